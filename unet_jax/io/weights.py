"""Model weights from any source and to any destination: the one module for weight I/O.

`load(model, source)` fills a model built from the config with the weights of
* an mmseg `.pth` (a 1.x training checkpoint or a released 0.x file; read without torch and
  without running anything from the file, `unet_jax.io.pth`);
* a weights folder as `save` (and `unet_jax.convert`) writes it: `model/` (the orbax tree of
  `nnx.state(model)`: parameters and BatchNorm statistics) and `meta/` (JSON: classes, palette,
  source, ...);
* a training checkpoint step (`<workdir>/checkpoints/<step>`, `<workdir>/best/<step>`, which hold
  the same two items), a manager folder (`<workdir>/checkpoints`: its newest step) or a workdir.
Loading is strict: a model that does not fit is refused with a hint and a few of the
missing, unexpected or mis-shaped entries; `use_recorded_model` builds the model a checkpoint
records.
`export_pth` writes the mmseg state_dict layout back (needs torch).
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
from collections import OrderedDict
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from unet_jax.errors import (CheckpointError, DamagedCheckpointError, InputError, one_line,
                             storage_error, warn)
from unet_jax.models import mmseg
from unet_jax.io import paths
from unet_jax.io.paths import as_path
from unet_jax.io.pth import load_pth, max_bytes_for

MODEL_ITEM, META_ITEM = "model", "meta"
CHECKPOINTS_DIR, BEST_DIR = "checkpoints", "best"
RUN_CONFIG = "config.json"  # a training run folder's config (unet_jax.train writes it)
TORCH_HINT = ("writing a .pth needs PyTorch: install the converter extra with "
              "`pip install -e .[torch]` (or `pip install torch==2.13.0`)")


def model_state(model: nnx.Module) -> nnx.State:
    """What a weights checkpoint holds: parameters and BatchNorm statistics."""
    return nnx.state(model, (nnx.Param, nnx.BatchStat))


def flat_paths(tree: Any) -> dict[str, Any]:
    """`{'a/b/0/kernel': leaf}` of any pytree (nnx.State, orbax metadata, nested dicts)."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        names = []
        for key in path:
            name = getattr(key, "key", getattr(key, "name", getattr(key, "idx", key)))
            names.append(str(name))
        if names and names[-1] == "value":  # an nnx Variable's array
            names.pop()
        out["/".join(names)] = leaf
    return out


# ------------------------------------------------------------------------------ writing
@contextlib.contextmanager
def writing(directory: Path) -> Iterator[None]:
    """Turn OS errors (disk full, read-only, ...), also as orbax and tensorstore wrap them, into
    one `CheckpointError` naming the folder and the OS error."""
    try:
        yield
    except Exception as err:  # orbax/tensorstore wrap OS errors in their own types
        reason = storage_error(err)
        if reason is None:
            raise
        raise CheckpointError(f"{directory}: cannot write the checkpoint: {reason}") from err


def _mib(size: int) -> str:
    """Bytes as MiB with one decimal (0.1 MiB at least, so that a small size is not '0')."""
    return f"{max(size / 2**20, 0.1):.1f} MiB"


def check_space(directory: Path, tree: Any) -> None:
    """Refuse a save of the arrays of `tree` that cannot fit on the disk (a clear error before
    orbax starts)."""
    if paths.is_url(directory):
        return  # a bucket has no free space to ask for; the store's own error says it is full
    need = sum(int(x.nbytes) for x in jax.tree.leaves(tree))
    probe = directory if directory.exists() else directory.parent
    free = shutil.disk_usage(probe).free
    if need > free:
        raise CheckpointError(f"{directory}: cannot write the checkpoint: "
                              f"{os.strerror(errno.ENOSPC)} (needs {_mib(need)}, "
                              f"{_mib(free)} free)")


