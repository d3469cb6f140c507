"""The forward pass, defined once (the page's twin is `web/forward.js`): a film's raw model
output, averaged over the test-time copies that metadata.json's `test_time` block names, and in
the same pass the output of one inner layer (the out-of-distribution score's features, the class
activation map's grid). `Bundle.forward` and `Bundle.forward_features` run it for every stage.

TensorFlow is imported only when a model runs, so commands that only read metadata start fast;
a bundle with its LiteRT flatbuffer runs the same pass there (`pneumoscan.litert`) without it.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # NumPy is imported where a model runs: `pneumoscan --help` starts without it
    import numpy as np

INFERENCE_BATCH = 32  # images per forward call: predict's and evaluate's default --batch-size
# Calls with this many films or fewer run eagerly: tracing and optimising the graph (about 0.3 s
# on 2 cores) costs a one-image `predict` more than it saves; larger calls run 3x faster compiled.
EAGER_AT_MOST = 3


@contextlib.contextmanager
def quiet_stderr() -> Iterator[None]:
    """The process's stderr (file descriptor 2) sent to /dev/null inside the block: the C++
    start-up lines of TensorFlow (absl's pre-init warning, oneDNN's notice) and of LiteRT (its
    XNNPACK delegate's INFO line) ignore the log levels. Errors still reach Python as exceptions."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "wb") as sink:
            os.dup2(sink.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


# Whether a first import of TensorFlow goes through `quiet_stderr` (the CLI clears it for --debug).
QUIET_IMPORT = [True]


def import_tensorflow() -> None:
    """Import TensorFlow (and so Keras' backend) once, quietly unless `QUIET_IMPORT` says not."""
    if "tensorflow" in sys.modules:
        return
    with quiet_stderr() if QUIET_IMPORT[0] else contextlib.nullcontext():
        import tensorflow  # noqa: F401


def copies(test_time: dict | None) -> tuple[list[tuple[int, int]], float]:
    """(shifts, fill) of metadata.json's `test_time` block; the film alone without one."""
    if not test_time:
        return [(0, 0)], 0.0
    return [tuple(shift) for shift in test_time["shifts"]], float(test_time["fill"])


def in_batches(
    run: Callable[[Any], tuple[Any, Any]], images: Any, batch_size: int, layer: str | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """`run(films) -> (raw outputs (k,), the layer's output (k, ...) or None)` over `images`,
    `batch_size` films a call, joined: (raw outputs float32 (n,), the layer's output float32
    (n, ...), or None when `layer` is None). Keras' pass and the flatbuffer's both go through it."""
    import numpy as np

    raw, features = [], []
    for start in range(0, int(images.shape[0]), batch_size):
        outputs, inner = run(images[start : start + batch_size])
        raw.append(np.asarray(outputs).reshape(-1))
        if layer:
            features.append(np.asarray(inner, dtype=np.float32))
    outputs = np.concatenate(raw).astype(np.float32) if raw else np.zeros(0, np.float32)
    if not layer:
        return outputs, None
    return outputs, np.concatenate(features) if features else np.zeros((0,), np.float32)


class Forward:
    """One model's forward pass with its test-time copies, built once per inner layer."""

    def __init__(self, model: Any, test_time: dict | None = None):
        self.model = model
        self.shifts, self.fill = copies(test_time)
        self._built: dict[str | None, tuple] = {}  # layer -> (eager, compiled)

    def __call__(
        self, images: Any, batch_size: int = INFERENCE_BATCH, layer: str | None = None
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """(raw outputs float32 (n,), the named layer's output float32 (n, ...) or None when
        `layer` is None) for (n, S, S, 1) float32 inputs in [0, 255], a NumPy array or a tensor.

        Each film runs with its copies in one call (`batch_size` films, so `batch_size` x copies
        inputs) and its raw output is their mean; the layer's output is the film's own (the first
        copy, shift [0, 0]). A call with at most `EAGER_AT_MOST` films runs eagerly."""
        eager, compiled = self._build(layer)
        call = eager if int(images.shape[0]) <= EAGER_AT_MOST else compiled

        def run(films):
            result = call(films)
            return (result[0], result[1]) if layer else (result, None)

        return in_batches(run, images, batch_size, layer)

    def _build(self, layer: str | None) -> tuple:
        if layer not in self._built:
            import keras
            import tensorflow as tf

            outputs = [self.model.output] + ([self.model.get_layer(layer).output] if layer else [])
            twin = keras.Model(self.model.inputs, outputs) if layer else self.model
            shifts, fill = self.shifts, self.fill

            def run(x):
                films = tf.shape(x)[0]
                copies = tf.concat([shifted(x, dy, dx, fill) for dy, dx in shifts], axis=0)
                result = twin(copies, training=False)
                raw = result[0] if layer else result
                mean = tf.reduce_mean(tf.reshape(raw, (len(shifts), films)), axis=0)
                return (mean, result[1][:films]) if layer else mean

            self._built[layer] = (run, tf.function(run, reduce_retracing=True))
        return self._built[layer]


def shifted(x: Any, dy: int, dx: int, fill: float = 0.0) -> Any:
    """(n, S, S, c) inputs with their content moved down by dy and right by dx pixels (negative:
    up, left), `fill` coming in (`perturb.translate` for one image; the page's `withCopies` in
    forward.js); the inputs themselves for (0, 0)."""
    if (dy, dx) == (0, 0):
        return x
    import tensorflow as tf

    height, width = x.shape[1], x.shape[2]
    padded = tf.pad(
        x, [[0, 0], [max(dy, 0), max(-dy, 0)], [max(dx, 0), max(-dx, 0)], [0, 0]], constant_values=fill
    )
    return padded[:, max(-dy, 0) : max(-dy, 0) + height, max(-dx, 0) : max(-dx, 0) + width, :]
