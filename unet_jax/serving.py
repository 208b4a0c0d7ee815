"""What an exported SavedModel runs in TensorFlow ops around the JAX test pipeline
(`unet_jax.cli.export`): only what jax2tf shape polymorphism cannot express.

The keep-ratio size of mmseg's test resize is not a polynomial of the image's H and W (a
min of two ratios, rounded), so the resize to it, and to the TTA views' sizes, is done here:

* `rescale_size`: mmcv's keep-ratio size rule in float64, so it gives Python's result
  (`unet_jax.preprocess.rescale_size`);
* `resize_uint8`: cv2's INTER_LINEAR on uint8, bit for bit: the source taps and 11-bit weights of
  `unet_jax.data.augment._linear_taps` (computed in float64 then float32 as cv2 does), the
  horizontal pass in int32, `>> 4`, the vertical pass `((b0 * h0) >> 16) + ((b1 * h1) >> 16)`,
  `+ 2 >> 2` (the tests compare it with cv2 itself);
* `segment`: the resize, then the JAX pipeline (`scores_fn`: normalise, slide or whole
  inference, logits flipped back and resized to the image's size, all with symbolic sizes), and
  with TTA the loop over mmseg's multi-scale + flip views, merged in probability space;
* `first_argmax`: the labels (a binary model's: the sigmoid above `eval.threshold`).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import tensorflow as tf

ScoresFn = Callable[[tf.Tensor, tf.Tensor, tf.Tensor], tf.Tensor]
RESIZE_COEF_SCALE = 2048  # cv2's INTER_RESIZE_COEF_SCALE (11 fractional bits)


# ------------------------------------------------------------------------------ sizes
def rescale_size(height: tf.Tensor, width: tf.Tensor, scale: Sequence[Any],
                 ) -> tuple[tf.Tensor, tf.Tensor]:
    """`unet_jax.preprocess.rescale_size` on int32 scalars; `scale` (long, short) may be tensors.

    sf = min(long / max(h, w), short / min(h, w)); size = max(int(x * sf + 0.5), 1), in float64.
    """
    h, w = tf.cast(height, tf.float64), tf.cast(width, tf.float64)
    first, second = (tf.cast(s, tf.float64) for s in scale)
    long_edge, short_edge = tf.maximum(first, second), tf.minimum(first, second)
    sf = tf.minimum(long_edge / tf.maximum(h, w), short_edge / tf.minimum(h, w))
    return (tf.maximum(tf.cast(tf.floor(h * sf + 0.5), tf.int32), 1),
            tf.maximum(tf.cast(tf.floor(w * sf + 0.5), tf.int32), 1))


def tta_view_size(height: tf.Tensor, width: tf.Tensor, ratio: float,
                  ) -> tuple[tf.Tensor, tf.Tensor]:
    """`unet_jax.preprocess.tta_view_hw`: mmseg's `Resize(scale_factor=ratio, keep_ratio=True)`."""
    h, w = tf.cast(height, tf.float64), tf.cast(width, tf.float64)
    ratio = tf.constant(float(ratio), tf.float64)
    target = (tf.floor(w * ratio + 0.5), tf.floor(h * ratio + 0.5))
    return rescale_size(height, width, target)


# ------------------------------------------------------------------------------ cv2 resize
def cv2_linear_taps(src_len: tf.Tensor, dst_len: tf.Tensor, clamp: bool,
                    ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor, tf.Tensor]:
    """cv2 INTER_LINEAR (8-bit) taps of every destination index: (s0, s1, w0, w1), int32.

    The same rule as `unet_jax.data.augment._linear_taps`: f = float32((d + 0.5) / (dst / src)
    - 0.5) in float64, s = floor(f), f -= s, weights rint((1 - f) * 2048), rint(f * 2048);
    columns (`clamp`) pin s and f at the borders, rows only clip the two source indices.
    """
    src_len = tf.cast(src_len, tf.int32)
    d = tf.range(dst_len, dtype=tf.float64)
    scale = 1.0 / (tf.cast(dst_len, tf.float64) / tf.cast(src_len, tf.float64))
    f = tf.cast((d + 0.5) * scale - 0.5, tf.float32)
    s = tf.cast(tf.floor(f), tf.int32)
    f = f - tf.cast(s, tf.float32)
    if clamp:
        low, high = s < 0, s >= src_len - 1
        f = tf.where(low | high, tf.zeros_like(f), f)
        s = tf.where(low, tf.zeros_like(s), tf.where(high, tf.fill(tf.shape(s), src_len - 1), s))
    w0 = tf.cast(tf.math.rint((1.0 - f) * RESIZE_COEF_SCALE), tf.int32)
    w1 = tf.cast(tf.math.rint(f * RESIZE_COEF_SCALE), tf.int32)
    return (tf.clip_by_value(s, 0, src_len - 1), tf.clip_by_value(s + 1, 0, src_len - 1), w0, w1)


