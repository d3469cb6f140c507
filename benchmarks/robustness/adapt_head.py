"""`python -m benchmarks.robustness.adapt_head --data SITE_DIR`: adaptations of `pneumoscan adapt`
that keep the parent's feature layers and refit only its output layer (or blend with fine-tuned
outputs), cross-fitted on a site's films exactly as `adapt` cross-fits, over several fold seeds.

One forward pass: for each of the model's test-time copies (metadata.json's `test_time`) the
pooled features that feed the output layer and the parent's logit. Variants, each fitted on the
training folds only and scored on the held-out fold (folds by patient, class-stratified, as
`adapt.patient_folds` deals them):

- `recalibrate`: the parent's raw outputs, the decision refitted (adapt's `recalibrate`);
- `head-K`: logistic regression of the label on the parent's logit (slope and intercept free)
  and the first K principal components of the pooled features (fitted on the training films,
  each scaled to unit variance), their coefficients pulled toward 0 ("the parent's logit only")
  by an L2 penalty chosen by inner cross-validation inside the training folds (4 patient folds,
  held-out log loss); `head-all`: every feature, standardised. Fitted on every copy of every film;
  a film's raw output is the mean of its copies' sigmoids, as the model's. The fitted head is a
  new kernel and bias of the output layer (`pneumoscan.adapt.Head`, what `adapt --method head`
  fits with 16 components), rounded as the bundle ships its weights, so that it ships as one
  ordinary model;
- with `--finetuned FILE.npz` (`adapt_variants --save` with the same `--data`, model, fold seeds
  and `--stratified`): `finetune` (its outputs) and `blend-W`, the fine-tuned and parent's logits
  averaged with weight W on the fine-tuned one (`blend-W-head-K`: with head-K's logits instead
  of the parent's), and each saved kind (`6w0.5`: weights
  interpolated; `6soup`: weights of several fine-tunes averaged) and, when it holds several
  fine-tunes per fold (`6`, `6m1`, ...), `ensemble-M`, their logits averaged.

Then, per rule (`--rules`), the decision is fitted on the training folds' raw outputs
(`fit_decision`, as `adapt` fits it) and applied to the held-out fold; the pooled out-of-fold
answers give accuracy, sensitivity, specificity and ROC AUC per fold seed, and a Markdown table of
mean ± sd over fold seeds.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from benchmarks.robustness.adapt_variants import figures, out_of_fold, print_table
from pneumoscan import adapt as adapt_mod
from pneumoscan.adapt import Head, choose_penalty, copy_features, sigmoid
from pneumoscan.bundle import Bundle
from pneumoscan.calibrate import logit
from pneumoscan.config import ThresholdRule
from pneumoscan.data import group_ids, inputs

ROUNDING = (
    np.float16
)  # the inner folds' and the scored heads' weights rounded as the bundled model ships them


def check_as_model(bundle: Bundle, x: np.ndarray, features, kernel, bias, labels) -> float:
    """Largest |difference| between a head (16 components, fitted on all films) applied by this
    module's arithmetic and the same head as the output layer of a copy of the model, its weights
    rounded as the bundle ships them, run by `Bundle.forward`: that head-K ships as one model."""
    import keras

    from pneumoscan.export import round_as_shipped

    head = Head(min(16, features.shape[-1]), 0.01).fit(features, kernel, bias, labels)
    model = keras.models.clone_model(bundle.model)
    model.set_weights(head.weights(bundle.model))
    round_as_shipped(model, adapt_mod.shipped_quantize(bundle.metadata))
    rounding = adapt_mod.shipped_rounding(bundle.metadata)
    return float(
        np.abs(Bundle(bundle.folder, model, bundle.metadata).forward(x) - head.raw(features, rounding)).max()
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, type=Path, help="the site's films: NORMAL/ and PNEUMONIA/")
    parser.add_argument("--model", default=None, help="run folder or bundle (default: the bundled model)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="fold seeds")
    parser.add_argument("--rules", nargs="+", default=["sensitivity:0.97"], help="threshold rules")
    parser.add_argument("--components", nargs="+", default=["2", "4", "8", "16", "all"])
    parser.add_argument("--penalties", type=float, nargs="*", default=[], help="also fixed penalties")
    parser.add_argument("--finetuned", type=Path, default=None, help="adapt_variants --save's file")
    parser.add_argument("--blend", type=float, nargs="*", default=[0.5], help="fine-tuned logit weights")
    args = parser.parse_args()

    bundle = Bundle.load(args.model, runtime="keras")
    samples = adapt_mod.site_films(bundle, args.data, print)
    labels, groups = np.array([s.label for s in samples]), np.array(group_ids(samples))
    x = inputs(samples)
    start = time.perf_counter()
    raw = bundle.forward(x)
    features, kernel, bias = copy_features(bundle, x)
    parent_raw = sigmoid(features @ kernel + bias).mean(0)
    print(f"features {features.shape}, {time.perf_counter() - start:.0f} s; largest |difference| from "
          f"the model's raw outputs {np.abs(parent_raw - raw).max():.2e}")  # fmt: skip
    parent_probability = bundle.decision.probabilities(raw)
    own = figures(labels, parent_probability, parent_probability >= bundle.decision.threshold)
    print(f"parent, its own threshold: {' '.join(f'{v:.3f}' for v in own)}")
    folded = check_as_model(bundle, x, features, kernel, bias, labels)
    print(f"a head as the model's output layer: largest |difference| from this arithmetic {folded:.2e}")
    saved = np.load(args.finetuned) if args.finetuned else None
    parent, rules = bundle.decision, [ThresholdRule.parse(r) for r in args.rules]
    results: dict = {}
    for seed in args.seeds:
        fold_of = adapt_mod.patient_folds(groups, 5, seed, labels)
        variants: dict[str, list] = {"recalibrate": [raw] * 5}
        chosen: dict[str, list] = {}
        for text in args.components:
            components = None if text == "all" else int(text)
            for penalty in [None, *args.penalties]:
                name = f"head-{text}" + ("" if penalty is None else f"@{penalty:g}")
                variants[name] = []
                for k in range(5):
                    train = fold_of != k
                    f, y, g = features[:, train], labels[train], groups[train]
                    lam = (
                        penalty
                        if penalty is not None
                        else choose_penalty(f, kernel, bias, y, g, seed, components, ROUNDING)
                    )
                    chosen.setdefault(name, []).append(lam)
                    variants[name].append(
                        Head(components, lam).fit(f, kernel, bias, y).raw(features, ROUNDING)
                    )
        if saved is not None:
            kinds = sorted({key.split("_", 1)[1] for key in saved.files if key.startswith(f"seed{seed}_")})
            assert np.array_equal(saved[f"seed{seed}_folds"], fold_of), "the saved folds differ"
            for kind in [kind for kind in kinds if kind != "folds"]:
                variants[f"finetune-{kind}"] = list(saved[f"seed{seed}_{kind}"])
            members = [kind for kind in sorted(kinds) if kind == "6" or kind.startswith("6m")]
            if len(members) > 1:  # adapt_variants --members: their logits averaged
                tuned = [logit(saved[f"seed{seed}_{kind}"]) for kind in members]
                variants[f"ensemble-{len(members)}"] = list(sigmoid(np.mean(tuned, axis=0)))
            tuned = saved[f"seed{seed}_6"]
            heads = [name for name in variants if name.startswith("head-") and "@" not in name]
            for weight in args.blend:
                for name, others in [("", [raw] * 5), *((f"-{head}", variants[head]) for head in heads)]:
                    variants[f"blend-{weight:g}{name}"] = [
                        sigmoid(weight * logit(t) + (1 - weight) * logit(o))
                        for t, o in zip(tuned, others, strict=True)
                    ]
        for name, lams in chosen.items():
            print(f"seed {seed}: {name} penalties {' '.join(f'{v:g}' for v in lams)}")
        for rule in rules:
            for name, raws in variants.items():
                probability, positive = out_of_fold(labels, raws, fold_of, rule, parent)
                values = figures(labels, probability, positive)
                results.setdefault((name, rule.text), []).append(values)
                print(f"seed {seed}: {name} {rule.text}: {' '.join(f'{v:.3f}' for v in values)}", flush=True)

    print(f"\n{len(samples)} site films; fold seeds {args.seeds}; {time.perf_counter() - start:.0f} s\n")
    print_table("variant", results)


if __name__ == "__main__":
    main()
