"""mmseg's test-time image preparation, in one place: the keep-ratio size, the uint8 resizes,
`normalise` (and `denormalise` for display) and `test_image`, the whole preparation of a test
image. Evaluation, predict, `Segmenter` and the benchmark (through `unet_jax.inference.segment`),
the exported SavedModel (`normalise` inside the JAX pipeline; the keep-ratio size mirrored in
TensorFlow by `unet_jax.serving`), the browser and the training augmentation call these, so the
rules exist once.

Channel order: `normalise` takes RGB (mmseg's SegDataPreProcessor converts cv2's BGR to RGB
before subtracting its RGB-order mean); callers holding BGR flip the channels first. This module
imports neither JAX nor TensorFlow.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import cv2
import numpy as np


def rescale_size(height: int, width: int, scale: Sequence[float]) -> tuple[int, int]:
    """mmcv.imrescale's keep-ratio output size (new_h, new_w) for a (long, short)-style `scale`.

    sf = min(max(scale) / max(h, w), min(scale) / min(h, w)); size = int(x * sf + 0.5).

    Deliberate difference: each side is at least 1. For extreme aspect ratios (a 1 x 5000 image
    to (584, 565): sf = 0.1168, height int(0.6168) = 0) mmcv returns a 0 side and the resize that
    follows fails in cv2, in mmseg too; here the side stays 1 pixel. Every other size is mmcv's.
    """
    long_edge, short_edge = max(scale), min(scale)
    sf = min(long_edge / max(height, width), short_edge / min(height, width))
    return max(int(height * float(sf) + 0.5), 1), max(int(width * float(sf) + 0.5), 1)


def tta_view_hw(height: int, width: int, ratio: float) -> tuple[int, int]:
    """Size of mmseg's TTA view `Resize(scale_factor=ratio, keep_ratio=True)`."""
    target = (int(width * ratio + 0.5), int(height * ratio + 0.5))
    return rescale_size(height, width, target)


def resize_uint8(image: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """cv2 INTER_LINEAR resize of a uint8 H x W (x C) image (mmcv.imresize); no copy if same size."""
    if tuple(image.shape[:2]) == tuple(hw):
        return image
    return cv2.resize(image, (int(hw[1]), int(hw[0])), interpolation=cv2.INTER_LINEAR)


def normalise(image_rgb: Any, mean: Sequence[float], std: Sequence[float]) -> Any:
    """uint8 RGB (..., 3) -> float32 (x - mean) / std (mmseg SegDataPreProcessor, RGB order).

    A numpy image gives a numpy array, a JAX one (e.g. traced inside the exported SavedModel,
    `unet_jax.cli.export`) a JAX array: the same arithmetic on the host and on the device.
    """
    return ((image_rgb.astype(np.float32) - np.asarray(mean, np.float32))
            / np.asarray(std, np.float32))


def denormalise(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """`normalise` undone for display: float RGB (..., 3) -> uint8 rint(x * std + mean), clipped
    to 0..255 (the browser shows augmented training samples with it)."""
    x = np.asarray(image, np.float32) * np.asarray(std, np.float32) + np.asarray(mean, np.float32)
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def test_image(image_rgb: np.ndarray, data_cfg: Any) -> np.ndarray:
    """mmseg's test pipeline before the model: keep-ratio resize of the uint8 RGB image to
    `data_cfg.img_scale` (an identity at the zoo datasets' native sizes), then normalise."""
    height, width = image_rgb.shape[:2]
    resized = resize_uint8(image_rgb, rescale_size(height, width, data_cfg.img_scale))
    return normalise(resized, data_cfg.mean, data_cfg.std)
