"""Choose the out-of-distribution fit: its number of exact directions and its margin over the val
quantile, against the sets of benchmarks/trust/ood_bench.py.

    .venv/bin/python -m benchmarks.trust.ood_sweep --model src/pneumoscan/bundled \
        [--data ../shared/data/chest_xray] [--real DIR] [--components 64 128 160 256] \
        [--margins 1.0 1.3 1.4 1.5]

The model's features of every set are computed once (one forward pass each): the synthetic and
packaged non-X-rays of `ood_bench`, `--real`, the val, internal-test and training splits, the
frozen shifted copies of val and internal-test, and the sample X-rays. Then `ood.fit` is run for
each number of directions (on the training split, threshold from val) and each margin applied,
and so is the NORMAL2-IM- family hold-out (fitted without the family, measured on it). Prints one
Markdown row per (directions, margin). The sets that choose the fit are the ones that measure
it: the rows are not an unseen test.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import warnings
from pathlib import Path

import numpy as np

from benchmarks.robustness.acquisition_shift import build_shifted
from benchmarks.trust.ood_bench import DEFAULT_DATA, FAMILIES, REPO, non_xray_paths, xray_features
from pneumoscan import ood
from pneumoscan.bundle import Bundle
from pneumoscan.data import find_images, list_images
from pneumoscan.preprocess import ImageError, decode, resize

SAMPLES = REPO / "samples" / "chest_xray"
XRAY_SETS = ("shifted val", "shifted internal-test", "samples")


def file_features(bundle: Bundle, paths: list[Path]) -> tuple[np.ndarray, np.ndarray]:
    """(pooled features, [colourfulness, aspect]) of the files that decode, as predict sees them."""
    images, checks = [], []
    for path in paths:
        try:
            decoded = decode(path)
        except ImageError:
            continue
        images.append(resize(decoded.luma, bundle.image_size))
        checks.append([decoded.colourfulness, decoded.aspect])
    block = bundle.metadata["ood"]
    _, maps = bundle.forward_features(np.stack(images), layer=block["feature_layer"])
    return ood.features(maps, block["feature_pooling"]), np.array(checks)


def feature_sets(bundle: Bundle, data: Path, real: Path | None, folder: Path) -> dict:
    """name -> (features, checks) of every set."""
    sets = {name: file_features(bundle, paths) for name, paths in non_xray_paths(folder, 60, 7, real).items()}
    for split in ("val", "internal-test"):
        build_shifted(data, split, folder / f"shifted-{split}")
        listed = list_images(folder / f"shifted-{split}")
        sets[f"shifted {split}"] = file_features(bundle, [path for path, _ in listed])
    sets["samples"] = file_features(bundle, find_images(SAMPLES))
    return sets


def with_margin(block: dict, margin: float) -> dict:
    wider = copy.deepcopy(block)
    wider["mahalanobis"]["threshold"] *= margin
    return wider


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(REPO / "src" / "pneumoscan" / "bundled"))
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--real", type=Path, default=None, help="a folder of real non-X-ray images")
    parser.add_argument("--components", type=int, nargs="+", default=[64, 128, 160, 256])
    parser.add_argument("--margins", type=float, nargs="+", default=[1.0, 1.3, 1.4, 1.5])
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # pydicom's notes on its own test files
    bundle = Bundle.load(args.model)
    source = bundle.metadata["ood"]["feature_layer"], bundle.metadata["ood"]["feature_pooling"]
    with tempfile.TemporaryDirectory() as tmp:
        sets = feature_sets(bundle, args.data, args.real, Path(tmp))
    splits = xray_features(bundle, args.data)
    family = FAMILIES[0]
    member = {name: np.char.startswith(split[2], family) for name, split in splits.items()}
    (train_f, train_c, *_), (val_f, val_c, *_) = splits["train"], splits["val"]
    unseen = [(split[0][member[n]], split[1][member[n]]) for n, split in splits.items() if n != "train"]
    unseen_f, unseen_c = (np.concatenate(part) for part in zip(*unseen, strict=True))
    print(
        "| directions, margin | all non-X-rays flagged | lowest real non-X-ray | "
        f"shifted val / internal-test | {family} held out, unseen / training part | "
        "highest sample X-ray |\n|---|---|---|---|---|---|"
    )
    for components in args.components:
        fitted = ood.fit(train_f, val_f, val_c, source, components, margin=1.0)
        rest_train, rest_val = ~member["train"], ~member["val"]
        held = ood.fit(train_f[rest_train], val_f[rest_val], val_c[rest_val], source, components, margin=1.0)
        for margin in args.margins:
            block, held_block = with_margin(fitted, margin), with_margin(held, margin)
            score = {name: ood.scores(block, *pair) for name, pair in sets.items()}
            nonxrays = np.concatenate([s for n, s in score.items() if n not in XRAY_SETS])
            real = np.concatenate(
                [s for n, s in score.items() if n not in XRAY_SETS and "synthetic" not in n]
            )
            shifted = [(score[f"shifted {s}"] > 1).mean() for s in ("val", "internal-test")]
            held_rates = [
                (ood.scores(held_block, unseen_f, unseen_c) > 1).mean(),
                (ood.scores(held_block, train_f[member["train"]], train_c[member["train"]]) > 1).mean(),
            ]
            print(
                f"| {components}, {margin:g} | {(nonxrays > 1).mean():.1%} | {real.min():.2f} | "
                f"{shifted[0]:.1%} / {shifted[1]:.1%} | {held_rates[0]:.1%} / {held_rates[1]:.1%} | "
                f"{score['samples'].max():.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
