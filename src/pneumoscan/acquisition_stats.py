"""How a film was acquired, not what it shows: cheap statistics that the shift validation design
holds out by (`pneumoscan train --val-design acquisition`, `data.acquisition_split`).

The official test split of the training data's source comes from an earlier period of the same
hospital; its normal films sit between the training normals and the training pneumonias in
exposure, sharpness and burned-in annotations. Thirteen statistics of a film (at 224 px) carry
that: the log variance of its Laplacian (sharpness, processing), grey-level percentiles and
dynamic range, the mean of the film, of its centre and of its border strips, the share of bright
text-like pixels in the top corners, and the skew and kurtosis of its histogram. A class-balanced
logistic regression on them, fitted out of fold by patient group, scores how pneumonia-like a
film's acquisition looks; the design validates on the normals it scores highest.
"""

from __future__ import annotations

import hashlib

import numpy as np

FEATURES = (
    "lap_logvar", "p1", "p99", "range", "mean", "centre", "top", "bottom", "sides",
    "text_tr", "text_tl", "skew", "kurt",
)  # fmt: skip
SIDE = 224  # the statistics are taken at this size (the training files' own)
FOLDS = 5


def statistics(gray: np.ndarray) -> np.ndarray:
    """The FEATURES of one (H, W) uint8 luma film, float64 (len(FEATURES),)."""
    g = _at_side(gray)
    h, w = g.shape
    laplacian = -4 * g[1:-1, 1:-1] + g[:-2, 1:-1] + g[2:, 1:-1] + g[1:-1, :-2] + g[1:-1, 2:]
    p1, p99 = np.percentile(g, [1, 99])
    band, text_h, text_w = round(0.12 * h), round(0.15 * h), round(0.35 * w)
    flat = g.ravel()
    mean, spread = flat.mean(), flat.std() + 1e-9
    z = (flat - mean) / spread
    sides = np.concatenate([g[:, :band].ravel(), g[:, -band:].ravel()]).mean()
    values = (
        np.log(laplacian.var() + 1e-9), p1, p99, p99 - p1, mean,
        g[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4].mean(), g[:band].mean(), g[-band:].mean(), sides,
        _bright_share(g[:text_h, w - text_w :]), _bright_share(g[:text_h, :text_w]),
        np.mean(z**3), np.mean(z**4) - 3.0,
    )  # fmt: skip
    return np.array(values, np.float64)


def _at_side(gray: np.ndarray) -> np.ndarray:
    if gray.shape == (SIDE, SIDE):
        return gray.astype(np.float64)
    from PIL import Image

    resized = Image.fromarray(gray).resize((SIDE, SIDE), Image.Resampling.BILINEAR)
    return np.asarray(resized, np.float64)


def _bright_share(strip: np.ndarray) -> float:
    """Burned-in text: pixels near white and well above the strip's median."""
    return float(((strip >= 235) & (strip >= np.median(strip) + 60)).mean())


Fitted = tuple[np.ndarray, np.ndarray, np.ndarray]  # feature means, feature scales, weights


def fit_logistic(x: np.ndarray, y: np.ndarray, strength: float = 1.0) -> Fitted:
    """Class-balanced, L2-penalised logistic regression on standardised features (as
    scikit-learn's with C=`strength`), by Newton's method.

    Returns:
        (mean, scale, weights): score a row r by sigmoid(((r - mean) / scale) @ weights[:-1] + weights[-1]).
    """
    mean, scale = x.mean(axis=0), x.std(axis=0) + 1e-12
    design = np.column_stack([(x - mean) / scale, np.ones(len(x))])
    counts = np.bincount(y, minlength=2)
    sample = len(y) / (2.0 * counts[y])  # "balanced" class weights
    penalty = np.full(design.shape[1], 1.0 / strength)
    penalty[-1] = 0.0  # the intercept is not penalised
    weights = np.zeros(design.shape[1])
    for _ in range(50):
        p = 1.0 / (1.0 + np.exp(-(design @ weights)))
        gradient = design.T @ (sample * (p - y)) + penalty * weights
        hessian = (design * (sample * p * (1 - p))[:, None]).T @ design + np.diag(penalty)
        step = np.linalg.solve(hessian, gradient)
        weights -= step
        if np.abs(step).max() < 1e-10:
            break
    return mean, scale, weights


def score(x: np.ndarray, fitted: Fitted) -> np.ndarray:
    mean, scale, weights = fitted
    return 1.0 / (1.0 + np.exp(-(((x - mean) / scale) @ weights[:-1] + weights[-1])))


def out_of_fold_scores(x: np.ndarray, y: np.ndarray, groups: list[int], seed: int) -> np.ndarray:
    """Each film's pneumonia-likeness from a `fit_logistic` that did not see its group: FOLDS
    folds of whole groups, stratified by label, in a seeded hash order."""
    by_group: dict[int, list[int]] = {}
    for index, group in enumerate(groups):
        by_group.setdefault(group, []).append(index)
    fold = np.empty(len(y), int)
    for label in (0, 1):
        members = [g for g, rows in by_group.items() if round(float(np.mean(y[rows]))) == label]
        members.sort(key=lambda g: hashlib.sha256(f"{seed}:{min(by_group[g])}".encode()).hexdigest())
        for rank, g in enumerate(members):
            fold[by_group[g]] = rank % FOLDS
    scores = np.empty(len(y))
    for k in range(FOLDS):
        held = fold == k
        scores[held] = score(x[held], fit_logistic(x[~held], y[~held]))
    return scores


MAX_WEIGHT = 10.0  # the largest balancing weight, before scaling: a few films must not dominate


def balancing_weights(
    x: np.ndarray, y: np.ndarray, groups: list[int], seed: int, strength: float
) -> np.ndarray:
    """Per film, (1 / P(its label | its acquisition)) ** `strength`, P from `out_of_fold_scores`,
    clipped at MAX_WEIGHT and scaled to mean 1 within each class. At strength 1 (inverse
    propensity) the acquisition statistics no longer predict the label in the weighted data: a
    normal film that looks acquired like the pneumonias counts more, and so does a pneumonia that
    looks like the normals. Strength 0 gives ones."""
    if strength == 0:
        return np.ones(len(y))
    p = out_of_fold_scores(x, y, groups, seed)
    own_label = np.where(y == 1, p, 1.0 - p)
    weights = np.minimum(np.maximum(own_label, 1e-12) ** -strength, MAX_WEIGHT)
    for label in (0, 1):
        members = y == label
        if members.any():
            weights[members] /= weights[members].mean()
    return weights
