"""Which features should the out-of-distribution flag read? Features of several layers of one
model on every set of benchmarks/trust/ood_sweep.py (and the dev films), computed once and
cached, then out-of-distribution rules compared on them without running the model again.

    .venv/bin/python -m benchmarks.trust.ood_layers features --model BUNDLE --out FEATURES.npz \
        [--data ../shared/data/chest_xray] [--dev ../shared/data/chest_xray_shift_dev] \
        [--layers stage2_out stage3_out ...]
    .venv/bin/python -m benchmarks.trust.ood_layers sweep FEATURES.npz \
        --rules stage3_out stage2_out stage2_out+stage3_out stage2_out,stage3_out \
        [--components 64 128] [--margins 1.1 1.2 1.3]

`features`: one forward pass per set, the film alone (the flag reads the film's own features,
not its test-time copies'), each layer's output pooled per channel (mean, population sd). The
sets: the non-X-rays of `ood_bench` (synthetic, 60 of each kind with seed 7; the packaged
photographs and pydicom slices; `--real`), the model's train, val and internal-test splits, the
frozen shifted copies of val and internal-test, the sample X-rays and, with `--dev`, the dev
films of the real shift (measured only: they choose nothing here).

`sweep`: each rule is fitted with `ood.fit` (the training split, the threshold at the margin
times val's quantile), as `ood_sweep` does, with the NORMAL2-IM- family held-out rows. A rule
is a layer (`stage3_out`: `mean_std` pooling; `stage3_out:sqrt_mean_std`, `stage3_out:none`),
layers joined by `+` (their pooled features concatenated into one vector, one Mahalanobis
distance) or by `,` (one Mahalanobis distance per group, each with its own threshold, the flag
when any is over its own; `*F` after a group multiplies its margin by F). The sets that choose
the rule are the ones that measure it: the rows are not an unseen test.
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

import numpy as np

from benchmarks.robustness.acquisition_shift import build_shifted
from benchmarks.trust.ood_bench import DEFAULT_DATA, FAMILIES, REPO, non_xray_paths
from pneumoscan import ood
from pneumoscan.bundle import Bundle
from pneumoscan.data import find_images, inputs, list_images, rebuild_splits
from pneumoscan.preprocess import ImageError, decode, resize

SAMPLES = REPO / "samples" / "chest_xray"
DEV = REPO.parent / "shared" / "data" / "chest_xray_shift_dev"
LAYERS = ("stage1_out", "stage2_add", "stage2_out", "stage3_add", "stage3_out")
XRAY_SETS = ("train", "val", "internal-test", "shifted val", "shifted internal-test", "samples", "dev")
BATCH = 64


class Probe:
    """The model with several inner layers as outputs: the film alone, no test-time copies."""

    def __init__(self, bundle: Bundle, layers: list[str], raw: list[str]):
        import keras

        self.layers, self.raw = layers, raw
        model = bundle.model
        self.twin = keras.Model(model.inputs, [model.get_layer(name).output for name in layers])

    def pooled(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """layer -> (n, 2c) [channel means, channel sds], float64, as `ood.features` pools
        (`mean_std`); `layer:sqrt_mean_std` -> the same of the square roots; `layer:none` -> the
        output flattened, for the layers of `raw`."""
        out: dict[str, list[np.ndarray]] = {name: [] for name in self.layers}
        out.update({f"{name}:none": [] for name in self.raw})
        out.update({f"{name}:sqrt_mean_std": [] for name in self.layers})
        for start in range(0, len(images), BATCH):
            result = self.twin(images[start : start + BATCH], training=False)
            result = result if isinstance(result, list | tuple) else [result]
            for name, values in zip(self.layers, result, strict=True):
                out[name].append(ood.features(np.asarray(values), "mean_std"))
                out[f"{name}:sqrt_mean_std"].append(ood.features(np.asarray(values), "sqrt_mean_std"))
                if name in self.raw:
                    out[f"{name}:none"].append(ood.features(np.asarray(values), "none").astype(np.float32))
        return {name: np.concatenate(parts) for name, parts in out.items()}


def file_inputs(paths: list[Path], size: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(model inputs, [colourfulness, aspect], names) of the files that decode, as predict sees them."""
    images, checks, names = [], [], []
    for path in paths:
        try:
            decoded = decode(path)
        except ImageError:
            continue
        images.append(resize(decoded.luma, size))
        checks.append([decoded.colourfulness, decoded.aspect])
        names.append(path.name)
    return np.stack(images), np.array(checks, dtype=np.float64), names


