"""Training checkpoints: orbax `CheckpointManager`s in the workdir, resume, best-by-metric, SIGTERM.

Layout of a workdir:
  checkpoints/<step>/variables/  {params, batch_stats} (the layout of a weights checkpoint's
                                 `variables/`, so `checkpoint_io.restore_weights` reads it)
  checkpoints/<step>/opt_state/  the optax state as a nested dict
  checkpoints/<step>/loop/       JSON: the host-side loop state (log window sums, ...)
  best/<step>/variables/         the weights of the best validation score (`eval.metric`)
  best/<step>/meta/              JSON: step, metric, the evaluation summary, classes, palette

Every save is asynchronous and atomic (orbax writes into a temporary folder and renames it on
commit), so a run killed at any moment resumes from `latest_step()`, its last committed step.
Dropout and data order are functions of (seed, step), so restoring (step, params, batch
statistics, optimiser state, loop state) reproduces the uninterrupted run exactly.
"""
from __future__ import annotations

import json
import logging
import signal
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx
from jax.experimental import multihost_utils

from unet_jax import checkpoint_io
from unet_jax.errors import CheckpointError
from unet_jax.parallel import put_replicated, to_host
from unet_jax.step import TrainState

CHECKPOINTS_DIR = "checkpoints"
BEST_DIR = "best"
_ITEMS = ("variables", "opt_state", "loop")
_BEST_ITEMS = ("variables", "meta")


# --------------------------------------------------------------------------- pytree <-> dicts

def _key_name(key: Any) -> Any:
    if isinstance(key, jax.tree_util.DictKey):
        return key.key
    if isinstance(key, jax.tree_util.SequenceKey):
        return key.idx
    if isinstance(key, jax.tree_util.GetAttrKey):
        return key.name
    if isinstance(key, jax.tree_util.FlattenedIndexKey):
        return key.key
    raise TypeError(f"unsupported pytree key {key!r}")


def _names(path: tuple) -> tuple:
    names = tuple(_key_name(k) for k in path)
    # nnx Variables flatten to `.value`: drop it, as `nnx.State.to_pure_dict` does.
    if len(names) > 1 and names[-1] == "value" and isinstance(path[-1], jax.tree_util.GetAttrKey):
        names = names[:-1]
    return names


def to_nested(tree: Any) -> dict[Any, Any]:
    """Any pytree -> nested dicts of its leaves keyed by path (namedtuple fields by name)."""
    out: dict[Any, Any] = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        names = _names(path)
        if not names:
            raise ValueError("to_nested: expected a container pytree, found a single leaf")
        node = out
        for name in names[:-1]:
            node = node.setdefault(name, {})
        node[names[-1]] = leaf
    return out


def from_nested(nested: Mapping[Any, Any], like: Any, source: str) -> Any:
    """Inverse of `to_nested`: the leaves of `nested` in the structure of `like`."""
    def lookup(names: tuple) -> Any:
        node: Any = nested
        for name in names:
            if isinstance(node, Mapping) and name in node:
                node = node[name]
            elif isinstance(node, Mapping) and str(name) in node:
                node = node[str(name)]
            else:
                raise KeyError(f"{source}: no entry {'/'.join(map(str, names))} "
                               "(the checkpoint was written for another model or optimiser)")
        return node

    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(like)
    leaves = [lookup(_names(path)) for path, _ in leaves_with_path]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _abstract(tree: Any) -> Any:
    def one(x: Any) -> Any:
        sharding = x.sharding if isinstance(x, jax.Array) else None
        return jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=sharding)
    return jax.tree.map(one, tree)


def state_variables(state: TrainState) -> dict[str, Any]:
    """`{'params': ..., 'batch_stats': ...}` of a TrainState as nested dicts of arrays."""
    return {"params": to_nested(state.params), "batch_stats": to_nested(state.batch_stats)}


# --------------------------------------------------------------------------- preemption