def resize_uint8(image: tf.Tensor, height: tf.Tensor, width: tf.Tensor) -> tf.Tensor:
    """`cv2.resize(image, (width, height), interpolation=cv2.INTER_LINEAR)` of a uint8
    (H, W, C) image, bit-exact (cv2's fixed-point path). The same size gives the image back."""
    shape = tf.shape(image)
    y0, y1, b0, b1 = cv2_linear_taps(shape[0], height, clamp=False)
    x0, x1, a0, a1 = cv2_linear_taps(shape[1], width, clamp=True)
    img = tf.cast(image, tf.int32)
    horizontal = (tf.gather(img, x0, axis=1) * a0[None, :, None]
                  + tf.gather(img, x1, axis=1) * a1[None, :, None])
    horizontal = tf.bitwise.right_shift(horizontal, 4)
    top = tf.bitwise.right_shift(b0[:, None, None] * tf.gather(horizontal, y0), 16)
    bottom = tf.bitwise.right_shift(b1[:, None, None] * tf.gather(horizontal, y1), 16)
    return tf.cast(tf.bitwise.right_shift(top + bottom + 2, 2), tf.uint8)


# ------------------------------------------------------------------------------ the pipeline
def segment(scores_fn: ScoresFn, image: tf.Tensor, config: Any) -> tuple[tf.Tensor, tf.Tensor]:
    """`unet_jax.inference.segment` of one uint8 RGB (H, W, 3) image -> (scores (H, W, C)
    float32, labels (H, W) uint8).

    `scores_fn(view, image, flip)` is `unet_jax.inference.view_scores` of a uint8 view
    converted with jax2tf: the view's logits (flipped back if `flip`) at `image`'s size. scores
    are those of the keep-ratio resize to data.img_scale, or with config.eval.tta the
    view-averaged probabilities; labels their argmax (ties: the lowest class id).
    """
    image = tf.convert_to_tensor(image)
    shape = tf.shape(image)
    height, width = shape[0], shape[1]
    checks = [tf.debugging.assert_equal(shape[2], 3, message="image: expected H x W x 3 RGB"),
              tf.debugging.assert_positive(height * width, message="image: expected H, W >= 1")]
    with tf.control_dependencies(checks):
        image = tf.identity(image)
    if not config.eval.tta:
        resized = resize_uint8(image, *rescale_size(height, width, tuple(config.data.img_scale)))
        scores = scores_fn(resized, image, tf.constant(False))
        return scores, _labels(scores, config, probabilities=False)
    total = 0.0
    scales = tuple(float(r) for r in config.eval.tta_scales)
    for ratio in scales:
        resized = resize_uint8(image, *tta_view_size(height, width, ratio))
        for flip in (False, True):
            view = tf.reverse(resized, [1]) if flip else resized
            logits = scores_fn(view, image, tf.constant(flip))
            total += (tf.sigmoid(logits) if logits.shape[-1] == 1
                      else tf.nn.softmax(logits, axis=-1))
    scores = total / (2 * len(scales))
    return scores, _labels(scores, config, probabilities=True)


def _labels(scores: tf.Tensor, config: Any, *, probabilities: bool) -> tf.Tensor:
    """`inference.labels_of` in TensorFlow: the first argmax, or for a binary model (one
    channel; the channel count is static) 1 where the foreground probability exceeds
    config.eval.threshold."""
    if scores.shape[-1] != 1:
        return first_argmax(scores)
    fg = scores[..., 0] if probabilities else tf.sigmoid(scores[..., 0])
    return tf.cast(fg > float(config.eval.threshold), tf.uint8)


def first_argmax(scores: tf.Tensor) -> tf.Tensor:
    """uint8 argmax over the last axis, the lowest index among ties (as `jnp.argmax`; TF's
    argmax leaves ties unspecified)."""
    top = tf.reduce_max(scores, axis=-1, keepdims=True)
    ids = tf.range(tf.shape(scores)[-1], dtype=tf.int32)
    first = tf.reduce_min(tf.where(scores == top, ids, tf.int32.max), axis=-1)
    return tf.cast(first, tf.uint8)
