"""`pneumoscan adapt --data SITE_DIR --out BUNDLE_DIR`: fit a model's decision to a hospital's
own films, and say honestly what that gains.

`SITE_DIR` holds `NORMAL/` and `PNEUMONIA/` (the layout `evaluate` reads: JPEG, PNG, DICOM).
The method `recalibrate` keeps the weights and refits the decision on the site's films with
`decision.fit_decision`, the function training uses: Platt calibration, the threshold by
`ADAPT_RULE` (or `--rule`) and the borderline band around it. `finetune` (the default) first
fits the weights to the site's films (`finetune`: a few epochs at a low rate with training's
augmentation and class weights, pulled toward the parent's weights, L2-SP, optionally mixed
with films of the original training data, `--replay`), then refits the decision the same way.
`head` keeps every layer but the output one, which it refits on the parent's features of the
site's films (`Head`: a penalised logistic regression on the parent's logit and a few principal
components of the features, the penalty chosen by inner patient folds), then the decision.
The out-of-distribution rule stays the parent's either way (its statistics come from the
training X-rays, which a site does not have; a threshold refitted on the site's films under the
fine-tuned weights flagged fewer non-X-rays and was dropped); BENCHMARKS.md, "Adapting to a
site", gives what it flags with fine-tuned weights.

The estimate is cross-fitted: the films are split by patient (each class's patients dealt
evenly) into K folds, each fold is scored
by a decision fitted without it, and the pooled out-of-fold answers give the site's accuracy,
sensitivity, specificity and ROC AUC with 95% intervals (bootstrap over patients), beside the
parent model's own answers on the same films. The bundle written is then fitted on all the
films: an ordinary bundle (the parent's files, metadata.json with the new decision and an
`adaptation` block), which predict, evaluate, explain, serve and the page use unchanged.

Films byte-identical to a film of the parent's own splits are left out (they would flatter the
estimate), unreadable films are listed and left out, and a class with fewer than
`MIN_FILMS` films or `MIN_PATIENTS` patients is refused before anything is written.
"""

from __future__ import annotations

import datetime as dt
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pneumoscan import metadata as metadata_io
from pneumoscan import metrics, run_folder
from pneumoscan.atomic import replace_dir_atomic
from pneumoscan.bundle import INFERENCE_BATCH, Bundle
from pneumoscan.config import CLASS_NAMES, ThresholdRule
from pneumoscan.data import Sample, group_ids, inputs, scan
from pneumoscan.decision import fit_decision, with_decision
from pneumoscan.errors import DataError, UsageError
from pneumoscan.evaluate import split_members
from pneumoscan.export import FORMATS, export_bundle, round_as_shipped

METHODS = ("recalibrate", "finetune", "head")
MIN_FILMS, MIN_PATIENTS = 20, 10  # per class
DEFAULT_FOLDS = 5
# The threshold rule when --rule is not given: fitted on a site's films, a rule holds its
# sensitivity only roughly out of fold (sensitivity:0.95 gave 0.94 cross-fitted on the dev films,
# 0.96 just 0.95); 0.97 kept 0.96 on average at no cost in accuracy (BENCHMARKS.md, "Adapting to
# a site").
ADAPT_RULE = "sensitivity:0.97"
# finetune: a few epochs at a low rate, pulled toward the parent's weights (L2-SP), with
# training's augmentation and class weights.
FINETUNE_EPOCHS, FINETUNE_RATE, FINETUNE_BATCH, L2SP = 6, 1e-4, 16, 1e-3
REPLAY_FILMS, REPLAY_SHARE = 400, 0.5  # --replay: films kept in memory; mixed in per site film
EPOCH_CHOICES, INNER_FOLDS = (3, 6, 10, 15), 4  # epochs None: chosen on one inner fold of 4
FREEZE_BN = False  # batch-norm layers updated (moving statistics and scale/offset) while fine-tuning
# head: the output layer refitted on the parent's frozen features, as a logistic regression on
# the parent's logit and the first HEAD_COMPONENTS principal components of the features feeding
# that layer, their coefficients pulled toward 0 ("the parent's logit only") by an L2 penalty
# chosen among HEAD_PENALTIES by held-out log loss over HEAD_INNER_FOLDS patient folds
# (BENCHMARKS.md, "Third round": 16 components did best of 2, 4, 8, 16 and all 160).
HEAD_COMPONENTS, HEAD_INNER_FOLDS = 16, 4
HEAD_PENALTIES = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0)
ESTIMATE_METRICS = ("accuracy", "sensitivity", "specificity", "roc_auc")


