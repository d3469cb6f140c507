"""Where training runs: `pneumoscan train --strategy default|mirrored|multi-worker [--precision P]`.

- `default`: one device (TensorFlow's default strategy).
- `mirrored`: `tf.distribute.MirroredStrategy`, every local GPU (the CPU when there is none).
- `multi-worker`: `tf.distribute.MultiWorkerMirroredStrategy` across the machines named in the
  standard `TF_CONFIG` environment variable (cluster and task), so the same command runs under
  Kubernetes, Slurm or a shell loop. The chief is the `chief` task when the cluster names one,
  else worker 0: it alone decides whether the run is new or resumed and alone writes the run
  folder; `Engine.broadcast` hands its decisions and its checkpoint to the others,
  `Engine.gather_json` brings every worker's word (the digest of its data) to all, and
  `Engine.on_chief` runs a step on the chief alone and gives every worker the chief's error.

`--batch-size` is per replica; a step's global batch is that times `Engine.replicas`, and the
learning rate is scaled by the same factor (the linear scaling rule, Goyal et al. 2017), after
the recipe's warm-up as before. With one replica nothing changes.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from pneumoscan import errors
from pneumoscan.config import PRECISIONS, STRATEGIES
from pneumoscan.errors import PneumoscanError, StrategyError


@dataclass
class Engine:
    """A `tf.distribute` strategy and this process's place in it."""

    name: str
    strategy: Any  # tf.distribute.Strategy
    worker: int  # this process's place in the cluster; 0 is the chief
    workers: int
    task: str = "worker 0"  # as TF_CONFIG names it, for messages: "chief 0", "worker 1", ...

    @property
    def replicas(self) -> int:
        return int(self.strategy.num_replicas_in_sync)

    @property
    def is_chief(self) -> bool:
        return self.worker == 0

    def broadcast(self, values: list[np.ndarray]) -> list[np.ndarray]:
        """The chief's `values` on every worker (others pass arrays of the same shapes and dtypes).

        One all-reduce of all the values packed in one float64 vector (exact for float32 and for
        integers below 2**53), to which only the chief's first replica contributes.
        """
        if self.workers == 1:
            return values
        import tensorflow as tf

        arrays = [np.asarray(value) for value in values]
        packed = tf.constant(np.concatenate([a.astype(np.float64).ravel() for a in arrays] or [np.zeros(0)]))
        reduced = self.strategy.run(_first_replica_of_chief_only, args=(packed, self.is_chief))
        flat = np.asarray(self.strategy.experimental_local_results(reduced)[0])
        ends = np.cumsum([a.size for a in arrays])
        return [
            part.reshape(a.shape).astype(a.dtype)
            for part, a in zip(np.split(flat, ends[:-1]) if arrays else [], arrays, strict=True)
        ]

    def broadcast_json(self, value: Any) -> Any:
        """A JSON-able value of the chief's, on every worker."""
        if self.workers == 1:
            return value
        data = np.frombuffer(json.dumps(value).encode(), np.uint8).astype(np.int32) if self.is_chief else None
        (length,) = self.broadcast([np.array([0 if data is None else data.size], np.int32)])
        (payload,) = self.broadcast([data if data is not None else np.zeros(int(length[0]), np.int32)])
        return json.loads(payload.astype(np.uint8).tobytes().decode())

    def gather_json(self, value: Any) -> list[Any]:
        """Every worker's JSON-able `value`, in worker order, on every worker."""
        if self.workers == 1:
            return [value]
        data = np.frombuffer(json.dumps(value).encode(), np.uint8).astype(np.float64)
        lengths = self._gather(np.array([data.size], np.float64))[:, 0].astype(int)
        padded = np.zeros(int(lengths.max()), np.float64)
        padded[: data.size] = data
        rows = self._gather(padded)
        return [
            json.loads(row[:n].astype(np.uint8).tobytes().decode())
            for row, n in zip(rows, lengths, strict=True)
        ]

    def _gather(self, vector: np.ndarray) -> np.ndarray:
        """(workers, n): row i is worker i's `vector` (float64 of the same length everywhere).
        One all-reduce (sum) to which each worker's first replica adds its row."""
        import tensorflow as tf

        table = np.zeros((self.workers, vector.size), np.float64)
        table[self.worker] = vector
        local = self.replicas // self.workers
        reduced = self.strategy.run(_first_local_replica_only, args=(tf.constant(table), self.worker * local))
        return np.asarray(self.strategy.experimental_local_results(reduced)[0])

    def on_chief(self, step: Callable[[], Any]) -> Any:
        """Run `step` on the chief alone and give its result to every worker; when it raises an
        error a person can act on (`errors.PneumoscanError`), every worker raises the same error
        with the chief's own sentence (not a lost worker: the chief did not stop by accident)."""
        outcome = None
        if self.is_chief:
            try:
                outcome = {"value": step()}
            except PneumoscanError as error:
                if self.workers == 1:
                    raise
                outcome = {"error": type(error).__name__, "message": str(error)}
        outcome = self.broadcast_json(outcome)
        if "error" in outcome:
            kind = getattr(errors, outcome["error"], None)
            raise (kind if isinstance(kind, type) else errors.PneumoscanError)(outcome["message"])
        return outcome["value"]


