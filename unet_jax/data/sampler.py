"""Training batches as a pure function of (seed, step), built by grain worker processes.

The training split is a `RecordSource` (`unet_jax.data.records`: random access by index, images
decoded once per process while a byte budget allows). Global sample `i = step *
global_batch_size + j` is a pure function of `(seed, i)`: its image is `permutation(seed, epoch
= i // N)[i % N]` and all its augmentation randomness comes from
`numpy.random.default_rng([seed, 1, i])` (this per-epoch permutation replaces mmseg's
RepeatDataset + shuffled sampler). So a run resumed at `start_step` sees exactly the batches of an
uninterrupted run, each host builds only its own rows `[process_index * B_local, (process_index +
1) * B_local)` of every global batch, and the number of worker processes changes nothing but the
speed.

`train_batches` is a grain pipeline: `MapDataset.range(start_step, ...)` mapped step -> batch,
and `mp_prefetch` with `workers` processes. grain gives worker `w` the steps `w, w + workers,
...` and interleaves their outputs in step order, so the order does not depend on the worker
count. The augmentation is numpy/cv2 code that holds the GIL, so threads cannot scale it;
processes do. Workers ignore SIGINT and SIGTERM (Ctrl-C or a scheduler signals the whole
process group; the trainer decides), and a worker that dies is noticed by grain within a second: `train_batches` then
starts new workers at the first step not yet delivered, so the batches stay the same. This
module imports neither TensorFlow nor JAX.
"""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from multiprocessing import resource_tracker
from types import SimpleNamespace
from typing import Any, Protocol

import cv2
import grain
from absl import flags
import numpy as np

from unet_jax.data import augment as A
from unet_jax.data import elastic as E
from unet_jax.errors import UserError

_PERM_STREAM, _AUG_STREAM = 0, 1
AUG_FIELDS = ("img_scale", "crop_size", "ratio_range", "cat_max_ratio", "flip_prob",
              "photometric", "mean", "std")
# Optional sections of `config.data` (the original U-Net's recipe): None when absent.
OPTIONAL_SECTIONS = ("elastic", "weight_map")


class PairSource(Protocol):
    """What the sampler reads: `len` and `train_pair(k) -> (BGR image, label)` (a RecordSource)."""

    def __len__(self) -> int: ...

    def train_pair(self, k: int) -> tuple[np.ndarray, np.ndarray]: ...


def aug_config(data_cfg: Any) -> SimpleNamespace:
    """The fields of `config.data` the augmentation reads, as a plain picklable object."""
    get = (lambda k: data_cfg[k]) if isinstance(data_cfg, dict) else (
        lambda k: getattr(data_cfg, k))
    has = (lambda k: k in data_cfg) if isinstance(data_cfg, dict) else (
        lambda k: hasattr(data_cfg, k) and getattr(data_cfg, k) is not None)
    optional = {k: _section(get(k)) if has(k) else None for k in OPTIONAL_SECTIONS}
    return SimpleNamespace(**{k: _plain(get(k)) for k in AUG_FIELDS}, **optional)


def _section(value: Any) -> SimpleNamespace:
    """A config section (ConfigDict, dict, or an `aug_config` result) as a plain namespace."""
    items = vars(value) if isinstance(value, SimpleNamespace) else dict(value)
    return SimpleNamespace(**{k: _plain(v) for k, v in items.items()})


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v) for v in value)
    return value