class PreemptionWatcher:
    """Notices SIGTERM: a flag on one process; JAX's preemption sync point across processes.

    `reached(step)` must be called at every step by every process; it turns True at the same
    step everywhere, after which the trainer saves and exits.
    """

    def __init__(self) -> None:
        self._flag = threading.Event()
        self._previous: Any = None
        self._multi = jax.process_count() > 1
        if not self._multi and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        del frame
        logging.warning("signal %d received: saving a checkpoint and stopping", signum)
        self._flag.set()

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
        """Put the previous SIGTERM handler back."""
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


# --------------------------------------------------------------------------- managers

class TrainCheckpoints:
    """The run's checkpoints: periodic ones (resume) and the best by `metric` (weights only)."""

    def __init__(self, workdir: str | Path, *, keep: int | None = 3, metric: str = "mDice",
                 async_save: bool = True):
        """`keep`: periodic checkpoints to keep (0 or None = all); `metric`: a summary key."""
        workdir = Path(workdir).absolute()
        self.directory = workdir / CHECKPOINTS_DIR
        self.best_directory = workdir / BEST_DIR
        self.metric = metric
        if keep is not None and int(keep) < 0:
            raise ValueError(f"train.keep_checkpoints: expected >= 0 (0 = all), found {keep}")
        self.manager = ocp.CheckpointManager(
            self.directory, item_names=_ITEMS, options=ocp.CheckpointManagerOptions(
                max_to_keep=(int(keep) or None) if keep is not None else None,
                enable_async_checkpointing=async_save, cleanup_tmp_directories=True))
        self.best = ocp.CheckpointManager(
            self.best_directory, item_names=_BEST_ITEMS, options=ocp.CheckpointManagerOptions(
                max_to_keep=1, best_fn=lambda m: float(m[metric]), best_mode="max",
                keep_checkpoints_without_metrics=False, enable_async_checkpointing=async_save,
                cleanup_tmp_directories=True))

    def latest_step(self) -> int | None:
        """The last committed periodic checkpoint (None if there is none)."""
        return self.manager.latest_step()

    def save(self, state: TrainState, loop: Mapping[str, Any]) -> bool:
        """Start saving `state` at its step (asynchronously); False if that step exists."""
        step = int(to_host(state.step))
        if step in self.manager.all_steps():
            return False
        return self.manager.save(step, force=True, args=ocp.args.Composite(
            variables=ocp.args.StandardSave(state_variables(state)),
            opt_state=ocp.args.StandardSave(to_nested(state.opt_state)),
            loop=ocp.args.JsonSave(dict(loop, step=step)),
        ))

    def restore(self, state: TrainState, step: int | None = None
                ) -> tuple[TrainState, dict[str, Any]]:
        """Restore the latest (or `step`) checkpoint into the structure/shardings of `state`.

        Returns the restored state and the loop state saved with it. Best checkpoints newer than
        the restored step (written by a run killed before its next periodic save) are removed,
        so a resumed run rewrites them exactly as the uninterrupted run did.
        """
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{self.directory}: no committed checkpoint to resume from")
        variables_like = state_variables(state)
        opt_like = to_nested(state.opt_state)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                variables=ocp.args.StandardRestore(_abstract(variables_like)),
                opt_state=ocp.args.StandardRestore(_abstract(opt_like)),
                loop=ocp.args.JsonRestore(),
            ))
        except (ValueError, KeyError, FileNotFoundError) as err:
            raise ValueError(
                f"{self.directory / str(step)}: cannot restore into the model/optimiser built "
                f"from the config (was this workdir trained with another config?): {err}"
            ) from err
        src = str(self.directory / str(step))
        params = from_nested(restored["variables"]["params"], state.params, src)
        stats = from_nested(restored["variables"]["batch_stats"], state.batch_stats, src)
        opt_state = from_nested(restored["opt_state"], state.opt_state, src)
        step_array = put_replicated(step, state.step)
        for old in self.best.all_steps():
            if old > step:
                self.best.delete(old)
        loop = dict(restored["loop"] or {})
        return TrainState(step_array, params, stats, state.rngs, opt_state), loop

    def save_best(self, state: TrainState, summary: Mapping[str, Any],
                  meta: Mapping[str, Any]) -> None:
        """Offer the weights of `state` as best; orbax keeps only the highest `metric`."""
        value = summary.get(self.metric)
        if value is None:
            logging.warning("validation summary has no %r value; best checkpoint not updated",
                            self.metric)
            return
        step = int(to_host(state.step))
        if step in self.best.all_steps():
            return
        self.best.save(step, force=True, metrics={self.metric: float(value)},
                       args=ocp.args.Composite(
                           variables=ocp.args.StandardSave(state_variables(state)),
                           meta=ocp.args.JsonSave(dict(meta, step=step, metric=self.metric,
                                                       summary=dict(summary)))))

    def best_step(self) -> int | None:
        """Step of the best checkpoint kept so far."""
        return self.best.best_step()

    def wait(self) -> None:
        """Block until every pending save is committed."""
        self.manager.wait_until_finished()
        self.best.wait_until_finished()

    def close(self) -> None:
        """Wait for pending saves and release the managers."""
        self.manager.close()
        self.best.close()