def adapt(
    model: str | Path | Bundle | None,
    data_dir: Path,
    out: Path,
    *,
    method: str = "finetune",
    rule: str | None = None,
    site: str | None = None,
    folds: int = DEFAULT_FOLDS,
    seed: int = 0,
    overwrite: bool = False,
    batch_size: int = INFERENCE_BATCH,
    replay: Path | None = None,
    n_resamples: int = 1000,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Write the adapted bundle to `out` and return its `adaptation` block.

    Raises:
        UsageError: an unknown method or rule, fewer than 2 folds, or `out` exists without
            `overwrite` (nothing written).
        DataError: not the NORMAL/ + PNEUMONIA/ layout, or too few films or patients in a class
            (nothing written).
    """
    data_dir, out = Path(data_dir), Path(out)
    if method not in METHODS:
        raise UsageError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}.")
    if folds < 2:
        raise UsageError(f"--folds must be at least 2, got {folds}.")
    if out.exists() and not overwrite:
        raise UsageError(f"{out}: already exists; choose another --out or pass --overwrite.")
    missing = [name for name in CLASS_NAMES if not (data_dir / name).is_dir()]
    if missing:
        raise DataError(
            f"{data_dir}: needs the folders {' and '.join(CLASS_NAMES)} (missing: {', '.join(missing)})."
        )
    bundle = Bundle.load(model)
    parent = bundle.decision
    try:
        threshold_rule = ThresholdRule.parse(rule or ADAPT_RULE)
    except ValueError as error:
        raise UsageError(str(error)) from None

    if replay is not None and method != "finetune":
        raise UsageError("--replay mixes training films into the fine-tune; it needs --method finetune.")
    samples = site_films(bundle, data_dir, log)
    labels = np.array([s.label for s in samples])
    groups = np.array(group_ids(samples))
    _check_counts(data_dir, labels, groups)
    log(f"Scoring {len(samples)} films with the parent model.")
    x = inputs(samples)
    raw = bundle.forward(x, batch_size)

    before_probability = parent.probabilities(raw)
    before_positive = before_probability >= parent.threshold
    before = _estimate(labels, before_probability, before_positive, groups, n_resamples)
    replay_films = load_replay(bundle, replay, log) if replay is not None else None
    fit = fitter(
        method,
        bundle,
        x,
        labels,
        raw,
        threshold_rule,
        seed,
        batch_size,
        log,
        groups=groups,
        replay=replay_films,
    )
    oof_probability, oof_positive = cross_fit(labels, groups, fit, folds, seed, log)
    after = _estimate(labels, oof_probability, oof_positive, groups, n_resamples)

    log(f"Adapting on all {len(samples)} films.")
    model, decision, site_metrics = fit(np.arange(len(samples)))
    block = {
        "parent": {"arch": bundle.metadata["arch"], "digest": bundle.digest},
        "site": site or data_dir.resolve().name,
        "method": method,
        "films": {name: int((labels == k).sum()) for k, name in enumerate(CLASS_NAMES)},
        "patients": {name: len(set(groups[labels == k])) for k, name in enumerate(CLASS_NAMES)},
        "date": dt.date.today().isoformat(),
        "rule": threshold_rule.text,
        "estimate": {"folds": folds, "seed": seed, "before": before, "after": after},
    }
    if replay_films is not None:
        block["replay"] = {"folder": str(replay), "films": len(replay_films[1])}
    if method == "head":
        block["head"] = {
            "components": HEAD_COMPONENTS,
            "penalties": list(HEAD_PENALTIES),
            "inner_folds": HEAD_INNER_FOLDS,
        }
    meta = {**with_decision(bundle.metadata, decision, site_metrics), "adaptation": block}
    _write_bundle(bundle.folder, meta, out, model)
    log(f"Wrote {out}: {describe(block)}")
    return block


def site_films(bundle: Bundle, data_dir: Path, log: Callable[[str], None]) -> list[Sample]:
    """The site's readable films at the model's input size, less those whose bytes are a film of
    one of the parent's own splits (listed in its splits.json)."""
    found = scan(data_dir, bundle.image_size)
    for reason in found.unreadable:
        log(f"warning: left out, unreadable: {reason}")
    members = split_members(bundle.folder, found.samples).values()
    kept = [s for i, s in enumerate(found.samples) if not any(inside[i] for inside in members)]
    if len(kept) < len(found.samples):
        log(
            f"warning: left out {len(found.samples) - len(kept)} film(s) byte-identical to films the "
            "parent model was trained or tuned on (they would flatter the estimate)."
        )
    return kept


def cross_fit(
    labels: np.ndarray,
    groups: np.ndarray,
    fit: Callable,
    folds: int,
    seed: int,
    log: Callable[[str], None] = print,
) -> tuple[np.ndarray, np.ndarray]:
    """Out-of-fold (probability, positive) of every film: the patients of each class are dealt
    into `folds` folds at random (`seed`), and each fold is scored by what `fit` made of the
    others."""
    fold_of = patient_folds(groups, folds, seed, labels)
    probability, positive = np.zeros(len(labels)), np.zeros(len(labels), dtype=bool)
    for k in range(folds):
        held = np.flatnonzero(fold_of == k)
        _, decision, _, raw_of = fit(np.flatnonzero(fold_of != k), scorer=True)
        probability[held] = decision.probabilities(raw_of(held))
        positive[held] = probability[held] >= decision.threshold
        log(f"Fold {k + 1}/{folds}: {len(held)} films held out, threshold {decision.threshold:.4f}.")
    return probability, positive


def fitter(
    method: str,
    bundle: Bundle,
    x: np.ndarray,
    labels: np.ndarray,
    raw: np.ndarray,
    rule: ThresholdRule,
    seed: int,
    batch_size: int,
    log: Callable[[str], None],
    *,
    groups: np.ndarray | None = None,
    epochs: int | None = FINETUNE_EPOCHS,
    freeze_bn: bool = FREEZE_BN,
    replay: tuple[np.ndarray, np.ndarray] | None = None,
) -> Callable:
    """fit(index) -> (the weights, None when they stay; the decision; its metrics), fitted on the
    films at `index`; with scorer=True also raw_of(index), the raw outputs of the model it made.
    `epochs` None: chosen among `EPOCH_CHOICES` inside the films at `index` (`choose_epochs`,
    which needs `groups`)."""
    parent = bundle.decision
    options = {"freeze_bn": freeze_bn, "replay": replay}

    if method == "head":
        features, kernel, bias = copy_features(bundle, x, batch_size)

    def fit(index: np.ndarray, scorer: bool = False):
        model, raw_of = None, lambda i: raw[i]
        if method == "head":
            rounding = shipped_rounding(bundle.metadata)
            penalty = choose_penalty(
                features[:, index], kernel, bias, labels[index], groups[index], seed, rounding=rounding
            )
            head = Head(HEAD_COMPONENTS, penalty).fit(features[:, index], kernel, bias, labels[index])
            log(f"  output layer refitted on {len(index)} films (penalty {penalty:g})")
            model = head.model(bundle)
        elif method == "finetune":
            n = epochs
            if n is None:
                n = choose_epochs(bundle, x[index], labels[index], groups[index], seed, **options)
                log(f"  epochs chosen on an inner split: {n}")
            model = finetune(bundle, x[index], labels[index], seed, log, epochs=n, **options)
        if model is not None:
            round_as_shipped(model, shipped_quantize(bundle.metadata))  # the decision must hold for it
            tuned = Bundle(bundle.folder, model, bundle.metadata)
            raw_of = lambda i: tuned.forward(x[i], batch_size)  # noqa: E731
        decision, metrics_ = fit_decision(labels[index], raw_of(index), rule, current=parent, split="site")
        return (model, decision, metrics_, raw_of) if scorer else (model, decision, metrics_)

    return fit


def finetune(
    bundle: Bundle,
    x: np.ndarray,
    labels: np.ndarray,
    seed: int,
    log: Callable[[str], None],
    *,
    epochs: int = FINETUNE_EPOCHS,
    freeze_bn: bool = FREEZE_BN,
    replay: tuple[np.ndarray, np.ndarray] | None = None,
    after_epoch: Callable[[int, Any], None] | None = None,
):
    """A copy of the bundle's model fitted to (x, labels): `epochs` epochs of Adam at
    `FINETUNE_RATE`, training's augmentation for the architecture, class-weighted cross-entropy
    plus `L2SP` times the squared distance of the weights from the parent's (L2-SP). With
    `freeze_bn` the batch-norm layers stay in inference mode (their moving statistics and scale
    and offset are the parent's). `after_epoch(epoch, model)`, when given, runs after each epoch
    (1-based). `replay`, (inputs, labels) of films of the original training data: each epoch
    mixes in `REPLAY_SHARE` times as many of them as there are site films, half of each class,
    drawn afresh, each of weight 1 (the site's films keep their class weights)."""
    import keras
    import tensorflow as tf

    from pneumoscan.augment import AUGMENT_DRAWS, augment_batch
    from pneumoscan.config import RECIPES
    from pneumoscan.training.fit import class_weights

    model = keras.models.clone_model(bundle.model)
    model.set_weights(bundle.model.get_weights())
    if freeze_bn:
        for layer in model.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.trainable = False  # Keras 3: a frozen batch-norm layer runs in inference mode
    anchors = [tf.constant(w.numpy()) for w in model.trainable_weights]
    recipe = RECIPES.get(bundle.metadata["arch"])
    weights = class_weights(labels)  # training's: each class weighs as much in the loss
    site_weight = np.array([weights.get(c, 0.0) for c in range(2)], np.float32)[labels]
    optimizer = keras.optimizers.Adam(FINETUNE_RATE)
    rng = np.random.default_rng(seed)

    @tf.function(reduce_retracing=True)
    def step(images, targets, weights, draws):
        if recipe is not None:
            images = augment_batch(images, draws, recipe.augment)
        with tf.GradientTape() as tape:
            predicted = tf.reshape(model(images, training=True), [-1])
            eps = keras.backend.epsilon()
            predicted = tf.clip_by_value(predicted, eps, 1 - eps)
            loss = -(targets * tf.math.log(predicted) + (1 - targets) * tf.math.log(1 - predicted))
            loss = tf.reduce_mean(loss * weights)
            pairs = zip(model.trainable_weights, anchors, strict=True)
            pull = tf.add_n([tf.reduce_sum(tf.square(w - a)) for w, a in pairs])
            total = loss + L2SP * pull
        gradients = tape.gradient(total, model.trainable_weights)
        optimizer.apply_gradients(zip(gradients, model.trainable_weights, strict=True))
        return loss

    for epoch in range(epochs):
        images, targets, sample_weight = x, labels, site_weight
        if replay is not None:
            picked = _replay_draw(replay[1], round(REPLAY_SHARE * len(labels)), rng)
            images = np.concatenate([x, replay[0][picked]])
            targets = np.concatenate([labels, replay[1][picked]])
            sample_weight = np.concatenate([site_weight, np.ones(len(picked), np.float32)])
        order, losses = rng.permutation(len(targets)), []
        for start in range(0, len(order), FINETUNE_BATCH):
            batch = order[start : start + FINETUNE_BATCH]
            draws = rng.random((len(batch), AUGMENT_DRAWS)).astype(np.float32)
            batch_args = (images[batch], targets[batch].astype(np.float32), sample_weight[batch], draws)
            losses.append(float(step(*(tf.constant(a) for a in batch_args))))
        log(f"  fine-tune epoch {epoch + 1}/{epochs}: loss {np.mean(losses):.4f}")
        if after_epoch is not None:
            after_epoch(epoch + 1, model)
    return model


def copy_features(bundle: Bundle, x: np.ndarray, batch_size: int = INFERENCE_BATCH):
    """(features (copies, n, d) float64: what feeds the model's output layer, for each test-time
    copy of each film; that layer's kernel (d,); its bias)."""
    import keras

    from pneumoscan.forward import copies, shifted

    model = bundle.model
    twin = keras.Model(model.input, model.layers[-1].input)
    shifts, fill = copies(bundle.metadata.get("test_time"))
    features = [
        np.concatenate(
            [
                np.asarray(twin(shifted(x[s : s + batch_size], dy, dx, fill), training=False))
                for s in range(0, len(x), batch_size)
            ]
        )
        for dy, dx in shifts
    ]
    kernel, bias = model.layers[-1].get_weights()
    return np.stack(features).astype(np.float64), kernel.reshape(-1).astype(np.float64), float(bias[0])


def sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -60, 60)))


