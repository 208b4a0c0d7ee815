"""Segmentation losses with mmsegmentation's exact reductions
(mmseg/models/losses/cross_entropy_loss.py, dice_loss.py, utils.py weight_reduce_loss).

Layout: logits are NHWC float arrays (N, H, W, C); labels are integer arrays (N, H, W) with
`ignore_index` (255) marking pixels without a label. Everything is computed in float32 whatever
the logits dtype (bfloat16 logits included), or in float64 for float64 logits (the float64
reference model); every function here is jit-able and differentiable in the logits.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# the package's one torch-bilinear resize, under the name the losses use for it
from unet_jax.models.layers import resize_bilinear as resize_logits_to


# torch.finfo(torch.float32).eps: mmseg adds it to every averaging denominator.
F32_EPS = float(np.finfo(np.float32).eps)


def _float(x: jax.Array) -> jax.Array:
    """`x` in its accumulation dtype: float32, or float64 when `x` is float64."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _check_logits_labels(logits: jax.Array, labels: jax.Array) -> None:
    if logits.ndim != 4:
        raise ValueError(f"logits must be NHWC (N, H, W, C); found shape {tuple(logits.shape)}")
    if tuple(labels.shape) != tuple(logits.shape[:3]):
        raise ValueError(
            f"labels must have shape (N, H, W) = {tuple(logits.shape[:3])} to match the logits; "
            f"found {tuple(labels.shape)}")


def cross_entropy_per_pixel(logits: jax.Array, labels: jax.Array, *,
                            ignore_index: int = 255) -> jax.Array:
    """Per-pixel softmax cross entropy (N, H, W) in float32, 0 at pixels labelled `ignore_index`."""
    _check_logits_labels(logits, labels)
    num_classes = logits.shape[-1]
    labels = labels.astype(jnp.int32)
    logp = jax.nn.log_softmax(_float(logits), axis=-1)
    valid = labels != ignore_index
    safe = jnp.clip(jnp.where(valid, labels, 0), 0, num_classes - 1)
    nll = -jnp.take_along_axis(logp, safe[..., None], axis=-1)[..., 0]
    return jnp.where(valid, nll, 0.0)


def cross_entropy(logits: jax.Array, labels: jax.Array, *, ignore_index: int = 255,
                  avg_non_ignore: bool = False) -> jax.Array:
    """mmseg `CrossEntropyLoss` (no class weights, loss_weight 1): scalar float32.

    The per-pixel sum is divided by N*H*W + eps (ignored pixels count in the denominator), or by
    the number of non-ignored pixels + eps when `avg_non_ignore` is True.
    """
    per_pixel = cross_entropy_per_pixel(logits, labels, ignore_index=ignore_index)
    if avg_non_ignore:
        count = jnp.sum(labels != ignore_index).astype(per_pixel.dtype)
    else:
        count = jnp.asarray(per_pixel.size, per_pixel.dtype)
    return jnp.sum(per_pixel) / (count + F32_EPS)


def _drop_channel(x: jax.Array, index: int) -> jax.Array:
    """Drop channel `index` of the last axis if it exists (mmseg's Dice `ignore_index` filter)."""
    c = x.shape[-1]
    if 0 <= index < c:
        keep = np.arange(c) != index
        return x[..., keep]
    return x


def dice_loss_v1(logits: jax.Array, labels: jax.Array, *, ignore_index: int = 255,
                 eps: float = 1e-3) -> jax.Array:
    """mmseg 1.1.2-1.2.2 `DiceLoss` defaults (sigmoid, naive_dice False), loss_weight 1
    (mmseg/models/losses/dice_loss.py in 1.2.2).

    Labels outside [0, C) become an all-zero one-hot row, but their predictions still count.
    Sums run per sample over C*H*W together; the result is the batch mean of 1 - dice.
    """
    _check_logits_labels(logits, labels)
    num_classes = logits.shape[-1]
    pred = jax.nn.sigmoid(_float(logits))
    clamped = jnp.clip(labels.astype(jnp.int32), 0, num_classes)
    target = jax.nn.one_hot(clamped, num_classes + 1, dtype=pred.dtype)[..., :num_classes]
    pred = _drop_channel(pred, ignore_index)
    target = _drop_channel(target, ignore_index)
    n = pred.shape[0]
    pred = pred.reshape(n, -1)
    target = target.reshape(n, -1)
    a = jnp.sum(pred * target, axis=1)
    b = jnp.sum(pred * pred, axis=1) + eps
    c = jnp.sum(target * target, axis=1) + eps
    return jnp.mean(1.0 - 2.0 * a / (b + c))