class TrainSampler:
    """Global sample index -> augmented (image, label), a pure function of (seed, index)."""

    def __init__(self, records: PairSource, data_cfg: Any, seed: int,
                 stream: tuple[int, ...] = (), sample_weights: Sequence[float] | None = None):
        if seed < 0:
            raise ValueError(f"seed: expected a non-negative int, found {seed}")
        if not records:
            raise ValueError("training split: expected at least one example, found none")
        self.records, self.data_cfg, self.seed = records, aug_config(data_cfg), int(seed)
        self.stream = tuple(int(v) for v in stream)  # extra permutation key (a host's shard)
        # each record's loss weight (`data.sample_weights`), or None: no per-sample weight
        self.sample_weights = (None if sample_weights is None
                               else np.asarray(sample_weights, np.float32))
        self._perms: dict[int, np.ndarray] = {}
        self._weights: dict[int, np.ndarray] = {}  # record -> weight map (a function of it)
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
        """Which record global sample `i` uses."""
        n = len(self.records)
        return int(self._permutation(i // n)[i % n])

    def params(self, i: int) -> A.AugParams:
        """All augmentation randomness of global sample `i`."""
        return A.sample_params(np.random.default_rng([self.seed, _AUG_STREAM, int(i)]))

    def pair(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """The decoded (BGR image, label) that global sample `i` augments."""
        return self.records.train_pair(self.image_index(int(i)))

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

    def weight_map(self, k: int) -> np.ndarray:
        """The weight map of record `k`'s label (`elastic.weight_map`), computed once."""
        with self._lock:
            cached = self._weights.get(k)
        if cached is None:
            w = self.data_cfg.weight_map
            cached = E.weight_map(self.records.train_pair(k)[1], int(w.cell_class),
                                  float(w.w0), float(w.sigma))
            with self._lock:
                self._weights[k] = cached
        return cached

    def batch_dict(self, indices: np.ndarray, image_indices: np.ndarray | None = None,
                   ) -> dict[str, np.ndarray]:
        """`batch` as the training step takes it: {"image", "label"[, "weight"][,
        "sample_weight"]}. With `data.elastic` the original U-Net's augmentation
        (`unet_jax.data.elastic`) replaces mmseg's, drawn from the same per-sample stream; with
        `data.weight_map` each sample carries its warped weight map; with sample weights each
        sample its record's loss weight (B,)."""
        batch = self._augmented(indices, image_indices)
        if self.sample_weights is not None:
            picks = indices if image_indices is None else image_indices
            batch["sample_weight"] = self.sample_weights[[self.image_index(int(i))
                                                          for i in picks]]
        return batch

    def _augmented(self, indices: np.ndarray, image_indices: np.ndarray | None
                   ) -> dict[str, np.ndarray]:
        cfg = self.data_cfg
        if cfg.elastic is None:
            image, label = self.batch(indices, image_indices)
            return {"image": image, "label": label}
        picks = indices if image_indices is None else image_indices
        records = [self.image_index(int(i)) for i in picks]
        pairs = [self.records.train_pair(k) for k in records]
        weights = [self.weight_map(k) if cfg.weight_map is not None else None for k in records]
        params = [E.sample_params(np.random.default_rng([self.seed, _AUG_STREAM, int(i)]),
                                  pair[1].shape, cfg.elastic)
                  for i, pair in zip(indices, pairs)]
        return E.train_batch([p[0] for p in pairs], [p[1] for p in pairs], weights, params, cfg)


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
    sample_weights: tuple[float, ...] | None = None  # per record of the source (a host's shard)

    def make(self, sampler: TrainSampler, step: int) -> dict[str, np.ndarray]:
        """This host's rows of global batch `step`."""
        rows = step_indices(step, self.global_batch_size, self.process_index, self.process_count)
        local = self.global_batch_size // self.process_count
        own = step_indices(step, local) if self.host_shard else None
        return sampler.batch_dict(rows, own)

    def sampler(self, records: PairSource) -> TrainSampler:
        stream = (self.process_count, self.process_index) if self.host_shard else ()
        return TrainSampler(records, self.data_cfg, self.seed, stream, self.sample_weights)


# ------------------------------------------------------------------------------ grain
class WorkerError(UserError):
    """Augmentation workers kept dying; the run stops (its last checkpoint resumes it)."""


class _StepToBatch:
    """grain's map step -> this host's batch; pickled to the workers as (plan, source), the
    sampler (with its permutation cache and lock) is rebuilt in each process."""

    def __init__(self, plan: BatchPlan, source: PairSource):
        self.plan, self.source = plan, source
        self._sampler: TrainSampler | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"plan": self.plan, "source": self.source}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.plan, self.source, self._sampler = state["plan"], state["source"], None

    def __call__(self, step: int) -> dict[str, np.ndarray]:
        if self._sampler is None:
            self._sampler = self.plan.sampler(self.source)
        return self.plan.make(self._sampler, int(step))


def _worker_init(worker_index: int, worker_count: int) -> None:  # pylint: disable=unused-argument
    """One process per core without nested thread pools; SIGINT and SIGTERM are the trainer's to
    handle (Ctrl-C, or a scheduler, signals the whole process group): the worker ignores them,
    grain stops it when the trainer closes the batches, and it exits with its parent."""
    cv2.setNumThreads(1)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=_exit_with, args=(parent,), daemon=True).start()


def _exit_with(parent: Any) -> None:
    """Wait for the parent's end (its sentinel) and exit: grain's workers would otherwise live on
    after a SIGKILLed trainer, holding its stdout (a caller waiting on that pipe hangs)."""
    parent.join()
    os._exit(0)  # pylint: disable=protected-access


_LAST_STEP = 1 << 62  # "for ever": grain's MapDataset.range needs an end; nothing is allocated


def _batches(plan: BatchPlan, source: PairSource, start_step: int, workers: int,
             prefetch: int) -> Any:
    """A grain iterator over this host's batches from `start_step` (workers > 0: processes)."""
    if not flags.FLAGS.is_parsed():
        # grain reads its absl flags (at their defaults here) when it starts workers; a caller
        # outside an absl app (a test, a notebook) has not parsed any.
        flags.FLAGS.mark_as_parsed()
    ds = grain.MapDataset.range(start_step, _LAST_STEP).map(_StepToBatch(plan, source))
    # One batch per element: in-process, one thread, a small read-ahead (grain's default of 16
    # threads would only contend for the GIL).
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2))
    if workers > 0:
        _quiet_resource_tracker()
        options = grain.MultiprocessingOptions(num_workers=workers,
                                               per_worker_buffer_size=max(prefetch, 1))
        it_ds = it_ds.mp_prefetch(options, worker_init_fn=_worker_init)
    return iter(it_ds)


