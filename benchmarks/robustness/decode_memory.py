"""Peak memory of decoding one file whose header declares far more pixels than it holds (or
whose deflated data set inflates to gigabytes), of large legal files, and of `pneumoscan
predict` on a folder mixing them with X-rays.

    python -m benchmarks.robustness.decode_memory [--json] [--no-predict]

Each case runs in a fresh process (`preprocess.decode` on one file, or the `pneumoscan predict`
command), and its peak resident memory is the child's `ru_maxrss` (resource.getrusage), so no
case inherits another's. The first row, a process that imports the decoders and decodes one
sample X-ray, is the floor every other row stands on. Issue 20's target: under 1.5 GB for any
file, whatever its header declares.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "samples" / "chest_xray" / "NORMAL" / "IM-0115-0001.jpeg"
TARGET_MB = 1500
# Runs `sys.argv[1:]` and prints the child's peak resident memory in KiB (Linux's ru_maxrss unit).
MEASURE = (
    "import resource, subprocess, sys; "
    "done = subprocess.run(sys.argv[1:], capture_output=True, text=True); "
    "print(done.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
    "print(done.stdout[-2000:] + done.stderr[-2000:])"
)
DECODE_ONE = (
    "import sys; from pneumoscan.preprocess import ImageError, decode\n"
    "try:\n    d = decode(sys.argv[1]); print('decoded', d.luma.shape)\n"
    "except ImageError as error:\n    print('refused:', error)"
)


def _dicom(path: Path, rows: int, columns: int, syntax: str = "explicit", samples: int = 1) -> Path:
    """A DICOM file of a smooth 16-bit image, then its Rows and Columns set to `rows` x `columns`
    (a lie when the pixels are fewer)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, RLELossless, SecondaryCaptureImageStorage, generate_uid

    side = 7000 if (rows, columns) == (7000, 7000) else 256
    picture = (np.add.outer(np.arange(side), np.arange(side)) * 5 % 4096).astype(np.uint16)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.Modality, ds.Rows, ds.Columns = "DX", side, side
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = picture.tobytes()
    if syntax == "rle":
        ds.compress(RLELossless)
    ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, columns, samples
    ds.save_as(path, enforce_file_format=True)
    return path


def _deflate_bomb(path: Path, inflated: int) -> Path:
    """A deflated DICOM file whose data set inflates to `inflated` bytes (zeros after a real one)."""
    _dicom(path, 256, 256)
    import pydicom

    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1.99"
    ds.save_as(path, enforce_file_format=True)
    data = path.read_bytes()
    start = 128 + 16 + int.from_bytes(data[140:144], "little")
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    zeros = bytes(1 << 20)
    body = b"".join(packer.compress(zeros) for _ in range(inflated >> 20)) + packer.flush()
    path.write_bytes(data[:start] + body)
    return path


def _png_declaring(path: Path, width: int, height: int) -> Path:
    """A small PNG whose IHDR declares `width` x `height` (its CRC made right)."""
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))
    return path


def _jpeg_declaring(path: Path, width: int, height: int) -> Path:
    """A small JPEG whose frame header declares `width` x `height`."""
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(buffer, format="JPEG")
    data = bytearray(buffer.getvalue())
    at = data.find(b"\xff\xc0")
    data[at + 5 : at + 9] = struct.pack(">HH", height, width)
    path.write_bytes(bytes(data))
    return path


def _rgb_png(path: Path, side: int) -> Path:
    yy, xx = np.mgrid[0:side, 0:side]
    rgb = np.stack([(xx % 256), (yy % 256), ((xx + yy) % 256)], -1).astype(np.uint8)
    Image.fromarray(rgb).save(path, compress_level=1)
    return path


def cases(folder: Path) -> dict[str, Path]:
    """name -> a file, written into `folder`."""
    return {
        "a sample X-ray (the floor)": SAMPLE,
        "RLE DICOM declaring 7,200 x 7,000": _dicom(folder / "rle-7200.dcm", 7200, 7000, "rle"),
        "RLE DICOM declaring 20,000 x 20,000": _dicom(folder / "rle-20000.dcm", 20000, 20000, "rle"),
        "RLE DICOM declaring 7,070 x 7,070 (under the limit)": _dicom(
            folder / "rle-7070.dcm", 7070, 7070, "rle"
        ),
        "DICOM declaring 20,000 x 20,000, 3 samples": _dicom(folder / "big-rgb.dcm", 20000, 20000, samples=3),
        "deflated DICOM inflating to 2 GB": _deflate_bomb(folder / "bomb.dcm", 2 << 30),
        "PNG declaring 20,000 x 20,000": _png_declaring(folder / "big.png", 20000, 20000),
        "JPEG declaring 20,000 x 20,000": _jpeg_declaring(folder / "big.jpeg", 20000, 20000),
        "7,000 x 7,000 RGB PNG": _rgb_png(folder / "rgb-7000.png", 7000),
        "7,000 x 7,000 16-bit DICOM": _dicom(folder / "grey-7000.dcm", 7000, 7000),
    }


def measure(command: list[str]) -> dict:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", MEASURE, *command], capture_output=True, text=True, cwd=REPO)
    first, _, rest = done.stdout.partition("\n")
    code, kib = (int(v) for v in first.split())
    return {
        "exit": code,
        "peak_mb": round(kib / 1024),
        "seconds": round(time.perf_counter() - start, 1),
        "outcome": rest.strip().splitlines()[-1][:160] if rest.strip() else "",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--no-predict", action="store_true", help="skip the `pneumoscan predict` row")
    args = parser.parse_args(argv)
    rows = {}
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        files = cases(folder)
        for name, path in files.items():
            rows[name] = measure([sys.executable, "-c", DECODE_ONE, str(path)])
        if not args.no_predict:
            command = [sys.executable, "-m", "pneumoscan", "predict", "--format", "json", str(SAMPLE)]
            rows["`pneumoscan predict` on the sample X-ray (its floor)"] = measure(command)
            mixed = folder / "mixed"
            mixed.mkdir()
            for path in files.values():
                shutil.copy(path, mixed / path.name)
            command = [sys.executable, "-m", "pneumoscan", "predict", "--format", "json", str(mixed)]
            row = measure(command)
            row["outcome"] = f"{len(files)} files, exit {row['exit']}"
            rows[f"`pneumoscan predict` on all {len(files)} files in one folder"] = row
            large = folder / "large"
            large.mkdir()
            for copy in range(4):
                shutil.copy(files["7,000 x 7,000 RGB PNG"], large / f"rgb-{copy}.png")
            rows["`pneumoscan predict` on 4 copies of the 7,000 x 7,000 RGB PNG"] = measure(
                [*command[:-1], str(large)]
            )
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        print(f"{'case':<62} {'peak MB':>8} {'s':>6}  outcome")
        for name, row in rows.items():
            print(f"{name:<62} {row['peak_mb']:>8} {row['seconds']:>6}  {row['outcome']}")
    return 0 if all(row["peak_mb"] < TARGET_MB for row in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
