"""Models and recipes measured on the selection set for the real shift (`chest_xray_shift_dev`).

    .venv/bin/python -m benchmarks.robustness.dev_report train --data ../shared/data/chest_xray \
        --out runs/dev --name zoom-in --seeds 1337 7 42 [--set augment.zoom_in=3.5 ...]
    .venv/bin/python -m benchmarks.robustness.dev_report score --dev ../shared/data/chest_xray_shift_dev \
        --train-data ../shared/data/chest_xray --models runs/dev/* src/pneumoscan/bundled \
        --baseline zoom-in --json dev.json

`train` is the seed loop: `pneumoscan.train.train` once per seed into OUT/NAME-sSEED, one after
the other, today's default configuration changed by each `--set KEY=VALUE` (dotted keys reach
`augment.` and `model.`; values are JSON); a finished run is kept, and the wall time recorded.

`score` runs every model (run folder or bundle, with the test-time copies its metadata names) on
the dev films and reports, for each: ROC AUC; sensitivity, specificity and accuracy at its
shipped operating point and at each `--rules` rule refitted on the model's own val (needs
`--train-data` and the model's splits.json); with `--single-pass`, each model with test-time
copies is also scored without them, as RECIPE+single-sSEED (its rule refitted on val); each
`--ensembles NAME=A,B` is the mean of the raw outputs of scored models that share their val
(runs of one seed), its calibration and rules refitted on that val; and per family (normal `IM`
and `NORMAL2-IM`: specificity; `bacterial` and `viral` pneumonia: sensitivity) at the shipped
point, with the family's AUC against the other class. Every interval is a 95% percentile
bootstrap over patients (1,000 resamples). Every model is scored on the same resamples of the
same films, so a difference between two models is paired.

Models named RECIPE-sSEED are pooled by recipe: the mean and sd over seeds of each figure, with
the interval of the mean (per-resample mean over seeds); `--baseline RECIPE` adds each recipe's
paired difference from it. These are selection-set figures: choosing among many variants on 314
films flatters the winner, so confirm a choice on seeds that took no part in it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time
from pathlib import Path

import numpy as np

from pneumoscan.metrics import percentile_interval as interval

N_RESAMPLES = 1000
BOOTSTRAP_SEED = 20181122
DEFAULT_RULES = ("youden", "sensitivity:0.95")
METRICS = ("roc_auc", "sensitivity", "specificity", "accuracy")
# Family of a film by its file name, and the figure that counts for it.
FAMILIES = {
    "IM": "specificity",
    "NORMAL2-IM": "specificity",
    "bacterial": "sensitivity",
    "viral": "sensitivity",
}
RUN_NAME = re.compile(r"^(?P<recipe>.+)-s(?P<seed>\d+)$")


def family(file_name: str) -> str:
    """`IM`, `NORMAL2-IM`, `bacterial`, `viral` or `other`, from a film's file name."""
    if file_name.startswith("NORMAL2-IM"):
        return "NORMAL2-IM"
    if file_name.startswith("IM-"):
        return "IM"
    if "bacteria" in file_name:
        return "bacterial"
    if "virus" in file_name:
        return "viral"
    return "other"


def recipe_of(name: str) -> tuple[str, int | None]:
    """("zoom-in", 7) for "zoom-in-s7"; (name, None) for a name without a seed."""
    match = RUN_NAME.match(name)
    return (match["recipe"], int(match["seed"])) if match else (name, None)


# --- the seed loop ---------------------------------------------------------------------------