def _quiet_resource_tracker() -> None:
    """Start the resource tracker with its "leaked shared_memory objects" warning off.

    grain hands each batch over as a shared-memory block (a small message on its queue, so a
    worker killed while it writes cannot leave a half message that blocks the reader for ever,
    as a pickled batch can). When the workers stop, a block made but not yet handed over is left
    to the resource tracker, which removes it at exit and warns (about one run in four here).
    The tracker process takes its warning filters from `sys.warnoptions` when it starts."""
    option = "ignore::UserWarning:multiprocessing.resource_tracker"
    if option not in sys.warnoptions:
        sys.warnoptions.append(option)
    resource_tracker.ensure_running()


def _worker_died(err: BaseException) -> bool:
    # grain reports a worker killed from outside (OOM killer, SIGKILL) as this RuntimeError
    # (process_prefetch.py, grain 0.2.x), within its 1 s queue timeout.
    return isinstance(err, RuntimeError) and "terminated unexpectedly" in str(err)


class _Watchdog:
    """SIGKILLs the workers when the consumer has waited `stall_s` for one batch: a hung worker
    (deadlocked, stopped) then reads as a dead one, which grain reports and we replace. The
    workers are the child processes started since `__init__` (grain keeps their handles
    private); the first batch of a start may take `first_s` (the workers import and decode)."""

    def __init__(self, stall_s: float, first_s: float):
        self.stall_s, self.first_s, self.fired = stall_s, first_s, False
        self.before = {p.pid for p in multiprocessing.active_children()}
        self.delivered = False

    def next(self, iterator: Any) -> dict[str, np.ndarray]:
        """The next batch; the workers are killed if it takes too long."""
        batch = self._guarded(next, iterator, self.stall_s if self.delivered else self.first_s)
        self.delivered = True
        return batch

    def close(self, iterator: Any) -> None:
        """Close the grain iterator; a worker that makes nothing would block that for ever
        (grain's reader threads wait on it), so it is killed after `stall_s`."""
        self._guarded(lambda it: it.close(), iterator, self.stall_s)

    def _guarded(self, fn: Any, iterator: Any, seconds: float) -> Any:
        timer = threading.Timer(seconds, self._kill)
        timer.daemon = True
        timer.start()
        try:
            return fn(iterator)
        finally:
            timer.cancel()

    def _kill(self) -> None:
        self.fired = True
        for child in multiprocessing.active_children():
            if child.pid not in self.before:
                with contextlib.suppress(OSError):
                    os.kill(child.pid, signal.SIGKILL)


