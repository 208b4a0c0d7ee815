"""Training batches as a pure function of (seed, step), built by worker processes.

The training split is cached in host memory once (`Record`s: BGR images and labels, decoded
arrays or encoded PNG bytes), sorted by `name`. Global sample `i = step * global_batch_size + j`
is a pure function of `(seed, i)`: its image is `permutation(seed, epoch = i // N)[i % N]` and all
its augmentation randomness comes from `numpy.random.default_rng([seed, 1, i])` (this per-epoch
permutation replaces mmseg's RepeatDataset + shuffled sampler). So a run resumed at `start_step`
sees exactly the batches of an uninterrupted run, each host builds only its own rows
`[process_index * B_local, (process_index + 1) * B_local)` of every global batch, and the number
of worker processes changes nothing but the speed.

`train_batches` runs the augmentation in `workers` processes (the standard library's
multiprocessing, "spawn"): each builds whole batches, the records sit once in shared memory,
and batches come back in step order with a bounded prefetch. The augmentation is numpy/cv2 code
that holds the GIL, so threads cannot scale it; processes do. This module imports neither
TensorFlow nor JAX (it runs where they are absent, e.g. experiments/gpu_report.py).
"""
from __future__ import annotations

import collections
import multiprocessing
import os
import pickle
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from multiprocessing import shared_memory
from types import SimpleNamespace
from typing import Any

import cv2
import numpy as np

from unet_jax.data import augment as A

_PERM_STREAM, _AUG_STREAM = 0, 1
AUG_FIELDS = ("img_scale", "crop_size", "ratio_range", "cat_max_ratio", "flip_prob",
              "photometric", "mean", "std")


@dataclass(frozen=True)
class Record:
    """One cached training pair: BGR uint8 image (or encoded bytes) and label (or bytes)."""
    image: np.ndarray | bytes
    label: np.ndarray | bytes
    name: str


def decode_image_bgr(value: np.ndarray | bytes) -> np.ndarray:
    """A cached image as BGR uint8 (H, W, 3), decoding encoded bytes as cv2 (mmcv) does."""
    if isinstance(value, (bytes, memoryview)):
        img = cv2.imdecode(np.frombuffer(value, np.uint8), cv2.IMREAD_COLOR)
        if img is None:
            raise ValueError(f"could not decode an encoded image of {len(value)} bytes")
        return img
    return value


def decode_label(value: np.ndarray | bytes) -> np.ndarray:
    """A cached label as uint8 (H, W)."""
    if isinstance(value, (bytes, memoryview)):
        lab = cv2.imdecode(np.frombuffer(value, np.uint8), cv2.IMREAD_UNCHANGED)
        if lab is None:
            raise ValueError(f"could not decode an encoded label of {len(value)} bytes")
        value = lab
    if value.ndim == 3 and value.shape[2] == 1:
        value = value[:, :, 0]
    if value.ndim != 2 or value.dtype != np.uint8:
        raise ValueError(f"label: expected uint8 HxW, found {value.dtype} {value.shape}")
    return value


def aug_config(data_cfg: Any) -> SimpleNamespace:
    """The fields of `config.data` the augmentation reads, as a plain picklable object."""
    get = (lambda k: data_cfg[k]) if isinstance(data_cfg, dict) else (
        lambda k: getattr(data_cfg, k))
    return SimpleNamespace(**{k: _plain(get(k)) for k in AUG_FIELDS})


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    return value