def _first_replica_of_chief_only(packed, is_chief: bool):
    """All-reduce (sum) in which only the chief's first replica contributes `packed`."""
    import tensorflow as tf

    context = tf.distribute.get_replica_context()
    first = tf.logical_and(tf.equal(context.replica_id_in_sync_group, 0), is_chief)
    return context.all_reduce(tf.distribute.ReduceOp.SUM, tf.where(first, packed, tf.zeros_like(packed)))


def _first_local_replica_only(table, first_replica: int):
    """All-reduce (sum) in which only replica `first_replica` (this worker's first) contributes."""
    import tensorflow as tf

    context = tf.distribute.get_replica_context()
    first = tf.equal(context.replica_id_in_sync_group, first_replica)
    return context.all_reduce(tf.distribute.ReduceOp.SUM, tf.where(first, table, tf.zeros_like(table)))


def make_engine(name: str, precision: str = "float32") -> Engine:
    """The strategy `name` (`STRATEGIES`) for this process, with the dtype policy `precision`.

    Raises:
        StrategyError: unknown name or precision, `multi-worker` without a usable TF_CONFIG,
            or `mixed_float16` on a machine without a GPU.
    """
    if name not in STRATEGIES:
        raise StrategyError(f"unknown strategy {name!r}; choose one of {', '.join(STRATEGIES)}.")
    if precision not in PRECISIONS:
        raise StrategyError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}.")
    worker, workers, task = (0, 1, "worker 0") if name != "multi-worker" else _task_from_tf_config()
    import tensorflow as tf

    if precision == "mixed_float16":
        if not tf.config.list_physical_devices("GPU"):
            raise StrategyError(
                "--precision mixed_float16 needs a GPU (float16 is slower than float32 on a CPU); "
                "this machine has none."
            )
        import keras

        keras.mixed_precision.set_global_policy("mixed_float16")
    if name == "default":
        return Engine(name, tf.distribute.get_strategy(), worker, workers, task)
    if name == "mirrored":
        return Engine(name, tf.distribute.MirroredStrategy(), worker, workers, task)
    return Engine(name, tf.distribute.MultiWorkerMirroredStrategy(), worker, workers, task)


def local_tf_configs(workers: int, chief: bool = False) -> list[str]:
    """One `TF_CONFIG` per process for a cluster of `workers` processes on 127.0.0.1, each on a
    port free when asked (for tests and benchmarks on one host); with `chief`, the first is a
    separate `chief` task and the others are workers 0, 1, ..."""
    sockets = [socket.socket() for _ in range(workers)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    addresses = [f"127.0.0.1:{s.getsockname()[1]}" for s in sockets]
    for s in sockets:
        s.close()
    if not chief:
        tasks = [{"type": "worker", "index": i} for i in range(workers)]
        return [json.dumps({"cluster": {"worker": addresses}, "task": task}) for task in tasks]
    cluster = {"chief": addresses[:1], "worker": addresses[1:]}
    tasks = [{"type": "chief", "index": 0}] + [{"type": "worker", "index": i} for i in range(workers - 1)]
    return [json.dumps({"cluster": cluster, "task": task}) for task in tasks]


def _task_from_tf_config() -> tuple[int, int, str]:
    """(this process's place in the cluster, number of processes, its task) from TF_CONFIG: the
    chief task first when there is one (TensorFlow's own order), then the workers by index."""
    text = os.environ.get("TF_CONFIG")
    example = '{"cluster": {"worker": ["host0:port", "host1:port"]}, "task": {"type": "worker", "index": 0}}'
    if not text:
        raise StrategyError(
            f"--strategy multi-worker needs the TF_CONFIG environment variable, e.g. {example}"
        )
    try:
        config = json.loads(text)
        cluster, task = config["cluster"], config["task"]
        chiefs, workers = list(cluster.get("chief", [])), list(cluster.get("worker", []))
        kind, index = task["type"], int(task["index"])
    except (ValueError, KeyError, TypeError, AttributeError):
        raise StrategyError(f"TF_CONFIG is not understood; expected the form {example}") from None
    if len(chiefs) > 1:
        raise StrategyError(f"TF_CONFIG's cluster may name one chief; it names {len(chiefs)}.")
    if kind == "chief" and chiefs and index == 0:
        return 0, 1 + len(workers), "chief 0"
    if kind != "worker" or not 0 <= index < len(workers):
        allowed = "a chief with index 0 or a worker" if chiefs else "a worker"
        raise StrategyError(
            f"TF_CONFIG's task must be {allowed} with 0 <= index < {len(workers)}; got {task}"
        )
    return len(chiefs) + index, len(chiefs) + len(workers), f"worker {index}"
