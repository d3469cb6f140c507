"""Run a model over files and folders: `pneumoscan predict [--model MODEL] PATH...`.

Images stream in batches, decoded on every core beside the forward pass (`pneumoscan.stream`;
memory stays flat however many there are), through the bundle's one forward pass
(`Bundle.forward`: LiteRT when the bundle has its flatbuffer, else Keras); a file that cannot be
used becomes a `{path, error}` record carrying the sentence of its one decode, and the others are still
predicted. The same decode/resize (pneumoscan.preprocess), calibration and threshold
(metadata.json) serve `evaluate` and the web page. This module owns paths, records and rendering.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TextIO

from pneumoscan.atomic import write_bytes_atomic
from pneumoscan.bundle import INFERENCE_BATCH, Bundle
from pneumoscan.data import find_images
from pneumoscan.decision import Verdict

FORMATS = ("table", "json", "csv")
OUTPUT_SUFFIXES = {".csv": "csv", ".jsonl": "jsonl"}  # --output FILE: its format by suffix
# New columns go last, so that an older file still reads the same way (`--resume`).
CSV_FIELDS = (
    *("path", "label", "probability", "threshold", "error", "warning"),
    *("borderline", "ood", "ood_score"),
    *("model", "model_digest"),  # which model answered, for an audit trail (`metadata.digest`)
)


def verdicts(
    bundle: Bundle, paths: Sequence[str | Path], batch_size: int = INFERENCE_BATCH
) -> Iterator[tuple[str, str, str, Verdict]]:
    """(path, error, warning, verdict) for every path, in order, batch by batch; `error` is ""
    when the file decoded, else its one-sentence reason (and the verdict is meaningless);
    `warning` what a DICOM header says against the image, or ""; the verdict is the model's
    decision (`pneumoscan.decision`) on the batch's forward pass, whose feature layer feeds the
    out-of-distribution score when the model has one."""
    from pneumoscan.stream import batches, lanes

    if not paths:
        return
    decision = bundle.decision
    layer = decision.feature_layer

    def decide(batch) -> list[Verdict]:
        outputs, features = bundle.forward_features(batch.images, batch_size, layer)
        return decision.apply(outputs, features, batch.checks)

    runtime = bundle.runtime
    if runtime is not None and runtime.has(layer) and len(runtime.shifts) > 1:
        # The flatbuffer with test-time copies: the forward pass is most of a film's time, and a
        # one-threaded interpreter per lane keeps both cores busiest (5-7% more films a second).
        done = lanes(paths, bundle.image_size, batch_size, decide)
    else:  # Keras, or no copies: one pass on every core, the decoding running ahead (8-9% more)
        done = ((batch, decide(batch)) for batch in batches(paths, bundle.image_size, batch_size))
    for batch, found in done:
        for film, verdict in zip(batch.films, found, strict=True):
            yield film.path, film.error, film.warning, verdict


def expand_paths(inputs: Iterable[str | Path], shard: tuple[int, int] | None = None) -> list[Path | dict]:
    """In input order: files as given, image files found in folders (`data.find_images`), and
    a `{path, error}` record for an input that does not exist or holds no image.

    With `shard=(k, n)`, only the items of shard k of n (`in_shard`): each keyed by its path
    relative to the argument it was found under, or by its own name when named directly.
    """
    items: list[tuple[Path | dict, str]] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = find_images(path)
            error = f"{path}: folder holds no .jpeg, .jpg or .png images (nor DICOM files)."
            items.extend(
                [(p, p.relative_to(path).as_posix()) for p in found]
                or [({"path": str(path), "error": error}, path.name)]
            )
        elif path.exists():
            items.append((path, path.name))
        else:
            items.append(({"path": str(path), "error": f"{path}: no such file or folder."}, path.name))
    return [item for item, key in items if shard is None or in_shard(key, *shard)]


def in_shard(key: str, index: int, count: int) -> bool:
    """Whether `key` falls in shard `index` of `count`: the first 8 bytes of the SHA-256 of its
    Unicode NFC form, modulo `count`. The same on every machine and Python version, and for a
    name whichever normal form its file system gave (macOS copies are often NFD), so N copies of
    a command with `--shard 0/N` ... `--shard N-1/N` cover every file exactly once."""
    key = unicodedata.normalize("NFC", key)
    digest = hashlib.sha256(key.encode("utf-8", errors="surrogateescape")).digest()
    return int.from_bytes(digest[:8], "big") % count == index


def iter_predictions(
    bundle: Bundle, items: list[Path | dict], batch_size: int = INFERENCE_BATCH
) -> Iterator[dict]:
    """One record per item of `expand_paths`, in order, as each batch is done: `{path, label,
    probability, threshold}`, then `borderline` and `ood`, `ood_score` when the model's metadata
    has those blocks (and `warning`, a sentence, when a DICOM header speaks against the image),
    or `{path, error}`; every record ends with `model` (the architecture's name) and
    `model_digest` (`metadata.digest`, "" for a model without a metadata.json file), as the
    page's CSV download does. Nothing is kept, so memory stays flat."""
    audit = {"model": bundle.metadata["arch"], "model_digest": bundle.digest}
    outputs = verdicts(bundle, [item for item in items if isinstance(item, Path)], batch_size)
    for item in items:
        if isinstance(item, dict):
            yield {**item, **audit}
            continue
        path, error, warning, verdict = next(outputs)
        if error:
            yield {"path": path, "error": error, **audit}
            continue
        record = {"path": path, **verdict.record()}
        yield {**record, "warning": f"{path}: {warning}.", **audit} if warning else {**record, **audit}


def predict_files(
    model: str | Path | Bundle | None, inputs: Sequence[str | Path], batch_size: int = INFERENCE_BATCH
) -> list[dict]:
    """One record per image, in input order: `{path, label, probability, threshold}` or
    `{path, error}`."""
    return list(iter_predictions(Bundle.load(model), expand_paths(inputs), batch_size))


def render(records: list[dict], fmt: str) -> str:
    """Records as `table` (for people), `json` (one array) or `csv` (header + rows)."""
    buffer = io.StringIO()
    with RecordWriter(buffer, fmt) as writer:
        for record in records:
            writer.write(record)
    return buffer.getvalue().rstrip("\n")


class RecordWriter:
    """Writes records to a text stream as they come: `json` (one array, written as it grows),
    `csv` (header, then rows), `jsonl` (one object a line) or `table` (kept until the end, since
    its column widths depend on every path). Each record is flushed, so a reader (or `--resume`)
    sees every finished one."""

    def __init__(self, stream: TextIO, fmt: str, header: bool = True, fields: Sequence[str] = CSV_FIELDS):
        """`fields`: the CSV columns; a resumed file keeps its own (`csv_fields`), so a file begun
        by an older pneumoscan gets no cells beyond its header."""
        if fmt not in (*FORMATS, "jsonl"):
            raise ValueError(f"unknown format {fmt!r}")
        self.stream, self.fmt, self.count, self.kept = stream, fmt, 0, []
        self.csv = (
            csv.DictWriter(stream, fieldnames=fields, lineterminator="\n", extrasaction="ignore")
            if fmt == "csv"
            else None
        )
        if self.csv is not None and header:
            self.csv.writeheader()

    def __enter__(self) -> RecordWriter:
        return self

    def write(self, record: dict) -> None:
        if self.fmt == "table":
            self.kept.append(record)
        elif self.fmt == "csv":
            self.csv.writerow(record)
        elif self.fmt == "jsonl":
            self.stream.write(json.dumps(record) + "\n")
        else:  # json: the text json.dumps(records, indent=2) would give, a record at a time
            lines = json.dumps(record, indent=2).splitlines()
            self.stream.write(
                ("[\n" if self.count == 0 else ",\n") + "\n".join("  " + line for line in lines)
            )
        self.count += 1
        self.stream.flush()

    def __exit__(self, error_type, *exc) -> None:
        if error_type is not None:  # no closing bracket or table under an error's message
            return
        if self.fmt == "table":
            header = f"{'label':<10} {'p(pneumonia)':>12}  threshold  borderline  ood"
            self.stream.write(table(self.kept, header, _cells) + "\n")
        elif self.fmt == "json":
            self.stream.write("\n]\n" if self.count else "[]\n")
        self.stream.flush()


def _cells(record: dict) -> str:
    """A record's table cells: label, probability, threshold, borderline (yes, no, or - for a
    model without a band) and ood (yes or no with the score, or -), then the flags in words
    (`flag_words`), so that a flagged label is never read alone."""
    borderline = {True: "yes", False: "no"}.get(record.get("borderline"), "-")
    ood_cell = "-"
    if "ood" in record:
        ood_cell = f"{'yes' if record['ood'] else 'no'} ({record['ood_score']:.2f})"
    flags = "; ".join(flag_words(record))
    return (
        f"{record['label']:<10} {probability_cell(record['probability']):>12}  {record['threshold']:.4f}     "
        f"{borderline:<10}  {ood_cell:<11}" + (f"  <- {flags}" if flags else "")
    ).rstrip()


def probability_cell(probability: float) -> str:
    """A probability to four decimals for people, never 1.0000 or 0.0000 (an estimate is never
    certain): the ends read >0.9999 and <0.0001. Records keep the full number."""
    if probability >= 0.99995:
        return ">0.9999"
    if probability < 0.00005:
        return "<0.0001"
    return f"{probability:.4f}"


def flag_words(record: dict) -> list[str]:
    """What a record's flags mean, most serious first: the words the table and the summary use
    beside a label (the page's wording.js says the same)."""
    words = []
    if record.get("ood"):
        words.append("NOT A CHEST X-RAY? the label is not meaningful")
    if record.get("borderline"):
        words.append("borderline: uncertain, needs a reader")
    return words


def csv_fields(path: Path) -> tuple[str, ...]:
    """The columns of an existing CSV file of records (its header), or `CSV_FIELDS` when it has
    none yet."""
    with open(path, encoding="utf-8", errors="surrogateescape", newline="") as handle:
        header = next(csv.reader(handle), None)
    return tuple(header) if header else CSV_FIELDS


def resume_key(path: str) -> str:
    """The key `--resume` matches records by: the path made absolute against the working folder
    and normalised (`./a`, `a//b`, `/cwd/a/x/../b`), so a file named relatively in one run and
    absolutely in the next is the same file. The record itself keeps the path as given."""
    return os.path.abspath(path)


def resume(path: Path, items: list[Path | dict]) -> tuple[list[Path | dict], int]:
    """Prepare an existing output file for `--resume`: the items still to predict, and how many
    were skipped as already done.

    The file is checked first and changed only once it reads as predict records: a last line that
    a killed run left unfinished is cut off, and the error records of the files tried again are
    dropped (an error is not done: the file may be readable now), so each path keeps one record.

    Raises:
        ValueError: the file is not a CSV or JSON-lines file of predict records (left as it was).
    """
    data = path.read_bytes()
    whole, fields, records = _read_records(path, data)
    _check_working_folder(path, [record["path"] for record in records if not record.get("error")])
    done = {resume_key(record["path"]) for record in records if not record.get("error")}
    todo = [item for item in items if resume_key(item_path(item)) not in done]
    retried = {resume_key(item_path(item)) for item in todo}
    kept = [r for r in records if not (r.get("error") and resume_key(r["path"]) in retried)]
    if len(kept) < len(records):
        whole = _serialise(kept, fields)
    if whole != data:
        if data.startswith(whole):
            with open(path, "r+b") as handle:
                handle.truncate(len(whole))
        else:
            write_bytes_atomic(path, whole)
    return todo, len(items) - len(todo)


def _check_working_folder(path: Path, done: list[str], sample: int = 100) -> None:
    """Refuse to resume from another working folder than the run began in: its relative paths
    would match nothing here, and every file would be predicted again, twice in the file. Told
    by the first `sample` relative paths of finished records, none of which names a file here.

    Raises:
        ValueError: no relative path of a finished record names a file from this folder.
    """
    relative = [name for name in done if not os.path.isabs(name)][:sample]
    if relative and not any(os.path.exists(name) for name in relative):
        raise ValueError(
            f"{path}: its records name files relative to the folder its run began in ({relative[0]}, "
            f"...), and none is found from {os.getcwd()}; resume from that folder, or start a new FILE."
        )


def _read_records(path: Path, data: bytes) -> tuple[bytes, tuple[str, ...] | None, list[dict]]:
    """(the file's whole lines, its CSV header or None for JSON lines, its records as read);
    nothing is written.

    Raises:
        ValueError: a line, the header or the unfinished last line is not what predict writes.
    """
    whole = data[: data.rfind(b"\n") + 1]
    text = whole.decode("utf-8", errors="surrogateescape")  # as written: names need not be UTF-8
    tail = data[len(whole) :]
    csv_file = path.suffix.lower() == ".csv"
    # What a kill leaves after the last newline: the start of a JSON line or of the CSV header
    # (the rest of a CSV row can be anything: a row begins with its path).
    start = ",".join(CSV_FIELDS).encode() if csv_file else b'{"path": '
    if tail and not (csv_file and whole) and not (tail.startswith(start) or start.startswith(tail)):
        raise _not_records(path, "its last line is not the start of a record")
    if not csv_file:
        return whole, None, [_json_record(path, number, line) for number, line in _lines(text)]
    rows = list(csv.reader(io.StringIO(text)))
    if not rows:
        return whole, CSV_FIELDS, []
    fields = tuple(rows[0])
    if len(fields) < len(CSV_FIELDS[:5]) or fields != CSV_FIELDS[: len(fields)]:
        raise _not_records(path, f"its header {','.join(fields)!r} is not predict's columns")
    records = []
    for number, row in enumerate(rows[1:], start=2):
        if len(row) != len(fields):
            raise _not_records(path, f"row {number} has {len(row)} cells, the header {len(fields)}")
        records.append(_checked(path, number, {k: v for k, v in zip(fields, row, strict=True) if v}))
    return whole, fields, records


def _lines(text: str) -> Iterator[tuple[int, str]]:
    return ((number, line) for number, line in enumerate(text.split("\n"), start=1) if line.strip())


def _json_record(path: Path, number: int, line: str) -> dict:
    try:
        record = json.loads(line)
    except ValueError:
        raise _not_records(path, f"line {number} is not JSON") from None
    if not isinstance(record, dict) or not set(record) <= set(CSV_FIELDS):
        raise _not_records(path, f"line {number} is not a predict record")
    return _checked(path, number, record)


def _checked(path: Path, number: int, record: dict) -> dict:
    """`record` if it has a path and either an error or a label and a probability."""
    fine = isinstance(record.get("path"), str) and record["path"] != ""
    if fine and not record.get("error"):
        try:
            float(record.get("probability"))
        except (TypeError, ValueError):
            fine = False
        fine = fine and isinstance(record.get("label"), str)
    if not fine:
        raise _not_records(path, f"line {number} is not a predict record")
    return record


def _not_records(path: Path, reason: str) -> ValueError:
    return ValueError(
        f"{path}: is not a file of predict records ({reason}); cannot resume it, left as it was."
    )


def _serialise(records: list[dict], fields: tuple[str, ...] | None) -> bytes:
    """Records as the output file holds them: CSV rows under `fields`, or JSON lines (None)."""
    buffer = io.StringIO()
    with RecordWriter(buffer, "jsonl" if fields is None else "csv", fields=fields or CSV_FIELDS) as writer:
        for record in records:
            writer.write(record)
    return buffer.getvalue().encode("utf-8", errors="surrogateescape")


def table(records: list[dict], header: str, cells: Callable[[dict], str]) -> str:
    """Records as aligned text: the path column, then `cells(record)` or the record's error."""
    width = max([len(r["path"]) for r in records] + [4])
    lines = [f"{'path':<{width}}  {header}"]
    lines += [
        f"{r['path']:<{width}}  " + (f"ERROR  {r['error']}" if "error" in r else cells(r)) for r in records
    ]
    return "\n".join(lines)


class Tally:
    """Counts of records as they pass, for the summary line (nothing else is kept). Films the
    out-of-distribution rule flags are counted apart, not under their label: a photograph called
    PNEUMONIA is not a pneumonia."""

    def __init__(self) -> None:
        self.labels: dict[str, int] = {}
        self.failed = self.flagged = self.borderline = 0

    def add(self, record: dict) -> None:
        if "error" in record:
            self.failed += 1
        elif record.get("ood"):
            self.flagged += 1
        else:
            self.labels[record["label"]] = self.labels.get(record["label"], 0) + 1
            self.borderline += bool(record.get("borderline"))

    def line(self, skipped: int = 0) -> str:
        parts = ", ".join(f"{n} {label}" for label, n in sorted(self.labels.items()))
        if self.borderline:
            parts += f"; {self.borderline} of them borderline, needing a reader"
        if self.flagged:
            flagged = f"{self.flagged} flagged as not chest X-rays, not counted by label"
            parts = f"{parts}; {flagged}" if parts else flagged
        done = f"; {skipped} already in the output file, skipped" if skipped else ""
        predicted = sum(self.labels.values()) + self.flagged
        return f"{predicted} image(s) predicted ({parts or 'none'}); {self.failed} failed{done}."


def item_path(item: Path | dict) -> str:
    """The `path` its record will carry."""
    return item["path"] if isinstance(item, dict) else str(item)