def dice_loss_legacy(logits: jax.Array, labels: jax.Array, *, ignore_index: int = 255,
                     smooth: float = 1.0, exponent: int = 2) -> jax.Array:
    """mmseg 0.x-1.0.0 `DiceLoss` (softmax, per-class binary dice averaged over C), weight 1
    (mmseg/models/losses/dice_loss.py up to 1.0.0).

    A pixel labelled `ignore_index` is one-hot encoded as class C-1 and masked only in the
    numerator, exactly as the loss that trained the published ce+dice checkpoints.
    """
    _check_logits_labels(logits, labels)
    num_classes = logits.shape[-1]
    labels = labels.astype(jnp.int32)
    pred = jax.nn.softmax(_float(logits), axis=-1)
    target = jax.nn.one_hot(jnp.clip(labels, 0, num_classes - 1), num_classes, dtype=pred.dtype)
    valid = (labels != ignore_index).astype(pred.dtype)[..., None]
    num = 2.0 * jnp.sum(pred * target * valid, axis=(1, 2)) + smooth            # (N, C)
    den = jnp.sum(pred ** exponent + target ** exponent, axis=(1, 2)) + smooth  # (N, C)
    per_class = jnp.mean(1.0 - num / den, axis=0)                               # (C,)
    if 0 <= ignore_index < num_classes:
        per_class = per_class * (np.arange(num_classes) != ignore_index)
    return jnp.sum(per_class) / num_classes


def pixel_accuracy(logits: jax.Array, labels: jax.Array, ignore_index: int = 255) -> jax.Array:
    """mmseg `accuracy(topk=1)`: percent of non-ignored pixels whose argmax equals the label."""
    _check_logits_labels(logits, labels)
    labels = labels.astype(jnp.int32)
    valid = labels != ignore_index
    pred = jnp.argmax(logits, axis=-1)
    correct = jnp.sum((pred == labels) & valid).astype(jnp.float32) + F32_EPS
    total = jnp.sum(valid).astype(jnp.float32) + F32_EPS
    return jax.lax.stop_gradient(correct * (100.0 / total))


def segmentation_loss(decode_logits: jax.Array, aux_logits: jax.Array | None, labels: jax.Array,
                      loss_cfg: Any) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The EncoderDecoder training objective and the terms mmseg logs
    (mmseg/models/decode_heads/decode_head.py loss_by_feat; mmengine BaseModel.parse_losses).

    `loss_cfg` is `config.loss` (read at trace time; validated by `check_config`). Both logits are bilinearly resized to the
    label size first. Returns (total, terms) with terms `decode.loss_ce`, [`decode.loss_dice`,]
    [`aux.loss_ce`,] `decode.acc_seg`[, `aux.acc_seg`], weights applied; total sums the losses.
    """
    name, dice_form = loss_cfg.name, loss_cfg.dice_form
    ignore_index, avg_non_ignore = loss_cfg.ignore_index, loss_cfg.avg_non_ignore
    ce_weight, dice_weight = loss_cfg.ce_weight, loss_cfg.dice_weight
    aux_weight = loss_cfg.aux_weight

    if labels.ndim != 3:
        raise ValueError(f"labels must be (N, H, W); found shape {tuple(labels.shape)}")
    labels = labels.astype(jnp.int32)
    hw = (labels.shape[1], labels.shape[2])

    terms: dict[str, jax.Array] = {}
    dec = resize_logits_to(_float(decode_logits), hw)
    terms["decode.loss_ce"] = ce_weight * cross_entropy(
        dec, labels, ignore_index=ignore_index, avg_non_ignore=avg_non_ignore)
    if name == "ce_dice":
        dice_fn = dice_loss_legacy if dice_form == "legacy" else dice_loss_v1
        terms["decode.loss_dice"] = dice_weight * dice_fn(dec, labels, ignore_index=ignore_index)
    terms["decode.acc_seg"] = pixel_accuracy(dec, labels, ignore_index=ignore_index)
    if aux_logits is not None:
        aux = resize_logits_to(_float(aux_logits), hw)
        terms["aux.loss_ce"] = aux_weight * cross_entropy(
            aux, labels, ignore_index=ignore_index, avg_non_ignore=avg_non_ignore)
        terms["aux.acc_seg"] = pixel_accuracy(aux, labels, ignore_index=ignore_index)
    total = sum(v for k, v in terms.items() if "loss" in k)
    return total, terms