def train_batches(source: PairSource, data_cfg: Any, *, global_batch_size: int,
                  seed: int, start_step: int = 0, process_index: int = 0,
                  process_count: int = 1, host_shard: bool = False, workers: int = 0,
                  prefetch: int = 2, max_restarts: int = 3, stall_s: float = 30.0,
                  sample_weights: Sequence[float] | None = None,
                  ) -> Iterator[dict[str, np.ndarray]]:
    """Infinite training batches of this host, in step order from `start_step`:
    dict(image float32 (B_local, h, w, 3) normalised RGB, label int32 (B_local, h, w)[, weight
    float32 (B_local, h, w) with `data.weight_map`]).

    (h, w) = data_cfg.crop_size; B_local = global_batch_size // process_count. With
    `host_shard`, `source` is this host's shard of the split: images are drawn from it alone,
    by a per-host permutation of the host's own sample counter, so batches depend on
    (seed, step, process_count). `workers` grain processes build the batches (0: this
    process), `prefetch` per worker ahead of the consumer. `sample_weights` (one per record of
    `source`) adds each sample's loss weight as "sample_weight" (B_local,). A worker that dies, or that leaves
    the consumer waiting `stall_s` seconds for a batch (the first one of a start: at least
    120 s, the workers import and decode), is replaced:
    new workers from the next undelivered step, so the same batches, with a warning line; after
    `max_restarts` replacements, `WorkerError`. Close the generator (or let it be collected)
    to stop the workers.
    """
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ValueError(f"global_batch_size: expected a positive multiple of process_count="
                         f"{process_count}, found {global_batch_size}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index: expected 0..{process_count - 1}, found {process_index}")
    if start_step < 0:
        raise ValueError(f"start_step: expected >= 0, found {start_step}")
    if not len(source):
        raise ValueError("training split: expected at least one example, found none")
    if sample_weights is not None and len(sample_weights) != len(source):
        raise ValueError(f"sample_weights: expected one per record ({len(source)}), found "
                         f"{len(sample_weights)}")
    plan = BatchPlan(aug_config(data_cfg), int(seed), int(global_batch_size),
                     int(process_index), int(process_count), bool(host_shard),
                     None if sample_weights is None else tuple(map(float, sample_weights)))
    step, restarts = start_step, 0
    while True:
        watchdog = _Watchdog(stall_s, max(4 * stall_s, 120.0))
        iterator = _batches(plan, source, step, workers, prefetch)
        try:
            while True:
                batch = watchdog.next(iterator) if workers > 0 else next(iterator)
                yield batch
                step += 1
        except RuntimeError as err:
            if not _worker_died(err):
                raise
            what = (f"an augmentation worker made no batch in {stall_s:g} s and was killed"
                    if watchdog.fired else
                    f"an augmentation worker died ({' '.join(str(err).split()[:12])})")
            if restarts >= max_restarts:
                raise WorkerError(f"{what}, after {restarts} replacement(s); stopped before "
                                  f"step {step}; the run resumes from its last checkpoint"
                                  ) from err
            restarts += 1
            print(f"warning: {what}; new workers continue from step {step} with the same "
                  "batches", file=sys.stderr, flush=True)
        finally:
            watchdog.close(iterator)
