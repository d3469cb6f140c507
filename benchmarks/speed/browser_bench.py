"""`python -m benchmarks.speed.browser_bench --model BUNDLE`: how heavy and how fast the web app is.

Serves BUNDLE with `pneumoscan.serve`, drives Debian's headless Chromium with Playwright and
prints a Markdown table:

- download: bytes of BUNDLE/tfjs/* and metadata.json (what a browser fetches for the model);
- load: navigation start to `<body data-ready="true">` (scripts, backend start, model fetch
  and a warm-up prediction), median of `--loads` cold loads (a fresh browser context each);
- per image: median over `--images` files of the card's `data-ms` (decode, grayscale,
  resize, predict, calibrate) and `data-infer-ms` (the predict call alone);
- threads: the page's `data-threads` (TF.js' wasm threads; 1 for cpu).

`--compare-threads ROUNDS` then times the wasm backend threaded against single-threaded, as
pages on two servers: `serve`'s own at `?threads=` `--threads` (cross-origin isolated: TF.js'
threaded SIMD build; default a thread per CPU, at most 8) and one without COEP (not isolated:
the single-threaded SIMD build the page ran before issue 22). Each round loads both cold and
gives each the same `--count` images, in alternating order (ABBA), so a load on the machine
falls on both; it prints each round's per-image medians and their ratio, then the ratios'
median and range. `--threads 1` makes it an A/A comparison: the spread that is noise.

It runs the model at full speed on the CPU: do not run it on a large model while a training
shares the machine.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import statistics
import sys
from pathlib import Path

from playwright.sync_api import expect, sync_playwright

from pneumoscan.data import find_images
from pneumoscan.serve import make_server, start_in_thread

REPO = Path(__file__).resolve().parents[2]
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
TIMEOUT_MS = 300_000


def bundle_bytes(bundle: Path) -> int:
    files = [bundle / "metadata.json", *sorted((bundle / "tfjs").iterdir())]
    return sum(path.stat().st_size for path in files if path.is_file())


def image_files(folder: Path, count: int) -> list[Path]:
    found = find_images(folder)
    if not found:
        raise SystemExit(f"browser_bench: no JPEG or PNG files under {folder}")
    return list(itertools.islice(itertools.cycle(found), count))


def open_ready(browser, url: str):
    """A fresh context (cold cache) and page at `url`, once the model is loaded."""
    context = browser.new_context()
    page = context.new_page()
    page.goto(url)
    expect(page.locator("body[data-ready]")).to_have_count(1, timeout=TIMEOUT_MS)
    if page.evaluate("document.body.dataset.ready") != "true":
        raise SystemExit(f"browser_bench: the page did not load the model: {page.inner_text('#load-error')}")
    return context, page


def page_bytes(browser, url: str) -> int:
    """Bytes a cold load of the page fetches (HTML, scripts, TF.js, wasm binary, model)."""
    context = browser.new_context()
    page = context.new_page()
    sizes: list[int] = []
    page.on("response", lambda response: sizes.append(int(response.headers.get("content-length", 0))))
    page.goto(url)
    expect(page.locator("body[data-ready]")).to_have_count(1, timeout=TIMEOUT_MS)
    context.close()
    return sum(sizes)


def classify(browser, url: str, backend: str, files: list[Path]) -> dict:
    """A cold page at `url` on `backend` given `files`: its threads and per-image medians (ms)."""
    context, page = open_ready(browser, url)
    in_use = page.evaluate("document.body.dataset.backend")
    if in_use != backend:
        raise SystemExit(f"browser_bench: asked for {backend}, the page runs on {in_use}")
    threads = page.evaluate("document.body.dataset.threads")
    page.set_input_files("input[type=file]", [str(path) for path in files])
    cards = page.locator("[data-testid=result]")
    expect(cards).to_have_count(len(files), timeout=TIMEOUT_MS)
    data = cards.evaluate_all("cards => cards.map(card => ({...card.dataset}))")
    context.close()
    failed = [card for card in data if "error" in card]
    if failed:
        raise SystemExit(f"browser_bench: {failed[0]['error']}")
    return {
        "threads": int(threads) if threads else None,
        "image_ms": statistics.median(float(card["ms"]) for card in data),
        "infer_ms": statistics.median(float(card["inferMs"]) for card in data),
    }


def measure(browser, base_url: str, backend: str, files: list[Path], loads: int) -> dict:
    url = f"{base_url}?backend={backend}"
    load_ms = []
    for _ in range(loads):
        context, page = open_ready(browser, url)
        load_ms.append(float(page.evaluate("document.body.dataset.readyMs")))
        context.close()
    return {
        "backend": backend,
        "page_bytes": page_bytes(browser, url),
        "load_ms": statistics.median(load_ms),
        **classify(browser, url, backend, files),
    }


def compare_threads(
    browser, threaded_url: str, single_url: str, threads: int, files: list[Path], rounds: int
) -> list[dict]:
    """Per round, the wasm page on `threads` threads and single-threaded, in ABBA order."""
    order = [
        ("threaded", f"{threaded_url}?backend=wasm&threads={threads}"),
        ("single", f"{single_url}?backend=wasm"),
    ]
    results = []
    for index in range(rounds):
        row = {}
        for name, url in order if index % 2 == 0 else order[::-1]:
            row[name] = classify(browser, url, "wasm", files)
        if row["single"]["threads"] != 1:
            raise SystemExit(
                f"browser_bench: the single-threaded page runs {row['single']['threads']} threads"
            )
        results.append(row)
    return results


def print_comparison(results: list[dict]) -> None:
    print(
        "\n| round | threads | per image, threaded / single (ms, median) | ratio "
        "| predict only, threaded / single (ms, median) | ratio |"
    )
    print("|---:|---|---:|---:|---:|---:|")
    ratios = {"image_ms": [], "infer_ms": []}
    for index, row in enumerate(results, 1):
        threaded, single = row["threaded"], row["single"]
        cells = []
        for key in ratios:
            ratios[key].append(threaded[key] / single[key])
            cells.append(f"{threaded[key]:.1f} / {single[key]:.1f} | {ratios[key][-1]:.2f}")
        print(f"| {index} | {threaded['threads']} vs {single['threads']} | {' | '.join(cells)} |")
    for key, words in (("image_ms", "per image"), ("infer_ms", "predict only")):
        values = ratios[key]
        print(
            f"\n{words}, threaded / single-threaded: median {statistics.median(values):.2f} "
            f"(range {min(values):.2f}-{max(values):.2f} over {len(values)} rounds)"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, type=Path, help="an exported bundle (with tfjs/)")
    parser.add_argument(
        "--images",
        type=Path,
        default=REPO / "samples" / "chest_xray",
        help="folder of JPEG/PNG files (default: the sample X-rays)",
    )
    parser.add_argument("--count", type=int, default=20, help="images per backend (default 20)")
    parser.add_argument("--loads", type=int, default=3, help="page loads per backend (default 3)")
    parser.add_argument(
        "--backends", default="wasm,cpu", help="comma-separated (default wasm,cpu; '' for none)"
    )
    parser.add_argument(
        "--compare-threads",
        type=int,
        default=0,
        metavar="ROUNDS",
        help="then time wasm threaded against single-threaded, ROUNDS interleaved rounds (default 0: not)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=min(8, os.cpu_count() or 1),
        help="the threaded side's ?threads= (default a thread per CPU, at most 8)",
    )
    parser.add_argument("--chromium", default=os.environ.get("CHROMIUM") or shutil.which("chromium"))
    args = parser.parse_args(argv)
    if not args.chromium:
        raise SystemExit("browser_bench: no Chromium found; install `chromium` or pass --chromium")
    if args.compare_threads < 0:
        raise SystemExit(f"browser_bench: --compare-threads must be 0 or more, not {args.compare_threads}")
    if not 1 <= args.threads <= 8:
        raise SystemExit(f"browser_bench: --threads must be from 1 to 8, not {args.threads}")

    server = make_server(args.model, port=0, quiet=True)
    single = make_server(args.model, port=0, quiet=True, cross_origin_isolated=False)
    for each in (server, single):
        start_in_thread(each)
    files = image_files(args.images, args.count)
    rows, comparison = [], []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
        backends = [backend.strip() for backend in args.backends.split(",") if backend.strip()]
        for backend in backends:
            rows.append(measure(browser, server.url, backend, files, args.loads))
        if args.compare_threads:
            comparison = compare_threads(
                browser, server.url, single.url, args.threads, files, args.compare_threads
            )
        version = browser.version
        browser.close()
    for each in (server, single):
        each.shutdown()
        each.server_close()

    size = bundle_bytes(args.model)
    print(
        f"Model bundle {args.model}: {size:,} bytes to download (tfjs/ + metadata.json); "
        f"Chromium {version} headless, {os.cpu_count()} CPUs; {len(files)} images from {args.images}.\n"
    )
    if rows:
        print(
            "| backend | threads | first load, all files (bytes) "
            f"| load to ready (ms, median of {args.loads}) "
            "| per image, total (ms, median) | per image, predict only (ms, median) |"
        )
        print("|---|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['backend']} | {row['threads'] or '-'} | {row['page_bytes']:,} | {row['load_ms']:.0f} "
            f"| {row['image_ms']:.1f} | {row['infer_ms']:.1f} |"
        )
    if comparison:
        print_comparison(comparison)
    return 0


if __name__ == "__main__":
    sys.exit(main())
