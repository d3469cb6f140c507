"""`python -m benchmarks.robustness.adapt_ood --model ADAPTED --data SITE_DIR`: what the "not a
chest X-ray" flag of a fine-tuned bundle (`pneumoscan adapt`) flags, with its own `ood` block
and with its parent's block on the same (fine-tuned) features, beside the parent model itself:
the site's X-rays and the synthetic non-X-rays of `benchmarks/trust/nonxray.py`
(`--per-kind` of each kind, `--seed`). Counts of flagged images per set.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.trust import nonxray
from pneumoscan import ood as ood_maths
from pneumoscan.bundle import Bundle
from pneumoscan.data import scan
from pneumoscan.preprocess import decode, resize


def read(paths: list[Path], size: int) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, [colourfulness, aspect]) of image files."""
    decoded = [decode(path, path.read_bytes()) for path in paths]
    images = np.stack([resize(d.luma, size) for d in decoded])
    return images, np.array([[d.colourfulness, d.aspect] for d in decoded], dtype=np.float64)


def flagged(model: Bundle, block: dict, images: np.ndarray, checks: np.ndarray) -> int:
    _, output = model.forward_features(images, 32, block["feature_layer"])
    features = ood_maths.features(output, block["feature_pooling"])
    return int((ood_maths.scores(block, features, checks) > 1.0).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="the adapted bundle")
    parser.add_argument("--data", required=True, type=Path, help="the site's films: NORMAL/ and PNEUMONIA/")
    parser.add_argument("--per-kind", type=int, default=60, help="synthetic non-X-rays per kind (default 60)")
    parser.add_argument("--seed", type=int, default=7, help="their seed (default 7)")
    parser.add_argument("--parent", default=None, help="the parent model (default: the bundled model)")
    args = parser.parse_args()

    adapted = Bundle.load(args.model)
    parent = Bundle.load(args.parent)
    size = adapted.image_size
    site = scan(args.data, size)
    sets = {"site X-rays": (np.stack([s.image for s in site.samples]), ood_maths.sample_checks(site.samples))}
    with tempfile.TemporaryDirectory() as tmp:
        written = nonxray.write_set(Path(tmp), args.per_kind, seed=args.seed)
        for kind, paths in written.items():
            sets[kind] = read(paths, size)
    sets["all non-X-rays"] = tuple(np.concatenate([sets[k][i] for k in written]) for i in (0, 1))
    print("| images | n | adapted weights, adapted block | adapted weights, parent's block | parent |")
    print("|---|---|---|---|---|")
    for name, (images, checks) in sets.items():
        cells = [
            flagged(adapted, adapted.metadata["ood"], images, checks),
            flagged(adapted, parent.metadata["ood"], images, checks),
            flagged(parent, parent.metadata["ood"], images, checks),
        ]
        print(f"| {name} | {len(images)} | {' | '.join(str(c) for c in cells)} |")


if __name__ == "__main__":
    main()