def penalised_logistic(design: np.ndarray, target: np.ndarray, penalty: np.ndarray) -> np.ndarray:
    """The parameters minimising the mean cross-entropy of sigmoid(design @ params) plus
    0.5 * sum(penalty * params**2), by Newton's method (the loss is convex), from params = (1,
    0, ...): the first column's coefficient 1, as for the parent's logit."""
    params = np.zeros(design.shape[1])
    params[0] = 1.0
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
    """The output layer refitted on (copies, n, d) features: logit = a * the parent's logit + b +
    coefficients on the first `components` unit-variance principal components of the features
    (None: every feature, standardised), those coefficients under an L2 `penalty` (a and b
    free). Fitted on every copy of every film; as a linear map of the features it is a new kernel
    and bias of the same output layer."""

    def __init__(self, components: int | None, penalty: float):
        self.components, self.penalty = components, penalty

    def fit(self, features: np.ndarray, kernel: np.ndarray, bias: float, labels: np.ndarray) -> Head:
        rows = features.reshape(-1, features.shape[-1])
        self.mean = rows.mean(0)
        centred = rows - self.mean
        if self.components is None:
            self.basis = np.diag(1.0 / np.maximum(centred.std(0), 1e-12))
        else:
            _, values, vectors = np.linalg.svd(centred, full_matrices=False)
            k = min(self.components, len(values))
            self.basis = vectors[:k].T / np.maximum(values[:k] / np.sqrt(len(rows)), 1e-12)  # (d, k)
        design = np.column_stack([rows @ kernel + bias, np.ones(len(rows)), centred @ self.basis])
        target = np.tile(labels, features.shape[0]).astype(np.float64)
        penalty = np.r_[0.0, 0.0, np.full(design.shape[1] - 2, self.penalty)]
        self.params = penalised_logistic(design, target, penalty)
        a, b, coefficients = self.params[0], self.params[1], self.params[2:]
        self.kernel = a * kernel + self.basis @ coefficients
        self.bias = float(a * bias + b - self.mean @ self.basis @ coefficients)
        return self

    def raw(self, features: np.ndarray, rounding: Any = None) -> np.ndarray:
        """Each film's raw output: the mean over its copies of sigmoid(features @ kernel + bias),
        the kernel and bias first rounded to `rounding` (np.float16: as a float16 bundle ships
        them) when given."""
        kernel, bias = self.kernel, self.bias
        if rounding is not None:
            kernel, bias = kernel.astype(rounding).astype(np.float64), float(np.float64(rounding(bias)))
        return sigmoid(features @ kernel + bias).mean(0)

    def weights(self, model: Any) -> list[np.ndarray]:
        """`model.get_weights()` with its output layer's kernel and bias this head's."""
        weights = model.get_weights()
        paths = [v.path for v in model.weights]
        output = model.layers[-1]
        weights[paths.index(output.kernel.path)] = self.kernel.reshape(-1, 1).astype(np.float32)
        weights[paths.index(output.bias.path)] = np.array([self.bias], np.float32)
        return weights

    def model(self, bundle: Bundle) -> Any:
        """A copy of the bundle's model with this output layer."""
        import keras

        model = keras.models.clone_model(bundle.model)
        model.set_weights(self.weights(bundle.model))
        return model


