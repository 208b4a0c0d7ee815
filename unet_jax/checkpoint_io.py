"""Model weights on disk: orbax checkpoints of params + BatchNorm statistics, with metadata.

A "weights checkpoint" (what `unet_jax.convert` writes and `init_from`/predict read) is a
folder holding `variables/` (an orbax StandardCheckpointer tree `{params, batch_stats}`) and
`unet_jax_meta.json` (classes, palette, source). Training checkpoints are managed in
`unet_jax.checkpoint`; `restore_model_variables` accepts either kind.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx

from unet_jax.errors import CheckpointError, InputError

META_FILE = "unet_jax_meta.json"
VARIABLES_DIR = "variables"


def model_variables(model: nnx.Module) -> dict[str, Any]:
    """`{'params': ..., 'batch_stats': ...}` as nested pure dicts of arrays."""
    return {"params": nnx.state(model, nnx.Param).to_pure_dict(),
            "batch_stats": nnx.state(model, nnx.BatchStat).to_pure_dict()}


def assign_variables(model: nnx.Module, variables: dict[str, Any], source: str) -> None:
    """Write restored `{params, batch_stats}` into `model`, checking every shape."""
    for kind, filt in (("params", nnx.Param), ("batch_stats", nnx.BatchStat)):
        state = nnx.state(model, filt)
        ours = dict(nnx.to_flat_state(state))
        theirs = dict(nnx.to_flat_state(nnx.State(variables[kind])))
        theirs = {tuple(int(p) if isinstance(p, str) and p.isdigit() else p for p in k): v
                  for k, v in theirs.items()}
        missing = sorted(map(str, set(ours) - set(theirs)))
        extra = sorted(map(str, set(theirs) - set(ours)))
        shapes = [f"{'.'.join(map(str, k))}: expected {ours[k][...].shape}, found "
                  f"{np.shape(theirs[k])}" for k in ours if k in theirs
                  and tuple(ours[k][...].shape) != tuple(np.shape(theirs[k]))]
        if missing or extra or shapes:
            raise CheckpointError(
                f"{source}: {kind} do not fit the model built from the config "
                f"(missing {missing[:10]}, unexpected {extra[:10]}, mis-shaped {shapes[:10]}); "
                f"check --config / model.base_channels / model.head / model.num_classes")
        for k, var in ours.items():
            value = theirs[k]
            var[...] = jax.numpy.asarray(getattr(value, "value", value))


def save_weights(directory: str | Path, model: nnx.Module, meta: dict[str, Any]) -> Path:
    """Write a weights checkpoint folder (atomic per orbax; refuses to overwrite)."""
    directory = Path(directory).absolute()
    if (directory / VARIABLES_DIR).exists():
        raise InputError(f"{directory / VARIABLES_DIR} already exists; choose a new --output")
    directory.mkdir(parents=True, exist_ok=True)
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(directory / VARIABLES_DIR, model_variables(model))
    ckptr.wait_until_finished()
    (directory / META_FILE).write_text(json.dumps(meta, indent=1, default=str))
    return directory


def read_meta(directory: str | Path) -> dict[str, Any]:
    """The metadata stored beside a weights checkpoint ({} if none)."""
    path = Path(directory) / META_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def restore_weights(directory: str | Path, model: nnx.Module) -> dict[str, Any]:
    """Load a weights checkpoint folder into `model`; returns its metadata."""
    directory = Path(directory).absolute()
    src = directory / VARIABLES_DIR
    if not src.is_dir():
        raise CheckpointError(
            f"{directory}: not a unet_jax weights checkpoint (expected {VARIABLES_DIR}/ and "
            f"{META_FILE}, as written by `python -m unet_jax.convert`)")
    target = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, model_variables(model))
    try:
        restored = ocp.StandardCheckpointer().restore(src, target)
    except ValueError as err:
        raise CheckpointError(f"{src}: does not fit the model built from the config: {err}") from err
    assign_variables(model, restored, str(src))
    return read_meta(directory)
