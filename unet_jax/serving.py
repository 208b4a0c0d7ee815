"""mmseg's test pipeline in TensorFlow ops, for images of any size: what an exported SavedModel
runs around the model forward (`unet_jax.export`).

Each function mirrors the numpy/JAX code that `unet_jax.predict` runs (`unet_jax.inference`,
`unet_jax.sizes`, `unet_jax.losses.resize_logits_to`), written with dynamic shapes because in a
SavedModel the image size is known only when it is served:

* `rescale_size`: mmcv's keep-ratio size rule in float64, so it gives Python's result;
* `resize_uint8`: cv2's INTER_LINEAR on uint8, bit for bit: the source taps and 11-bit weights of
  `unet_jax.data.augment._linear_taps` (computed in float64 then float32 as cv2 does), the
  horizontal pass in int32, `>> 4`, the vertical pass `((b0 * h0) >> 16) + ((b1 * h1) >> 16)`,
  `+ 2 >> 2` (the tests compare it with cv2 itself);
* `normalise`: (x - mean) / std in float32;
* `slide_inference`: mmseg's ceil-divided window grid whose last row/column is aligned to the
  bottom/right edge; windows are cut with one gather per batch of `batch_windows` (the last
  batch filled with dummy windows, as `unet_jax.inference` does, so the forward always sees one
  shape), a window smaller than the crop is zero-padded to a multiple of the size divisor and
  its logits cropped back, logits are scatter-added into a canvas and divided by the per-pixel
  window count;
* `whole_inference`: one forward on the image zero-padded to a multiple of the divisor, logits
  cropped back;
* `resize_logits`: torch's bilinear (align_corners=False) with float64 source coordinates,
  as `resize_logits_to`;
* `tta_inference`: mmseg's multi-scale + flip views, merged in probability space.

`forward` is any callable (N, h, w, 3) float32 normalised -> (N, h, w, C) float32 logits whose h
and w are multiples of the size divisor (the jax2tf-converted model in a SavedModel).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import tensorflow as tf

Forward = Callable[[tf.Tensor], tf.Tensor]
RESIZE_COEF_SCALE = 2048  # cv2's INTER_RESIZE_COEF_SCALE (11 fractional bits)


# ------------------------------------------------------------------------------ sizes
def rescale_size(height: tf.Tensor, width: tf.Tensor, scale: Sequence[Any],
                 ) -> tuple[tf.Tensor, tf.Tensor]:
    """`unet_jax.sizes.rescale_size` on int32 scalars; `scale` (long, short) may be tensors.

    sf = min(long / max(h, w), short / min(h, w)); size = int(x * sf + 0.5), all in float64.
    """
    h, w = tf.cast(height, tf.float64), tf.cast(width, tf.float64)
    first, second = (tf.cast(s, tf.float64) for s in scale)
    long_edge, short_edge = tf.maximum(first, second), tf.minimum(first, second)
    sf = tf.minimum(long_edge / tf.maximum(h, w), short_edge / tf.minimum(h, w))
    return (tf.cast(tf.floor(h * sf + 0.5), tf.int32),
            tf.cast(tf.floor(w * sf + 0.5), tf.int32))


def tta_view_size(height: tf.Tensor, width: tf.Tensor, ratio: float,
                  ) -> tuple[tf.Tensor, tf.Tensor]:
    """`unet_jax.inference.tta_view_hw`: mmseg's `Resize(scale_factor=ratio, keep_ratio=True)`."""
    h, w = tf.cast(height, tf.float64), tf.cast(width, tf.float64)
    ratio = tf.constant(float(ratio), tf.float64)
    target = (tf.floor(w * ratio + 0.5), tf.floor(h * ratio + 0.5))
    return rescale_size(height, width, target)


def _round_up(n: tf.Tensor, divisor: int) -> tf.Tensor:
    return (n + divisor - 1) // divisor * divisor


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


def normalise(image: tf.Tensor, mean: Sequence[float], std: Sequence[float]) -> tf.Tensor:
    """uint8 RGB (H, W, 3) -> float32 (x - mean) / std (`unet_jax.inference.normalise`)."""
    return ((tf.cast(image, tf.float32) - tf.constant(mean, tf.float32))
            / tf.constant(std, tf.float32))