def save(directory: str | Path, model: nnx.Module, meta: dict[str, Any]) -> Path:
    """Write a weights folder (`model/` + `meta/`); atomic, and never over an existing path."""
    directory = paths.to_path(directory)
    if directory.exists() and any(directory.iterdir()):
        raise InputError(f"{directory} already exists and is not empty; choose a new --output")
    if directory.exists() and not paths.is_url(directory):
        directory.rmdir()  # orbax writes a temporary folder and renames it into place
    state = model_state(model)
    meta = {**meta, "digest": {MODEL_ITEM: digest(state)}}
    with writing(directory):
        directory.parent.mkdir(parents=True, exist_ok=True)
        check_space(directory, state)
        checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
        try:
            checkpointer.save(directory, args=ocp.args.Composite(**{
                MODEL_ITEM: ocp.args.StandardSave(state),
                META_ITEM: ocp.args.JsonSave(json.loads(json.dumps(meta, default=str)))}))
        except BaseException:
            for partial in directory.parent.glob(f"{directory.name}.orbax-checkpoint-tmp*"):
                shutil.rmtree(partial, ignore_errors=True)  # orbax's uncommitted folder
            raise
        finally:
            checkpointer.close()
    return directory


def require_torch() -> Any:
    """The torch module, or an `InputError` saying how to install it."""
    try:
        import torch
    except ImportError as err:
        raise InputError(f"--to-mmseg: {TORCH_HINT}") from err
    return torch


def export_pth(model: nnx.Module, path: str | Path, meta: dict[str, Any]) -> Path:
    """Write `model` as an mmseg .pth (state_dict + dataset meta) that `init_model` loads."""
    torch = require_torch()
    sd = mmseg.model_state_dict(model, num_batches_tracked=int(meta.get("iter") or 0))
    state_dict = OrderedDict((k, torch.from_numpy(np.array(v))) for k, v in sd.items())
    classes, palette = tuple(meta["classes"]), [list(p) for p in meta["palette"]]
    out = {"meta": {"dataset_meta": {"classes": classes, "palette": palette},
                    "CLASSES": classes, "PALETTE": palette, "exported_by": "unet_jax"},
           "state_dict": state_dict}
    path = as_path(path)
    if path.exists():
        raise InputError(f"{path} already exists; choose a new --output")
    with writing(path), paths.staged(path) as local:  # torch writes local files only
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_suffix(local.suffix + ".tmp")
        try:
            torch.save(out, tmp)
            tmp.replace(local)
        finally:
            tmp.unlink(missing_ok=True)
    return path


# ------------------------------------------------------------------------------ digests
def digest(tree: Any) -> str:
    """sha256 over every array of `tree` (path, dtype, shape and bytes, in path order).

    Recorded in a checkpoint's `meta` when it is saved and checked when it is read back, so a
    damaged array (a flipped byte, a truncated file) is noticed instead of trained on.
    """
    h = hashlib.sha256()
    for name, leaf in sorted(flat_paths(tree).items()):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
            leaf = leaf.addressable_data(0)  # replicated: every process holds all of it
        arr = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{name}|{arr.dtype.str}|{arr.shape}|".encode())
        h.update(arr.tobytes())
    return h.hexdigest()


def nonfinite(tree: Any) -> dict[str, int]:
    """{path: number of NaN/inf values} of the floating-point arrays of `tree` that have any."""
    counts = _count_nonfinite(tree)
    return {k: int(v) for k, v in flat_paths(jax.device_get(counts)).items() if int(v)}


@jax.jit
def _count_nonfinite(tree: Any) -> Any:
    def count(x: jax.Array) -> jax.Array:
        if not jnp.issubdtype(x.dtype, jnp.inexact):
            return jnp.zeros((), jnp.int32)
        return jnp.sum(~jnp.isfinite(x), dtype=jnp.int32)
    return jax.tree.map(count, tree)


# ------------------------------------------------------------------------------ reading
def candidates(path: str | Path) -> list[tuple[Path, int | None]]:
    """The folders holding `model/` that `path` names, newest first, with their steps.

    A weights folder or step folder names itself; a manager folder (`<workdir>/checkpoints`)
    or a training workdir names its committed steps, so that a damaged newest one can be passed
    over for the one before.
    """
    path = paths.to_path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint (expected an mmseg .pth, a weights "
                              "folder from unet_jax.convert or a training workdir)")
    if (path / MODEL_ITEM).is_dir():
        return [(path, int(path.name) if path.name.isdigit() else None)]
    for directory in (path / CHECKPOINTS_DIR, path):
        steps = committed_steps(directory)
        if steps:
            return [(directory / str(s), s) for s in reversed(steps)]
    raise CheckpointError(
        f"{path}: expected a weights folder (with {MODEL_ITEM}/), a training workdir (with "
        f"{CHECKPOINTS_DIR}/<step>/) or a checkpoint manager folder; found none of these")


