"""Damaged copies of valid DICOM, PNG and JPEG files through both decoders: `pneumoscan`'s
(`preprocess.decode`) and the page's (web/preprocess.js and web/dicom.js, in Node).

    python -m benchmarks.robustness.fuzz_decode --cases 3000 --seed 0 [--json]

Each case is one valid file (a few small ones of each format: DICOM 8, 12 and 16 bit, big
endian, RLE, JPEG baseline, planar colour, a VOI LUT; PNG grey, RGB and 16 bit; JPEG grey and
RGB) with one damage drawn from the seed: bytes flipped, the file cut short, bytes inserted, or a
header field rewritten (a DICOM attribute's value or length, a PNG's IHDR with its CRC made
right, a JPEG's frame size). Every case must either decode or be refused with one sentence that
names the file, on one line, ending in a full stop, quoting no raw bytes; anything else (another
exception, a hang past HANG_S, a sentence of another shape) is a failure and is listed.
`tests/test_fuzz.py` runs a few hundred cases of each side in `make test`.
"""

from __future__ import annotations

import argparse
import io
import json
import signal
import struct
import subprocess
import sys
import tempfile
import time
import warnings
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
PAGE_SCRIPT = Path(__file__).with_suffix(".mjs")
SIDE = 48  # the seeds' side: small, so a case costs milliseconds
HANG_S = 30  # a case still running after this is a hang
# DICOM attributes a header edit rewrites: (group, element) of Rows, Columns, SamplesPerPixel,
# PlanarConfiguration, BitsAllocated, BitsStored, PixelRepresentation, WindowCenter, WindowWidth,
# RescaleSlope, LUTDescriptor, LUTData, PixelData, TransferSyntaxUID.
DICOM_FIELDS = [
    (0x0028, 0x0010), (0x0028, 0x0011), (0x0028, 0x0002), (0x0028, 0x0006), (0x0028, 0x0100),
    (0x0028, 0x0101), (0x0028, 0x0103), (0x0028, 0x1050), (0x0028, 0x1051), (0x0028, 0x1053),
    (0x0028, 0x3002), (0x0028, 0x3006), (0x7FE0, 0x0010), (0x0002, 0x0010),
]  # fmt: skip
DAMAGES = ("flip", "truncate", "insert", "field")


class Outcomes:
    """What one decoder made of the cases: counts by outcome, and the failures (name, what).
    (A plain class: tests load this file by path, where a dataclass cannot find its module.)"""

    def __init__(self) -> None:
        self.counts: Counter = Counter()
        self.failures: list[tuple[str, str]] = []
        self.warned = 0  # cases that let a Python warning out (it would print on stderr)
        self.seconds = 0.0

    def record(self, name: str, kind: str, detail: str = "") -> None:
        self.counts[kind] += 1
        if kind not in ("decoded", "refused"):
            self.failures.append((name, f"{kind}: {detail}"))


# ---- the valid files ---------------------------------------------------------------------------


def _picture(channels: int = 1, top: int = 255) -> np.ndarray:
    yy, xx = np.mgrid[0:SIDE, 0:SIDE]
    planes = [(np.sin(xx / (3 + c)) * np.cos(yy / 5) + 1) / 2 * top for c in range(channels)]
    picture = np.stack(planes, -1) if channels > 1 else planes[0]
    return np.rint(picture).astype(np.uint8 if top <= 255 else np.uint16)


def _image_file(array: np.ndarray, kind: str, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=kind, **options)
    return buffer.getvalue()


