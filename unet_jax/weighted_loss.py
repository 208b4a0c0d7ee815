"""The original U-Net's objective: softmax cross-entropy weighted per pixel by the weight map
(Ronneberger et al. 2015, §3: E = sum_x w(x) log p_l(x)(x), minimised as -E), and the centre
crop that aligns full-tile labels with the smaller logits of an unpadded net.

Kept apart from `losses.py` (mmseg's losses with mmseg's reductions): this loss is not mmseg's.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from unet_jax.losses import F32_EPS, cross_entropy_per_pixel, pixel_accuracy
from unet_jax.models.unet2015 import centre_crop


def weighted_cross_entropy(logits: jax.Array, labels: jax.Array, weights: jax.Array, *,
                           ignore_index: int = 255) -> jax.Array:
    """sum_x w(x) * -log p_label(x) over (N, H, W), divided by N*H*W (+ eps): scalar float32.

    Pixels labelled `ignore_index` contribute 0 whatever their weight.
    """
    per_pixel = cross_entropy_per_pixel(logits, labels, ignore_index=ignore_index)
    total = jnp.sum(per_pixel * weights.astype(per_pixel.dtype))
    return total / (jnp.asarray(per_pixel.size, per_pixel.dtype) + F32_EPS)


def weighted_segmentation_loss(logits: jax.Array, labels: jax.Array, weights: jax.Array,
                               loss_cfg: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(total, terms) as `losses.segmentation_loss` logs them (`decode.loss_ce`,
    `decode.acc_seg`), with the weighted cross-entropy; labels and weights are centre-cropped
    to the logits' size."""
    h, w = logits.shape[1], logits.shape[2]
    labels = centre_crop(labels, h, w).astype(jnp.int32)
    weights = centre_crop(weights, h, w)
    ce = loss_cfg.ce_weight * weighted_cross_entropy(logits, labels, weights,
                                                      ignore_index=loss_cfg.ignore_index)
    acc = pixel_accuracy(logits, labels, ignore_index=loss_cfg.ignore_index)
    return ce, {"decode.loss_ce": ce, "decode.acc_seg": acc}
