"""Benchmark inference on the bundle's LiteRT flatbuffer against Keras (issue 22): cold start,
`--help`, end-to-end throughput with and without the test-time copies, and where the time goes.

    .venv/bin/python -m benchmarks.speed.litert_bench [--model BUNDLE] [--images 600] [--data DIR]

- cold start: `python -m pneumoscan predict --format json FILM` as a whole new process (warm
  disk cache, one untimed run of each first), on the bundle (LiteRT) and on a copy of it without
  `model.tflite` (Keras), alternated, median of `--runs`; and `python -m pneumoscan --help`.
- throughput: `predict.iter_predictions` over N films (decode, resize, forward, calibration,
  borderline band, out-of-distribution score, records written as JSON lines to memory), in one
  fresh process per runtime, with the shipped copies and without them in turn, median of 3;
  LiteRT and Keras alternate. On LiteRT also its two ways apart: `stream.lanes` (a one-threaded
  interpreter per core) and `stream.batches` (decoding ahead of one interpreter on every core),
  and the cores each run used.
- where the time goes: each stage alone on one thread over the same films (decode, resize,
  the forward pass with and without the copies, the out-of-distribution score and verdicts,
  writing the records), in ms per film; their sum against the end-to-end time per film shows
  what the overlap of decoding and the forward pass gains.

Prints Markdown tables for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pneumoscan.data import find_images

REPO = Path(__file__).resolve().parents[2]
DEFAULT_MODEL = REPO / "src" / "pneumoscan" / "bundled"
DEFAULT_DATA = REPO.parent / "shared" / "data" / "chest_xray" / "train"

THROUGHPUT = r"""
import io, json, sys, time
from pathlib import Path
from pneumoscan.bundle import Bundle
from pneumoscan.predict import RecordWriter, iter_predictions
model, runtime, batch, listing = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
paths = [Path(p) for p in Path(listing).read_text().splitlines()]
loaded = Bundle.load(model, runtime=runtime)
def without_copies(bundle):
    metadata = {k: v for k, v in bundle.metadata.items() if k != "test_time"}
    if bundle.runtime is None:
        return Bundle(bundle.folder, bundle.model, metadata)
    from pneumoscan.litert import Runtime
    return Bundle(bundle.folder, None, metadata, Runtime(bundle.folder, metadata["export"]["litert"]))
bundles = {"copies": loaded, "none": without_copies(loaded)}
def run(bundle, items):  # as predict runs
    with RecordWriter(io.StringIO(), "jsonl") as writer:
        for record in iter_predictions(bundle, items, batch):
            writer.write(record)
    return writer.count
def run_stream(bundle, items):  # decode threads ahead of one interpreter on every core
    from pneumoscan.stream import batches
    layer = bundle.decision.feature_layer
    for films in batches(items, bundle.image_size, batch):
        bundle.decision.apply(*bundle.forward_features(films.images, batch, layer), films.checks)
    return len(items)
import resource
def cpu():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
runs = {name: (run, bundle) for name, bundle in bundles.items()}
if loaded.runtime is not None:
    runs.update({f"stream_{name}": (run_stream, bundle) for name, bundle in bundles.items()})
    from pneumoscan.stream import lanes
    def run_lanes(bundle, items):  # a lane per core, each with its one-threaded interpreter
        layer = bundle.decision.feature_layer
        def decide(films):
            return bundle.decision.apply(*bundle.forward_features(films.images, batch, layer), films.checks)
        for _ in lanes(items, bundle.image_size, batch, decide):
            pass
        return len(items)
    runs.update({f"lanes_{name}": (run_lanes, bundle) for name, bundle in bundles.items()})
