"""Training changes measured on the acquisition validation design, with paired intervals.

    .venv/bin/python -m benchmarks.robustness.acquisition_val_design train --data ../shared/data/chest_xray \
        --out runs/shift --variants baseline reweight --seeds 1337 7
    .venv/bin/python -m benchmarks.robustness.acquisition_val_design train --data ../shared/data/chest_xray \
        --out runs/shift --variants drop-suspects --seeds 1337 7 --suspects label_noise.json
    .venv/bin/python -m benchmarks.robustness.acquisition_val_design report --data ../shared/data/chest_xray \
        --runs runs/shift --baseline baseline --json acquisition_val_design.json

`train` runs `pneumoscan.train.train` once per variant and seed (`VARIANTS`: changes to the
default configuration) into OUT/VARIANT-sSEED, one after the other; a finished run is kept.
The seed also draws the split, so the variants of one seed share train, val and internal-test.

`report` scores every run on its own shifted internal-test (rebuilt from its splits.json), and
each `--ensembles A+B` (the mean of the raw outputs of variants A and B of one seed):
ROC AUC, and sensitivity, specificity and accuracy at the run's shipped operating point
(calibration and threshold from its shifted val) and at each rule of `RULES` refitted on that
val. Accuracy is also given at the held-out split's class mix (234 NORMAL : 390 PNEUMONIA,
`held_out_accuracy`), which is what an estimate of the held-out accuracy must be compared with.
Intervals: 95% percentile bootstrap over patients (1,000 resamples, the same ones for every
variant of a seed, so a difference between two variants is paired); a variant's pooled figure is
the mean over seeds, its interval from the mean of per-seed resamples.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

from pneumoscan.metrics import percentile_interval as interval

HELD_OUT_MIX = (234, 390)  # NORMAL, PNEUMONIA of the held-out official test split
RULES = ("youden", "sensitivity:0.95")
N_RESAMPLES = 1000
METRICS = ("roc_auc", "sensitivity", "specificity", "accuracy", "held_out_accuracy")

# Changes to the default configuration (pneumoscan.config.DEFAULTS); "augment" and "model" are
# merged into the recipe's augmentation and architecture. "baseline" and the acquisition
# augmentations were measured before reweighting became the default, and keep it off;
# "reweight" is today's default, and the later variants change it. `exclude_files: SUSPECTS`
# takes the suspects of `train --suspects`.
# Every variant was measured on the film alone, before test-time copies became the default
# (`variant_config` keeps them off; benchmarks/robustness/tta_design.py measures them on these runs).
SUSPECTS = "suspects"
ACQUISITION_AUG = {"gamma": 0.3, "detail": 0.7, "noise": 4.0, "text_stamps": 0.3, "erase": 0.25}
VARIANTS: dict[str, dict] = {
    "baseline": {"acquisition_reweight": 0.0},
    "acquisition-aug": {"acquisition_reweight": 0.0, "augment": ACQUISITION_AUG},
    "acquisition-aug-strong": {
        "acquisition_reweight": 0.0,
        "augment": {"gamma": 0.5, "detail": 1.0, "noise": 8.0, "text_stamps": 0.5, "erase": 0.5},
    },
    "reweight": {"acquisition_reweight": 1.0},
    "mixup": {"mixup": 0.2},
    "weight-average": {"weight_average_momentum": 0.995},
    "drop-suspects": {"exclude_files": SUSPECTS},
    "standardise": {"model": {"standardise_input": True}},
}


def variant_config(name: str, seed: int, suspects: tuple[str, ...] = ()):
    from pneumoscan.config import DEFAULTS

    changes = dict(VARIANTS[name])
    config = dataclasses.replace(DEFAULTS, random_seed=seed, test_time_shift=0.0).resolved()
    for block in ("augment", "model"):
        if block in changes:
            changes[block] = dataclasses.replace(getattr(config, block), **changes[block])
    if changes.get("exclude_files") == SUSPECTS:
        if not suspects:
            raise SystemExit(
                f"variant {name} needs --suspects (the JSON of benchmarks/robustness/label_noise.py)"
            )
        changes["exclude_files"] = suspects
    return dataclasses.replace(config, **changes)


def train_all(
    data: Path, out: Path, variants: list[str], seeds: list[int], suspects: tuple[str, ...] = ()
) -> None:
    from pneumoscan.train import train

    for seed in seeds:
        for name in variants:
            run_dir = out / f"{name}-s{seed}"
            start = time.perf_counter()
            config = variant_config(name, seed, suspects)
            train(config, data, run_dir, log=lambda line: print(line, flush=True))
            seconds = time.perf_counter() - start
            (run_dir / "wall_seconds.txt").write_text(f"{seconds:.0f}\n")
            print(f"{run_dir}: {seconds:.0f} s", flush=True)


def outputs_of(run_dir: Path, data: Path, copies=None) -> dict:
    """Raw outputs of one run on its val and internal-test, and its shipped operating point.

    `copies`, a function from one model input to a dict of k copies of it, adds each split's
    raw outputs of every film's copies, (n, k), as "copies"."""
    from pneumoscan.bundle import Bundle
    from pneumoscan.data import group_ids, inputs
    from pneumoscan.evaluate import read_file_lists, select_samples, split_outputs

    bundle = Bundle.load(run_dir)
    outputs = {}
    for split in ("val", "internal-test"):
        samples, _, _ = select_samples(
            bundle.metadata, data, split, bundle.image_size, read_file_lists(bundle.folder)
        )
        labels, raw = split_outputs(bundle, samples)
        outputs[split] = {"labels": labels, "raw": raw, "groups": np.array(group_ids(samples))}
        if copies is not None:
            moved = np.stack([c for x in inputs(samples) for c in copies(x).values()])
            outputs[split]["copies"] = bundle.forward(moved).reshape(len(samples), -1)
    return {
        **outputs,
        "shipped": (bundle.metadata["calibration"], bundle.threshold),
        "design": bundle.metadata["data"]["rule"].get("design", "random"),
        "epochs": bundle.metadata.get("training", {}).get("best_epoch"),
    }


