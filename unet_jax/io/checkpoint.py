"""Training checkpoints: orbax `CheckpointManager`s in the workdir, resume, best-by-metric, SIGTERM.

Layout of a workdir:
  checkpoints/<step>/model/   nnx.state(model): parameters and BatchNorm statistics (the item a
                              weights folder holds, so `unet_jax.io.weights.load` reads any step)
  checkpoints/<step>/train/   nnx.state of the optimizer (step, optax state) and the log sums
  checkpoints/<step>/meta/    JSON: the step and the digest of each item's arrays
  best/<step>/{model,meta}/   the weights of the best validation score (`eval.metric`), with the
                              evaluation summary, classes and palette in `meta`

Every save is asynchronous and atomic (orbax writes into a temporary folder and renames it on
commit), so a run killed at any moment resumes from `latest_step()`, its last committed step.
Dropout and data order are functions of (seed, step), so restoring the state reproduces the
uninterrupted run exactly.
"""
from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from unet_jax.errors import CheckpointError, DamagedCheckpointError, one_line, warn
from unet_jax.parallel import sync
from unet_jax.io import paths
from unet_jax.step import LOGS, MODEL, OPTIMIZER, TrainState
from unet_jax.io.weights import (BEST_DIR, CHECKPOINTS_DIR, META_ITEM, MODEL_ITEM, check_space,
                                 digest, restore_state, verify, writing)

TRAIN_ITEM = "train"
DAMAGED_DIR, DIVERGED_DIR = "damaged", "diverged"
_ITEMS = (MODEL_ITEM, TRAIN_ITEM, META_ITEM)
_BEST_ITEMS = (MODEL_ITEM, META_ITEM)


def _train_part(state: Any) -> dict[str, Any]:
    return {"optimizer": state[OPTIMIZER], "logs": state[LOGS]}


def _abstract(tree: Any) -> Any:
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


# --------------------------------------------------------------------------- preemption

