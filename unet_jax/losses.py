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


def _per_sample(weight: jax.Array | None, ndim: int, dtype: Any) -> jax.Array | float:
    """A per-sample weight (N,) shaped to broadcast against an (N, ...) array of `ndim` axes."""
    if weight is None:
        return 1.0
    return jnp.asarray(weight, dtype).reshape((-1,) + (1,) * (ndim - 1))


def cross_entropy(logits: jax.Array, labels: jax.Array, *, ignore_index: int = 255,
                  avg_non_ignore: bool = False, class_weight: Any = None,
                  weight: jax.Array | None = None) -> jax.Array:
    """mmseg `CrossEntropyLoss` (softmax, loss_weight 1): scalar float32.

    The per-pixel sum is divided by N*H*W + eps (ignored pixels count in the denominator), or by
    the number of non-ignored pixels + eps when `avg_non_ignore` is True. `class_weight` (C,)
    weighs each pixel's loss by its class and divides by the sum of those weights + eps instead.
    mmseg 1.2.2 raises IndexError for any ignored pixel once class weights are set (it looks
    up `class_weight[255]`); here ignored pixels weigh 0 in the denominator, as torch's own
    weighted mean and mmseg's `avg_non_ignore=True` intent, so `avg_non_ignore` changes
    nothing with class weights. `weight` (N,) weighs each sample's pixels (mmseg's element-wise
    `weight` broadcast over the pixels; not in the denominator).
    """
    per_pixel = cross_entropy_per_pixel(logits, labels, ignore_index=ignore_index)
    valid = labels != ignore_index
    if class_weight is not None:
        cw = jnp.asarray(class_weight, per_pixel.dtype)
        safe = jnp.clip(jnp.where(valid, labels, 0), 0, cw.shape[0] - 1)
        pixel_weight = jnp.where(valid, cw[safe], 0.0)
        per_pixel = per_pixel * pixel_weight
        count = jnp.sum(pixel_weight)
    elif avg_non_ignore:
        count = jnp.sum(valid).astype(per_pixel.dtype)
    else:
        count = jnp.asarray(per_pixel.size, per_pixel.dtype)
    per_pixel = per_pixel * _per_sample(weight, 3, per_pixel.dtype)
    return jnp.sum(per_pixel) / (count + F32_EPS)


def binary_cross_entropy(logits: jax.Array, labels: jax.Array, *, ignore_index: int = 255,
                         avg_non_ignore: bool = False, pos_weight: Any = None,
                         weight: jax.Array | None = None) -> jax.Array:
    """mmseg `CrossEntropyLoss(use_sigmoid=True)`: per-channel sigmoid cross entropy, scalar.

    With C > 1 channels the target is the one-hot label; with one channel (binary segmentation,
    mmseg's `out_channels=1`) it is the label itself (0 or 1). Ignored pixels weigh 0. The sum
    is divided by N*H*W*C (plain mean, ignored elements included, no eps) or, with
    `avg_non_ignore`, by the number of non-ignored elements + eps. `pos_weight` (mmseg's
    `class_weight` here: torch's `pos_weight`, one value per channel or a single value) weighs
    the positive term. `weight` (N,) weighs each sample's elements, as in `cross_entropy`.
    """
    _check_logits_labels(logits, labels)
    x = _float(logits)
    num_channels = x.shape[-1]
    labels = labels.astype(jnp.int32)
    valid = (labels >= 0) & (labels != ignore_index)
    safe = jnp.where(valid, labels, 0)
    if num_channels == 1:
        target = safe[..., None].astype(x.dtype)
    else:
        target = jax.nn.one_hot(safe, num_channels, dtype=x.dtype)
    mask = jnp.broadcast_to(valid[..., None], x.shape).astype(x.dtype)
    pw = 1.0 if pos_weight is None else jnp.asarray(pos_weight, x.dtype)
    # torch's binary_cross_entropy_with_logits: (1 - y) x + (1 + (pw - 1) y) softplus(-x)
    loss = (1.0 - target) * x + (1.0 + (pw - 1.0) * target) * jax.nn.softplus(-x)
    loss = loss * mask * _per_sample(weight, 4, x.dtype)
    if avg_non_ignore:
        return jnp.sum(loss) / (jnp.sum(mask) + F32_EPS)
    return jnp.mean(loss)


def _drop_channel(x: jax.Array, index: int) -> jax.Array:
    """Drop channel `index` of the last axis if it exists (mmseg's Dice `ignore_index` filter)."""
    c = x.shape[-1]
    if 0 <= index < c:
        keep = np.arange(c) != index
        return x[..., keep]
    return x