def shipped_rounding(metadata: dict[str, Any]) -> Any:
    """np.float16 when the bundle ships float16 weights, else None (`Head.raw`)."""
    return np.float16 if shipped_quantize(metadata) == "float16" else None


def choose_penalty(
    features: np.ndarray,
    kernel: np.ndarray,
    bias: float,
    labels: np.ndarray,
    groups: np.ndarray,
    seed: int,
    components: int | None = HEAD_COMPONENTS,
    rounding: Any = None,
) -> float:
    """The `HEAD_PENALTIES` value with the lowest held-out log loss over `HEAD_INNER_FOLDS`
    class-stratified patient folds of these films (ties to the larger penalty), each inner head's
    weights rounded to `rounding` (`Head.raw`)."""
    fold_of = patient_folds(groups, HEAD_INNER_FOLDS, seed, labels)
    losses = []
    for penalty in HEAD_PENALTIES:
        loss = 0.0
        for k in range(HEAD_INNER_FOLDS):
            train, held = fold_of != k, fold_of == k
            head = Head(components, penalty).fit(features[:, train], kernel, bias, labels[train])
            p = np.clip(head.raw(features[:, held], rounding), 1e-7, 1 - 1e-7)
            loss -= float(np.sum(labels[held] * np.log(p) + (1 - labels[held]) * np.log(1 - p)))
        losses.append(loss)
    return max(p for p, loss in zip(HEAD_PENALTIES, losses, strict=True) if loss <= min(losses) + 1e-9)


