"""mmsegmentation checkpoints <-> unet_jax models: the state_dict key map and strict loading.

Module attributes mirror mmseg's names, so a state path joined with '.' is the mmseg prefix;
only the leaf names differ (kernel -> weight with OIHW <-> HWIO, scale -> weight,
mean/var -> running_mean/running_var). `num_batches_tracked` has no counterpart here.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import jax.numpy as jnp
import numpy as np
from flax import nnx

from unet_jax.errors import CheckpointError

_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "bias": "bias",
                  "mean": "running_mean", "var": "running_var"}


class StateDictMismatchError(CheckpointError):
    """A state_dict does not fit the model built from the config."""


def _torch_key(path: tuple) -> str | None:
    parts = [str(p) for p in path]
    leaf = parts[-1]
    if leaf not in _LEAF_TO_TORCH or "rngs" in parts:
        return None
    return ".".join(parts[:-1] + [_LEAF_TO_TORCH[leaf]])


def _variables(model: nnx.Module) -> dict[str, tuple[tuple, nnx.Variable]]:
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(model, (nnx.Param, nnx.BatchStat))):
        key = _torch_key(path)
        if key is not None:
            out[key] = (path, var)
    return out


# The one transposed conv (mmseg's DeconvModule, its attribute name misspelt as in mmseg): torch
# keeps its weight as (in, out, kh, kw), ours is (kh, kw, in, out); the same permutation both ways.
_DECONV_WEIGHT = ".deconv_upsamping.0.weight"


def to_torch_layout(key: str, value: np.ndarray) -> np.ndarray:
    """Our array for `key` in torch layout (4-D conv kernels HWIO -> OIHW, the transposed
    conv's (kh, kw, in, out) -> (in, out, kh, kw))."""
    if value.ndim != 4:
        return value
    axes = (2, 3, 0, 1) if key.endswith(_DECONV_WEIGHT) else (3, 2, 0, 1)
    return np.ascontiguousarray(value.transpose(axes))


def from_torch_layout(key: str, value: np.ndarray) -> np.ndarray:
    """A torch array for `key` in our layout (4-D conv weights OIHW -> HWIO, the transposed
    conv's (in, out, kh, kw) -> (kh, kw, in, out))."""
    if value.ndim != 4:
        return value
    axes = (2, 3, 0, 1) if key.endswith(_DECONV_WEIGHT) else (2, 3, 1, 0)
    return np.ascontiguousarray(value.transpose(axes))


def model_state_dict(model: nnx.Module, num_batches_tracked: int = 0) -> dict[str, np.ndarray]:
    """The model's weights as an mmseg state_dict (torch layouts, float32 numpy arrays)."""
    sd = {}
    for key, (_, var) in _variables(model).items():
        sd[key] = to_torch_layout(key, np.asarray(var[...], np.float32))
        if key.endswith(".running_var"):  # every BatchNorm, the deconv's included
            sd[key[: -len("running_var")] + "num_batches_tracked"] = np.array(
                num_batches_tracked, np.int64)
    return sd


def describe_checkpoint(sd: Mapping[str, np.ndarray]) -> str:
    """Which config a state_dict fits: head, classes and backbone width read off its keys."""
    head = ("pspnet" if any(".psp_modules." in k for k in sd)
            else "deeplabv3" if any(".aspp_modules." in k for k in sd)
            else "fcn" if any(k.startswith("decode_head.convs.") for k in sd) else "unknown")
    seg = sd.get("decode_head.conv_seg.weight")
    classes = int(seg.shape[0]) if seg is not None else "unknown"
    first = sd.get("backbone.encoder.0.0.convs.0.conv.weight")
    width = int(first.shape[0]) if first is not None else "unknown"
    bottleneck = sd.get("decode_head.bottleneck.conv.weight",
                        sd.get("decode_head.convs.0.conv.weight"))
    channels = int(bottleneck.shape[0]) if bottleneck is not None else "unknown"
    dataset = "configs/cityscapes.py" if classes == 19 else "a retinal config (configs/drive.py ...)"
    if classes == 1:  # mmseg's binary decode head (out_channels=1, sigmoid)
        classes = "1 output channel (binary)"
        dataset += " and --config.model.out_channels=1"
    else:
        classes = f"{classes} classes"
    return (f"the checkpoint holds a {head} decode head ({channels} channels) with {classes} "
            f"and base_channels {width}: use {dataset} with ':{head},ce' (plus "
            f"--config.model.base_channels={width} --config.model.head_channels={channels} "
            f"if the widths differ from the zoo's 64 and {64 if head == 'fcn' else 16})"
            + _describe_upsample(sd))


def _describe_upsample(sd: Mapping[str, np.ndarray]) -> str:
    """The decoder's upsampling as far as its keys tell (not bilinear vs nearest: no weights)."""
    deconv = next((v for k, v in sd.items() if k.endswith(_DECONV_WEIGHT)), None)
    if deconv is not None:
        return (f"; its decoder upsamples with DeconvModule: --config.model.upsample=deconv "
                f"--config.model.deconv_kernel_size={int(np.shape(deconv)[-1])}")
    if any(".interp_upsample.0.conv." in k for k in sd):
        return ("; its decoder's InterpConv has conv_first=True: "
                "--config.model.upsample_conv_first=True")
    return ""


def mismatch_message(src: Any, missing: list[str], unexpected: list[str], shapes: list[str],
                     hint: str) -> str:
    """One short line for weights that do not fit the model: the hint first, the counts, then
    at most three examples (a full list of a mismatched model runs to a hundred keys)."""
    examples = ([f"missing {k}" for k in missing] + [f"unexpected {k}" for k in unexpected]
                + shapes)[:3]
    more = len(missing) + len(unexpected) + len(shapes) - len(examples)
    return (f"{src} does not fit the model built from the config ({hint}): "
            f"{len(missing)} missing, {len(unexpected)} unexpected, {len(shapes)} mis-shaped "
            f"keys, e.g. {'; '.join(examples)}" + (f" (+{more} more)" if more else ""))


def load_state_dict(model: nnx.Module, sd: Mapping[str, Any], source: str = "<state_dict>",
                    ) -> None:
    """Copy an mmseg state_dict into `model`, strictly: every mismatch is reported at once."""
    ours = _variables(model)
    theirs = {k: v for k, v in sd.items() if not k.endswith("num_batches_tracked")}
    missing = sorted(set(ours) - set(theirs))
    unexpected = sorted(set(theirs) - set(ours))
    shapes = []
    for key in sorted(set(ours) & set(theirs)):
        want = tuple(to_torch_layout(key, np.zeros(ours[key][1][...].shape, np.float32)).shape)
        got = tuple(np.shape(theirs[key]))
        if want != got:
            shapes.append(f"{key}: expected {want}, found {got}")
    if missing or unexpected or shapes:
        raise StateDictMismatchError(mismatch_message(
            source, missing, unexpected, shapes,
            hint=describe_checkpoint(theirs)))
    for key, (_, var) in ours.items():
        # float32 values, stored in the variable's own dtype (float64 in a float64 model).
        var[...] = jnp.asarray(from_torch_layout(key, np.asarray(theirs[key], np.float32)),
                               var[...].dtype)


def extract_state_dict(obj: Any, path: str | Path = "<checkpoint>") -> dict[str, np.ndarray]:
    """mmengine's rule: `obj['state_dict']` if present, else obj itself; strip `module.`."""
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(sd, dict):
        raise CheckpointError(
            f"{path}: expected a dict with a 'state_dict' entry or a bare state dict, "
            f"found {type(obj).__name__}")
    out = {}
    for key, value in sd.items():
        if not isinstance(key, str):
            raise CheckpointError(f"{path}: state_dict keys must be strings, found "
                                  f"{type(key).__name__} {key!r:.60}")
        key = key[len("module."):] if key.startswith("module.") else key
        if isinstance(value, np.ndarray):
            out[key] = value
    return out


def checkpoint_meta(obj: Any) -> dict[str, Any]:
    """What an mmseg checkpoint says beside its weights: classes, palette, iteration, layout.

    1.x files keep `meta.dataset_meta.{classes, palette}`, 0.x files `meta.{CLASSES, PALETTE}`;
    absent values are None.
    """
    meta = obj.get("meta", {}) if isinstance(obj, dict) else {}
    meta = meta if isinstance(meta, dict) else {}
    ds = meta.get("dataset_meta") if isinstance(meta.get("dataset_meta"), dict) else {}
    classes = ds.get("classes", meta.get("CLASSES"))
    palette = ds.get("palette", meta.get("PALETTE"))
    layout = ("mmseg-1.x" if isinstance(obj, dict) and ("message_hub" in obj or ds)
              else "mmseg-0.x" if isinstance(obj, dict) and "state_dict" in obj
              else "bare state_dict")
    iteration = meta.get("iter")
    return {"classes": _names(classes), "palette": _colours(palette),
            "iter": int(iteration) if isinstance(iteration, (int, np.integer)) else None,
            "layout": layout}


def _names(value: Any) -> list[str] | None:
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return list(value)
    return None


def _colours(value: Any) -> list[list[int]] | None:
    ok = isinstance(value, (list, tuple)) and all(
        isinstance(p, (list, tuple)) and len(p) == 3
        and all(isinstance(v, (int, np.integer)) and 0 <= v <= 255 for v in p) for p in value)
    return [[int(v) for v in p] for p in value] if ok else None