def _dicom(pixels: np.ndarray, syntax: str = "1.2.840.10008.1.2.1", **header) -> bytes:
    """A single-frame Secondary Capture file of `pixels` (grey or RGB, 8 or 16 bit) in `syntax`
    (explicit little or big endian, RLE Lossless, JPEG baseline), plus `header` attributes."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import RLELossless, SecondaryCaptureImageStorage, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.Modality, ds.PatientName = "DX", "Fuzz^Case"
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.SamplesPerPixel = 3 if pixels.ndim == 3 else 1
    ds.PhotometricInterpretation = "RGB" if pixels.ndim == 3 else "MONOCHROME2"
    if pixels.ndim == 3:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = ds.BitsStored = 8 * pixels.itemsize
    ds.HighBit, ds.PixelRepresentation = ds.BitsStored - 1, 0
    ds.PixelData = pixels.tobytes()
    for keyword, value in header.items():
        setattr(ds, keyword, value)
    big = syntax == "1.2.840.10008.1.2.2"
    if big:
        ds.PixelData = pixels.astype(pixels.dtype.newbyteorder(">")).tobytes()
    if syntax == RLELossless:
        ds.compress(RLELossless)
    elif syntax == "1.2.840.10008.1.2.4.50":
        ds.PixelData = encapsulate([_image_file(pixels, "JPEG", quality=90)])
        ds["PixelData"].is_undefined_length = True
    ds.file_meta.TransferSyntaxUID = syntax
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, little_endian=not big, implicit_vr=False, enforce_file_format=True)
    return buffer.getvalue()


def _voi_lut():
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    item = Dataset()
    item.LUTDescriptor = [1024, 100, 12]
    item.LUTData = np.linspace(0, 4095, 1024).astype("<u2").tobytes()
    return Sequence([item])


def seed_files() -> dict[str, bytes]:
    """name -> the bytes of a valid file, the starting points of the damage."""
    grey, rgb = _picture(), _picture(3)
    wide = _picture(top=4095)
    # RGB stored plane after plane, in an array of the pixels' shape (its bytes are what count)
    planar = _picture(3, top=4095).transpose(2, 0, 1).copy().reshape(SIDE, SIDE, 3)
    return {
        "grey.png": _image_file(grey, "PNG"),
        "rgb.png": _image_file(rgb, "PNG"),
        "wide.png": _image_file(_picture(top=65535), "PNG"),
        "grey.jpeg": _image_file(grey, "JPEG"),
        "rgb.jpeg": _image_file(rgb, "JPEG"),
        "8 bit.dcm": _dicom(grey),
        "12 bit window.dcm": _dicom(wide, BitsStored=12, WindowCenter=2048, WindowWidth=4000),
        "16 bit big endian VOI LUT.dcm": _dicom(wide, "1.2.840.10008.1.2.2", VOILUTSequence=_voi_lut()),
        "RLE 16 bit.dcm": _dicom(wide, "1.2.840.10008.1.2.5", RescaleSlope=2, RescaleIntercept=-10),
        "JPEG baseline.dcm": _dicom(grey, "1.2.840.10008.1.2.4.50"),
        "RGB planar 16 bit.dcm": _dicom(planar, PlanarConfiguration=1),
    }


# ---- the damage ----------------------------------------------------------------------------------


def damaged(seeds: dict[str, bytes], cases: int, seed: int) -> list[tuple[str, bytes]]:
    """`cases` damaged copies, the seeds taken in turn: (name, bytes), the name saying which
    seed, which damage and the case's number (its suffix the seed's, so DICOM stays DICOM)."""
    rng = np.random.default_rng(seed)
    names = list(seeds)
    out = []
    for case in range(cases):
        name = names[case % len(names)]
        damage = DAMAGES[int(rng.integers(len(DAMAGES)))]
        stem, suffix = name.rsplit(".", 1)
        out.append((f"{case:05d} {stem} {damage}.{suffix}", _damage(seeds[name], suffix, damage, rng)))
    return out


def _damage(data: bytes, suffix: str, damage: str, rng: np.random.Generator) -> bytes:
    buffer = bytearray(data)
    if damage == "flip":
        for at in rng.integers(0, len(buffer), int(rng.integers(1, 9))):
            buffer[at] ^= int(rng.integers(1, 256))
    elif damage == "truncate":
        del buffer[int(rng.integers(0, len(buffer))) :]
    elif damage == "insert":
        at = int(rng.integers(0, len(buffer)))
        buffer[at:at] = rng.bytes(int(rng.integers(1, 64)))
    else:
        edit = {"dcm": _edit_dicom, "png": _edit_png, "jpeg": _edit_jpeg}[suffix]
        edit(buffer, rng)
    return bytes(buffer)


def _number(rng: np.random.Generator, size: int) -> bytes:
    """A value a damaged field might hold: 0, the largest, one off the edges, or any."""
    top = 2 ** (8 * size) - 1
    return int(rng.choice([0, 1, top, top - 1, int(rng.integers(0, top, dtype=np.uint64))])).to_bytes(
        size, "little"
    )


def _edit_dicom(buffer: bytearray, rng: np.random.Generator) -> None:
    """Rewrite the value (or the length) of one of DICOM_FIELDS, found by its tag bytes."""
    group, element = DICOM_FIELDS[int(rng.integers(len(DICOM_FIELDS)))]
    for order in ("<", ">"):
        at = bytes(buffer).find(struct.pack(f"{order}HH", group, element))
        if at >= 0:
            break
    if at < 0:
        buffer[:0] = rng.bytes(4)  # the field is not there: damage the preamble instead
        return
    if rng.random() < 0.3:  # the length of an explicit VR element (2 bytes after the VR)
        buffer[at + 6 : at + 8] = _number(rng, 2)
    else:
        size = 4 if rng.random() < 0.2 else 2
        buffer[at + 8 : at + 8 + size] = _number(rng, size)


def _edit_png(buffer: bytearray, rng: np.random.Generator) -> None:
    """Rewrite one IHDR field (width, height, bit depth, colour type, interlace), CRC made right."""
    start, size = [(16, 4), (20, 4), (24, 1), (25, 1), (28, 1)][int(rng.integers(5))]
    buffer[start : start + size] = _number(rng, size)[::-1]
    buffer[29:33] = struct.pack(">I", zlib.crc32(bytes(buffer[12:29])))


def _edit_jpeg(buffer: bytearray, rng: np.random.Generator) -> None:
    """Rewrite the frame header's height, width or component count, or a segment's length."""
    at = bytes(buffer).find(b"\xff\xc0")
    if at < 0 or rng.random() < 0.25:
        at = bytes(buffer).find(b"\xff", 2 + int(rng.integers(0, 200)))
        buffer[at + 2 : at + 4] = _number(rng, 2)
        return
    start, size = [(5, 2), (7, 2), (9, 1), (4, 1)][int(rng.integers(4))]
    buffer[at + start : at + start + size] = _number(rng, size)


# ---- the two decoders ----------------------------------------------------------------------------


def sentence_problem(message: str, name: str) -> str | None:
    """What is wrong with a refusal's sentence, or None: one line, naming the file first, ending
    in a full stop, quoting no raw bytes (what follows the name is printable ASCII)."""
    if "\n" in message:
        return "several lines"
    if not message.startswith(f"{name}: "):
        return "does not start with the file's name"
    if not message.endswith("."):
        return "does not end in a full stop"
    said = message[len(name) + 2 :]
    if "\\x" in said or "b'" in said or 'b"' in said or not (said.isascii() and said.isprintable()):
        return "quotes raw bytes"
    return None


class _Hang(Exception):
    pass


def _alarm(signum, frame):
    raise _Hang


def python_side(cases: list[tuple[str, bytes]]) -> Outcomes:
    """Each case through `pneumoscan.preprocess.decode` (from its bytes), in this process."""
    from pneumoscan.preprocess import ImageError, decode

    outcomes = Outcomes()
    start = time.perf_counter()
    previous = signal.signal(signal.SIGALRM, _alarm)
    try:
        for name, data in cases:
            signal.alarm(HANG_S)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    decode(name, data)
                    outcomes.record(name, "decoded")
                except ImageError as error:
                    problem = sentence_problem(str(error), name)
                    outcomes.record(
                        name, "refused" if problem is None else "bad sentence", f"{problem}: {error}"
                    )
                except _Hang:
                    outcomes.record(name, "hung", f"over {HANG_S} s")
                except Exception as error:  # what the test is looking for
                    outcomes.record(name, "crashed", type(error).__name__)
                finally:
                    signal.alarm(0)
            outcomes.warned += bool(caught)
    finally:
        signal.signal(signal.SIGALRM, previous)
    outcomes.seconds = time.perf_counter() - start
    return outcomes


def page_side(cases: list[tuple[str, bytes]], metadata: Path, folder: Path) -> Outcomes:
    """Each case through the page's decode step, in one Node process (fuzz_decode.mjs)."""
    paths = []
    for number, (name, data) in enumerate(cases):
        (folder / str(number)).mkdir(parents=True, exist_ok=True)
        path = folder / str(number) / name
        path.write_bytes(data)
        paths.append(path)
    outcomes = Outcomes()
    start = time.perf_counter()
    try:
        done = subprocess.run(
            ["node", str(PAGE_SCRIPT), str(metadata)],
            input="".join(f"{p}\n" for p in paths),
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=HANG_S + len(cases) * 0.5,
        )
        answers = [json.loads(line) for line in done.stdout.split("\n") if line]
    except subprocess.TimeoutExpired:
        answers = []
    for (name, _), answer in zip(cases, answers + [None] * (len(cases) - len(answers)), strict=True):
        if answer is None:
            outcomes.record(name, "hung", "no answer (the page hung or stopped)")
        elif "decoded" in answer:
            outcomes.record(name, "decoded")
        elif "refused" in answer:
            problem = sentence_problem(answer["refused"], name)
            outcomes.record(
                name, "refused" if problem is None else "bad sentence", f"{problem}: {answer['refused']}"
            )
        else:
            outcomes.record(name, "crashed", answer["crashed"][:200])
    outcomes.seconds = time.perf_counter() - start
    return outcomes