class PreemptionWatcher:
    """Notices SIGTERM and SIGINT (Ctrl-C): a flag on one process; JAX's preemption sync point
    (SIGTERM) across processes.

    `reached(step)` must be called at every step by every process; it turns True at the same
    step everywhere, after which the trainer saves and exits. A second SIGINT while the first is
    being handled raises `KeyboardInterrupt` as usual (the impatient way out).
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self._flag = threading.Event()
        self._previous: dict[int, Any] = {}
        self._multi = jax.process_count() > 1
        if not self._multi and threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        del frame
        if signum == signal.SIGINT and self._flag.is_set():
            raise KeyboardInterrupt
        self._flag.set()  # the trainer prints one line when it has saved

    def request(self) -> None:
        """Ask for a stop as SIGTERM would (tests, callers)."""
        self._flag.set()

    def reached(self, step: int) -> bool:
        """Whether to save and stop after `step`."""
        if self._multi:
            try:
                return bool(multihost_utils.reached_preemption_sync_point(step))
            except RuntimeError:  # preemption service disabled
                return False
        return self._flag.is_set()

    def close(self) -> None:
        """Put the previous signal handlers back."""
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}


# --------------------------------------------------------------------------- managers

class TrainCheckpoints:
    """The run's checkpoints: periodic ones (resume) and the best by `metric` (weights only)."""

    def __init__(self, workdir: str | Path, *, keep: int = 3, metric: str = "mDice",
                 async_save: bool = True):
        """`keep`: periodic checkpoints to keep (0 = all); `metric`: a summary key."""
        workdir = paths.to_path(workdir)
        self.directory = workdir / CHECKPOINTS_DIR
        self.best_directory = workdir / BEST_DIR
        self.damaged_directory = workdir / DAMAGED_DIR
        self.diverged_directory = workdir / DIVERGED_DIR
        self.metric = metric
        # Each manager its own barrier names: both save step N at the end of a run, and orbax
        # names a save's multi-process barrier after the step folder alone ("N"), so with one
        # name a fast process could pass both saves' barriers on the first and leave a slower
        # one waiting for ever (2 processes hung at the last save about 1 run in 2).
        self.manager = ocp.CheckpointManager(
            self.directory, item_names=_ITEMS, options=ocp.CheckpointManagerOptions(
                max_to_keep=keep or None, enable_async_checkpointing=async_save,
                cleanup_tmp_directories=True,
                multiprocessing_options=ocp.options.MultiprocessingOptions(
                    barrier_sync_key_prefix="unet_jax_checkpoints")))
        self.best = ocp.CheckpointManager(
            self.best_directory, item_names=_BEST_ITEMS, options=ocp.CheckpointManagerOptions(
                max_to_keep=1, best_fn=lambda m: float(m[metric]), best_mode="max",
                keep_checkpoints_without_metrics=False, enable_async_checkpointing=async_save,
                cleanup_tmp_directories=True,
                multiprocessing_options=ocp.options.MultiprocessingOptions(
                    barrier_sync_key_prefix="unet_jax_best")))

    def latest_step(self) -> int | None:
        """The last committed periodic checkpoint (None if there is none)."""
        return self.manager.latest_step()

    def check_history(self) -> None:
        """With no committed checkpoint, refuse a workdir whose earlier checkpoints all turned
        out unusable (set aside in `damaged/`, or step folders orbax cannot read as committed):
        starting over there would overwrite the old run's history."""
        lost = sorted(p.name for p in self.directory.glob("*") if p.name.isdigit())
        damaged = sorted(p.name for p in self.damaged_directory.glob("*"))
        if self.latest_step() is not None or not (lost or damaged):
            return
        where = (f"step folders {', '.join(lost)} in {self.directory} are not committed "
                 "checkpoints" if lost else f"{len(damaged)} damaged checkpoint(s) were set "
                 f"aside in {self.damaged_directory}")
        raise CheckpointError(f"{self.directory.parent}: no usable checkpoint to resume from "
                              f"({where}); start a new --workdir rather than training over "
                              "this run's history")

    def save(self, train: TrainState, step: int) -> bool:
        """Start saving the state of `step` (asynchronously); False if that step exists.

        The digests of the model and training arrays go into `meta`, so that a restore notices
        any damage. The caller checks that the state is finite first.
        """
        if step in self.manager.all_steps():
            return False
        train_part = _train_part(train.state)
        check_space(self.directory, train.state)
        meta = {"step": step, "digest": {MODEL_ITEM: digest(train.state[MODEL]),
                                         TRAIN_ITEM: digest(train_part)}}
        with writing(self.directory):
            return self.manager.save(step, force=True, args=ocp.args.Composite(**{
                MODEL_ITEM: ocp.args.StandardSave(train.state[MODEL]),
                TRAIN_ITEM: ocp.args.StandardSave(train_part),
                META_ITEM: ocp.args.JsonSave(meta),
            }))

    def restore(self, train: TrainState) -> int | None:
        """Restore the newest intact checkpoint into `train.state`; returns its step (None: none).

        A damaged checkpoint (unreadable, or arrays that do not match the recorded digest) is
        reported by name and moved to `<workdir>/damaged/` (kept for inspection, out of the way
        of the new save of that step), and the one before it is tried. If none is intact, one
        `CheckpointError` says so. Best checkpoints newer than the restored step (written by a
        run killed before its next periodic save) are removed, so a resumed run rewrites them
        exactly as the uninterrupted run did.
        """
        steps = sorted(self.manager.all_steps(), reverse=True)
        damaged = []
        for step in steps:
            try:
                self._restore(train, step)
            except DamagedCheckpointError as err:
                damaged.append(one_line(err))
                target = self.set_aside(step, self.damaged_directory)
                warn(f"{one_line(err)}; moved to {target}; resuming from the checkpoint before "
                     "it")
                continue
            for old in self.best.all_steps():
                if old > step:
                    self.best.delete(old)
            return step
        if damaged:
            raise CheckpointError(f"{self.directory}: no intact checkpoint to resume from "
                                  f"({len(damaged)} damaged, moved to {self.damaged_directory}: "
                                  + "; ".join(damaged) + "); start a new --workdir")
        return None

    def _restore(self, train: TrainState, step: int) -> None:
        folder = self.directory / str(step)
        model = restore_state(folder, train.state[MODEL])
        like = _train_part(train.state)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**{
                TRAIN_ITEM: ocp.args.StandardRestore(_abstract(like))}))[TRAIN_ITEM]
        except Exception as err:  # orbax/tensorstore raise many types for a damaged folder
            raise DamagedCheckpointError(f"{folder / TRAIN_ITEM}: cannot be read back "
                                         f"({type(err).__name__}: {one_line(err)})") from err
        verify(folder, TRAIN_ITEM, restored)
        train.state[MODEL] = model
        train.state[OPTIMIZER] = restored["optimizer"]
        train.state[LOGS] = restored["logs"]

    def set_aside(self, step: int, where: Path) -> Path:
        """Move checkpoint `step` out of the manager's way into `where` (kept, not deleted)."""
        target = where / f"{CHECKPOINTS_DIR}_{step}_{int(time.time())}"
        if jax.process_index() == 0:
            target.parent.mkdir(parents=True, exist_ok=True)
            paths.move(self.directory / str(step), target)
        sync("unet_jax:set_aside_checkpoint")
        self.manager.reload()
        return target

    def save_best(self, train: TrainState, step: int, summary: Mapping[str, Any],
                  meta: Mapping[str, Any]) -> None:
        """Offer the weights of `step` as best; orbax keeps only the highest `metric`."""
        value = summary.get(self.metric)
        if value is None:
            logging.warning("validation summary has no %r value; best checkpoint not updated",
                            self.metric)
            return
        if step in self.best.all_steps():
            return
        check_space(self.best_directory, train.state[MODEL])
        with writing(self.best_directory):
            self.best.save(step, force=True, metrics={self.metric: float(value)},
                           args=ocp.args.Composite(**{
                               MODEL_ITEM: ocp.args.StandardSave(train.state[MODEL]),
                               META_ITEM: ocp.args.JsonSave(dict(
                                   meta, step=step, metric=self.metric, summary=dict(summary),
                                   digest={MODEL_ITEM: digest(train.state[MODEL])}))}))

    def best_step(self) -> int | None:
        """Step of the best checkpoint kept so far."""
        return self.best.best_step()

    def wait(self) -> None:
        """Block until every pending save is committed."""
        with writing(self.directory):
            self.manager.wait_until_finished()
            self.best.wait_until_finished()

    def close(self) -> None:
        """Wait for pending saves and release the managers."""
        with writing(self.directory):
            self.manager.close()
            self.best.close()
