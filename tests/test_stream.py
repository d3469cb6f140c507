"""pneumoscan.stream: predict's input stream without TensorFlow: order kept, each bad file's
reason carried, images as `decode_to_input` makes them, a bounded number of films in flight."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from conftest import SAMPLES
from pneumoscan import stream
from pneumoscan.preprocess import decode, decode_to_input

PATHS = sorted(SAMPLES.rglob("*.jpeg"))[:6]


def _films(paths, size, batch_size=4, workers=None):
    return [film for batch in stream.batches(paths, size, batch_size, workers) for film in batch.films]


def test_images_stream_flags_bad_files(tmp_path):
    bad = tmp_path / "bad.jpeg"
    bad.write_bytes(b"not an image")
    rows = [f for f in _films([PATHS[0], bad, PATHS[1]], 64) if f.warning == ""]  # no DICOM here
    assert [r.error == "" for r in rows] == [True, False, True]
    assert rows[1].path == str(bad)
    assert rows[1].error == f"{bad}: is not a JPEG, PNG or DICOM image."  # the decode's own sentence
    assert all(r.image.shape == (64, 64, 1) and r.image.dtype == np.float32 for r in rows)
    np.testing.assert_array_equal(rows[2].image, decode_to_input(PATHS[1], 64))
    np.testing.assert_array_equal(rows[1].image, 0)
    # The out-of-distribution image checks ride along: [colourfulness, aspect].
    expected = decode(PATHS[1])
    np.testing.assert_array_equal(rows[2].checks, [expected.colourfulness, expected.aspect])
    np.testing.assert_array_equal(rows[1].checks, [0.0, 1.0])


def test_any_exception_while_decoding_costs_only_that_files_record(monkeypatch):
    """An exception that is not an ImageError is the file's one sentence (its type, not its
    text), and the files after it still come."""

    def flaky(path):
        if path == PATHS[1]:
            raise RuntimeError("raw header bytes b'Doe^Jane'")
        return decode(path)

    monkeypatch.setattr(stream, "decode", flaky)
    rows = [(f.path, f.error) for f in _films(PATHS[:3], 32)]
    assert [path for path, _ in rows] == [str(p) for p in PATHS[:3]]
    assert [error for _, error in rows] == ["", f"{PATHS[1]}: could not be decoded (RuntimeError).", ""]


@pytest.mark.parametrize(("batch_size", "workers"), [(1, 1), (4, 2), (5, 3), (64, 4)])
def test_order_and_batches_hold_whatever_the_threads(batch_size, workers):
    paths = [PATHS[i % len(PATHS)] for i in range(23)]
    batches = list(stream.batches(paths, 48, batch_size, workers))
    assert [len(b.films) for b in batches[:-1]] == [batch_size] * (len(batches) - 1)
    assert 0 < len(batches[-1].films) <= batch_size
    films = [f for b in batches for f in b.films]
    assert [f.path for f in films] == [str(p) for p in paths]
    for batch in batches:
        assert batch.images.shape == (len(batch.films), 48, 48, 1) and batch.checks.shape == (
            len(batch.films),
            2,
        )
    for film, path in zip(films, paths, strict=True):
        np.testing.assert_array_equal(film.image, decode_to_input(path, 48))


@pytest.fixture
def started(monkeypatch):
    """The paths `stream.load` was asked for, in the order asked; each film empty."""
    paths, lock = [], threading.Lock()

    def counting(path, size):
        with lock:
            paths.append(path)
        return stream.Film(str(path), "", "", np.zeros((size, size, 1), np.float32), np.array([0.0, 1.0]))

    monkeypatch.setattr(stream, "load", counting)
    return paths


def test_films_in_flight_are_bounded(started):
    """Decoding runs ahead of the consumer by at most two batches and a film a worker, however
    many files there are: memory stays flat."""
    batches = stream.batches([f"film{i}" for i in range(1000)], 8, batch_size=4, workers=2)
    consumed = 0
    for batch in batches:
        consumed += len(batch.films)
        assert len(started) <= consumed + 2 * 4 + 2
        if consumed >= 40:
            break
    batches.close()
    assert len(started) < 1000


@pytest.mark.parametrize(("batch_size", "count"), [(1, 1), (4, 2), (5, 3), (64, 2)])
def test_lanes_keep_the_order_and_work_each_batch_on_a_lane(batch_size, count):
    """`lanes` gives the batches `batches` gives, in order, each with what `work` made of it
    on the lane thread that decoded it."""
    paths = [PATHS[i % len(PATHS)] for i in range(23)]

    def work(batch):
        return threading.current_thread().name, len(batch.films)

    done = list(stream.lanes(paths, 48, batch_size, work, count))
    expected = list(stream.batches(paths, 48, batch_size, count))
    assert [len(b.films) for b, _ in done] == [len(b.films) for b in expected]
    assert all(name.startswith("lane") and size == len(b.films) for b, (name, size) in done)
    for (batch, _), same in zip(done, expected, strict=True):
        np.testing.assert_array_equal(batch.images, same.images)
        np.testing.assert_array_equal(batch.checks, same.checks)
        assert [f.path for f in batch.films] == [f.path for f in same.films]
    assert len({name for _, (name, _) in done}) <= count


def test_lanes_carry_each_bad_files_sentence(tmp_path):
    bad = tmp_path / "bad.jpeg"
    bad.write_bytes(b"not an image")
    (batch, _), *_ = stream.lanes([PATHS[0], bad], 32, 4, lambda b: None)
    assert [f.error for f in batch.films] == ["", f"{bad}: is not a JPEG, PNG or DICOM image."]


def test_batches_in_flight_in_lanes_are_bounded(started):
    done = stream.lanes([f"film{i}" for i in range(1000)], 8, 4, lambda b: None, count=2)
    consumed = 0
    for batch, _ in done:
        consumed += len(batch.films)
        assert len(started) <= consumed + (2 + 1) * 4  # the lanes' batches and one queued
        if consumed >= 40:
            break
    done.close()
    assert len(started) < 1000
