"""The evaluation report: `pneumoscan evaluate ... --out REPORT_DIR`.

REPORT_DIR receives `metrics.json`, PNG plots (roc, pr, confusion_matrix, reliability,
training_curves when the model folder has `history.csv`, errors) and one self-contained
`report.html` with every image inlined.
"""

from __future__ import annotations

import base64
import contextlib
import csv
import html
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pneumoscan import run_folder
from pneumoscan.atomic import write_bytes_atomic, write_json_atomic
from pneumoscan.evaluate import COLLAPSED, INTERVALS, Evaluation
from pneumoscan.metadata import digest as metadata_digest
from pneumoscan.metrics import CI_METRICS, collapsed, interval_counts
from pneumoscan.preprocess import ImageError, load_grayscale

ERRORS_PER_KIND = 8
FILMS_LISTED = 24  # of each kind in the report's list of films to look at


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def roc_points(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false positive rate, true positive rate) at every distinct threshold, from (0, 0)."""
    order = np.argsort(-probs, kind="mergesort")
    labels, probs = labels[order], probs[order]
    last = np.r_[np.nonzero(np.diff(probs))[0], labels.size - 1]
    tp, fp = np.cumsum(labels)[last], np.cumsum(1 - labels)[last]
    return np.r_[0, fp / max(fp[-1], 1)], np.r_[0, tp / max(tp[-1], 1)]


def _plot_roc(ev: Evaluation, path: Path) -> None:
    plt = _figure()
    fpr, tpr = roc_points(ev.labels, ev.probabilities)
    r = ev.result
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot(fpr, tpr, lw=2, label=f"AUC {_fmt(r['roc_auc'])} {_ci(r, 'roc_auc')}")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    if r["specificity"] is not None and r["sensitivity"] is not None:
        ax.plot(
            1 - r["specificity"], r["sensitivity"], "o", c="crimson", label=f"threshold {r['threshold']:.3f}"
        )
    ax.set(
        xlabel="1 - specificity", ylabel="sensitivity", title=f"ROC ({ev.split})", xlim=(0, 1), ylim=(0, 1.01)
    )
    ax.legend(loc="lower right")
    _save(fig, path)


def _plot_pr(ev: Evaluation, path: Path) -> None:
    plt = _figure()
    order = np.argsort(-ev.probabilities, kind="mergesort")
    hits = ev.labels[order]
    tp = np.cumsum(hits)
    precision, recall = tp / np.arange(1, hits.size + 1), tp / max(hits.sum(), 1)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot(recall, precision, lw=2, label=f"AP {_fmt(ev.result['pr_auc'])} {_ci(ev.result, 'pr_auc')}")
    ax.axhline(ev.labels.mean() if ev.labels.size else 0, ls="--", c="grey", lw=1, label="prevalence")
    ax.set(
        xlabel="sensitivity (recall)",
        ylabel="precision (PPV)",
        title=f"Precision-recall ({ev.split})",
        xlim=(0, 1),
        ylim=(0, 1.01),
    )
    ax.legend(loc="lower left")
    _save(fig, path)


def _plot_confusion(ev: Evaluation, path: Path) -> None:
    plt = _figure()
    cm = ev.result["confusion_matrix"]
    grid = np.array([[cm["tn"], cm["fp"]], [cm["fn"], cm["tp"]]])
    fig, ax = plt.subplots(figsize=(4, 3.6))
    ax.imshow(grid, cmap="Blues")
    for (i, j), value in np.ndenumerate(grid):
        ax.text(
            j,
            i,
            str(value),
            ha="center",
            va="center",
            fontsize=14,
            color="white" if value > grid.max() / 2 else "black",
        )
    ax.set(
        xticks=[0, 1],
        yticks=[0, 1],
        xticklabels=["NORMAL", "PNEUMONIA"],
        yticklabels=["NORMAL", "PNEUMONIA"],
        xlabel="predicted",
        ylabel="true",
        title=f"Confusion matrix at {ev.result['threshold']:.3f}",
    )
    _save(fig, path)


def _plot_reliability(ev: Evaluation, path: Path, bins: int = 15) -> None:
    plt = _figure()
    edges = np.linspace(0, 1, bins + 1)
    index = np.clip(np.digitize(ev.probabilities, edges[1:-1]), 0, bins - 1)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    for b in range(bins):
        members = index == b
        if members.any():
            fraction = ev.labels[members].mean()
            ax.bar(
                edges[b],
                fraction,
                width=1 / bins,
                align="edge",
                alpha=0.6,
                edgecolor="k",
                color="tab:blue",
            )
            # How many films each bar rests on: a bar of 2 films says little.
            ax.text(
                edges[b] + 0.5 / bins,
                min(fraction, 0.93) + 0.015,
                str(int(members.sum())),
                ha="center",
                fontsize=6,
            )
    ax.set(
        xlabel="calibrated probability of pneumonia",
        ylabel="fraction with pneumonia",
        title=f"Reliability (ECE {_fmt(ev.result['ece'])}; films per bar above it)",
        xlim=(0, 1),
        ylim=(0, 1),
    )
    _save(fig, path)


def _plot_history(history: Path, path: Path) -> bool:
    with open(history) as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        return False
    plt = _figure()
    epochs = [int(r["epoch"]) for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, metric in zip(axes, ("loss", "auc"), strict=True):
        for prefix, style in (("", "-"), ("val_", "--")):
            values = [float(r[prefix + metric]) for r in rows if r.get(prefix + metric)]
            if values:
                ax.plot(epochs[: len(values)], values, style, marker="o", label=prefix + metric)
        ax.set(xlabel="epoch", title=metric)
        ax.legend()
    _save(fig, path)
    return True


def _plot_errors(ev: Evaluation, path: Path) -> int:
    """Grid of the most confident false positives and false negatives."""
    threshold = ev.result["threshold"]
    p, y = ev.probabilities, ev.labels
    fp = [i for i in np.argsort(-p) if y[i] == 0 and p[i] >= threshold][:ERRORS_PER_KIND]
    fn = [i for i in np.argsort(p) if y[i] == 1 and p[i] < threshold][:ERRORS_PER_KIND]
    chosen = [("false positive", i) for i in fp] + [("false negative", i) for i in fn]
    if not chosen:
        return 0
    plt = _figure()
    cols = min(4, len(chosen))
    rows = -(-len(chosen) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.9 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (kind, i) in zip(axes.flat, chosen, strict=False):  # the grid may have spare cells
        with contextlib.suppress(ImageError):  # a file removed since; its title still names it
            ax.imshow(load_grayscale(ev.samples[i].path), cmap="gray")
        ax.set_title(f"{kind}\np={p[i]:.3f} {Path(ev.samples[i].relpath).name[:22]}", fontsize=7)
    _save(fig, path)
    return len(chosen)


def _save(fig, path: Path) -> None:
    import io

    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=110)
    _figure().close(fig)
    write_bytes_atomic(path, buffer.getvalue())


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _ci(result: dict, name: str) -> str:
    lo, hi = result["ci95"].get(name, [None, None])
    return f"[{_fmt(lo)}, {_fmt(hi)}]" + ("*" if collapsed(result["ci95"].get(name)) else "")


def flagged_films(ev: Evaluation) -> list[int]:
    """Indices of the films the model's out-of-distribution rule flags, by `predict`'s verdict
    on each (a second pass over the films, for the report only); none for a model without
    the rule."""
    if not ev.metadata.get("ood"):
        return []
    from pneumoscan.bundle import Bundle
    from pneumoscan.predict import verdicts

    found = verdicts(Bundle.load(ev.model_dir), [sample.path for sample in ev.samples])
    return [i for i, (_, error, _, verdict) in enumerate(found) if not error and verdict.ood]


def films_to_look_at(ev: Evaluation, flagged: Sequence[int] = ()) -> list[tuple[int, str]]:
    """(index, why) of the films a reader should see: those `flagged` as not chest X-rays,
    the errors at the model's threshold, most confident first, then the borderline ones
    (inside the model's band), FILMS_LISTED of each at most."""
    from pneumoscan.calibrate import in_band

    threshold, p, y = ev.result["threshold"], ev.probabilities, ev.labels
    fp = [(int(i), "false positive") for i in np.argsort(-p) if y[i] == 0 and p[i] >= threshold]
    fn = [(int(i), "false negative") for i in np.argsort(p) if y[i] == 1 and p[i] < threshold]
    band = ev.metadata.get("borderline")
    inside = (
        []
        if not band
        else [(int(i), "borderline") for i in np.argsort(p) if in_band(p[i], band["low"], band["high"])]
    )
    ood = [(int(i), "flagged: not a chest X-ray?") for i in flagged]
    return ood[:FILMS_LISTED] + fp[:FILMS_LISTED] + fn[:FILMS_LISTED] + inside[:FILMS_LISTED]


def _thumbnail(path: Path, side: int = 96) -> str:
    """A film as an inline PNG of `side` pixels on its longer side; "" when it cannot be read."""
    import io

    from PIL import Image

    try:
        image = Image.fromarray(load_grayscale(path))
    except ImageError:
        return ""
    image.thumbnail((side, side))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    data = base64.b64encode(buffer.getvalue()).decode()
    return f"<img alt='' width='{image.width}' src='data:image/png;base64,{data}'>"


def _films_html(ev: Evaluation) -> str:
    names = ev.metadata["class_names"]
    rows = "".join(
        f"<tr><td>{_thumbnail(ev.samples[i].path)}</td><td>{html.escape(ev.samples[i].relpath)}</td>"
        f"<td>{names[int(ev.labels[i])]}</td><td>{ev.probabilities[i]:.3f}</td><td>{why}</td></tr>"
        for i, why in films_to_look_at(ev, flagged_films(ev))
    )
    if not rows:
        return "<p>No flagged, wrong or borderline films at the model's threshold.</p>"
    header = "".join(f"<th>{name}</th>" for name in ("film", "file", "truth", "p(pneumonia)", "why"))
    return f"<table><tr>{header}</tr>{rows}</table>"


def write_report(out_dir: Path, ev: Evaluation, data: Path) -> list[str]:
    """Write every report file; returns their names."""
    meta = ev.metadata
    context = {
        "model": str(ev.model_dir),
        "arch": meta["arch"],
        "data": str(data),
        "split": ev.split,
        "threshold_rule": meta["threshold"]["rule"],
        "threshold_split": meta["threshold"].get("split"),
        "calibration": meta["calibration"]["method"],
        "model_digest": metadata_digest(ev.model_dir),  # sha256 of its metadata.json: which model
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    intervals = {"method": INTERVALS, "n": interval_counts(ev.result["confusion_matrix"])}
    write_json_atomic(
        out_dir / "metrics.json", {**ev.result, "context": context, "notes": ev.notes, "intervals": intervals}
    )
    plots = {
        "roc.png": _plot_roc,
        "pr.png": _plot_pr,
        "confusion_matrix.png": _plot_confusion,
        "reliability.png": _plot_reliability,
    }
    for name, plot in plots.items():
        plot(ev, out_dir / name)
    written = ["metrics.json", *plots]
    history = Path(context["model"]) / run_folder.HISTORY
    if history.is_file() and _plot_history(history, out_dir / "training_curves.png"):
        written.append("training_curves.png")
    if _plot_errors(ev, out_dir / "errors.png"):
        written.append("errors.png")
    html_text = _html(out_dir, ev, context, written)  # a file name that is not UTF-8 shows as \udcXX
    write_bytes_atomic(out_dir / "report.html", html_text.encode(errors="backslashreplace"))
    return [*written, "report.html"]


def _figure_html(png: Path) -> str:
    """One plot inlined as a data: URL, captioned with its name."""
    caption = png.stem.replace("_", " ")
    data = base64.b64encode(png.read_bytes()).decode()
    image = f"<img alt='{caption}' src='data:image/png;base64,{data}'>"
    return f"<figure>{image}<figcaption>{caption}</figcaption></figure>"


def _html(out_dir: Path, ev: Evaluation, context: dict, files: list[str]) -> str:
    r = ev.result
    counts = interval_counts(r["confusion_matrix"])
    rows = "".join(
        f"<tr><td>{name}</td><td>{_fmt(r[name])}</td><td>{_ci(r, name) if name in r['ci95'] else ''}</td>"
        f"<td>{counts.get(name, '')}</td><td>{_fmt(r['at_0_5'][name])}</td></tr>"
        for name in (*CI_METRICS, "brier", "ece")
    )
    images = "".join(_figure_html(out_dir / name) for name in files if name.endswith(".png"))
    # What makes every figure optimistic (films seen in training, a threshold chosen on them)
    # comes first, above the table; the other notes follow it.
    warned = [n for n in ev.notes if n.startswith("warning:")]
    top = "".join(f"<p class='warning'><b>{html.escape(n)}</b></p>" for n in warned)
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in ev.notes if n not in warned) or "<li>none</li>"
    collapsed_note = f"<p>{html.escape(COLLAPSED)}</p>" if "*" in rows else ""
    cm = r["confusion_matrix"]
    model = html.escape(str(context["model"]))
    viewport = '<meta name="viewport" content="width=device-width, initial-scale=1">'
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">{viewport}
<title>pneumoscan evaluation: {html.escape(ev.split)}</title>
<style>body{{font-family:system-ui,sans-serif;max-width:70rem;margin:2rem auto;padding:0 1rem;color:#1b1f24}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccd;padding:.3rem .6rem;text-align:right}}
td:first-child,th:first-child{{text-align:left}}figure{{display:inline-block;margin:.5rem}}
img{{max-width:100%}}pre{{background:#f4f6f8;padding:.8rem;overflow:auto}}
.warning{{background:#fff8e6;border-left:6px solid #e0b100;padding:.5rem .8rem}}</style></head><body>
<h1>pneumoscan evaluation</h1>
{top}
<p>Split <b>{html.escape(ev.split)}</b>: {r["n"]} images. Model <code>{model}</code>
({html.escape(context["arch"])}, metadata.json SHA-256
<code>{context["model_digest"][:16]}</code>), threshold {r["threshold"]:.4f}
({html.escape(context["threshold_rule"])},
chosen on {html.escape(str(context["threshold_split"]))}). Probabilities are calibrated
({html.escape(context["calibration"])}).</p>
<p>Research software, not a medical device.</p>
<h2>Metrics</h2>
<table><tr><th>metric</th><th>value</th><th>95% CI</th><th>n</th><th>at 0.5</th></tr>{rows}</table>
<p>{html.escape(INTERVALS)}</p>{collapsed_note}
<p>Confusion matrix: TN {cm["tn"]}, FP {cm["fp"]}, FN {cm["fn"]}, TP {cm["tp"]}.</p>
<h2>Films to look at</h2>{_films_html(ev)}
<h2>Notes</h2><ul>{notes}</ul>
<h2>Plots</h2>{images}
<h2>metrics.json</h2><pre>{html.escape(json.dumps(r, indent=1))}</pre>
</body></html>
"""