# ------------------------------------------------------------------------------ logits resize
def torch_linear_taps(n_in: tf.Tensor, n_out: tf.Tensor,
                      ) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
    """torch bilinear (align_corners=False) taps along one axis: i0, i1 (int32), lam (float32);
    `unet_jax.losses._linear_taps` with the source coordinate in float64."""
    n_in64 = tf.cast(n_in, tf.float64)
    src = (tf.range(n_out, dtype=tf.float64) + 0.5) * (n_in64 / tf.cast(n_out, tf.float64)) - 0.5
    src = tf.maximum(src, 0.0)
    i0 = tf.minimum(tf.cast(tf.floor(src), tf.int32), n_in - 1)
    i1 = tf.minimum(i0 + 1, n_in - 1)
    return i0, i1, tf.cast(src - tf.cast(i0, tf.float64), tf.float32)


def resize_logits(logits: tf.Tensor, height: tf.Tensor, width: tf.Tensor) -> tf.Tensor:
    """(h, w, C) float32 logits -> (height, width, C), torch bilinear, rows then columns."""
    shape = tf.shape(logits)
    h0, h1, lh = torch_linear_taps(shape[0], height)
    lh = lh[:, None, None]
    x = tf.gather(logits, h0) * (1.0 - lh) + tf.gather(logits, h1) * lh
    w0, w1, lw = torch_linear_taps(shape[1], width)
    lw = lw[None, :, None]
    return tf.gather(x, w0, axis=1) * (1.0 - lw) + tf.gather(x, w1, axis=1) * lw


# ------------------------------------------------------------------------------ inference
def window_starts(length: tf.Tensor, crop: int, stride: int) -> tf.Tensor:
    """Start offsets of mmseg's slide windows along one axis (`unet_jax.inference.slide_windows`):
    ceil(max(L - crop, 0) / stride) + 1 windows, the last one ending at the edge."""
    grids = tf.maximum(length - crop + stride - 1, 0) // stride + 1
    ends = tf.minimum(tf.range(grids) * stride + crop, length)
    return tf.maximum(ends - crop, 0)


def _coverage(length: tf.Tensor, starts: tf.Tensor, size: tf.Tensor) -> tf.Tensor:
    """How many windows [start, start + size) cover each index of range(length), float32."""
    i = tf.range(length)[:, None]
    inside = (i >= starts[None, :]) & (i < starts[None, :] + size)
    return tf.reduce_sum(tf.cast(inside, tf.float32), axis=1)