def dice_loss_v1(logits: jax.Array, labels: jax.Array, *, ignore_index: int = 255,
                 eps: float = 1e-3, naive_dice: bool = False, weight: jax.Array | None = None,
                 binary_target: str = "background") -> jax.Array:
    """mmseg 1.1.2-1.2.2 `DiceLoss` (sigmoid, activate), loss_weight 1
    (mmseg/models/losses/dice_loss.py in 1.2.2).

    Labels outside [0, C) become an all-zero one-hot row, but their predictions still count.
    Sums run per sample over C*H*W together; the result is the batch mean of 1 - dice, each
    sample's term times `weight` (N,) if given. `naive_dice` is the first-power form
    (2a + eps) / (sum p + sum t + eps) instead of V-Net's 2a / (sum p^2 + sum t^2 + 2 eps).
    With one channel (binary segmentation) mmseg's one-hot target is the column of class 0,
    the background, against the sigmoid that its CE and its prediction read as the foreground
    (a bug): `binary_target="background"` keeps that, "foreground" compares with label == 1.
    """
    _check_logits_labels(logits, labels)
    num_classes = logits.shape[-1]
    pred = jax.nn.sigmoid(_float(logits))
    labels = labels.astype(jnp.int32)
    if num_classes == 1 and binary_target == "foreground":
        target = (labels == 1)[..., None].astype(pred.dtype)
    else:
        clamped = jnp.clip(labels, 0, num_classes)
        target = jax.nn.one_hot(clamped, num_classes + 1, dtype=pred.dtype)[..., :num_classes]
    pred = _drop_channel(pred, ignore_index)
    target = _drop_channel(target, ignore_index)
    n = pred.shape[0]
    pred = pred.reshape(n, -1)
    target = target.reshape(n, -1)
    a = jnp.sum(pred * target, axis=1)
    if naive_dice:
        dice = (2.0 * a + eps) / (jnp.sum(pred, axis=1) + jnp.sum(target, axis=1) + eps)
    else:
        b = jnp.sum(pred * pred, axis=1) + eps
        c = jnp.sum(target * target, axis=1) + eps
        dice = 2.0 * a / (b + c)
    return jnp.mean((1.0 - dice) * _per_sample(weight, 1, pred.dtype))


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
                      loss_cfg: Any, sample_weight: jax.Array | None = None,
                      ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """The EncoderDecoder training objective and the terms mmseg logs
    (mmseg/models/decode_heads/decode_head.py loss_by_feat; mmengine BaseModel.parse_losses).

    `loss_cfg` is `config.loss` (read at trace time; validated by `check_config`). Both logits
    are bilinearly resized to the label size first. CE is the softmax one, or the sigmoid one
    with `use_sigmoid` or one output channel (binary; `class_weight` is then its pos_weight);
    the decode and auxiliary heads share the CE options, as mmseg configs that set them on both.
    `sample_weight` (N,) weighs each sample in every term (mmseg's `weight` argument, which its
    legacy Dice drops, as here). Returns (total, terms) with terms `decode.loss_ce`,
    [`decode.loss_dice`,] [`aux.loss_ce`,] `decode.acc_seg`[, `aux.acc_seg`], weights applied;
    total sums the losses. With one channel `acc_seg` is, as mmseg's top-1 of one channel, the
    percentage of pixels labelled 0.
    """
    c = loss_cfg
    if labels.ndim != 3:
        raise ValueError(f"labels must be (N, H, W); found shape {tuple(labels.shape)}")
    labels = labels.astype(jnp.int32)
    hw = (labels.shape[1], labels.shape[2])
    binary = decode_logits.shape[-1] == 1
    class_weight = tuple(c.class_weight) or None
    common = dict(ignore_index=c.ignore_index, avg_non_ignore=c.avg_non_ignore,
                  weight=sample_weight)

    def ce(logits: jax.Array) -> jax.Array:
        if c.use_sigmoid or binary:
            return binary_cross_entropy(logits, labels, pos_weight=class_weight, **common)
        return cross_entropy(logits, labels, class_weight=class_weight, **common)

    terms: dict[str, jax.Array] = {}
    dec = resize_logits_to(_float(decode_logits), hw)
    terms["decode.loss_ce"] = c.ce_weight * ce(dec)
    if c.name == "ce_dice":
        if c.dice_form == "legacy" and not binary:
            dice = dice_loss_legacy(dec, labels, ignore_index=c.ignore_index)
        else:
            dice = dice_loss_v1(dec, labels, ignore_index=c.ignore_index,
                                naive_dice=c.naive_dice, weight=sample_weight,
                                binary_target=c.dice_binary_target)
        terms["decode.loss_dice"] = c.dice_weight * dice
    terms["decode.acc_seg"] = pixel_accuracy(dec, labels, ignore_index=c.ignore_index)
    if aux_logits is not None:
        aux = resize_logits_to(_float(aux_logits), hw)
        terms["aux.loss_ce"] = c.aux_weight * ce(aux)
        terms["aux.acc_seg"] = pixel_accuracy(aux, labels, ignore_index=c.ignore_index)
    total = sum(v for k, v in terms.items() if "loss" in k)
    return total, terms
