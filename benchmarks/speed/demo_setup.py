"""`make demo` on a fresh clone: the time until the page answers, and what it installs into .venv.

    .venv/bin/python -m benchmarks.speed.demo_setup [--rounds 1] [--baseline 94df8fc]
        [--baseline-targets "venv node"] [--targets demo-setup] [--repo .]

Each round runs two arms in turn, each in a fresh `git clone` of --repo in a temporary folder:
the baseline (commit --baseline, by default the last one before the light install, where
`make demo` ran `make venv node`: the whole requirements.lock) and this checkout's HEAD (where it
runs `make demo-setup`: requirements-demo.lock into the venv and `npm ci`, side by side). An arm
times `make TARGETS` (the set-up), then starts `.venv/bin/python -m pneumoscan demo --port 0` as
`make demo` does and times until its /healthz answers 200 ("serving"); the clone itself is not
timed. Then `du` of .venv, once right after the set-up and once after serving (Python writes the
bytecode of what it imported; the script runs make and the server without
PYTHONDONTWRITEBYTECODE, as Python runs by default).

Both arms share the machine's pip and npm caches and its package index, as a person's second
checkout would. Prints one line per arm and round, and the ratio HEAD / baseline of the time to
serving, round by round.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

BASELINE = "94df8fc"
START_TIMEOUT_S = 300
# Python's default: it writes the bytecode of what it imports (a session may have turned that off).
ENVIRONMENT = {name: value for name, value in os.environ.items() if name != "PYTHONDONTWRITEBYTECODE"}


def du(path: Path) -> dict[str, object]:
    """`du -sh` as printed, and `du -sk` in bytes (disk usage, what `du -sh` rounds)."""
    human = subprocess.run(["du", "-sh", str(path)], capture_output=True, text=True, check=True)
    kib = subprocess.run(["du", "-sk", str(path)], capture_output=True, text=True, check=True)
    return {"du_sh": human.stdout.split()[0], "bytes": int(kib.stdout.split()[0]) * 1024}


def serve_until_healthy(clone: Path) -> float:
    """Seconds from starting `pneumoscan demo --port 0` to its first 200 on /healthz."""
    start = time.monotonic()
    process = subprocess.Popen(
        [str(clone / ".venv" / "bin" / "python"), "-m", "pneumoscan", "demo", "--port", "0"],
        cwd=clone,
        env=ENVIRONMENT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = process.stdout.readline()
        url = re.search(r"on (http://\S+/)$", line.strip())
        if url is None:
            raise SystemExit(f"demo did not start in {clone}: {line!r} {process.stderr.read()[-2000:]}")
        with urllib.request.urlopen(url.group(1) + "healthz", timeout=START_TIMEOUT_S) as response:
            if response.status != 200:
                raise SystemExit(f"/healthz answered {response.status} in {clone}")
        return time.monotonic() - start
    finally:
        process.terminate()
        process.wait(timeout=START_TIMEOUT_S)


def run_arm(repo: Path, rev: str, targets: list[str], workdir: Path) -> dict[str, object]:
    clone = workdir / f"clone-{rev}"
    shutil.rmtree(clone, ignore_errors=True)
    subprocess.run(["git", "clone", "--quiet", str(repo), str(clone)], check=True)
    subprocess.run(["git", "-C", str(clone), "checkout", "--quiet", rev], check=True)
    start = time.monotonic()
    made = subprocess.run(
        ["make", "-C", str(clone), *targets], env=ENVIRONMENT, capture_output=True, text=True
    )
    setup_s = time.monotonic() - start
    if made.returncode != 0:
        raise SystemExit(f"make {' '.join(targets)} failed at {rev}:\n{(made.stdout + made.stderr)[-3000:]}")
    installed = du(clone / ".venv")
    serve_s = serve_until_healthy(clone)
    record = {
        "rev": subprocess.run(
            ["git", "-C", str(clone), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
        ).stdout.strip(),
        "make": " ".join(targets),
        "setup_s": round(setup_s, 1),
        "serving_s": round(setup_s + serve_s, 1),
        "venv_after_setup": installed,
        "venv_after_serving": du(clone / ".venv"),
        "node_modules": du(clone / "node_modules"),
    }
    shutil.rmtree(clone, ignore_errors=True)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--baseline", default=BASELINE, help="commit of the baseline (default %(default)s)")
    parser.add_argument("--baseline-targets", default="venv node")
    parser.add_argument("--targets", default="demo-setup")
    parser.add_argument("--repo", type=Path, default=Path.cwd())
    args = parser.parse_args(argv)
    head = subprocess.run(
        ["git", "-C", str(args.repo), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="demo-setup-") as tmp:
        for round_ in range(args.rounds):
            before = run_arm(args.repo, args.baseline, args.baseline_targets.split(), Path(tmp))
            print(json.dumps({"round": round_, "arm": "baseline", **before}), flush=True)
            after = run_arm(args.repo, head, args.targets.split(), Path(tmp))
            print(json.dumps({"round": round_, "arm": "head", **after}), flush=True)
            ratio = after["serving_s"] / before["serving_s"]
            print(json.dumps({"round": round_, "serving_ratio_head_to_baseline": round(ratio, 3)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