for how, bundle in runs.values():  # warm-up: builds the graphs / the interpreter's plans
    how(bundle, paths[: batch + batch // 2])
times = {name: [] for name in runs}
cores = {name: [] for name in runs}
for turn in range(3):
    for name in (list(runs) if turn % 2 else list(runs)[::-1]):
        how, bundle = runs[name]
        start, used = time.perf_counter(), cpu()
        count = how(bundle, paths)
        times[name].append(time.perf_counter() - start)
        cores[name].append((cpu() - used) / times[name][-1])
import numpy as np
from pneumoscan.preprocess import decode_to_input
x = np.stack([decode_to_input(p, loaded.image_size) for p in paths[:256]])
forward = {name: [] for name in bundles}
for turn in range(3):  # the forward pass alone, on the decoded films
    for name, bundle in bundles.items():
        start = time.perf_counter()
        bundle.forward(x, batch)
        forward[name].append(time.perf_counter() - start)
print(json.dumps({"n": count, **{name: sorted(t)[1] for name, t in times.items()},
                  **{f"cores_{name}": sorted(c)[1] for name, c in cores.items()},
                  **{f"forward_{name}": len(x) / sorted(t)[1] for name, t in forward.items()}}))
"""

STAGES = r"""
import io, json, sys, time
import numpy as np
from pathlib import Path
from pneumoscan.bundle import Bundle
from pneumoscan.predict import RecordWriter
from pneumoscan.preprocess import decode, resize
from pneumoscan.litert import Runtime
model, batch, listing = sys.argv[1], int(sys.argv[2]), sys.argv[3]
paths = [Path(p) for p in Path(listing).read_text().splitlines()]
bundle = Bundle.load(model, runtime="litert")
plain = Runtime(bundle.folder, bundle.metadata["export"]["litert"], None)
def per_film(seconds):
    return 1000 * seconds / len(paths)
def timed(work):
    start = time.perf_counter()
    result = work()
    return result, time.perf_counter() - start
decoded, decode_s = timed(lambda: [decode(p) for p in paths])
x, resize_s = timed(lambda: np.stack([resize(d.luma, bundle.image_size) for d in decoded]))
checks = np.array([[d.colourfulness, d.aspect] for d in decoded])
layer = bundle.decision.feature_layer
bundle.forward_features(x[:batch], batch, layer); plain(x[:batch], batch, layer)
(raw, features), forward_s = timed(lambda: bundle.forward_features(x, batch, layer))
_, plain_s = timed(lambda: plain(x, batch, layer))
verdicts, ood_s = timed(lambda: bundle.decision.apply(raw, features, checks))
records = [{"path": str(p), **v.record(), "model": "m", "model_digest": "d"} for p, v in zip(paths, verdicts)]
start = time.perf_counter()
with RecordWriter(io.StringIO(), "jsonl") as writer:
    for record in records:
        writer.write(record)
write_s = time.perf_counter() - start
print(json.dumps({"decode": per_film(decode_s), "resize": per_film(resize_s), "forward": per_film(forward_s),
                  "forward_plain": per_film(plain_s), "ood": per_film(ood_s), "write": per_film(write_s)}))
"""


def image_list(data: Path, count: int) -> list[str]:
    files = find_images(data)
    if not files:
        raise SystemExit(f"{data}: no images")
    return [str(files[i % len(files)]) for i in range(count)]


def whole_process(commands: dict[str, list[str]], runs: int) -> dict[str, float]:
    """Median wall seconds of each command as a new process, the commands alternated."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    for command in commands.values():  # warm the disk cache
        subprocess.run(command, check=True, capture_output=True, env=env)
    times: dict[str, list[float]] = {name: [] for name in commands}
    for turn in range(runs):
        for name in list(commands) if turn % 2 else list(commands)[::-1]:
            start = time.perf_counter()
            subprocess.run(commands[name], check=True, capture_output=True, env=env)
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def child(script: str, *args: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", script, *args],
        check=True,
        capture_output=True,
        text=True,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument(
        "--data", type=Path, default=DEFAULT_DATA if DEFAULT_DATA.is_dir() else REPO / "samples"
    )
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--runs", type=int, default=5, help="whole-process runs of each command (median)")
    args = parser.parse_args()
    if not (args.model / "model.tflite").is_file():
        raise SystemExit(f"{args.model}: no model.tflite (pneumoscan export --add-litert gives it one)")
    paths = image_list(args.data, args.images)
    with tempfile.TemporaryDirectory() as tmp:
        keras_copy = Path(tmp) / "keras-bundle"
        shutil.copytree(args.model, keras_copy, ignore=shutil.ignore_patterns("model.tflite"))
        listing = Path(tmp) / "films.txt"
        listing.write_text("\n".join(paths))
        predict = [sys.executable, "-m", "pneumoscan", "predict", "--format", "json", "--model"]
        cold = whole_process(
            {
                "litert": [*predict, str(args.model), paths[0]],
                "keras": [*predict, str(keras_copy), paths[0]],
                "help": [sys.executable, "-m", "pneumoscan", "--help"],
            },
            args.runs,
        )
        batch = str(args.batch_size)
        throughput = {
            runtime: child(THROUGHPUT, str(folder), runtime, batch, str(listing))
            for runtime, folder in (("litert", args.model), ("keras", keras_copy), ("litert ", args.model))
        }
        stages = child(STAGES, str(args.model), batch, str(listing))
    first, again = throughput["litert"], throughput["litert "]
    litert = {k: statistics.median([first[k], again[k]]) if k != "n" else first[k] for k in first}
    keras = throughput["keras"]
    n = litert["n"]
    print(
        f"LiteRT vs Keras: model {args.model}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, batch {args.batch_size}, {n} films from {args.data}\n"
    )
    print("| measure | LiteRT | Keras | Keras / LiteRT |\n|---|---|---|---|")
    print(
        f"| `predict` one film, whole process, cold (median of {args.runs}) | {cold['litert']:.2f} s | "
        f"{cold['keras']:.2f} s | {cold['keras'] / cold['litert']:.1f}x |"
    )
    for name, label in (("copies", "with the shipped test-time copies"), ("none", "without copies")):
        print(
            f"| end to end over {n} films, {label} (median of 3) | {n / litert[name]:.0f} films/s | "
            f"{n / keras[name]:.0f} films/s | {keras[name] / litert[name]:.2f}x |"
        )
    for name, label in (("copies", "with the copies (3 inputs a film)"), ("none", "without copies")):
        key = f"forward_{name}"
        print(
            f"| forward pass alone, {label}, 256 decoded films | {litert[key]:.0f} films/s | "
            f"{keras[key]:.0f} films/s | {litert[key] / keras[key]:.2f}x |"
        )
    print(
        "\nLiteRT in lanes against the decode-ahead stream (predict runs lanes for a model with "
        "test-time copies, the stream for one without), and the cores each used (CPU seconds over "
        "wall seconds; medians of 3, alternated):\n"
    )
    print("| 640 films | lanes | stream | lanes / stream |\n|---|---|---|---|")
    for name, label in (("copies", "with the copies"), ("none", "without copies")):
        print(
            f"| {label} | {n / litert['lanes_' + name]:.0f} films/s on {litert['cores_lanes_' + name]:.2f} "
            f"cores | {n / litert['stream_' + name]:.0f} films/s on {litert['cores_stream_' + name]:.2f} "
            f"cores | {litert['stream_' + name] / litert['lanes_' + name]:.2f}x |"
        )
    print(f"\n`pneumoscan --help`, whole process (median of {args.runs}): {cold['help']:.2f} s\n")
    print("Where the time goes (LiteRT, each stage alone, one Python thread; ms per film):\n")
    print("| stage | ms per film |\n|---|---|")
    labels = {
        "decode": "decode (file read, JPEG/PNG decode, luma, checks)",
        "resize": "resize (NumPy bilinear)",
        "forward": "forward pass with the copies (3 inputs a film)",
        "forward_plain": "forward pass without the copies",
        "ood": "calibration, band, out-of-distribution score (decision.apply)",
        "write": "writing the records (JSON lines)",
    }
    for key, label in labels.items():
        print(f"| {label} | {stages[key]:.2f} |")
    serial = sum(stages[k] for k in ("decode", "resize", "forward", "ood", "write"))
    print(
        f"| sum with the copies, one after another | {serial:.2f} |\n"
        f"| end to end with the copies (decode overlapping the forward pass) | "
        f"{1000 * litert['copies'] / n:.2f} |"
    )


if __name__ == "__main__":
    main()
