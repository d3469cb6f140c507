"""What three test-time copies cost: the forward pass of one pass against three.

    .venv/bin/python -m benchmarks.speed.tta_cost --model src/pneumoscan/bundled

Python: `Bundle.forward` over 1,024 random inputs, once and three times over (best of 3
rounds), as images per second; the bundle's own `test_time` block, if it has one, is set
aside, so one pass is one pass. Page: `node benchmarks/speed/tta_cost.mjs BUNDLE/tfjs`, the TF.js
model on the wasm backend in Node (one thread), one image against a batch of three. Both time
the model alone; decoding, preprocessing, heatmap and the out-of-distribution features come on
top, as in `predict_bench.py` and `browser_bench.py`.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

COUNT = 1024


def python_rates(model: Path) -> dict[int, float]:
    from pneumoscan.bundle import Bundle

    loaded = Bundle.load(model)
    plain = {key: value for key, value in loaded.metadata.items() if key != "test_time"}
    bundle = Bundle(loaded.folder, loaded.model, plain)
    size = bundle.image_size
    images = np.random.default_rng(0).uniform(0, 255, (COUNT, size, size, 1)).astype(np.float32)
    bundle.forward(images[:128])  # traced once
    rates = {}
    for passes in (1, 3):
        copies = np.concatenate([images] * passes)
        best = min(_seconds(bundle.forward, copies) for _ in range(3))
        rates[passes] = COUNT / best
    return rates


def _seconds(function, argument) -> float:
    start = time.perf_counter()
    function(argument)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True, help="a bundle with tfjs/")
    args = parser.parse_args(argv)
    for passes, rate in python_rates(args.model).items():
        print(f"python, {passes} pass(es): {rate:.0f} images/s")
    script = Path(__file__).with_suffix(".mjs")
    subprocess.run(["node", str(script), str(args.model / "tfjs")], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
