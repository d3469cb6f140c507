"""`predict`'s input stream, in NumPy and threads (no TensorFlow): path -> decode -> grayscale ->
resize (pneumoscan.preprocess), in batches, in the order given, two ways:

- `lanes` (the LiteRT flatbuffer with test-time copies): one thread a core, each decoding a
  whole batch and then running the caller's work on it (the forward pass on the thread's own
  one-threaded interpreter, the verdicts), while the other lanes do the same with the next
  batches;
- `batches` (Keras, whose pass uses every core itself, or a flatbuffer without copies): a small
  pool of threads decodes ahead of the batch the forward pass is on.

`predict.verdicts` picks between them by what measured faster (BENCHMARKS.md, "Inference without
TensorFlow").

Pillow, NumPy and the LiteRT interpreter release the GIL while they work. A bounded number of
films is in flight, so memory stays flat however many files there are. A file that cannot be
used becomes its decode's one sentence, its image zeros, and the stream goes on; beside each
image ride the image checks of the out-of-distribution flag (colourfulness before luma, aspect).
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from pneumoscan.preprocess import ImageError, decode, resize, unusable

# Decoding threads: one a core, at least two (one decodes while the other waits on a read).
WORKERS = max(2, os.cpu_count() or 1)
# Lanes (`lanes`): one a core.
LANES = os.cpu_count() or 1

Result = TypeVar("Result")


@dataclass(frozen=True)
class Film:
    """One path's model input, or the reason it has none."""

    path: str
    error: str  # "" when the file decoded, else its one-sentence reason
    warning: str  # what its DICOM header says against it ("; "-joined phrases), or ""
    image: np.ndarray  # (S, S, 1) float32 in [0, 255]; zeros on error
    checks: np.ndarray  # float64 [colourfulness, aspect]; [0, 1] on error


@dataclass(frozen=True)
class Batch:
    """Consecutive films, their images stacked for one forward pass."""

    films: list[Film]

    @property
    def images(self) -> np.ndarray:
        return np.stack([film.image for film in self.films])

    @property
    def checks(self) -> np.ndarray:
        return np.stack([film.checks for film in self.films])


def load(path: str | Path, image_size: int) -> Film:
    """One path's film. Whatever a file holds, the outcome is its image or one sentence: an
    exception no decode rule names becomes `preprocess.unusable`'s (its type, not its text)."""
    try:
        decoded = decode(path)
    except Exception as error:
        text = str(error) if isinstance(error, ImageError) else unusable(path, error)
        empty = np.zeros((image_size, image_size, 1), np.float32)
        return Film(str(path), text, "", empty, np.array([0.0, 1.0]))
    checks = np.array([decoded.colourfulness, decoded.aspect])
    return Film(str(path), "", "; ".join(decoded.warnings), resize(decoded.luma, image_size), checks)


def batches(
    paths: Sequence[str | Path], image_size: int, batch_size: int, workers: int | None = None
) -> Iterator[Batch]:
    """Batches of `batch_size` films (the last shorter) in the order of `paths`, decoded on
    `workers` threads while the caller works on the batch before; at most two batches and a film
    a worker are in flight. `workers`: `WORKERS` unless given."""
    workers = workers or WORKERS
    ahead = 2 * batch_size + workers
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="decode") as pool:
        pending: deque[Future] = deque()
        queued = iter(paths)
        try:
            for path in queued:
                pending.append(pool.submit(load, path, image_size))
                if len(pending) >= ahead:
                    break
            films: list[Film] = []
            while pending:
                films.append(pending.popleft().result())
                nxt = next(queued, None)
                if nxt is not None:
                    pending.append(pool.submit(load, nxt, image_size))
                if len(films) == batch_size:
                    yield Batch(films)
                    films = []
            if films:
                yield Batch(films)
        finally:  # a consumer that stops early: the queued decodes are dropped, not waited for
            for future in pending:
                future.cancel()


def lanes(
    paths: Sequence[str | Path],
    image_size: int,
    batch_size: int,
    work: Callable[[Batch], Result],
    count: int | None = None,
) -> Iterator[tuple[Batch, Result]]:
    """(batch, `work(batch)`) for consecutive batches of `batch_size` films, in the order of
    `paths`, each batch decoded and worked on from start to end by one of `count` threads
    (`LANES` unless given): a core decodes a batch and runs its forward pass while the other does
    the same with the next (a LiteRT interpreter per thread, `litert.Runtime.runner`). At most
    `count` + 1 batches are in flight."""
    count = count or LANES

    def decode_and_work(chunk: Sequence[str | Path]) -> tuple[Batch, Result]:
        batch = Batch([load(path, image_size) for path in chunk])
        return batch, work(batch)

    chunks = (paths[start : start + batch_size] for start in range(0, len(paths), batch_size))
    with ThreadPoolExecutor(max_workers=count, thread_name_prefix="lane") as pool:
        pending: deque[Future] = deque()
        try:
            for chunk in chunks:
                pending.append(pool.submit(decode_and_work, chunk))
                if len(pending) > count:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:  # a consumer that stops early: the queued batches are dropped, not waited for
            for future in pending:
                future.cancel()
