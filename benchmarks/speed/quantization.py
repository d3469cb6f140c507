"""What TF.js weight quantization costs: size and internal-test AUC for none / float16 / uint8.

    .venv/bin/python -m benchmarks.speed.quantization --model RUN_DIR --data ../shared/data/chest_xray

Each variant is exported with `pneumoscan.tfjs.write_tfjs`; its weights are read back exactly
as TF.js dequantizes them and put into the Keras model (`bundle.tfjs_weights`), which is then
evaluated on the internal-test split (and val) like `pneumoscan evaluate`. The bundle may ship
quantized weights when internal-test AUC stays within 0.002 of float32.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

TOLERANCE = 0.002


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    args = parser.parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from pneumoscan.bundle import Bundle, tfjs_weights
    from pneumoscan.evaluate import evaluate
    from pneumoscan.tfjs import write_tfjs

    bundle = Bundle.load(args.model)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for quantize in ("none", "float16", "uint8"):
            info = write_tfjs(bundle.model, Path(tmp) / quantize, quantize=quantize)
            with tfjs_weights(bundle.model, Path(tmp) / quantize):
                scores = {
                    split: evaluate(bundle, args.data, split, n_resamples=200).result["roc_auc"]
                    for split in ("val", "internal-test")
                }
            rows.append((quantize, info["total_bytes"], scores))
    base = rows[0][2]["internal-test"]
    print(f"model {args.model}\n")
    print(f"| weights | TF.js bytes | val AUC | internal-test AUC | Δ vs float32 | within {TOLERANCE} |")
    print("|---|---|---|---|---|---|")
    for quantize, size, scores in rows:
        delta = scores["internal-test"] - base
        print(
            f"| {quantize} | {size:,} | {scores['val']:.4f} | {scores['internal-test']:.4f} | {delta:+.4f} | "
            f"{'yes' if abs(delta) <= TOLERANCE else 'no'} |"
        )


if __name__ == "__main__":
    main()