def ensemble_of(members: list[dict]) -> dict:
    """The outputs of the mean of the members' raw outputs (runs of one seed, so one split);
    its shipped point is the default rule fitted on val."""
    from pneumoscan.calibrate import fit_operating_point
    from pneumoscan.config import DEFAULTS

    outputs = {}
    for split in ("val", "internal-test"):
        first = members[0][split]
        if any(not np.array_equal(m[split]["labels"], first["labels"]) for m in members):
            raise SystemExit("an ensemble's members must share their splits (one seed)")
        outputs[split] = {**first, "raw": np.mean([m[split]["raw"] for m in members], axis=0)}
    fitted = fit_operating_point(outputs["val"]["labels"], outputs["val"]["raw"], DEFAULTS.threshold_rule)
    return {
        **outputs,
        "shipped": (fitted["calibration"], fitted["threshold"]["value"]),
        "design": members[0]["design"],
        "epochs": None,
    }


def scores(outputs: dict) -> dict:
    """A run's (or ensemble's) internal-test labels and calibrated outputs at each operating
    point: the shipped one, and each rule of `RULES` refitted on its val."""
    from pneumoscan.calibrate import apply_calibration, fit_operating_point
    from pneumoscan.config import ThresholdRule

    points = {"shipped": outputs["shipped"]}
    val, test = outputs["val"], outputs["internal-test"]
    for rule in RULES:
        fitted = fit_operating_point(val["labels"], val["raw"], ThresholdRule.parse(rule))
        points[rule] = (fitted["calibration"], fitted["threshold"]["value"])
    return {
        "labels": test["labels"],
        "groups": test["groups"],
        "points": {
            name: (apply_calibration(test["raw"], calibration), float(threshold))
            for name, (calibration, threshold) in points.items()
        },
        "design": outputs["design"],
        "epochs": outputs["epochs"],
    }


def resampled(labels: np.ndarray, probs: np.ndarray, threshold: float, weights: np.ndarray) -> dict:
    """Point estimates and per-resample values of METRICS."""
    from pneumoscan.metrics import _weighted_metrics, summarize

    point = summarize(labels, probs, threshold)
    samples = _weighted_metrics(labels, probs, threshold, weights)
    normal, pneumonia = HELD_OUT_MIX
    for values in (point, samples):
        values["held_out_accuracy"] = (normal * values["specificity"] + pneumonia * values["sensitivity"]) / (
            normal + pneumonia
        )
    return {m: (float(point[m]), np.asarray(samples[m], np.float64)) for m in METRICS}


def pooled(results: list[dict], minus: list[dict] | None = None) -> dict:
    """Mean over seeds of each metric (less `minus`'s, seed by seed) with its interval."""
    out = {}
    for m in METRICS:
        points = [r[m][0] - (minus[i][m][0] if minus else 0.0) for i, r in enumerate(results)]
        draws = [r[m][1] - (minus[i][m][1] if minus else 0.0) for i, r in enumerate(results)]
        out[m] = [float(np.mean(points)), *interval(np.mean(draws, axis=0))]
    return out