def committed_steps(directory: Path) -> list[int]:
    """Finalised step folders of a manager directory that hold weights, ascending."""
    if not directory.is_dir():
        return []
    return sorted(s for s in ocp.path.step.checkpoint_steps(directory)
                  if (directory / str(s) / MODEL_ITEM).is_dir())


def read_meta(folder: str | Path) -> dict[str, Any]:
    """The JSON `meta/` item of a weights or step folder ({} if it has none)."""
    item = as_path(folder) / META_ITEM / "metadata"
    if not item.is_file():
        return {}
    try:
        meta = json.loads(item.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DamagedCheckpointError(f"{item}: unreadable ({err})") from err
    if not isinstance(meta, dict):
        raise DamagedCheckpointError(f"{item}: expected a JSON object, found {type(meta).__name__}")
    return meta


def verify(folder: str | Path, item: str, tree: Any) -> None:
    """Raise `DamagedCheckpointError` unless `tree` matches the digest `folder` recorded for
    `item`. A folder without that digest is unverified, which counts as damaged: its arrays
    cannot be told from changed ones, so they are never used silently."""
    recorded = read_meta(folder).get("digest", {}).get(item)
    if recorded is None:
        raise DamagedCheckpointError(
            f"{as_path(folder) / item}: unverified (no digest recorded in {META_ITEM}/, so damaged "
            "arrays could not be noticed; a weights folder from an older unet_jax.convert: "
            "convert it again)")
    if digest(tree) != recorded:
        raise DamagedCheckpointError(
            f"{as_path(folder) / item}: its arrays do not match the digest recorded when it was "
            "saved (the files were changed or damaged)")


def _check_readable(folder: Path) -> None:
    """Raise `DamagedCheckpointError` unless the `model/` item of `folder` reads back as it was
    written (its own structure, verified against its digest): a damaged `_METADATA` or manifest
    makes the stored tree look empty, which must not be reported as another model."""
    src = folder / MODEL_ITEM
    try:
        stored = ocp.StandardCheckpointer().restore(src)
    except Exception as err:  # orbax/tensorstore raise many types for a damaged folder
        raise DamagedCheckpointError(f"{src}: cannot be read back "
                                     f"({type(err).__name__}: {one_line(err)})") from err
    verify(folder, MODEL_ITEM, stored)


def restore_state(folder: str | Path, like: nnx.State) -> nnx.State:
    """The `model/` item of `folder` in the structure, dtypes and shardings of `like`, verified.

    A model that does not fit is one short `CheckpointError` (`mismatch`), raised only when the
    folder itself reads back cleanly; a folder that cannot be read back as written (or carries
    no digest) is a `DamagedCheckpointError`.
    """
    folder = as_path(folder)
    src = folder / MODEL_ITEM
    try:
        stored = flat_paths(ocp.StandardCheckpointer().metadata(src).item_metadata)
    except Exception as err:  # orbax/tensorstore raise many types for a damaged folder
        raise DamagedCheckpointError(f"{src}: unreadable checkpoint metadata "
                                     f"({type(err).__name__}: {one_line(err)})") from err
    ours = flat_paths(like)
    missing = sorted(set(ours) - set(stored))
    unexpected = sorted(set(stored) - set(ours))
    shapes = [f"{k}: expected {tuple(ours[k].shape)}, found {tuple(stored[k].shape)}"
              for k in sorted(set(ours) & set(stored))
              if tuple(ours[k].shape) != tuple(stored[k].shape)]
    if missing or unexpected or shapes:
        _check_readable(folder)  # a damaged folder is reported as damaged, not as a mismatch
        raise CheckpointError(mmseg.mismatch_message(
            src, missing, unexpected, shapes,
            hint="check --config, model.base_channels, model.head and model.num_classes"))
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    try:
        restored = ocp.StandardCheckpointer().restore(src, target)
    except Exception as err:  # orbax/tensorstore raise many types for a damaged folder
        raise DamagedCheckpointError(f"{src}: cannot be read back "
                                     f"({type(err).__name__}: {one_line(err)})") from err
    verify(folder, MODEL_ITEM, restored)
    return restored


def recorded_model(source: str | Path) -> tuple[dict[str, Any], Path] | None:
    """(the `model` config fields, the file recording them) of a unet_jax checkpoint: a run
    folder's `config.json` (for the workdir, its manager folder or a step of `checkpoints/` or
    `best/`) or a weights folder's `meta/`; None for an mmseg `.pth` or where none is recorded."""
    path = paths.to_path(source)
    if path.is_file() or not path.exists():
        return None
    if path.name in (CHECKPOINTS_DIR, BEST_DIR):
        path = path.parent
    elif path.parent.name in (CHECKPOINTS_DIR, BEST_DIR):
        path = path.parent.parent
    record = path / RUN_CONFIG
    if record.is_file():
        try:
            fields = json.loads(record.read_text()).get("model")
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as err:
            raise CheckpointError(f"{record}: unreadable ({one_line(err)})") from err
    else:
        record = path / META_ITEM
        fields = read_meta(path).get("model") if record.is_dir() else None
    return (fields, record) if isinstance(fields, dict) else None


def model_config(model_cfg: Any, source: str | Path, overridden: Collection[str] = ()) -> Any:
    """`model_cfg` with every field the checkpoint `source` records (`recorded_model`) set to the
    recorded value, so that commands build the model the checkpoint holds; a field the user set
    (`overridden`: dotted names, e.g. {"model.base_channels"}) that differs is refused, field by
    field, as resuming a run folder with another model is.
    """
    found = recorded_model(source)
    if found is None:
        return model_cfg
    recorded, where = found
    ours = json.loads(model_cfg.to_json())
    fields = [k for k in ours if k in recorded and recorded[k] != ours[k]]
    clash = [f"model.{k}: {recorded[k]!r} in the checkpoint, {ours[k]!r} now" for k in fields
             if f"model.{k}" in overridden]
    if clash:
        raise CheckpointError(f"{source} holds another model than the one asked for "
                              f"({'; '.join(clash)}; recorded in {where}); drop those overrides "
                              "to use the checkpoint's model, or choose another checkpoint")
    model_cfg = model_cfg.copy_and_resolve_references()
    with model_cfg.unlocked():
        for k in fields:
            model_cfg[k] = tuple(recorded[k]) if isinstance(recorded[k], list) else recorded[k]
    return model_cfg


def use_recorded_model(config: Any, source: str | Path, overridden: Collection[str] = ()) -> Any:
    """Set `config.model` to the model the checkpoint `source` records (`model_config`; the
    dotted `overridden` fields, e.g. the command line's `--config.model.*`, are the user's) and
    check the config again; returns `config`. Every command that takes a checkpoint calls it."""
    from unet_jax.config import check_config
    config.model = model_config(config.model, source, overridden)
    return check_config(config)


def load(model: nnx.Module, source: str | Path) -> dict[str, Any]:
    """Fill `model` from any source this module reads; returns what was loaded.

    The result holds `source` (a sentence naming it), `path`, `step` (a training step or None)
    and the metadata stored with the weights (`classes`, `palette`, ...). From a workdir or
    manager folder, a damaged newest checkpoint is reported and the one before it is used.
    """
    path = paths.to_path(source) if paths.is_url(source) else as_path(source).expanduser()
    if path.is_file():
        weight_bytes = sum(x.nbytes for x in jax.tree.leaves(model_state(model)))
        obj = load_pth(paths.local_copy(path), max_bytes=max_bytes_for(weight_bytes))
        mmseg.load_state_dict(model, mmseg.extract_state_dict(obj, path), source=str(path))
        return {"source": f"mmseg checkpoint {path}", "path": str(path), "step": None,
                **mmseg.checkpoint_meta(obj)}
    found = candidates(path)
    damaged = []
    for folder, step in found:
        try:
            nnx.update(model, restore_state(folder, model_state(model)))
            meta = read_meta(folder)
        except DamagedCheckpointError as err:
            if len(found) == 1:
                raise
            warn(f"{one_line(err)}; trying the checkpoint before it")
            damaged.append(one_line(err))
            continue
        step = meta.get("step", step)
        return {**meta, "source": f"unet_jax checkpoint {folder}", "path": str(folder),
                "step": step}
    raise CheckpointError(f"{path}: no intact checkpoint ({len(damaged)} damaged: "
                          + "; ".join(damaged) + ")")