def choose_epochs(
    bundle: Bundle, x: np.ndarray, labels: np.ndarray, groups: np.ndarray, seed: int, **options
) -> int:
    """The number of fine-tuning epochs, among `EPOCH_CHOICES`, whose model ranks best (ROC AUC
    of the raw outputs; ties to fewer epochs) the films of one inner fold of whole patients
    (1 / `INNER_FOLDS` of them, class-stratified), fine-tuned on the others: one run of the
    largest choice, scored after each choice."""
    fold_of = patient_folds(groups, INNER_FOLDS, seed, labels)
    inner, held = np.flatnonzero(fold_of != 0), np.flatnonzero(fold_of == 0)
    ranked: dict[int, float] = {}
    scorer: list[Bundle] = []

    def score(epoch: int, model: Any) -> None:
        if epoch in EPOCH_CHOICES:
            scorer[:] = scorer or [Bundle(bundle.folder, model, bundle.metadata)]
            ranked[epoch] = metrics.roc_auc(labels[held], scorer[0].forward(x[held]))

    finetune(
        bundle,
        x[inner],
        labels[inner],
        seed,
        lambda _: None,
        epochs=max(EPOCH_CHOICES),
        after_epoch=score,
        **options,
    )
    return max(EPOCH_CHOICES, key=lambda e: (round(ranked[e], 4), -e))