def parse_setting(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise SystemExit(f"--set {text!r}: write KEY=VALUE (e.g. augment.zoom_in=3.5)")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value  # a bare string, e.g. val_design=random


def configured(seed: int, settings: list[tuple[str, object]]):
    """Today's default configuration for `seed`, resolved, with each setting applied."""
    from pneumoscan.config import DEFAULTS

    config = dataclasses.replace(DEFAULTS, random_seed=seed).resolved()
    blocks: dict[str, dict] = {"augment": {}, "model": {}, "": {}}
    for key, value in settings:
        block, _, field = key.rpartition(".")
        if block not in blocks:
            raise SystemExit(f"--set {key}: only augment.FIELD and model.FIELD are nested")
        blocks[block][field] = value
    for block in ("augment", "model"):
        if blocks[block]:
            blocks[""][block] = dataclasses.replace(getattr(config, block), **blocks[block])
    return dataclasses.replace(config, **blocks[""])


def train_seeds(
    data: Path, out: Path, name: str, seeds: list[int], settings: list[tuple[str, object]]
) -> None:
    from pneumoscan.train import train

    for seed in seeds:
        run_dir = out / f"{name}-s{seed}"
        start = time.perf_counter()
        train(configured(seed, settings), data, run_dir, log=lambda line: print(line, flush=True))
        seconds = time.perf_counter() - start
        (run_dir / "wall_seconds.txt").write_text(f"{seconds:.0f}\n")
        print(f"{run_dir}: {seconds:.0f} s", flush=True)


# --- scoring ---------------------------------------------------------------------------------


def dev_films(dev: Path, image_size: int) -> dict:
    """The dev films at one input size: inputs, labels, patient groups and families."""
    from pneumoscan.data import group_ids, inputs, scan

    found = scan(dev, image_size)
    if found.unreadable:
        raise SystemExit(f"{dev}: {len(found.unreadable)} unreadable file(s): {found.unreadable[:3]}")
    samples = found.samples
    return {
        "inputs": inputs(samples),
        "labels": np.array([s.label for s in samples]),
        "groups": np.array(group_ids(samples)),
        "families": np.array([family(s.path.name) for s in samples]),
        "files": [s.relpath for s in samples],
    }


def val_outputs(bundle, train_data: Path | None) -> tuple[np.ndarray, np.ndarray] | None:
    """(labels, raw outputs) of the model's own val, or None when it cannot be rebuilt (no
    `--train-data`, or no splits.json)."""
    from pneumoscan.evaluate import read_file_lists, select_samples, split_outputs

    file_lists = read_file_lists(bundle.folder)
    if train_data is None or file_lists is None:
        return None
    samples, _, _ = select_samples(bundle.metadata, train_data, "val", bundle.image_size, file_lists)
    return split_outputs(bundle, samples)


def refitted(labels: np.ndarray, raw: np.ndarray, rules: list[str]) -> dict[str, tuple[dict, float]]:
    """Calibration and threshold of each rule, fitted on val's labels and raw outputs."""
    from pneumoscan.calibrate import fit_operating_point
    from pneumoscan.config import ThresholdRule

    points = {}
    for rule in rules:
        fitted = fit_operating_point(labels, raw, ThresholdRule.parse(rule))
        points[rule] = (fitted["calibration"], float(fitted["threshold"]["value"]))
    return points


def without_copies(bundle):
    """The same model and metadata, less the test-time copies: the film alone."""
    import copy

    from pneumoscan.bundle import Bundle

    metadata = copy.deepcopy(bundle.metadata)
    metadata.pop("test_time", None)
    return Bundle(bundle.folder, bundle.model, metadata)


def model_outputs(
    path: Path, dev: Path, train_data: Path | None, rules: list[str], cache: dict, alone: bool = False
) -> dict:
    """One model's calibrated dev outputs at its shipped point and at each rule refitted on its
    val. `alone`: without its test-time copies, the shipped point its own rule refitted on val."""
    from pneumoscan.bundle import Bundle
    from pneumoscan.calibrate import apply_calibration

    bundle = Bundle.load(path)
    if alone:
        bundle = without_copies(bundle)
    if bundle.image_size not in cache:
        cache[bundle.image_size] = dev_films(dev, bundle.image_size)
    raw = bundle.forward(cache[bundle.image_size]["inputs"])
    val = val_outputs(bundle, train_data)
    if alone:
        own_rule = bundle.metadata["threshold"]["rule"]
        shipped = refitted(*val, [own_rule])[own_rule]
    else:
        shipped = (bundle.metadata["calibration"], bundle.threshold)
    points = {"shipped": shipped, **(refitted(*val, rules) if val is not None else {})}
    return {
        "raw": raw,
        "val": val,
        "points": {
            name: (apply_calibration(raw, cal), threshold) for name, (cal, threshold) in points.items()
        },
        "test_time": bool(bundle.metadata.get("test_time")),
        "best_epoch": bundle.metadata.get("training", {}).get("best_epoch"),
    }


def figures(films: dict, probs: np.ndarray, threshold: float, weights: np.ndarray) -> dict:
    """{figure: (point value, per-resample values)}: METRICS and each family's rate and AUC."""
    from pneumoscan.metrics import _weighted_metrics, roc_auc, sensitivity, specificity, summarize

    rates = {"sensitivity": sensitivity, "specificity": specificity}
    labels = films["labels"]
    point = summarize(labels, probs, threshold)
    draws = _weighted_metrics(labels, probs, threshold, weights)
    out = {m: (float(point[m]), np.asarray(draws[m], np.float64)) for m in METRICS}
    for name, rate in FAMILIES.items():
        members = films["families"] == name
        if not members.any():
            continue
        positive = bool(labels[members][0])
        keep = members | (labels == (0 if positive else 1))  # the family against the other class
        kept = _weighted_metrics(labels[keep], probs[keep], threshold, weights[:, keep])
        called = (probs[keep] >= threshold).astype(np.int64)
        out[f"{name} {rate}"] = (rates[rate](labels[keep], called), np.asarray(kept[rate], np.float64))
        out[f"{name} auc"] = (roc_auc(labels[keep], probs[keep]), np.asarray(kept["roc_auc"], np.float64))
    return out


def score(
    dev: Path,
    models: list[tuple[str, Path]],
    train_data: Path | None,
    rules: list[str],
    baseline: str | None,
    single: bool = False,
    ensembles: list[tuple[str, tuple[str, ...]]] = (),
) -> dict:
    from pneumoscan.metrics import _group_weights

    cache: dict = {}
    per_model: dict[str, dict] = {}
    table: dict = {"dev": str(dev), "resamples": N_RESAMPLES, "models": {}, "recipes": {}, "differences": {}}
    jobs = [(name, path, False) for name, path in models]
    if single:  # each model also without its copies, as RECIPE+single-sSEED
        jobs += [(_single_name(name), path, True) for name, path in models if _has_copies(path)]
    results, paths = {}, {}
    for name, path, alone in jobs:
        print(f"scoring {name} ({path})", file=sys.stderr, flush=True)
        results[name], paths[name] = model_outputs(path, dev, train_data, rules, cache, alone), str(path)
    for name, members in ensembles:
        results[name], paths[name] = (
            ensemble_outputs([results[m] for m in members], rules),
            " + ".join(members),
        )
    # The dev films are the same, in the same order, at every input size: one set of resamples.
    films = next(iter(cache.values()))
    weights = _group_weights(films["groups"], N_RESAMPLES, np.random.default_rng(BOOTSTRAP_SEED))
    table["n"] = {family_name: int((films["families"] == family_name).sum()) for family_name in FAMILIES}
    for name, result in results.items():
        per_model[name] = {
            point: figures(films, probs, threshold, weights)
            for point, (probs, threshold) in result["points"].items()
        }
        table["models"][name] = {
            "path": paths[name],
            "test_time_copies": result["test_time"],
            "best_epoch": result["best_epoch"],
            **{
                point: {
                    "threshold": result["points"][point][1],
                    **{fig: [v, *interval(d)] for fig, (v, d) in values.items()},
                }
                for point, values in per_model[name].items()
            },
        }
    recipes: dict[str, list[str]] = {}
    for name in per_model:
        recipes.setdefault(recipe_of(name)[0], []).append(name)
    for recipe, names in recipes.items():
        table["recipes"][recipe] = pooled([per_model[n] for n in names], names)
    if baseline is not None and baseline in recipes:
        base = [per_model[n] for n in recipes[baseline]]
        for recipe, names in recipes.items():
            if recipe != baseline:
                table["differences"][f"{recipe} - {baseline}"] = pooled(
                    [per_model[n] for n in names], names, minus=base
                )
    return table


def ensemble_outputs(members: list[dict], rules: list[str]) -> dict:
    """The mean of the members' raw outputs, on dev and on their shared val; the shipped point
    is today's default rule fitted on that val, and each rule likewise."""
    from pneumoscan.calibrate import apply_calibration
    from pneumoscan.config import DEFAULTS

    if any(m["val"] is None for m in members):
        raise SystemExit("an ensemble's members need their val (--train-data and splits.json)")
    labels = members[0]["val"][0]
    if any(not np.array_equal(m["val"][0], labels) for m in members):
        raise SystemExit("an ensemble's members must share their val split (one seed)")
    raw = np.mean([m["raw"] for m in members], axis=0)
    val_raw = np.mean([m["val"][1] for m in members], axis=0)
    default = str(DEFAULTS.threshold_rule)
    points = {"shipped": refitted(labels, val_raw, [default])[default], **refitted(labels, val_raw, rules)}
    return {
        "raw": raw,
        "val": (labels, val_raw),
        "points": {
            name: (apply_calibration(raw, cal), threshold) for name, (cal, threshold) in points.items()
        },
        "test_time": any(m["test_time"] for m in members),
        "best_epoch": None,
    }


def parse_ensemble(text: str) -> tuple[str, tuple[str, ...]]:
    """ "NAME=A,B" -> ("NAME", ("A", "B")); "A,B" names itself."""
    name, sep, members = text.partition("=")
    members = members if sep else name
    parts = tuple(members.split(","))  # not "+": the names of single-pass models hold one
    if len(parts) < 2 or not all(parts):
        raise SystemExit(f"--ensembles {text!r}: write NAME=A,B with A, B names of scored models")
    return (name if sep else members), parts


def _single_name(name: str) -> str:
    recipe, seed = recipe_of(name)
    return f"{recipe}+single" + ("" if seed is None else f"-s{seed}")


def _has_copies(path: Path) -> bool:
    return bool(json.loads((Path(path) / "metadata.json").read_text()).get("test_time"))


def pooled(results: list[dict], names: list[str], minus: list[dict] | None = None) -> dict:
    """Per operating point and figure: mean, sd over the members, and the interval of the mean
    (less `minus`'s mean, resample by resample: the films and resamples are the same)."""
    out: dict = {"members": names}
    points = set.intersection(*(set(r) for r in results + (minus or [])))
    for point in sorted(points):
        out[point] = {}
        for fig in results[0][point]:
            values = np.array([r[point][fig][0] for r in results])
            draws = np.mean([r[point][fig][1] for r in results], axis=0)
            if minus:
                values = values - np.mean([m[point][fig][0] for m in minus])
                draws = draws - np.mean([m[point][fig][1] for m in minus], axis=0)
            sd = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
            out[point][fig] = {"mean": float(values.mean()), "sd": sd, "ci95": interval(draws)}
    return out


def markdown(table: dict) -> str:
    columns = [*METRICS, *[f"{name} {rate}" for name, rate in FAMILIES.items()]]
    header = [
        "| model | point | threshold | " + " | ".join(columns) + " |",
        "|---|---|---|" + "---|" * len(columns),
    ]
    lines = ["### models", "", *header]
    for name, row in table["models"].items():
        for point in [p for p in row if isinstance(row[p], dict)]:
            cells = " | ".join(_cell(row[point].get(c)) for c in columns)
            lines.append(f"| {name} | {point} | {row[point]['threshold']:.3f} | {cells} |")
    for title, block in (("recipes (mean ± sd over seeds [95% interval of the mean])", table["recipes"]),
                         ("paired differences", table["differences"])):  # fmt: skip
        lines += ["", f"### {title}", "", "| recipe | point | " + " | ".join(columns) + " |",
                  "|---|---|" + "---|" * len(columns)]  # fmt: skip
        sign = "+" if block is table["differences"] else ""
        for name, row in block.items():
            for point in [p for p in row if p != "members"]:
                cells = " | ".join(_pooled_cell(row[point].get(c), sign) for c in columns)
                lines.append(f"| {name} ({len(row['members'])}) | {point} | {cells} |")
    return "\n".join(lines) + "\n"


def _cell(values: list[float] | None) -> str:
    return "" if values is None else f"{values[0]:.3f} [{values[1]:.3f}, {values[2]:.3f}]"


def _pooled_cell(values: dict | None, sign: str = "") -> str:
    if values is None:
        return ""
    low, high = values["ci95"]
    return f"{values['mean']:{sign}.3f} ± {values['sd']:.3f} [{low:{sign}.3f}, {high:{sign}.3f}]"


def model_arguments(items: list[str]) -> list[tuple[str, Path]]:
    """NAME=PATH, or PATH named by its folder (a bundle folder named `bundled` stays so)."""
    models = []
    for item in items:
        name, sep, path = item.partition("=")
        models.append((name, Path(path)) if sep else (Path(item).name, Path(item)))
    return models


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train_parser = commands.add_parser("train", help="the seed loop around pneumoscan's train")
    train_parser.add_argument("--data", type=Path, required=True)
    train_parser.add_argument("--out", type=Path, required=True)
    train_parser.add_argument("--name", required=True, help="the recipe's name; runs are NAME-sSEED")
    train_parser.add_argument("--seeds", nargs="+", type=int, required=True)
    train_parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="settings")
    score_parser = commands.add_parser("score", help="models on the dev films, pooled by recipe")
    score_parser.add_argument("--dev", type=Path, required=True)
    score_parser.add_argument("--models", nargs="+", required=True, metavar="[NAME=]PATH")
    score_parser.add_argument("--train-data", type=Path, help="the training folder: rules refitted on val")
    score_parser.add_argument("--rules", nargs="*", default=list(DEFAULT_RULES))
    score_parser.add_argument("--baseline", help="the recipe every other is compared with, paired")
    score_parser.add_argument(
        "--single-pass", action="store_true", help="also score each model without its test-time copies"
    )
    score_parser.add_argument(
        "--ensembles",
        nargs="*",
        default=[],
        metavar="NAME=A,B",
        help="also score the mean of these models' raw outputs (names as scored, +single ones "
        "included; members must share their val), calibration and rules refitted on that val",
    )
    score_parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.command == "train":
        settings = [parse_setting(s) for s in args.settings]
        train_seeds(args.data, args.out, args.name, args.seeds, settings)
        return 0
    if args.single_pass and args.train_data is None:
        parser.error("--single-pass refits each model's rule on its val: it needs --train-data")
    models = model_arguments(args.models)
    ensembles = [parse_ensemble(e) for e in args.ensembles]
    table = score(args.dev, models, args.train_data, args.rules, args.baseline, args.single_pass, ensembles)
    if args.json:
        args.json.write_text(json.dumps(table, indent=1))
    print(markdown(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
