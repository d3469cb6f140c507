"""`python -m benchmarks.robustness.adapt_curve --data SITE_DIR`: how many of its own films a site
needs for `pneumoscan adapt`.

For each size N (`--sizes`, default 25 50 100 200) and each of `--draws` random draws, whole
patients are drawn from SITE_DIR until N films are in hand (both classes present); the bundled
model (or `--model`) is adapted on them by each method (`recalibrate`, `finetune`: the same code
as `pneumoscan adapt`, with its guards on the number of films left out, at adapt's default rule or
`--rule`) and scored on the films
of the other patients, beside the unadapted model on those same films. Prints a Markdown table
of the mean ± sd over draws of accuracy, sensitivity, specificity and ROC AUC.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from pneumoscan import metrics
from pneumoscan.adapt import ADAPT_RULE, fitter, site_films
from pneumoscan.bundle import Bundle
from pneumoscan.config import ThresholdRule
from pneumoscan.data import group_ids, inputs

NAMES = ("accuracy", "sensitivity", "specificity", "roc_auc")


def figures(labels: np.ndarray, probability: np.ndarray, threshold: float) -> list[float]:
    positive = (probability >= threshold).astype(int)
    return [
        metrics.accuracy(labels, positive),
        metrics.sensitivity(labels, positive),
        metrics.specificity(labels, positive),
        metrics.roc_auc(labels, probability),
    ]


def draw_patients(groups: np.ndarray, labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of whole patients, in random order, until `size` films (both classes present)."""
    while True:
        chosen: list[int] = []
        for group in rng.permutation(np.unique(groups)):
            if len(chosen) >= size:
                break
            chosen.extend(np.flatnonzero(groups == group).tolist())
        index = np.array(chosen)
        if len(set(labels[index].tolist())) == 2:
            return index


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, type=Path, help="the site's films: NORMAL/ and PNEUMONIA/")
    parser.add_argument("--model", default=None, help="run folder or bundle (default: the bundled model)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[25, 50, 100, 200], help="films to adapt on")
    parser.add_argument("--draws", type=int, default=3, help="random draws per size (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="the draws' seed (default 0)")
    parser.add_argument("--rule", default=ADAPT_RULE, help=f"threshold rule (default {ADAPT_RULE}, adapt's)")
    args = parser.parse_args()

    bundle = Bundle.load(args.model)
    samples = site_films(bundle, args.data, print)
    labels, groups = np.array([s.label for s in samples]), np.array(group_ids(samples))
    x = inputs(samples)
    raw = bundle.forward(x)
    parent = bundle.decision
    rule = ThresholdRule.parse(args.rule)
    rng = np.random.default_rng(args.seed)
    rows = []
    for size in args.sizes:
        results: dict[str, list[list[float]]] = {"unadapted": [], "recalibrate": [], "finetune": []}
        seconds = {"recalibrate": [], "finetune": []}
        for draw in range(args.draws):
            site = draw_patients(groups, labels, size, rng)
            rest = np.setdiff1d(np.arange(len(samples)), site)
            unadapted = parent.probabilities(raw[rest])
            results["unadapted"].append(figures(labels[rest], unadapted, parent.threshold))
            for method in ("recalibrate", "finetune"):
                start = time.perf_counter()
                fit = fitter(
                    method, bundle, x, labels, raw, rule, args.seed + draw, 32, lambda _: None, groups=groups
                )
                _, decision, _, raw_of = fit(site, scorer=True)
                probability = decision.probabilities(raw_of(rest))
                seconds[method].append(time.perf_counter() - start)
                results[method].append(figures(labels[rest], probability, decision.threshold))
        for method, values in results.items():
            table = np.array(values)
            cells = [f"{table[:, i].mean():.3f} ± {table[:, i].std(ddof=1):.3f}" for i in range(len(NAMES))]
            took = f"{np.mean(seconds[method]):.1f}" if method in seconds else ""
            rows.append(f"| {size} | {method} | {' | '.join(cells)} | {took} |")
        print(rows[-3:], flush=True)
    print(f"\n{len(samples)} site films; {args.draws} draws per size; scored on the other patients' films.\n")
    print(f"| site films | method | {' | '.join(NAMES)} | seconds |")
    print("|---|---|" + "---|" * (len(NAMES) + 1))
    print("\n".join(rows))


if __name__ == "__main__":
    main()