def _replay_draw(labels: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of `count` replay films, half of each class (as far as each class has them)."""
    halves = []
    for c, share in ((0, count // 2), (1, count - count // 2)):
        members = np.flatnonzero(labels == c)
        halves.append(rng.choice(members, min(share, len(members)), replace=False))
    return np.concatenate(halves)


def load_replay(bundle: Bundle, folder: Path, log: Callable[[str], None] = print):
    """(inputs, labels) of up to `REPLAY_FILMS` readable films of `folder` (NORMAL/ + PNEUMONIA/,
    or a data root whose train/ holds them), half of each class, drawn with a fixed seed, at the
    model's input size.

    Raises:
        DataError: neither layout, or a class folder without images.
    """
    from pneumoscan.data import find_layout, list_images
    from pneumoscan.preprocess import ImageError, decode_to_input

    folder = find_layout(Path(folder))["train"]
    listed = list_images(folder)
    labels = np.array([label for _, label in listed])
    images, kept = [], []
    for i in _replay_draw(labels, REPLAY_FILMS, np.random.default_rng(0)):
        path = listed[i][0]
        try:
            images.append(decode_to_input(path, bundle.image_size))
        except ImageError:  # decode says every unreadable file in one
            continue
        kept.append(i)
    log(f"Replay: {len(kept)} films of {folder} ({int(labels[kept].sum())} PNEUMONIA).")
    return np.stack(images), labels[kept]


def patient_folds(groups: np.ndarray, folds: int, seed: int, labels: np.ndarray | None = None) -> np.ndarray:
    """Per film, its fold in [0, folds): whole patient groups, dealt in a random order. With
    `labels`, class-stratified: the patients of each class (a patient's class is its films'
    majority label) are dealt in turn, continuing round the folds, so each fold holds nearly the
    same number of each class's patients."""
    unique = np.unique(groups)
    rng = np.random.default_rng(seed)
    if labels is None:
        strata = [rng.permutation(len(unique))]
    else:
        positive = np.array([labels[groups == g].mean() > 0.5 for g in unique])
        strata = [rng.permutation(np.flatnonzero(positive == c)) for c in (False, True)]
    order = np.concatenate(strata)
    fold_of_group = {int(unique[i]): rank % folds for rank, i in enumerate(order)}
    return np.array([fold_of_group[int(g)] for g in groups])


def describe(block: dict[str, Any]) -> str:
    """One paragraph: the site, its films, and the cross-fitted estimate before -> after."""
    films = ", ".join(f"{n} {name}" for name, n in block["films"].items())
    lines = [
        f"{block['method']} to {block['site']} on {films} ({block['date']}); "
        f"cross-fitted over {block['estimate']['folds']} folds by patient:",
        f"{'':<12} {'before':>26} {'after':>26}",
    ]
    for name in ESTIMATE_METRICS:
        cells = []
        for when in ("before", "after"):
            value, (low, high) = block["estimate"][when][name], block["estimate"][when][f"{name}_ci95"]
            cells.append(f"{value:.3f} [{low:.3f}, {high:.3f}]")
        lines.append(f"{name:<12} {cells[0]:>26} {cells[1]:>26}")
    return "\n".join(lines)


def _estimate(
    labels: np.ndarray, probability: np.ndarray, positive: np.ndarray, groups: np.ndarray, n_resamples: int
) -> dict[str, Any]:
    """Accuracy, sensitivity, specificity (of `positive`) and ROC AUC (of `probability`), each
    with its 95% interval from a bootstrap over patient groups."""

    def values(index: np.ndarray) -> list[float]:
        y, p, yes = labels[index], probability[index], positive[index].astype(int)
        if len(set(y.tolist())) < 2:
            return [float("nan")] * len(ESTIMATE_METRICS)
        rates = (metrics.accuracy(y, yes), metrics.sensitivity(y, yes), metrics.specificity(y, yes))
        return [*rates, metrics.roc_auc(y, p)]

    result: dict[str, Any] = dict(zip(ESTIMATE_METRICS, values(np.arange(len(labels))), strict=True))
    members = {int(g): np.flatnonzero(groups == g) for g in np.unique(groups)}
    keys = np.array(list(members))
    rng = np.random.default_rng(0)
    resamples = (rng.choice(keys, len(keys)) for _ in range(n_resamples))
    draws = np.array([values(np.concatenate([members[int(g)] for g in drawn])) for drawn in resamples])
    for i, name in enumerate(ESTIMATE_METRICS):
        result[f"{name}_ci95"] = metrics.percentile_interval(draws[:, i])
    result["n"] = len(labels)
    return result


def _check_counts(data_dir: Path, labels: np.ndarray, groups: np.ndarray) -> None:
    for k, name in enumerate(CLASS_NAMES):
        films, patients = int((labels == k).sum()), len(set(groups[labels == k].tolist()))
        if films < MIN_FILMS or patients < MIN_PATIENTS:
            raise DataError(
                f"{data_dir / name}: {films} usable film(s) of {patients} patient(s); adapting needs at "
                f"least {MIN_FILMS} films and {MIN_PATIENTS} patients per class."
            )


def shipped_quantize(metadata: dict[str, Any]) -> str:
    """How the model's weights are stored when it is a bundle (`export`'s `--quantize`)."""
    return metadata.get("export", {}).get("quantize", "none")


def _write_bundle(parent: Path, meta: dict[str, Any], out: Path, model: Any = None) -> None:
    """`out`, swapped in whole or not at all: for weights that stay, the parent's files with the
    new metadata.json; for new weights, `export_bundle` of them, in the parent's formats and
    weight storage (or every format, float32, for a run folder)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    build = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        if model is None:
            shutil.copytree(
                parent, build, dirs_exist_ok=True, ignore=shutil.ignore_patterns("checkpoint", ".*")
            )
            metadata_io.write(build, meta)
            replace_dir_atomic(build, out)
            return
        model.save(build / run_folder.MODEL)
        metadata_io.write(build, meta)
        if (parent / run_folder.SPLITS).is_file():
            shutil.copy2(parent / run_folder.SPLITS, build / run_folder.SPLITS)
        formats = tuple(meta.get("export", {}).get("formats", FORMATS))
        export_bundle(build, out, shipped_quantize(meta), formats, source=f"{parent}, adapted")
    finally:
        shutil.rmtree(build, ignore_errors=True)
