"""pneumoscan.predict: streaming predictions, formats, and one clear record per bad input."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import shutil
import unicodedata
from pathlib import Path

import keras
import numpy as np
import pytest

from conftest import AWKWARD_BAD, AWKWARD_VALID, SAMPLES, raw_with_copies, write_awkward
from pneumoscan import bundle as bundle_module
from pneumoscan.bundle import Bundle
from pneumoscan.calibrate import apply_calibration
from pneumoscan.cli import main
from pneumoscan.metadata import read
from pneumoscan.predict import CSV_FIELDS, expand_paths, in_shard, predict_files
from pneumoscan.preprocess import IMAGE_SUFFIXES, decode_to_input

UNUSUAL = AWKWARD_VALID
SAMPLE_FILES = sorted(SAMPLES.rglob("*.jpeg"))
BAD = AWKWARD_BAD


def test_probabilities_match_the_model_and_metadata(trained_run):
    _, run_dir = trained_run
    paths = sorted(SAMPLES.rglob("*.jpeg"))[:5]
    records = predict_files(run_dir, paths, batch_size=2)
    meta = read(run_dir)
    model = keras.models.load_model(run_dir / "model.keras")
    raw = raw_with_copies(model, np.stack([decode_to_input(p, 64) for p in paths]), meta)
    expected = apply_calibration(raw, meta["calibration"])
    assert [r["path"] for r in records] == [str(p) for p in paths]
    np.testing.assert_allclose([r["probability"] for r in records], expected, atol=1e-6)
    for r in records:
        assert r["threshold"] == meta["threshold"]["value"]
        assert r["label"] == ("PNEUMONIA" if r["probability"] >= r["threshold"] else "NORMAL")


def test_batch_size_does_not_change_results(trained_run):
    _, run_dir = trained_run
    one = predict_files(run_dir, [SAMPLES], batch_size=1)
    seven = predict_files(run_dir, [SAMPLES], batch_size=7)
    assert len(one) == 16
    np.testing.assert_allclose([r["probability"] for r in one], [r["probability"] for r in seven], atol=1e-6)


def test_unusual_but_valid_images_are_predicted(trained_run, tmp_path):
    _, run_dir = trained_run
    for name, make in UNUSUAL.items():
        make(tmp_path / name)
    records = predict_files(run_dir, [tmp_path])
    assert sorted(r["path"].rsplit("/", 1)[1] for r in records) == sorted(UNUSUAL)
    assert all(os.fsencode(r["path"]) == os.fsencode(tmp_path / Path(r["path"]).name) for r in records)
    assert all("error" not in r and 0 <= r["probability"] <= 1 for r in records), records


def test_bad_inputs_each_get_one_sentence_and_the_rest_go_on(trained_run, tmp_path, capsys):
    _, run_dir = trained_run
    folder = tmp_path / "batch"
    folder.mkdir()
    for name, (make, _) in BAD.items():
        make(folder / name)
    good = shutil.copy(SAMPLES / "PNEUMONIA" / "person19_bacteria_61.jpeg", folder / "good.jpeg")
    args = [
        "predict",
        "--model",
        str(run_dir),
        "--format",
        "json",
        str(tmp_path / "missing.png"),
        str(folder / "empty.jpeg"),
        str(folder / "good.jpeg"),
        str(folder / "notes.png"),
        str(folder / "anim.gif"),
        str(folder / "truncated.jpeg"),
        str(folder / "bomb.png"),
        str(folder / "icon.png"),
        str(tmp_path / "nothing_here"),
    ]
    (tmp_path / "nothing_here").mkdir()
    assert main(args) == 1
    out, err = capsys.readouterr()
    records = json.loads(out)
    assert [r["path"] for r in records] == args[5:]
    by_name = {r["path"].rsplit("/", 1)[1]: r for r in records}
    assert (
        by_name["good.jpeg"]["label"] in ("NORMAL", "PNEUMONIA") and str(good) == by_name["good.jpeg"]["path"]
    )
    assert "no such file or folder" in by_name["missing.png"]["error"]
    assert "folder holds no .jpeg" in by_name["nothing_here"]["error"]
    for name, (_, message) in BAD.items():
        if name not in by_name:
            continue  # the corpus test below gives every bad file
        error = by_name[name]["error"]
        assert message in error and name in error and "\n" not in error
    assert "Traceback" not in err and "1 image(s) predicted" in err and "8 failed" in err


def test_formats(trained_run, capsys):
    _, run_dir = trained_run
    files = [str(p) for p in sorted(SAMPLES.rglob("*.jpeg"))[:3]]
    assert main(["predict", "--model", str(run_dir), "--format", "csv", *files]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["path"] for r in rows] == files
    assert set(rows[0]) == {"path", "label", "probability", "threshold", "error", "warning"} | {
        "borderline",
        "ood",
        "ood_score",
        "model",
        "model_digest",
    }
    # Which model answered, for an audit trail: its architecture and its metadata.json's SHA-256.
    expected = hashlib.sha256((run_dir / "metadata.json").read_bytes()).hexdigest()
    assert {(r["model"], r["model_digest"]) for r in rows} == {
        (Bundle.load(run_dir).metadata["arch"], expected)
    }
    assert {rows[0]["ood"], rows[0]["borderline"]} <= {"True", "False"} and float(rows[0]["ood_score"]) > 0
    assert main(["predict", "--model", str(run_dir), *files]) == 0
    table = capsys.readouterr().out.splitlines()
    header = ["path", "label", "p(pneumonia)", "threshold", "borderline", "ood"]
    assert table[0].split() == header and len(table) == 4
    assert all(line.split()[4] in ("yes", "no") and line.split()[5] in ("yes", "no") for line in table[1:])


def test_missing_model_without_a_bundle_is_a_usage_error(monkeypatch, capsys):
    monkeypatch.setattr(bundle_module, "bundled_dir", lambda: None)
    assert main(["predict", str(SAMPLES)]) == 2
    assert "no --model given and this installation has no bundled model" in capsys.readouterr().err


def test_not_a_model_folder(tmp_path, capsys):
    assert main(["predict", "--model", str(tmp_path), str(SAMPLES)]) == 2
    assert "not a model folder" in capsys.readouterr().err


def test_the_awkward_corpus_every_file_a_record_and_one_sentence(trained_run, tmp_path, capsys):
    _, run_dir = trained_run
    folder = write_awkward(tmp_path / "corpus")
    assert main(["predict", "--model", str(run_dir), "--format", "json", str(folder)]) == 1
    out, err = capsys.readouterr()
    by_name = {Path(r["path"]).name: r for r in json.loads(out)}
    listed = {name for name in [*AWKWARD_VALID, *AWKWARD_BAD] if Path(name).suffix.lower() in IMAGE_SUFFIXES}
    assert set(by_name) == listed  # anim.gif is not an image name; the loop/ link is not followed
    assert main(["predict", "--model", str(run_dir), "--format", "json", str(folder / "anim.gif")]) == 1
    by_name["anim.gif"] = json.loads(capsys.readouterr().out)[0]
    for name in AWKWARD_VALID:
        assert "error" not in by_name[name] and by_name[name]["label"] in ("NORMAL", "PNEUMONIA"), name
    for name, (_, message) in AWKWARD_BAD.items():
        error = by_name[name]["error"]
        assert message in error and error.startswith(str(folder / name)) and "\n" not in error, name
    assert "Traceback" not in err and f"{len(AWKWARD_BAD) - 1} failed" in err
    exif = [by_name[f"exif-orientation-{k}.jpeg"]["probability"] for k in range(1, 9)]
    assert len(set(exif)) > 1  # the orientation is applied: rotated copies are not the same input


def test_json_on_stdout_is_one_array_written_as_it_grows(trained_run, capsys):
    _, run_dir = trained_run
    assert main(["predict", "--model", str(run_dir), "--format", "json", str(SAMPLES)]) == 0
    out = capsys.readouterr().out
    assert out == json.dumps(predict_files(run_dir, [SAMPLES]), indent=2) + "\n"


def _from_csv(key: str, value: str):
    """A CSV cell as the JSON record holds it."""
    if key in ("probability", "threshold", "ood_score"):
        return float(value)
    return {"True": True, "False": False}[value] if key in ("borderline", "ood") else value


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_output_file_is_written_as_records_come_and_resumed(trained_run, tmp_path, capsys, suffix):
    _, run_dir = trained_run
    output = tmp_path / f"records{suffix}"
    base = ["predict", "--model", str(run_dir), "--output", str(output)]
    expected = {r["path"]: r for r in predict_files(run_dir, [SAMPLES])}

    def read() -> list[dict]:
        if suffix == ".csv":
            rows = csv.DictReader(output.open())
            return [{k: _from_csv(k, v) for k, v in row.items() if v} for row in rows]
        return [json.loads(line) for line in output.read_text().splitlines()]

    assert main([*base, str(SAMPLES)]) == 0
    out, err = capsys.readouterr()
    assert out == "" and "16 image(s) predicted" in err
    assert {r["path"]: r for r in read()} == expected and len(read()) == 16

    def same(record: dict) -> bool:  # other batches, other float rounding: as in test_batch_size...
        reference = expected[record["path"]]
        return record["label"] == reference["label"] and record["probability"] == pytest.approx(
            reference["probability"], abs=1e-6
        )

    assert main([*base, str(SAMPLES)]) == 2  # an existing file is never overwritten
    assert "exists; pass --resume" in capsys.readouterr().err

    # As a kill leaves it: 5 whole records and half of the sixth.
    lines = output.read_text().splitlines(keepends=True)
    keep = 6 if suffix == ".csv" else 5  # the CSV header counts as a line
    output.write_text("".join(lines[:keep]) + lines[keep][: len(lines[keep]) // 2])
    assert main([*base, "--resume", str(SAMPLES)]) == 0
    err = capsys.readouterr().err
    assert "11 image(s) predicted" in err and "5 already in the output file, skipped" in err
    records = read()
    assert sorted(r["path"] for r in records) == sorted(expected)  # each path once, none half
    assert all(same(r) for r in records)


def test_resuming_a_csv_begun_before_the_new_columns_keeps_its_header(trained_run, tmp_path, capsys):
    _, run_dir = trained_run
    output = tmp_path / "old.csv"
    old_fields = ["path", "label", "probability", "threshold", "error", "warning"]
    first = predict_files(run_dir, SAMPLE_FILES[:2])
    with output.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=old_fields, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        writer.writerows(first)
    assert (
        main(
            [
                "predict",
                "--model",
                str(run_dir),
                "--output",
                str(output),
                "--resume",
                *map(str, SAMPLE_FILES[:4]),
            ]
        )
        == 0
    )
    assert "2 already in the output file, skipped" in capsys.readouterr().err
    rows = list(csv.reader(output.open()))
    assert rows[0] == old_fields and len(rows) == 5 and all(len(row) == len(old_fields) for row in rows)


@pytest.mark.parametrize(
    "name, content",
    [
        ("people.csv", b"name,score\nalice,1\nbob,2"),  # a torn-looking last line: kept
        ("people.csv", b"name,score\n"),  # header only: no empty rows appended
        ("people.csv", b"name,sc"),
        ("half.csv", b"path,label,probability,threshold\nx.png,NORMAL,0.1,0.5\n"),
        ("bad-row.csv", ",".join(CSV_FIELDS).encode() + b"\nx.png,,,,,,,,\n"),  # neither label nor error
        ("notes.jsonl", b'{"name": "alice"}\n{"na'),
        ("notes.jsonl", b"hello"),
        ("notes.jsonl", b'{"path": "x.png", "label": "NORMAL", "probability": 0.1}\nhello'),
        ("notes.jsonl", b'{"path": "x.png", "owner": "alice", "label": "NORMAL", "probability": 0.1}\n'),
    ],
)
def test_resume_leaves_a_file_that_is_not_predict_records_as_it_was(name, content, tmp_path, capsys):
    """Checked before anything is cut or appended: one sentence naming the file, exit 2."""
    output = tmp_path / name
    output.write_bytes(content)
    assert main(["predict", "--output", str(output), "--resume", str(SAMPLE_FILES[0])]) == 2
    err = capsys.readouterr().err
    assert f"{output}: is not a file of predict records" in err and len(err.strip().splitlines()) == 1
    assert output.read_bytes() == content


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_resume_tries_error_records_again(trained_run, tmp_path, capsys, suffix):
    """An error record is not done (the file may be readable now): it is predicted again and its
    old record dropped, so every path has one record."""
    _, run_dir = trained_run
    output = tmp_path / f"records{suffix}"
    base = ["predict", "--model", str(run_dir), "--output", str(output)]
    assert main([*base, *map(str, SAMPLE_FILES[:3])]) == 0
    lines = output.read_text().splitlines(keepends=True)
    failed = str(SAMPLE_FILES[1])
    error = {"path": failed, "error": f"{failed}: file is truncated."}
    if suffix == ".csv":
        lines[2] = ",".join([failed, "", "", "", error["error"], *[""] * (len(CSV_FIELDS) - 5)]) + "\n"
    else:
        lines[1] = json.dumps(error) + "\n"
    output.write_text("".join(lines))
    capsys.readouterr()
    assert main([*base, "--resume", *map(str, SAMPLE_FILES[:4])]) == 0
    err = capsys.readouterr().err
    assert "2 image(s) predicted" in err and "2 already in the output file, skipped" in err
    if suffix == ".csv":
        records = list(csv.DictReader(output.open()))
    else:
        records = [json.loads(line) for line in output.read_text().splitlines()]
    assert sorted(r["path"] for r in records) == sorted(map(str, SAMPLE_FILES[:4]))
    assert not any(r.get("error") for r in records)


def test_resume_matches_paths_however_they_are_written(trained_run, tmp_path, monkeypatch, capsys):
    """Records are matched by the absolute path: a run begun with absolute paths resumes with
    relative ones (and `./`, `..`) from another spelling, and each file keeps one record, with
    the path as it was given."""
    _, run_dir = trained_run
    output = tmp_path / "records.jsonl"
    base = ["predict", "--model", str(run_dir), "--output", str(output)]
    assert main([*base, *map(str, SAMPLE_FILES[:2])]) == 0
    capsys.readouterr()
    monkeypatch.chdir(SAMPLES.parent)
    assert main([*base, "--resume", f"./{SAMPLES.name}/../{SAMPLES.name}"]) == 0
    assert "2 already in the output file, skipped" in capsys.readouterr().err
    paths = [json.loads(line)["path"] for line in output.read_text().splitlines()]
    assert len(paths) == len(SAMPLE_FILES) == len({os.path.abspath(p) for p in paths})
    assert paths[:2] == list(map(str, SAMPLE_FILES[:2]))
    assert all(p.startswith(f"{SAMPLES.name}/../{SAMPLES.name}/") for p in paths[2:])

    # From another folder, those relative paths name nothing: refused, the file left as it was.
    before = output.read_bytes()
    monkeypatch.chdir(tmp_path)
    assert main([*base, "--resume", str(SAMPLES)]) == 2
    err = capsys.readouterr().err
    assert f"{output}: its records name files relative to the folder its run began in" in err
    assert "resume from that folder, or start a new FILE" in err and output.read_bytes() == before


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--resume"], "--resume continues an --output FILE"),
        (["--output", "{tmp}/r.txt"], "name a .csv or .jsonl file"),
        (["--output", "{tmp}/r.csv", "--format", "json"], "with --output the file's suffix sets its format"),
    ],
)
def test_output_usage_errors(flags, message, tmp_path, capsys):
    flags = [f.replace("{tmp}", str(tmp_path)) for f in flags]
    assert main(["predict", *flags, str(SAMPLES)]) == 2
    assert message in capsys.readouterr().err


def test_progress_bar_on_a_terminal_only(trained_run, monkeypatch, capsys):
    """A terminal on stderr gets a progress bar (rich); a pipe or file gets nothing but the summary."""
    import sys as system

    _, run_dir = trained_run

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    terminal = Terminal()
    monkeypatch.setattr(system, "stderr", terminal)
    assert main(["predict", "--model", str(run_dir), "--format", "csv", str(SAMPLES)]) == 0
    assert "predicting" in terminal.getvalue() and "16/16" in terminal.getvalue()


def test_three_shards_cover_every_file_once(trained_run, tmp_path, capsys):
    """`--shard K/N` by a hash of each path relative to its argument: the union of the shards is
    one unsharded run, no file twice; a missing input is reported by the shard its name falls in."""
    _, run_dir = trained_run
    inputs = [str(SAMPLES), str(tmp_path / "missing.png"), str(SAMPLES / "NORMAL" / "IM-0115-0001.jpeg")]
    base = ["predict", "--model", str(run_dir), "--format", "json"]
    main([*base, *inputs])
    whole = json.loads(capsys.readouterr().out)
    shards = []
    for k in range(3):
        main([*base, "--shard", f"{k}/3", *inputs])
        shards.append(json.loads(capsys.readouterr().out))
    assert all(shards) and sorted(len(s) for s in shards) != [0, 0, len(whole)]  # spread out
    merged = sorted((r["path"], r.get("label"), r.get("error")) for s in shards for r in s)
    assert merged == sorted((r["path"], r.get("label"), r.get("error")) for r in whole)
    # The key is the path below its argument: another mount point gives the same shards.
    copy = shutil.copytree(SAMPLES, tmp_path / "elsewhere" / "chest_xray")
    main([*base, "--shard", "1/3", str(copy)])
    moved = {Path(r["path"]).relative_to(copy) for r in json.loads(capsys.readouterr().out)}
    assert moved == {
        Path(r["path"]).relative_to(SAMPLES) for r in shards[1] if r["path"].startswith(str(SAMPLES / ""))
    }


# Shard of 10 of a few keys, fixed for good: a salted or per-machine hash would move them.
PINNED_SHARDS = {
    "NORMAL/IM-0115-0001.jpeg": 5,
    "PNEUMONIA/person1_bacteria_1.jpeg": 2,
    "missing.png": 9,
    "a/b/c.dcm": 5,
    "caf\u00e9.png": 4,
    "cafe\u0301.png": 4,  # the same name in NFD, as a copy from macOS may spell it
    "B\u00e4der/R\u00f6ntgen.png": 6,
    "\udcff.png": 7,  # a name that is not UTF-8, as os.fsdecode gives it
}


@pytest.mark.parametrize("key, shard", PINNED_SHARDS.items())
def test_shard_assignments_are_fixed(key, shard):
    assert [k for k in range(10) if in_shard(key, k, 10)] == [shard]


def test_the_shard_key_is_nfc_and_the_same_for_relative_and_absolute_arguments(tmp_path, monkeypatch):
    """A name copied from macOS (NFD) falls in the shard of its NFC spelling, and a folder named
    relatively or absolutely shards alike."""
    for form, folder in (("NFC", "composed"), ("NFD", "decomposed")):
        path = tmp_path / folder / unicodedata.normalize(form, "B\u00e4der/R\u00f6ntgen.png")
        path.parent.mkdir(parents=True)
        path.write_bytes(b"")
        assert expand_paths([tmp_path / folder], (6, 10)) == [path]
        assert expand_paths([path], (5, 10)) == [path]  # named directly: its own name, "Röntgen.png"
    monkeypatch.chdir(tmp_path)
    for k in range(10):
        relative = expand_paths(["./composed/"], (k, 10))
        assert [tmp_path / p for p in relative] == expand_paths([tmp_path / "composed"], (k, 10))


@pytest.mark.parametrize("shard", ["3/3", "1", "a/b", "-1/2", "1/0"])
def test_a_bad_shard_is_a_usage_error(shard, capsys):
    assert main(["predict", f"--shard={shard}", str(SAMPLES)]) == 2
    assert "shard must be K/N with 0 <= K < N" in capsys.readouterr().err


# ---- issue 23: the flags wherever a label is shown ---------------------------------------

FLAGGED = [
    {"path": "photo.png", "label": "PNEUMONIA", "probability": 0.996, "threshold": 0.9, "borderline": False}
    | {"ood": True, "ood_score": 3.2},
    {"path": "xray.jpeg", "label": "PNEUMONIA", "probability": 0.99999, "threshold": 0.9, "borderline": False}
    | {"ood": False, "ood_score": 0.2},
    {"path": "unsure.jpeg", "label": "NORMAL", "probability": 0.5, "threshold": 0.9, "borderline": True}
    | {"ood": False, "ood_score": 0.4},
    {"path": "broken.png", "error": "broken.png: is not an image."},
]


def test_the_summary_counts_flagged_films_apart_from_their_label():
    from pneumoscan.predict import Tally

    tally = Tally()
    for record in FLAGGED:
        tally.add(record)
    assert tally.line() == (
        "3 image(s) predicted (1 NORMAL, 1 PNEUMONIA; 1 of them borderline, needing a reader; "
        "1 flagged as not chest X-rays, not counted by label); 1 failed."
    )
    only_photos = Tally()
    only_photos.add(FLAGGED[0])
    flagged_only = "1 image(s) predicted (1 flagged as not chest X-rays, not counted by label); 0 failed."
    assert only_photos.line() == flagged_only


def test_the_table_says_each_flag_in_words_and_never_prints_certainty():
    from pneumoscan.predict import render

    lines = render(FLAGGED, "table").splitlines()
    header = ["path", "label", "p(pneumonia)", "threshold", "borderline", "ood"]
    assert lines[0].split() == header
    photo, xray, unsure = lines[1:4]
    assert "NOT A CHEST X-RAY? the label is not meaningful" in photo
    assert "<-" not in xray and ">0.9999" in xray and "1.0000" not in xray
    assert "borderline: uncertain, needs a reader" in unsure and "NOT A CHEST" not in unsure
    assert all(line.split()[4] in ("yes", "no") and line.split()[5] in ("yes", "no") for line in lines[1:4])