def compute(
    bundle: Bundle, layers: list[str], raw: list[str], data: Path, dev: Path | None, real: Path | None
) -> dict:
    """Flat arrays for np.savez: `SET|LAYER` features (`SET|LAYER:none` for `raw`), `SET|checks`,
    `SET|names`."""
    probe, size = Probe(bundle, layers, raw), bundle.image_size
    arrays: dict[str, np.ndarray] = {}

    def add(name: str, images: np.ndarray, checks: np.ndarray, names: list[str]) -> None:
        for layer, values in probe.pooled(images).items():
            arrays[f"{name}|{layer}"] = values
        arrays[f"{name}|checks"], arrays[f"{name}|names"] = checks, np.array(names)
        print(f"{name}: {len(names)} images", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for name, paths in non_xray_paths(folder, 60, 7, real).items():
            add(f"nonxray {name}", *file_inputs(paths, size))
        for split in ("val", "internal-test"):
            build_shifted(data, split, folder / f"shifted-{split}")
            listed = [path for path, _ in list_images(folder / f"shifted-{split}")]
            add(f"shifted {split}", *file_inputs(listed, size))
    add("samples", *file_inputs(find_images(SAMPLES), size))
    if dev is not None:
        add("dev", *file_inputs([path for path, _ in list_images(dev)], size))
    meta = bundle.metadata
    digests = {name: info["digest"] for name, info in meta["data"]["splits"].items()}
    splits = rebuild_splits(data, meta["data"]["rule"], digests, size)
    for name, samples in splits.splits.items():
        add(name, inputs(samples), ood.sample_checks(samples), [s.path.name for s in samples])
    return arrays


class Sets:
    """The cached features: set names, and (features, checks) of a set under a rule's layers."""

    def __init__(self, path: Path):
        with np.load(path) as cached:
            self.arrays = {key: cached[key] for key in cached.files}
        self.names = sorted({key.split("|")[0] for key in self.arrays})

    def features(self, name: str, layers: list[str], rows: np.ndarray | None = None) -> np.ndarray:
        values = np.concatenate([self.arrays[f"{name}|{layer}"] for layer in layers], axis=1)
        return values if rows is None else values[rows]

    def checks(self, name: str, rows: np.ndarray | None = None) -> np.ndarray:
        values = self.arrays[f"{name}|checks"]
        return values if rows is None else values[rows]

    def member(self, name: str, family: str) -> np.ndarray:
        return np.char.startswith(self.arrays[f"{name}|names"].astype(str), family)


def parse_rule(rule: str) -> tuple[list[list[str]], list[float]]:
    """'a+b,c*1.5' -> ([[a, b], [c]], [1, 1.5]): one Mahalanobis part per comma, its layers
    concatenated, its margin the sweep's times the factor after `*` (1 without)."""
    parts, factors = [], []
    for part in rule.split(","):
        layers, _, factor = part.partition("*")
        parts.append(layers.split("+"))
        factors.append(float(factor or 1.0))
    return parts, factors


def fit_parts(sets: Sets, parts: list[list[str]], components: int, rows: dict | None = None) -> list:
    """One `ood.fit` block per part (margin 1), fitted on train with val's quantile; `rows`
    (set -> boolean mask) keeps a subset of train and val."""
    rows = rows or {}
    blocks = []
    for layers in parts:
        train = sets.features("train", layers, rows.get("train"))
        val = sets.features("val", layers, rows.get("val"))
        blocks.append(
            ood.fit(
                train,
                val,
                sets.checks("val", rows.get("val")),
                ("+".join(layers), "mean_std"),
                components,
                margin=1.0,
            )
        )
    return blocks


def rule_scores(
    sets: Sets, parts: list[list[str]], blocks: list, margins: list[float], name: str, rows=None
) -> np.ndarray:
    """ood_score of a set under the rule: the largest part, each over its margin x its
    threshold, with colourfulness and aspect as `ood.scores` has them."""
    scored = []
    for layers, block, margin in zip(parts, blocks, margins, strict=True):
        wider = {
            **block,
            "mahalanobis": {**block["mahalanobis"], "threshold": block["mahalanobis"]["threshold"] * margin},
        }
        scored.append(ood.scores(wider, sets.features(name, layers, rows), sets.checks(name, rows)))
    return np.max(scored, axis=0)


def sweep(sets: Sets, rules: list[str], components: list[int], margins: list[float]) -> None:
    nonxrays = [name for name in sets.names if name.startswith("nonxray")]
    real = [name for name in nonxrays if "synthetic" not in name]
    synthetic = [name for name in nonxrays if "synthetic" in name]
    family = FAMILIES[0]
    member = {name: sets.member(name, family) for name in ("train", "val", "internal-test")}
    has_dev = "dev" in sets.names
    print(
        "| rule | directions, margin | non-X-rays flagged | synthetic | lowest real | "
        f"shifted val / internal-test | {family} held out, unseen / training part | "
        f"highest sample X-ray | {'dev flagged (highest) | ' if has_dev else ''}\n"
        f"|---|---|---|---|---|---|---|---|{'---|' if has_dev else ''}"
    )
    for rule in rules:
        parts, factors = parse_rule(rule)
        for k in components:
            blocks = fit_parts(sets, parts, k)
            rest = {name: ~mask for name, mask in member.items()}
            held = fit_parts(sets, parts, k, rest)
            for sweep_margin in margins:
                margin = [sweep_margin * factor for factor in factors]
                score = {name: rule_scores(sets, parts, blocks, margin, name) for name in sets.names}
                all_non = np.concatenate([score[n] for n in nonxrays])
                syn = np.concatenate([score[n] for n in synthetic])
                low_real = min(score[n].min() for n in real)
                shifted = [(score[f"shifted {s}"] > 1).mean() for s in ("val", "internal-test")]
                unseen = np.concatenate(
                    [rule_scores(sets, parts, held, margin, n, member[n]) for n in ("val", "internal-test")]
                )
                trained = rule_scores(sets, parts, held, margin, "train", member["train"])
                dev = (
                    f" {(score['dev'] > 1).sum()} of {len(score['dev'])} ({score['dev'].max():.2f}) |"
                    if has_dev
                    else ""
                )
                flagged = f"{(all_non > 1).sum()} of {len(all_non)} = {(all_non > 1).mean():.1%}"
                print(
                    f"| {rule} | {k}, {sweep_margin:g} | {flagged} | {(syn > 1).mean():.1%} | "
                    f"{low_real:.2f} | {shifted[0]:.1%} / {shifted[1]:.1%} | {(unseen > 1).mean():.1%} / "
                    f"{(trained > 1).mean():.1%} | {score['samples'].max():.2f} |{dev}",
                    flush=True,
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("features", help="compute and cache the features of every set")
    make.add_argument("--model", required=True)
    make.add_argument("--out", type=Path, required=True)
    make.add_argument("--data", type=Path, default=DEFAULT_DATA)
    make.add_argument("--dev", type=Path, default=DEV if DEV.is_dir() else None)
    make.add_argument("--real", type=Path, default=None, help="a folder of real non-X-ray images")
    make.add_argument("--layers", nargs="+", default=list(LAYERS))
    make.add_argument("--raw", nargs="*", default=["stage3_out"], help="layers also kept unpooled")
    run = sub.add_parser("sweep", help="compare rules on cached features")
    run.add_argument("features", type=Path)
    run.add_argument("--rules", nargs="+", required=True)
    run.add_argument("--components", type=int, nargs="+", default=[64, 128])
    run.add_argument("--margins", type=float, nargs="+", default=[1.1, 1.2, 1.3])
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # pydicom's notes on its own test files
    if args.command == "features":
        arrays = compute(Bundle.load(args.model), args.layers, args.raw, args.data, args.dev, args.real)
        np.savez_compressed(args.out, **arrays)
    else:
        sweep(Sets(args.features), args.rules, args.components, args.margins)


if __name__ == "__main__":
    main()