class TrainSampler:
    """Global sample index -> augmented (image, label), a pure function of (seed, index)."""

    def __init__(self, records: Sequence[Record], data_cfg: Any, seed: int,
                 stream: tuple[int, ...] = ()):
        if seed < 0:
            raise ValueError(f"seed: expected a non-negative int, found {seed}")
        if not records:
            raise ValueError("training split: expected at least one example, found none")
        self.records, self.data_cfg, self.seed = records, aug_config(data_cfg), int(seed)
        self.stream = tuple(int(v) for v in stream)  # extra permutation key (a host's shard)
        self._perms: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def _permutation(self, epoch: int) -> np.ndarray:
        with self._lock:
            perm = self._perms.get(epoch)
            if perm is None:
                rng = np.random.default_rng([self.seed, _PERM_STREAM, *self.stream, epoch])
                perm = rng.permutation(len(self.records))
                if len(self._perms) >= 8:
                    del self._perms[min(self._perms)]
                self._perms[epoch] = perm
            return perm

    def image_index(self, i: int) -> int:
        """Which cached image global sample `i` uses."""
        n = len(self.records)
        return int(self._permutation(i // n)[i % n])

    def params(self, i: int) -> A.AugParams:
        """All augmentation randomness of global sample `i`."""
        return A.sample_params(np.random.default_rng([self.seed, _AUG_STREAM, int(i)]))

    def pair(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """The decoded (BGR image, label) that global sample `i` augments."""
        rec = self.records[self.image_index(int(i))]
        return decode_image_bgr(rec.image), decode_label(rec.label)

    def batch(self, indices: np.ndarray, image_indices: np.ndarray | None = None,
              ) -> tuple[np.ndarray, np.ndarray]:
        """Samples `indices`: float32 (B, h, w, 3) normalised RGB and int32 (B, h, w) labels.

        Augmentation randomness comes from `indices`; the images from `image_indices` (default
        the same), which lets a host draw images from its own shard only.
        """
        picks = indices if image_indices is None else image_indices
        pairs = [self.pair(i) for i in picks]
        return A.train_batch([p[0] for p in pairs], [p[1] for p in pairs],
                             [self.params(i) for i in indices], self.data_cfg)


def step_indices(step: int, global_batch_size: int, process_index: int = 0,
                 process_count: int = 1) -> np.ndarray:
    """Global sample indices of this host's rows of global batch `step`."""
    local = global_batch_size // process_count
    start = step * global_batch_size + process_index * local
    return np.arange(start, start + local, dtype=np.int64)


@dataclass(frozen=True)
class BatchPlan:
    """What defines this host's batches (everything a worker needs besides the records)."""
    data_cfg: SimpleNamespace
    seed: int
    global_batch_size: int
    process_index: int
    process_count: int
    host_shard: bool

    def make(self, sampler: TrainSampler, step: int) -> dict[str, np.ndarray]:
        """This host's rows of global batch `step`."""
        rows = step_indices(step, self.global_batch_size, self.process_index, self.process_count)
        local = self.global_batch_size // self.process_count
        own = step_indices(step, local) if self.host_shard else None
        image, label = sampler.batch(rows, own)
        return {"image": image, "label": label}

    def sampler(self, records: Sequence[Record]) -> TrainSampler:
        stream = (self.process_count, self.process_index) if self.host_shard else ()
        return TrainSampler(records, self.data_cfg, self.seed, stream)


# ------------------------------------------------------------------------------ shared memory
def _pack(records: Sequence[Record]) -> tuple[shared_memory.SharedMemory, list[tuple]]:
    """All records' bytes in one shared-memory block, and an index to find them again."""
    parts, index, offset = [], [], 0
    for rec in records:
        entry = [rec.name]
        for value in (rec.image, rec.label):
            raw = value if isinstance(value, bytes) else np.ascontiguousarray(value).tobytes()
            kind = ("bytes", None, None) if isinstance(value, bytes) else (
                "array", value.shape, value.dtype.str)
            entry.append((offset, len(raw), *kind))
            parts.append(raw)
            offset += len(raw)
        index.append(tuple(entry))
    block = shared_memory.SharedMemory(create=True, size=max(offset, 1))
    position = 0
    for raw in parts:
        block.buf[position:position + len(raw)] = raw
        position += len(raw)
    return block, index


def _unpack(block: shared_memory.SharedMemory, index: list[tuple]) -> list[Record]:
    """Zero-copy `Record`s over the shared block (read only)."""
    def view(offset, size, kind, shape, dtype):
        raw = block.buf[offset:offset + size]
        if kind == "bytes":
            return bytes(raw)  # encoded images are decoded per sample anyway
        arr = np.frombuffer(raw, dtype=np.dtype(dtype)).reshape(shape)
        arr.flags.writeable = False
        return arr
    return [Record(view(*img), view(*lab), name) for name, img, lab in index]


_WORKER: dict[str, Any] = {}


def _worker_init(block_name: str, index_pickle: bytes, plan: BatchPlan) -> None:
    cv2.setNumThreads(1)  # one process per core: no nested thread pools
    block = shared_memory.SharedMemory(name=block_name)
    _WORKER.update(block=block, plan=plan,
                   sampler=plan.sampler(_unpack(block, pickle.loads(index_pickle))))


def _worker_batch(step: int) -> dict[str, np.ndarray]:
    return _WORKER["plan"].make(_WORKER["sampler"], step)


def _spawn_pool(workers: int, initargs: tuple) -> Any:
    """A spawned pool whose processes import the data package without TensorFlow."""
    previous = os.environ.get("UNET_JAX_LIGHT_DATA")
    os.environ["UNET_JAX_LIGHT_DATA"] = "1"
    try:
        return multiprocessing.get_context("spawn").Pool(workers, initializer=_worker_init,
                                                         initargs=initargs)
    finally:
        if previous is None:
            del os.environ["UNET_JAX_LIGHT_DATA"]
        else:
            os.environ["UNET_JAX_LIGHT_DATA"] = previous


def train_batches(records: Sequence[Record], data_cfg: Any, *, global_batch_size: int,
                  seed: int, start_step: int = 0, process_index: int = 0,
                  process_count: int = 1, host_shard: bool = False, workers: int = 0,
                  prefetch: int = 2) -> Iterator[dict[str, np.ndarray]]:
    """Infinite training batches of this host, in step order from `start_step`:
    dict(image float32 (B_local, h, w, 3) normalised RGB, label int32 (B_local, h, w)).

    (h, w) = data_cfg.crop_size; B_local = global_batch_size // process_count. With
    `host_shard`, `records` are this host's shard of the split: images are drawn from it alone,
    by a per-host permutation of the host's own sample counter, so batches depend on
    (seed, step, process_count). `workers` processes build the batches (0: this process), at
    most `prefetch` per worker ahead of the consumer. Close the generator (or let it be
    collected) to stop the workers.
    """
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ValueError(f"global_batch_size: expected a positive multiple of process_count="
                         f"{process_count}, found {global_batch_size}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index: expected 0..{process_count - 1}, found {process_index}")
    if start_step < 0:
        raise ValueError(f"start_step: expected >= 0, found {start_step}")
    if not records:
        raise ValueError("training split: expected at least one example, found none")
    plan = BatchPlan(aug_config(data_cfg), int(seed), int(global_batch_size),
                     int(process_index), int(process_count), bool(host_shard))
    if workers <= 0:
        sampler = plan.sampler(records)
        step = start_step
        while True:
            yield plan.make(sampler, step)
            step += 1
    block, index = _pack(records)
    pool = _spawn_pool(workers, (block.name, pickle.dumps(index), plan))
    pending: collections.deque = collections.deque()
    try:
        step = start_step
        while True:
            while len(pending) < workers * max(prefetch, 1):
                pending.append(pool.apply_async(_worker_batch, (step,)))
                step += 1
            yield pending.popleft().get()
    finally:
        _stop(pool, pending)
        block.close()
        block.unlink()


def _stop(pool: Any, pending: collections.deque, wait_s: float = 60.0) -> None:
    """Let the prefetched batches finish, then stop the workers with their end-of-work sentinel.

    `Pool.terminate` alone can deadlock: a worker killed while it writes a result keeps the
    result queue's lock, and the pool's task thread then waits on that lock forever (seen here
    in about one close in twenty). Only workers that do not finish in `wait_s` are terminated.
    """
    deadline = time.monotonic() + wait_s
    for result in pending:
        result.wait(max(0.0, deadline - time.monotonic()))
    if all(result.ready() for result in pending):
        pool.close()
    else:
        pool.terminate()
    pool.join()
