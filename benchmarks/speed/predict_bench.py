"""Benchmark `pneumoscan predict`: cold start and end-to-end images/s on this machine.

    .venv/bin/python -m benchmarks.speed.predict_bench --model RUN_OR_BUNDLE [--images 600] [--data DIR]
    .venv/bin/python -m benchmarks.speed.predict_bench --model RUN_OR_BUNDLE --rss 1000 3000 6000

Cold start: a new process with a warm disk cache (one untimed run first) that imports
pneumoscan, loads the model, decodes and predicts one image; median of 3 runs. Throughput:
`predict_files` over N images (decode + resize + forward + calibration, and the
out-of-distribution flag and borderline band when the model has them) in a fresh process,
median of 5, alternated with the same model without those two blocks; plus the forward pass
alone (`Bundle.forward`) on the same batches, and the process's peak RSS. Prints a
Markdown table for BENCHMARKS.md. With `--rss N ...`: the peak RSS of `pneumoscan predict
--output FILE.jsonl` over folders of N images each, to show memory does not grow with N.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pneumoscan.data import find_images

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "chest_xray" / "train"

THROUGHPUT = r"""
import json, resource, sys, time
import numpy as np
from pneumoscan.bundle import Bundle
from pneumoscan.predict import predict_files
from pneumoscan.preprocess import decode_to_input
model_dir, batch, paths = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
bundle = Bundle.load(model_dir)
# The same model without the out-of-distribution flag and borderline band (issue 11), run in
# turn with it, so that the flag's cost is measured under the same load.
# On the same runtime (LiteRT when the bundle has its flatbuffer, else Keras).
plain = Bundle(bundle.folder, None if bundle.runtime else bundle.model,
               {k: v for k, v in bundle.metadata.items() if k not in ("ood", "borderline")}, bundle.runtime)
for b in (bundle, plain):  # warm-up: traces the graphs, the last short batch's too
    predict_files(b, paths[:batch], batch_size=batch)
    predict_files(b, paths[:batch + batch // 2], batch_size=batch)
def cpu_seconds():  # the process's CPU time, every thread: what the load cannot stretch
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
times, cpu = {"with": [], "without": []}, {"with": [], "without": []}
pair = [("with", bundle), ("without", plain)]
for turn in range(5):  # in turn, each first every other time
    for name, b in pair if turn % 2 else pair[::-1]:
        start, start_cpu = time.perf_counter(), cpu_seconds()
        records = predict_files(b, paths, batch_size=batch)
        times[name].append(time.perf_counter() - start)
        cpu[name].append(cpu_seconds() - start_cpu)
end_to_end, without = sorted(times["with"])[2], sorted(times["without"])[2]
cpu_with, cpu_without = sorted(cpu["with"])[2], sorted(cpu["without"])[2]
x = np.stack([decode_to_input(p, bundle.image_size) for p in paths[:256]])
bundle.forward(x[:batch], batch)
start = time.perf_counter()
bundle.forward(x, batch)
forward = time.perf_counter() - start
print(json.dumps({"n": len(records), "errors": sum("error" in r for r in records),
                  "end_to_end_s": end_to_end, "without_flag_s": without,
                  "cpu_s": cpu_with, "cpu_without_flag_s": cpu_without,
                  "flag_blocks": "ood" in bundle.metadata,
                  "forward_images_per_s": len(x) / forward,
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def image_list(data: Path, count: int) -> list[str]:
    files = find_images(data)
    if not files:
        raise SystemExit(f"{data}: no images")
    return [str(files[i % len(files)]) for i in range(count)]


def cold_start(model: str, image: str, runs: int = 3) -> float:
    command = [sys.executable, "-m", "pneumoscan", "predict", "--model", model, "--format", "json", image]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    subprocess.run(command, check=True, capture_output=True, env=env)  # warm the disk cache
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True, env=env)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_rss_mb(command: list[str]) -> tuple[float, float]:
    """(peak RSS in MB, wall seconds) of one child process, from the kernel's own accounting."""
    start = time.perf_counter()
    process = subprocess.Popen(
        command,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
    )
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) not in (0, 1):
        raise SystemExit(f"{' '.join(command)} failed")
    return usage.ru_maxrss / 1024, time.perf_counter() - start


def memory_table(model: str, data: Path, counts: list[int]) -> None:
    """Peak RSS of `predict --output` over N images (links to the data's images, repeated): flat
    when records stream to the file and nothing grows with N."""
    files = find_images(data)
    print(f"pneumoscan predict --output FILE.jsonl, peak RSS by number of images (model {model})\n")
    print("| images | peak RSS (MB) | wall (s) | images/s |\n|---|---|---|---|")
    for count in counts:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "images"
            folder.mkdir()
            for index in range(count):
                source = files[index % len(files)]
                (folder / f"{index:07d}{source.suffix}").symlink_to(source)
            command = [
                sys.executable,
                "-m",
                "pneumoscan",
                "predict",
                "--model",
                model,
                "--output",
                str(Path(tmp) / "records.jsonl"),
                str(folder),
            ]
            rss, wall = peak_rss_mb(command)
        print(f"| {count:,} | {rss:.0f} | {wall:.1f} | {count / wall:.0f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument(
        "--data", type=Path, default=DEFAULT_DATA if DEFAULT_DATA.is_dir() else REPO / "samples"
    )
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument(
        "--rss",
        type=int,
        nargs="*",
        default=None,
        metavar="N",
        help="instead: peak RSS of `pneumoscan predict --output FILE.jsonl` over folders of N images",
    )
    args = parser.parse_args()
    if args.rss is not None:
        memory_table(args.model, args.data, args.rss or [1000, 3000, 6000])
        return
    paths = image_list(args.data, args.images)
    cold = cold_start(args.model, paths[0])
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "throughput.py"
        script.write_text(THROUGHPUT)
        out = subprocess.run(
            [sys.executable, str(script), args.model, str(args.batch_size), *paths],
            check=True,
            capture_output=True,
            text=True,
            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"),
        ).stdout
    result = json.loads(out.strip().splitlines()[-1])
    meta = json.loads((Path(args.model) / "metadata.json").read_text())
    print(
        f"pneumoscan predict benchmark: model {args.model} ({meta['arch']}, "
        f"{meta['input']['height']}x{meta['input']['width']}), {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, batch {args.batch_size}, data {args.data}\n"
    )
    print("| measure | value |\n|---|---|")
    print(f"| cold start, one image (median of 3) | {cold:.2f} s |")
    print(
        f"| end to end over {result['n']} images (median of 5) | {result['end_to_end_s']:.2f} s = "
        f"{result['n'] / result['end_to_end_s']:.0f} images/s |"
    )
    if result["flag_blocks"]:
        print(
            f"| the same without the ood and borderline blocks, in turn (median of 5) | "
            f"{result['without_flag_s']:.2f} s = {result['n'] / result['without_flag_s']:.0f} images/s |"
        )
        print(
            f"| CPU time over them, all threads (median of 5): with / without the blocks | "
            f"{result['cpu_s']:.2f} s / {result['cpu_without_flag_s']:.2f} s |"
        )
    print(f"| forward pass alone | {result['forward_images_per_s']:.0f} images/s |")
    print(f"| peak RSS (throughput process) | {result['peak_rss_mb']:.0f} MB |")
    print(f"| errors | {result['errors']} |")


if __name__ == "__main__":
    main()