# --------------------------------------------------------------------------- weights for eval

def _step_dirs(directory: Path) -> list[int]:
    """Committed (finalised) step folders of a manager directory that hold weights."""
    return sorted(s for s in ocp.path.step.checkpoint_steps(directory)
                  if (directory / str(s) / checkpoint_io.VARIABLES_DIR).is_dir())


def find_weights(path: str | Path) -> tuple[Path, int | None]:
    """Resolve a path to a folder holding `variables/`, and its step if it is a training one.

    Accepts a weights checkpoint (as `unet_jax.convert` writes), one step folder of a manager,
    a manager folder (`<workdir>/checkpoints` or `<workdir>/best`: its latest committed step),
    or a workdir (its latest periodic checkpoint).
    """
    path = Path(path).expanduser().absolute()
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint folder")
    if (path / checkpoint_io.VARIABLES_DIR).is_dir():
        return path, int(path.name) if path.name.isdigit() else None
    for directory in (path / CHECKPOINTS_DIR, path):
        if directory.is_dir():
            steps = _step_dirs(directory)
            if steps:
                return directory / str(steps[-1]), steps[-1]
    raise CheckpointError(
        f"{path}: expected a weights checkpoint (a folder with {checkpoint_io.VARIABLES_DIR}/), "
        f"a training workdir (with {CHECKPOINTS_DIR}/<step>/) or a checkpoint manager folder; "
        "found none of these")


def restore_latest_weights(path: str | Path, model: nnx.Module) -> dict[str, Any]:
    """Load params and BatchNorm statistics into `model` from any checkpoint `find_weights` knows.

    Returns metadata: `path` (the folder read), `step` (training step or None) and whatever the
    checkpoint stored beside the weights (classes, palette, source, metric).
    """
    folder, step = find_weights(path)
    meta = checkpoint_io.restore_weights(folder, model)
    meta_item = folder / "meta" / "metadata"
    if meta_item.is_file():
        meta = {**json.loads(meta_item.read_text()), **meta}
    loop_item = folder / "loop" / "metadata"
    if loop_item.is_file() and step is None:
        step = json.loads(loop_item.read_text()).get("step")
    return {**meta, "path": str(folder), "step": meta.get("step", step)}


def load_any_weights(model: nnx.Module, path: str | Path) -> str:
    """Fill `model` from an mmseg `.pth` file or any folder `find_weights` knows; says which."""
    path = Path(path).expanduser()
    if path.is_file():
        from unet_jax.models.mmseg import extract_state_dict, load_state_dict
        from unet_jax.models.pth import load_pth
        load_state_dict(model, extract_state_dict(load_pth(path), path), source=str(path))
        return f"mmseg checkpoint {path}"
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder (expected an mmseg .pth, a "
                                "weights folder from unet_jax.convert or a training workdir)")
    return f"unet_jax checkpoint {restore_latest_weights(path, model)['path']}"
