"""Build the frozen, shifted benchmark of one split and compare it with the committed digest.

    .venv/bin/python -m benchmarks.robustness.make_acquisition_shift --data ROOT \
        --split val|internal-test --out DIR [--check | --freeze]

The images go to DIR/{NORMAL,PNEUMONIA}/ with DIR/manifest.json (see `acquisition_shift.py` beside
this file). Without a flag the digest is printed and compared for information; `--check` exits 1
when it differs from `acquisition_shift_manifest.json` (beside this file); `--freeze` writes that
split's seed, family table, per-file parameters and digest into it (do this once, before any
model search).
Exit codes: 0 same (or frozen), 1 differs, 2 unusable data or a split that was never frozen.
Run from the repository root; needs pneumoscan importable: `make venv` installs it, or run
with PYTHONPATH=src.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from benchmarks.robustness.acquisition_shift import (
    SHIFT_SEED,
    SHIFT_SPLITS,
    build_shifted,
    describe_families,
    read_manifest,
)
from pneumoscan.atomic import write_bytes_atomic
from pneumoscan.data import DataError

FROZEN = Path(__file__).resolve().parent / "acquisition_shift_manifest.json"
# The committed file keeps 64-bit hash prefixes, like splits.json: enough to name a changed file.
SHORT_HASH = 16


def frozen_entry(manifest: dict) -> dict:
    """The committed record of one split: digests and per-file parameters, short hashes."""
    files = {
        name: {
            "source_sha256": entry["source_sha256"][:SHORT_HASH],
            "steps": entry["steps"],
            "sha256": entry["sha256"][:SHORT_HASH],
        }
        for name, entry in sorted(manifest["files"].items())
    }
    return {
        "source_split_digest": manifest["source"]["split_digest"],
        "n_files": len(files),
        "digest": manifest["digest"],
        "versions": manifest["versions"],
        "files": files,
    }


def frozen_header(seed: int) -> dict:
    return {
        "about": "Frozen acquisition-shift benchmark (val: model selection; internal-test: reporting only). "
        "Written by `python -m benchmarks.robustness.make_acquisition_shift --freeze`; do not edit by hand.",
        "generator": "benchmarks.robustness.acquisition_shift",
        "seed": seed,
        **describe_families(),
    }


def dumps_one_line_per_file(document: dict) -> str:
    """Indented JSON, except that each file's record stays on one line (small, diffable)."""
    placeholders = {}
    copy = json.loads(json.dumps(document))
    for split in copy.get("splits", {}).values():
        for name, record in split["files"].items():
            key = f"@@{len(placeholders)}@@"
            placeholders[f'"{key}"'] = json.dumps(record, separators=(",", ":"))
            split["files"][name] = key
    text = json.dumps(copy, indent=2)
    for key, record in placeholders.items():
        text = text.replace(key, record, 1)
    return text + "\n"


def freeze(manifest: dict, path: Path = FROZEN) -> list[str]:
    """Write this split's record into the committed file; returns splits dropped as stale."""
    header = frozen_header(manifest["seed"])
    current = json.loads(path.read_text()) if path.is_file() else {}
    splits = current.get("splits", {})
    stale = []
    if {k: current.get(k) for k in header if k != "about"} != {
        k: v for k, v in header.items() if k != "about"
    }:
        stale = sorted(name for name in splits if name != manifest["split"])
        splits = {}  # seed or family table changed: other splits must be frozen again
    splits[manifest["split"]] = frozen_entry(manifest)
    document = {**header, "splits": {name: splits[name] for name in SHIFT_SPLITS if name in splits}}
    write_bytes_atomic(path, dumps_one_line_per_file(document).encode())
    return stale


def compare(manifest: dict, path: Path = FROZEN) -> list[str]:
    """Differences from the committed record, one sentence each; empty when identical."""
    if not path.is_file():
        return [f"{path}: no frozen benchmark yet; run with --freeze once."]
    committed = json.loads(path.read_text())
    split = manifest["split"]
    if split not in committed.get("splits", {}):
        return [f"{path}: split {split!r} was never frozen; run with --freeze once."]
    frozen = committed["splits"][split]
    if frozen["digest"] == manifest["digest"]:
        return []
    ours = frozen_entry(manifest)
    problems = [f"digest {manifest['digest']} differs from the frozen {frozen['digest']}."]
    if frozen["source_split_digest"] != ours["source_split_digest"]:
        problems.append("the source split differs (other data, other bytes, or another split rule).")
    if committed["seed"] != manifest["seed"]:
        problems.append(f"seed {manifest['seed']} differs from the frozen {committed['seed']}.")
    names = sorted(set(frozen["files"]) | set(ours["files"]))
    params = [
        n for n in names if frozen["files"].get(n, {}).get("steps") != ours["files"].get(n, {}).get("steps")
    ]
    data = [
        n
        for n in names
        if n not in params
        and frozen["files"].get(n, {}).get("sha256") != ours["files"].get(n, {}).get("sha256")
    ]
    if params:
        problems.append(f"{len(params)} file(s) have other parameters, e.g. {', '.join(params[:3])}.")
    if data:
        problems.append(
            f"{len(data)} file(s) have the same parameters but other bytes, e.g. "
            f"{', '.join(data[:3])} (encoders: frozen {frozen['versions']}, now {ours['versions']})."
        )
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="dataset root, as for `pneumoscan train`")
    parser.add_argument("--split", choices=SHIFT_SPLITS, required=True)
    parser.add_argument("--out", type=Path, required=True, help="output folder (replaced whole)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--check", action="store_true", help="exit 1 unless the digest equals the frozen one")
    mode.add_argument("--freeze", action="store_true", help=f"record this split in {FROZEN.name}")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        digest = build_shifted(args.data, args.split, args.out, SHIFT_SEED)
    except (DataError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    manifest = read_manifest(args.out)
    print(
        f"{args.split}: {len(manifest['files'])} images -> {args.out} in {time.perf_counter() - start:.1f} s"
    )
    print(f"digest {digest}")
    if args.freeze:
        stale = freeze(manifest)
        print(
            f"frozen in {FROZEN}"
            + (f"; dropped stale {', '.join(stale)}: freeze them again" if stale else "")
        )
        return 0
    problems = compare(manifest)
    for problem in problems:
        print(f"{'error' if args.check else 'note'}: {problem}", file=sys.stderr)
    if not problems:
        print("same as the frozen benchmark")
    never_frozen = problems and "--freeze once" in problems[0]
    return (2 if never_frozen else 1) if (args.check and problems) else 0


if __name__ == "__main__":
    sys.exit(main())
