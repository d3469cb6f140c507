"""The README's pictures of the page, taken with the bundled model (or --model) in Chromium.

    .venv/bin/python -m benchmarks.docs.screenshots [--model BUNDLE] [--out docs]

Writes `screenshot.png` (the page with a pneumonia and a normal sample), `heatmap.png` (the two
cards, the pneumonia's heatmap shown), `ood.png` (a photograph beside the pneumonia film) and
`phone.png` (the page as a 390 x 844 phone first shows it), so that the threshold,
probabilities and model line they show are the shipped model's own. Needs
Debian's chromium and the npm packages (`make setup`); the page picks its backend itself.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "samples" / "chest_xray"
PNEUMONIA = SAMPLES / "PNEUMONIA" / "person1006_bacteria_2937.jpeg"
NORMAL = SAMPLES / "NORMAL" / "IM-0115-0001.jpeg"
TIMEOUT_MS = 120_000
DESKTOP = {"width": 1100, "height": 880}
PHONE = {"width": 390, "height": 844}
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--no-first-run"]


def photograph(folder: Path) -> Path:
    """matplotlib's sample photograph (shipped inside the package), as photo.png."""
    import matplotlib
    from PIL import Image

    source = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    out = folder / "photo.png"
    with Image.open(source) as image:
        image.convert("RGB").resize((363, 390)).save(out)
    return out


def take(model: Path | None, out: Path) -> list[Path]:
    from playwright import sync_api

    from pneumoscan.bundle import find
    from pneumoscan.serve import make_server, start_in_thread

    chromium = os.environ.get("CHROMIUM") or shutil.which("chromium")
    if chromium is None:
        raise SystemExit("screenshots.py needs Debian's chromium (make setup installs it)")
    server = make_server(find(model), port=0, quiet=True)
    start_in_thread(server)
    url = f"http://127.0.0.1:{server.server_address[1]}/"  # the automatic backend, as a user gets
    try:
        with tempfile.TemporaryDirectory() as tmp, sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=ARGS)
            page = _open(browser, url, scale=1)
            cards = _classify(page, [PNEUMONIA, NORMAL])
            page.screenshot(path=str(out / "screenshot.png"))
            page.get_by_role("button", name="Clear results").click()
            _clip(page, _classify(page, [photograph(Path(tmp)), PNEUMONIA]), out / "ood.png")
            page = _open(browser, url, scale=2)
            cards = _classify(page, [PNEUMONIA, NORMAL])
            cards.nth(0).locator("[data-testid=heatmap-toggle]").click()
            visible = cards.nth(0).locator("canvas[data-testid=heatmap]:not([hidden])")
            sync_api.expect(visible).to_have_count(1, timeout=TIMEOUT_MS)
            _clip(page, cards, out / "heatmap.png")
            page = _open(browser, url, scale=1, viewport=PHONE)
            page.screenshot(path=str(out / "phone.png"))  # what is above the fold
            browser.close()
    finally:
        server.shutdown()
        server.server_close()
    return [out / name for name in ("screenshot.png", "heatmap.png", "ood.png", "phone.png")]


def _open(browser, url: str, scale: int, viewport: dict | None = None):
    from playwright import sync_api

    page = browser.new_page(viewport=viewport or DESKTOP, device_scale_factor=scale)
    page.goto(url)
    sync_api.expect(page.locator("body[data-ready=true]")).to_have_count(1, timeout=TIMEOUT_MS)
    return page


def _classify(page, files: list[Path]):
    from playwright import sync_api

    page.set_input_files("input[type=file]", [str(f) for f in files])
    cards = page.locator("[data-testid=result]")
    sync_api.expect(cards).to_have_count(len(files), timeout=TIMEOUT_MS)
    return cards


def _clip(page, cards, path: Path) -> None:
    """The first two cards, cut out of a screenshot of the page."""
    first, last = cards.nth(0).bounding_box(), cards.nth(1).bounding_box()
    clip = {
        "x": first["x"],
        "y": min(first["y"], last["y"]),
        "width": last["x"] + last["width"] - first["x"],
        "height": max(first["height"], last["height"]),
    }
    page.screenshot(path=str(path), clip=clip, full_page=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="bundle (default: the bundled model)")
    parser.add_argument("--out", type=Path, default=REPO / "docs")
    args = parser.parse_args(argv)
    for path in take(args.model, args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
