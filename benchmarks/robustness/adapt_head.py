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
  new kernel and bias of the output layer (`head_weights`), rounded as the bundle ships its
  weights, so that it ships as one ordinary model;
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
from pneumoscan.bundle import Bundle
from pneumoscan.calibrate import logit
from pneumoscan.config import ThresholdRule
from pneumoscan.data import group_ids, inputs

PENALTIES = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0)  # per film, on unit-variance inputs
INNER = 4


def copy_features(bundle: Bundle, x: np.ndarray, batch_size: int = 32):
    """(features (copies, n, d) feeding the output layer, its kernel (d,), its bias) over the
    test-time copies of `x`."""
    import keras
    import tensorflow as tf

    from pneumoscan.forward import copies, shifted

    model = bundle.model
    head = model.layers[-1]
    twin = keras.Model(model.inputs, head.input)
    shifts, fill = copies(bundle.metadata.get("test_time"))
    features = []
    for dy, dx in shifts:
        rows = [
            twin(shifted(tf.constant(x[s : s + batch_size]), dy, dx, fill), training=False).numpy()
            for s in range(0, len(x), batch_size)
        ]
        features.append(np.concatenate(rows))
    kernel, bias = head.get_weights()
    return np.stack(features).astype(np.float64), kernel.reshape(-1).astype(np.float64), float(bias[0])


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-np.clip(z, -60, 60)))


def penalised_logistic(design: np.ndarray, target: np.ndarray, penalty: np.ndarray) -> np.ndarray:
    """Parameters minimising the mean cross-entropy of sigmoid(design @ params) plus
    0.5 * sum(penalty * params**2), by Newton's method (the loss is convex)."""
    params = np.zeros(design.shape[1])
    params[0] = 1.0  # start at the parent's logit (its column first)
    n = len(target)
    for _ in range(50):
        s = sigmoid(design @ params)
        gradient = design.T @ (s - target) / n + penalty * params
        hessian = (design * (s * (1 - s))[:, None]).T @ design / n + np.diag(penalty + 1e-9)
        step = np.linalg.solve(hessian, gradient)
        params = params - step
        if np.max(np.abs(step)) < 1e-9:
            break
    return params


class Head:
    """The output layer refitted on (copies, n, d) features: logit' = a * parent logit + b +
    coefficients on K unit-variance principal components (or standardised features, K None)."""

    def __init__(self, components: int | None, penalty: float):
        self.components, self.penalty = components, penalty

    def fit(self, features, kernel, bias, labels):
        rows = features.reshape(-1, features.shape[-1])
        self.mean = rows.mean(0)
        centred = rows - self.mean
        if self.components is None:
            self.basis = np.diag(1.0 / np.maximum(centred.std(0), 1e-12))
        else:
            _, values, vectors = np.linalg.svd(centred, full_matrices=False)
            k = self.components
            self.basis = vectors[:k].T / np.maximum(values[:k] / np.sqrt(len(rows)), 1e-12)  # (d, k)
        design = self._design(features, kernel, bias)
        target = np.tile(labels, features.shape[0]).astype(np.float64)
        penalty = np.r_[0.0, 0.0, np.full(design.shape[1] - 2, self.penalty)]
        self.params = penalised_logistic(design, target, penalty)
        a, b, c = self.params[0], self.params[1], self.params[2:]
        self.kernel = a * kernel + self.basis @ c
        self.bias = a * bias + b - self.mean @ self.basis @ c
        return self

    def _design(self, features, kernel, bias):
        rows = features.reshape(-1, features.shape[-1])
        z = (rows - self.mean) @ self.basis
        return np.column_stack([rows @ kernel + bias, np.ones(len(rows)), z])

    def raw(self, features, rounding=np.float16):
        """Mean over copies of sigmoid(features @ kernel + bias), the weights rounded as shipped."""
        kernel = self.kernel.astype(rounding).astype(np.float64)
        bias = float(np.float64(rounding(self.bias)))
        return sigmoid(features @ kernel + bias).mean(0)


def with_head(model, head: Head) -> list[np.ndarray]:
    """`model.get_weights()` with the output layer's kernel and bias replaced by `head`'s."""
    weights = model.get_weights()
    paths = [v.path for v in model.weights]
    output = model.layers[-1]
    weights[paths.index(output.kernel.path)] = head.kernel.reshape(-1, 1).astype(np.float32)
    weights[paths.index(output.bias.path)] = np.array([head.bias], np.float32)
    return weights


def check_as_model(bundle: Bundle, x: np.ndarray, features, kernel, bias, labels) -> float:
    """Largest |difference| between a head (16 components, fitted on all films) applied by this
    module's arithmetic and the same head as the output layer of a copy of the model, its weights
    rounded as the bundle ships them, run by `Bundle.forward`: that head-K ships as one model."""
    import keras

    from pneumoscan.export import round_as_shipped

    head = Head(min(16, features.shape[-1]), 0.01).fit(features, kernel, bias, labels)
    model = keras.models.clone_model(bundle.model)
    model.set_weights(with_head(bundle.model, head))
    round_as_shipped(model, adapt_mod.shipped_quantize(bundle.metadata))
    rounding = np.float16 if adapt_mod.shipped_quantize(bundle.metadata) == "float16" else np.float32
    return float(
        np.abs(Bundle(bundle.folder, model, bundle.metadata).forward(x) - head.raw(features, rounding)).max()
    )


def choose_penalty(features, kernel, bias, labels, groups, components, seed) -> float:
    """The penalty with the lowest held-out log loss over `INNER` patient folds of these films
    (ties to the larger penalty)."""
    fold_of = adapt_mod.patient_folds(groups, INNER, seed, labels)
    losses = []
    for penalty in PENALTIES:
        total = 0.0
        for k in range(INNER):
            train, held = fold_of != k, fold_of == k
            head = Head(components, penalty).fit(features[:, train], kernel, bias, labels[train])
            p = np.clip(head.raw(features[:, held]), 1e-7, 1 - 1e-7)
            y = labels[held]
            total -= np.sum(y * np.log(p) + (1 - y) * np.log(1 - p))
        losses.append(total)
    best = min(losses)
    return max(p for p, loss in zip(PENALTIES, losses, strict=True) if loss <= best + 1e-9)


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
                        else choose_penalty(f, kernel, bias, y, g, components, seed)
                    )
                    chosen.setdefault(name, []).append(lam)
                    variants[name].append(Head(components, lam).fit(f, kernel, bias, y).raw(features))
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