def bundled_metadata() -> Path:
    from pneumoscan.bundle import bundled_dir

    return bundled_dir() / "metadata.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=3000, help="damaged files (default 3000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-page", action="store_true", help="only the Python decoder")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    cases = damaged(seed_files(), args.cases, args.seed)
    sides = {"python": python_side(cases)}
    if not args.no_page:
        with tempfile.TemporaryDirectory() as folder:
            sides["page"] = page_side(cases, bundled_metadata(), Path(folder))
    report = {
        side: {
            "cases": len(cases),
            **{
                kind: outcomes.counts.get(kind, 0)
                for kind in ("decoded", "refused", "crashed", "hung", "bad sentence")
            },
            "warned": outcomes.warned,
            "seconds": round(outcomes.seconds, 1),
            "failures": outcomes.failures[:20],
        }
        for side, outcomes in sides.items()
    }
    if args.json:
        print(json.dumps({"cases": args.cases, "seed": args.seed, "sides": report}, indent=2))
    else:
        print(f"{args.cases} damaged files, seed {args.seed}")
        print("side    decoded  refused  crashed  hung  bad sentence  warned  seconds")
        for side, row in report.items():
            print(
                f"{side:<7} {row['decoded']:>7}  {row['refused']:>7}  {row['crashed']:>7}  {row['hung']:>4}  "
                f"{row['bad sentence']:>12}  {row['warned']:>6}  {row['seconds']:>7}"
            )
            for name, what in row["failures"]:
                print(f"  {name}: {what}")
    return 1 if any(row["failures"] for row in report.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
