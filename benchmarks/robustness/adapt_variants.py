"""`python -m benchmarks.robustness.adapt_variants --data SITE_DIR`: fine-tuning choices of
`pneumoscan adapt`, cross-fitted on a site's films over several fold seeds.

For each fold seed (`--seeds`, default 0 1 2) the films are dealt by patient into 5 folds (as
`adapt` deals them; `--stratified` by class); for each fold the model is fine-tuned on the other
folds with `adapt.finetune` (`--freeze-bn`, `--replay DIR`) for the largest of `--epochs`, and
after each of `--epochs` epochs its weights, rounded as the bundle ships them, score every film.
Then, per number of epochs and per threshold rule (`--rules`), the decision is fitted on the
training folds' films (`fit_decision`, as `adapt` fits it) and applied to the held-out fold; the
pooled out-of-fold answers give accuracy, sensitivity, specificity and ROC AUC. `--select`
adds the epochs chosen inside each training fold (`adapt.choose_epochs`); `--wise A...` also
scores, after each of `--epochs`, the weights A * fine-tuned + (1 - A) * parent's (every weight,
batch-norm statistics included; one model, as a bundle would ship it), kind `EwA`; with
`--head K` also toward the parent whose output layer is refitted on the training folds as
`adapt_head`'s head-K (kind `EwAhK`), and with `--lpft` fine-tuned from that parent (and
pulled toward it; kind `ElpK`). `--members M`: M fine-tunes per fold (fine-tune seeds S,
S + 1000, ...; the first is kind `E`, the others `EmJ`) and their weights averaged (`Esoup`).
Prints a Markdown table of the mean ± sd over fold seeds, `recalibrate` (weights kept) beside
it, and the seconds per fold seed; `--save FILE.npz` keeps every out-of-fold raw output for later
analysis.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from pneumoscan import adapt as adapt_mod
from pneumoscan import metrics
from pneumoscan.bundle import Bundle
from pneumoscan.config import ThresholdRule
from pneumoscan.data import group_ids, inputs
from pneumoscan.decision import fit_decision
from pneumoscan.export import round_as_shipped

NAMES = ("accuracy", "sensitivity", "specificity", "roc_auc")


def out_of_fold(labels, raw_by_fold, fold_of, rule, parent):
    """Pooled out-of-fold (probability, positive): each fold's decision fitted on the others'
    films with their raw outputs from the model made without that fold."""
    probability, positive = np.zeros(len(labels)), np.zeros(len(labels), dtype=bool)
    for k, raw in enumerate(raw_by_fold):
        train, held = np.flatnonzero(fold_of != k), np.flatnonzero(fold_of == k)
        decision, _ = fit_decision(labels[train], raw[train], rule, current=parent, split="site")
        probability[held] = decision.probabilities(raw[held])
        positive[held] = probability[held] >= decision.threshold
    return probability, positive


def figures(labels, probability, positive):
    yes = positive.astype(int)
    return [
        metrics.accuracy(labels, yes),
        metrics.sensitivity(labels, yes),
        metrics.specificity(labels, yes),
        metrics.roc_auc(labels, probability),
    ]


def print_table(first: str, results: dict) -> None:
    """A Markdown table of {(kind, rule): [figures per fold seed]}: mean ± sd over fold seeds."""
    print(f"| {first} | rule | {' | '.join(NAMES)} |")
    print("|---|---|" + "---|" * len(NAMES))
    for (kind, rule), values in results.items():
        table = np.array(values)
        spread = table.std(axis=0, ddof=1) if len(table) > 1 else np.zeros(len(NAMES))
        cells = [f"{m:.3f} ± {s:.3f}" for m, s in zip(table.mean(axis=0), spread, strict=True)]
        print(f"| {kind} | {rule} | {' | '.join(cells)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, type=Path, help="the site's films: NORMAL/ and PNEUMONIA/")
    parser.add_argument("--model", default=None, help="run folder or bundle (default: the bundled model)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="fold seeds")
    parser.add_argument("--epochs", type=int, nargs="+", default=[6], help="epochs scored")
    parser.add_argument("--rules", nargs="+", default=None, help="threshold rules (default: the model's)")
    parser.add_argument("--freeze-bn", action="store_true", help="batch-norm in inference mode")
    parser.add_argument("--stratified", action="store_true", help="class-stratified patient folds")
    parser.add_argument("--replay", type=Path, default=None, help="films of the original training data")
    parser.add_argument("--select", action="store_true", help="also the epochs chosen per training fold")
    parser.add_argument("--wise", type=float, nargs="*", default=[], help="weight interpolations A")
    parser.add_argument("--head", type=int, default=None, help="--wise also toward the parent with head-K")
    parser.add_argument("--lpft", action="store_true", help="also fine-tune from the parent with head-K")
    parser.add_argument("--members", type=int, default=1, help="fine-tunes per fold (seeds S + 1000 j)")
    parser.add_argument("--save", type=Path, default=None, help="keep the out-of-fold raw outputs (.npz)")
    args = parser.parse_args()

    bundle = Bundle.load(args.model)
    samples = adapt_mod.site_films(bundle, args.data, print)
    labels, groups = np.array([s.label for s in samples]), np.array(group_ids(samples))
    x = inputs(samples)
    raw = bundle.forward(x)
    parent = bundle.decision
    rules = [ThresholdRule.parse(r) for r in (args.rules or [parent.threshold_block["rule"]])]
    quantize = adapt_mod.shipped_quantize(bundle.metadata)
    replay = adapt_mod.load_replay(bundle, args.replay, print) if args.replay else None
    parent_weights = bundle.model.get_weights()
    anchor_names = ["", *([f"h{args.head}"] if args.head else [])]
    wise = [f"{e}w{a:g}{h}" for e in args.epochs for a in args.wise for h in anchor_names]
    if args.head:
        from benchmarks.robustness.adapt_head import ROUNDING
        from pneumoscan.adapt import Head, choose_penalty, copy_features

        features, kernel, bias = copy_features(bundle, x)
        import keras

        start_model = keras.models.clone_model(bundle.model)
    ensemble = [f"{e}{m}" for e in args.epochs for m in [*(f"m{j}" for j in range(1, args.members)), "soup"]]
    ensemble = ensemble if args.members > 1 else []
    lpft = [f"{e}lp{args.head}" for e in args.epochs] if args.lpft else []
    kinds = [*args.epochs, *wise, *ensemble, *lpft, *(["selected"] if args.select else [])]
    if args.members > 1:
        import keras

        soup_model = keras.models.clone_model(bundle.model)

    def scored(model, weights):
        """Raw outputs of every film under `weights`, rounded as the bundle ships them."""
        model.set_weights(weights)
        round_as_shipped(model, quantize)
        return Bundle(bundle.folder, model, bundle.metadata).forward(x)

    results = {(kind, rule.text): [] for kind in [*kinds, "recalibrate"] for rule in rules}
    saved, seconds = {}, []
    for seed in args.seeds:
        start = time.perf_counter()
        fold_of = adapt_mod.patient_folds(groups, 5, seed, labels if args.stratified else None)
        raws: dict = {kind: [] for kind in kinds}
        for k in range(5):
            train = np.flatnonzero(fold_of != k)
            tuned, members = {}, {}
            anchors = {"": parent_weights}
            if args.head:  # the parent with its output layer refitted on these folds (adapt_head's head-K)
                f, y = features[:, train], labels[train]
                penalty = choose_penalty(f, kernel, bias, y, groups[train], seed, args.head, ROUNDING)
                fitted = Head(args.head, penalty).fit(f, kernel, bias, y)
                anchors[f"h{args.head}"] = fitted.weights(bundle.model)

            def score(epoch, model, tuned=tuned, members=members, anchors=anchors, member=0):
                if epoch in args.epochs:
                    kept = model.get_weights()
                    members[(epoch, member)] = kept
                    suffix = "" if member == 0 else f"m{member}"
                    tuned[f"{epoch}{suffix}" if suffix else epoch] = scored(model, kept)
                    for alpha in args.wise if member == 0 else []:
                        for name, anchor in anchors.items():
                            pairs = zip(kept, anchor, strict=True)
                            tuned[f"{epoch}w{alpha:g}{name}"] = scored(
                                model, [alpha * w + (1 - alpha) * p for w, p in pairs]
                            )
                    model.set_weights(kept)

            for member in range(args.members):
                adapt_mod.finetune(
                    bundle,
                    x[train],
                    labels[train],
                    seed + 1000 * member,
                    lambda _: None,
                    epochs=max(args.epochs),
                    freeze_bn=args.freeze_bn,
                    replay=replay,
                    after_epoch=lambda epoch, model, member=member: score(epoch, model, member=member),
                )
            for epoch in args.epochs if args.members > 1 else []:
                soup = [
                    np.mean(ws, axis=0)
                    for ws in zip(*(members[(epoch, m)] for m in range(args.members)), strict=True)
                ]
                tuned[f"{epoch}soup"] = scored(soup_model, soup)
            if args.lpft:  # linear probe, then fine-tune: from (and pulled toward) the parent with head-K

                def lp_score(epoch, model, tuned=tuned):
                    if epoch in args.epochs:
                        kept = model.get_weights()
                        tuned[f"{epoch}lp{args.head}"] = scored(model, kept)
                        model.set_weights(kept)

                start_model.set_weights(anchors[f"h{args.head}"])
                adapt_mod.finetune(
                    Bundle(bundle.folder, start_model, bundle.metadata),
                    x[train],
                    labels[train],
                    seed,
                    lambda _: None,
                    epochs=max(args.epochs),
                    freeze_bn=args.freeze_bn,
                    replay=replay,
                    after_epoch=lp_score,
                )
            for kind in [*args.epochs, *wise, *ensemble, *lpft]:
                raws[kind].append(tuned[kind])
            if args.select:
                fit = adapt_mod.fitter(
                    "finetune", bundle, x, labels, raw, rules[0], seed, 32, lambda _: None,
                    groups=groups, replay=replay, freeze_bn=args.freeze_bn, epochs=None,
                )  # fmt: skip
                _, _, _, raw_of = fit(train, scorer=True)
                raws["selected"].append(raw_of(np.arange(len(labels))))
            print(f"seed {seed} fold {k + 1}/5 done, {time.perf_counter() - start:.0f} s", flush=True)
        seconds.append(time.perf_counter() - start)
        for rule in rules:
            for kind in kinds:
                probability, positive = out_of_fold(labels, raws[kind], fold_of, rule, parent)
                results[(kind, rule.text)].append(figures(labels, probability, positive))
            probability, positive = out_of_fold(labels, [raw] * 5, fold_of, rule, parent)
            results[("recalibrate", rule.text)].append(figures(labels, probability, positive))
        for kind in kinds:
            saved[f"seed{seed}_{kind}"] = np.array(raws[kind])
        saved[f"seed{seed}_folds"] = fold_of
        if args.save:  # after each fold seed, so that a run cut short keeps what it did
            np.savez(args.save, labels=labels, groups=groups, raw=raw, **saved)
        for (kind, rule), values in results.items():
            print(f"seed {seed}: {kind} {rule}: {' '.join(f'{v:.3f}' for v in values[-1])}", flush=True)

    chosen = [("--freeze-bn", args.freeze_bn), ("--stratified", args.stratified)]
    flags = " ".join(flag for flag, on in chosen if on)
    print(f"\n{len(samples)} site films; fold seeds {args.seeds}; {flags or 'defaults'}")
    print(f"replay: {args.replay}; seconds per fold seed: {', '.join(f'{s:.0f}' for s in seconds)}\n")
    print_table("epochs", results)


if __name__ == "__main__":
    main()
