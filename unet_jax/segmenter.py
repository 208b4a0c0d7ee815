"""The Python API: a model and its weights, ready to segment images one at a time.

    from unet_jax import Segmenter
    from unet_jax.io.images import read_rgb

    seg = Segmenter.load("configs/drive.py:fcn", "weights/drive_fcn")
    labels, scores = seg.predict(read_rgb("01_test.tif"))  # (H, W) uint8, (H, W, C) float32

`predict` is the predict CLI's computation (the CLI runs through it): mmseg's test pipeline
(`unet_jax.inference.segment`: keep-ratio resize to `data.img_scale`, slide or whole inference
per `config.eval`, logits resized back, argmax; TTA with `eval.tta`). `scores` are what
`--save_logits` saves: the logits at the image's size, or with TTA the averaged probabilities.
Read files with `unet_jax.io.images.read_rgb` to get the pixels mmseg would decode.
"""
from __future__ import annotations

from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import ml_collections
import numpy as np
from flax import nnx

from unet_jax.io import weights
from unet_jax.config import check_config, load_config, set_field
from unet_jax.errors import InputError
from unet_jax.inference import ModelApply, make_apply_fn, segment
from unet_jax.models import build_model


def full_palette(palette: Any, num_classes: int) -> list[list[int]]:
    """`palette` extended (deterministically) to `num_classes` colours."""
    colours = [[int(v) for v in p] for p in palette][:num_classes]
    rng = np.random.default_rng(0)
    while len(colours) < num_classes:
        colours.append([int(v) for v in rng.integers(0, 256, 3)])
    return colours


def resolve_config(config: str | ml_collections.ConfigDict,
                   overrides: Mapping[str, Any] | None = None) -> ml_collections.ConfigDict:
    """A checked config from `FILE[:ARG]` (as `--config`) or a ConfigDict (copied), overridden.

    `overrides` map dotted fields to values (`{"model.base_channels": 8}`); strings are parsed as
    on the command line.
    """
    if isinstance(config, ml_collections.ConfigDict):
        config = config.copy_and_resolve_references()
        for dotted, value in (overrides or {}).items():
            set_field(config, dotted, value)
    else:
        config = load_config(str(config), overrides)
    return check_config(config)


class Segmenter:
    """A model built from a config, with weights from any checkpoint `unet_jax.io.weights` reads."""

    def __init__(self, config: ml_collections.ConfigDict, model: nnx.Module,
                 loaded: Mapping[str, Any] | None = None) -> None:
        """Wrap an already built and filled `model` of (checked) `config`; see `load`."""
        self.config = config
        self.loaded = dict(loaded or {})
        self.num_classes = int(config.model.num_classes)
        self.classes = tuple(config.data.classes)
        self.palette = full_palette(config.data.palette, self.num_classes)
        self._apply: ModelApply = make_apply_fn(model)

    @classmethod
    def load(cls, config: str | ml_collections.ConfigDict, checkpoint: str | Path, *,
             overrides: Mapping[str, Any] | None = None,
             overridden: Collection[str] = ()) -> "Segmenter":
        """Build the model of `config` and fill it from `checkpoint`.

        `config` is `FILE[:ARG]` as on the command line ("configs/drive.py:fcn") or a
        ConfigDict; `overrides` map dotted fields to values. `checkpoint` is an mmseg `.pth`, a
        weights folder (`unet_jax.convert`), a training workdir or one of its step folders,
        local or in a bucket (`gs://...`, `unet_jax.io.paths`).
        The model is the one the checkpoint records (a run folder's `config.json`, a weights
        folder's `meta/`), except that a `model.*` field named in `overrides` or `overridden`
        (fields already set in a ConfigDict, e.g. by the command line) must agree with it.
        Config and checkpoint mistakes raise `ConfigError` / `CheckpointError`.
        """
        config = resolve_config(config, overrides)
        weights.use_recorded_model(config, checkpoint, {*(overrides or {}), *overridden})
        model = build_model(config.model)
        loaded = weights.load(model, checkpoint)
        return cls(config, model, loaded)

    def predict(self, image: np.ndarray, *, resize: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Segment one uint8 RGB image (H, W, 3) of any size -> (labels, scores).

        labels: uint8 (H, W) class ids; scores: float32 (H, W, C), the logits at the image's
        size (with `config.eval.tta`, the view-averaged probabilities). `resize=False` skips the
        keep-ratio resize to `data.img_scale` (the CLI's `--noresize`).
        """
        image = np.asarray(image)
        if (image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3
                or min(image.shape[:2]) < 1):
            raise InputError(f"Segmenter.predict: expected one uint8 RGB image (H, W, 3), found "
                             f"{image.dtype} {image.shape}; read files with "
                             "unet_jax.io.images.read_rgb")
        scores, pred = segment(self._apply, image, self.config, resize=resize)
        return np.asarray(pred, np.uint8), np.asarray(scores, np.float32)