def report(data: Path, runs: Path, baseline: str, ensembles: list[str] = ()) -> dict:
    """Every run of `runs`, and each ensemble ("A+B": the mean of variants A and B of a seed)
    for the seeds that have all its members."""
    from pneumoscan.metrics import _group_weights

    found: dict[tuple[str, int], Path] = {}
    for run_dir in sorted(runs.iterdir()):
        if (run_dir / "metadata.json").is_file() and "-s" in run_dir.name:
            name, seed = run_dir.name.rsplit("-s", 1)
            found[name, int(seed)] = run_dir
    seeds = sorted({seed for _, seed in found})
    table: dict = {"runs": {}, "variants": {}, "differences": {}}
    per_seed: dict[int, dict[str, dict]] = {}
    for seed in seeds:
        names = [name for name, s in found if s == seed]
        outputs = {name: outputs_of(found[name, seed], data) for name in names}
        for ensemble in ensembles:
            if all(member in outputs for member in ensemble.split("+")):
                outputs[ensemble] = ensemble_of([outputs[member] for member in ensemble.split("+")])
        scored = {name: scores(result) for name, result in outputs.items()}
        groups = next(iter(scored.values()))["groups"]
        weights = _group_weights(groups, N_RESAMPLES, np.random.default_rng(seed))
        per_seed[seed] = {}
        for name, result in scored.items():
            per_seed[seed][name] = {
                point: resampled(result["labels"], probs, threshold, weights)
                for point, (probs, threshold) in result["points"].items()
            }
            table["runs"][f"{name}-s{seed}"] = {
                "design": result["design"],
                "best_epoch": result["epochs"],
                "n": {"NORMAL": int((result["labels"] == 0).sum()), "PNEUMONIA": int(result["labels"].sum())},
                **{
                    point: {
                        "threshold": result["points"][point][1],
                        **{m: [v, *interval(s)] for m, (v, s) in values.items()},
                    }
                    for point, values in per_seed[seed][name].items()
                },
            }
    for name in sorted({name for results in per_seed.values() for name in results}):
        mine = [per_seed[s][name] for s in seeds if name in per_seed[s]]
        table["variants"][name] = {
            "seeds": [s for s in seeds if name in per_seed[s]],
            **{point: pooled([r[point] for r in mine]) for point in mine[0]},
        }
        paired = [s for s in seeds if name in per_seed[s] and baseline in per_seed[s]]
        if name == baseline or not paired:
            continue
        table["differences"][f"{name} - {baseline}"] = {
            "seeds": paired,
            **{
                point: pooled(
                    [per_seed[s][name][point] for s in paired], [per_seed[s][baseline][point] for s in paired]
                )
                for point in per_seed[paired[0]][name]
            },
        }
    return table


def markdown(table: dict) -> str:
    def cell(values: list[float], sign: str = "") -> str:
        return f"{values[0]:{sign}.3f} [{values[1]:{sign}.3f}, {values[2]:{sign}.3f}]"

    header = ["| run | operating point | " + " | ".join(METRICS) + " |", "|---|---|" + "---|" * len(METRICS)]
    lines = []
    blocks = (
        ("runs", table["runs"], ""),
        ("variants (mean over seeds)", table["variants"], ""),
        ("paired differences (mean over seeds)", table["differences"], "+"),
    )
    for title, block, sign in blocks:
        lines += [f"### {title}", "", *header]
        for name, row in block.items():
            for point in ("shipped", *RULES):
                cells = " | ".join(cell(row[point][m], sign) for m in METRICS)
                lines.append(f"| {name} | {point} | {cells} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train_parser = commands.add_parser("train")
    train_parser.add_argument("--data", type=Path, required=True)
    train_parser.add_argument("--out", type=Path, required=True)
    train_parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=["baseline"])
    train_parser.add_argument("--seeds", nargs="+", type=int, default=[1337])
    train_parser.add_argument(
        "--suspects",
        type=Path,
        help="JSON of benchmarks/robustness/label_noise.py, for the drop-suspects variant",
    )
    report_parser = commands.add_parser("report")
    report_parser.add_argument("--data", type=Path, required=True)
    report_parser.add_argument("--runs", type=Path, required=True)
    report_parser.add_argument("--baseline", default="baseline")
    report_parser.add_argument("--json", type=Path)
    report_parser.add_argument(
        "--ensembles", nargs="*", default=[], metavar="A+B", help="also score the mean of these variants"
    )
    args = parser.parse_args(argv)
    if args.command == "train":
        from pneumoscan.config import read_file_list

        suspects = read_file_list(args.suspects) if args.suspects else ()
        train_all(args.data, args.out, args.variants, args.seeds, suspects)
        return 0
    table = report(args.data, args.runs, args.baseline, args.ensembles)
    if args.json:
        args.json.write_text(json.dumps(table, indent=1) + "\n")
    print(markdown(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