def slide_inference(forward: Forward, image: tf.Tensor, crop: Sequence[int],
                    stride: Sequence[int], num_classes: int, *, batch_windows: int,
                    size_divisor: int) -> tf.Tensor:
    """mmseg slide inference of one normalised (H, W, 3) float32 image -> (H, W, C) logits.

    Raw logits of overlapping windows are averaged (`unet_jax.inference.slide_inference`).
    """
    (hc, wc), (hs, ws), batch = (int(v) for v in crop), (int(v) for v in stride), batch_windows
    shape = tf.shape(image)
    height, width = shape[0], shape[1]
    wh, ww = tf.minimum(hc, height), tf.minimum(wc, width)
    ph, pw = _round_up(wh, size_divisor), _round_up(ww, size_divisor)
    ys, xs = window_starts(height, hc, hs), window_starts(width, wc, ws)
    count = _coverage(height, ys, wh)[:, None] * _coverage(width, xs, ww)[None, :]
    n_rows, n_cols = tf.size(ys), tf.size(xs)
    total = n_rows * n_cols
    num_batches = (total + batch - 1) // batch
    slots = num_batches * batch  # row-major windows, then dummy ones at (0, 0)
    win_y = tf.pad(tf.repeat(ys, n_cols), [[0, slots - total]])
    win_x = tf.pad(tf.tile(xs, [n_rows]), [[0, slots - total]])
    valid = tf.range(slots) < total
    rows, cols = tf.range(wh), tf.range(ww)

    def body(k: tf.Tensor, canvas: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        picked = tf.range(k * batch, (k + 1) * batch)
        y = tf.gather(win_y, picked)[:, None, None] + rows[None, :, None]
        x = tf.gather(win_x, picked)[:, None, None] + cols[None, None, :]
        index = tf.stack([tf.broadcast_to(y, [batch, wh, ww]),
                          tf.broadcast_to(x, [batch, wh, ww])], axis=-1)
        windows = tf.gather_nd(image, index)
        windows = tf.pad(windows, [[0, 0], [0, ph - wh], [0, pw - ww], [0, 0]])
        logits = forward(windows)[:, :wh, :ww, :num_classes]
        keep = tf.gather(valid, picked)[:, None, None, None]
        logits = tf.where(keep, logits, tf.zeros_like(logits))
        return k + 1, tf.tensor_scatter_nd_add(canvas, index, logits)

    canvas = tf.zeros(tf.stack([height, width, num_classes]), tf.float32)
    _, canvas = tf.while_loop(lambda k, _: k < num_batches, body, (tf.constant(0), canvas))
    return canvas / count[:, :, None]


def whole_inference(forward: Forward, image: tf.Tensor, num_classes: int, *,
                    size_divisor: int) -> tf.Tensor:
    """One forward on the normalised (H, W, 3) image, zero-padded bottom/right to a multiple of
    the divisor, logits cropped back (`unet_jax.inference.whole_inference`)."""
    shape = tf.shape(image)
    height, width = shape[0], shape[1]
    ph, pw = _round_up(height, size_divisor), _round_up(width, size_divisor)
    padded = tf.pad(image, [[0, ph - height], [0, pw - width], [0, 0]])
    return forward(padded[None])[0, :height, :width, :num_classes]


def inference(forward: Forward, image: tf.Tensor, eval_cfg: Any, num_classes: int, *,
              size_divisor: int) -> tf.Tensor:
    """Slide or whole inference per `eval_cfg.mode` (config.eval) -> (H, W, C) logits."""
    if eval_cfg.mode == "slide":
        return slide_inference(forward, image, tuple(eval_cfg.crop_size),
                               tuple(eval_cfg.stride), num_classes,
                               batch_windows=int(eval_cfg.batch_windows),
                               size_divisor=size_divisor)
    return whole_inference(forward, image, num_classes, size_divisor=size_divisor)


def tta_inference(forward: Forward, image: tf.Tensor, config: Any, *,
                  size_divisor: int) -> tf.Tensor:
    """mmseg multi-scale + flip TTA of a uint8 RGB image -> averaged probabilities (H, W, C)
    (`unet_jax.inference.tta_inference`)."""
    shape = tf.shape(image)
    height, width = shape[0], shape[1]
    num_classes, data = int(config.model.num_classes), config.data
    scales = tuple(float(r) for r in config.eval.tta_scales)
    total = tf.zeros(tf.stack([height, width, num_classes]), tf.float32)
    for ratio in scales:
        resized = resize_uint8(image, *tta_view_size(height, width, ratio))
        for flip in (False, True):
            view = resized[:, ::-1] if flip else resized
            logits = inference(forward, normalise(view, data.mean, data.std), config.eval,
                               num_classes, size_divisor=size_divisor)
            if flip:
                logits = logits[:, ::-1]
            total += tf.nn.softmax(resize_logits(logits, height, width), axis=-1)
    return total / (2 * len(scales))


def segment(forward: Forward, image: tf.Tensor, config: Any, *, size_divisor: int = 16,
            ) -> tuple[tf.Tensor, tf.Tensor]:
    """`unet_jax.inference.segment` of one uint8 RGB (H, W, 3) image -> (scores (H, W, C)
    float32, labels (H, W) uint8).

    scores are the logits at the original size (keep-ratio resize to data.img_scale, normalise,
    slide/whole inference, logits resized back), or with config.eval.tta the view-averaged
    probabilities; labels their argmax (ties: the lowest class id).
    """
    image = tf.convert_to_tensor(image)
    shape = tf.shape(image)
    height, width = shape[0], shape[1]
    checks = [tf.debugging.assert_equal(shape[2], 3, message="image: expected H x W x 3 RGB"),
              tf.debugging.assert_positive(height * width, message="image: expected H, W >= 1")]
    with tf.control_dependencies(checks):
        image = tf.identity(image)
    data, num_classes = config.data, int(config.model.num_classes)
    if config.eval.tta:
        scores = tta_inference(forward, image, config, size_divisor=size_divisor)
    else:
        resized = resize_uint8(image, *rescale_size(height, width, tuple(data.img_scale)))
        logits = inference(forward, normalise(resized, data.mean, data.std), config.eval,
                           num_classes, size_divisor=size_divisor)
        scores = resize_logits(logits, height, width)
    return scores, first_argmax(scores)


def first_argmax(scores: tf.Tensor) -> tf.Tensor:
    """uint8 argmax over the last axis, the lowest index among ties (as `jnp.argmax`; TF's
    argmax leaves ties unspecified)."""
    top = tf.reduce_max(scores, axis=-1, keepdims=True)
    ids = tf.range(tf.shape(scores)[-1], dtype=tf.int32)
    first = tf.reduce_min(tf.where(scores == top, ids, tf.int32.max), axis=-1)
    return tf.cast(first, tf.uint8)
