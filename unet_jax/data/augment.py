"""mmsegmentation's training augmentation, fast and bit-equal to mmseg's transforms.

The train pipeline of every zoo config (mmseg/datasets/transforms: RandomResize(ratio 0.5-2,
keep ratio) -> RandomCrop(cat_max_ratio 0.75) -> RandomFlip(0.5) -> PhotoMetricDistortion on the
BGR uint8 image -> BGR->RGB + (x - mean) / std -> pad to the crop size with 0 / 255). Every random
draw is made up front (`AugParams`, `sample_params`); the keep-ratio resize is computed only
inside the chosen crop window by an integer emulation of cv2's bilinear/nearest resize; the
cat_max_ratio candidates are checked vectorised; the photometric distortion runs vectorised over
the batch (`train_batch`). Images are BGR uint8, as cv2 (and so mmseg) decodes them; `normalise`
returns RGB.

The tests replay the same `AugParams` through an implementation structured exactly like mmseg's
transforms (tests/mmseg_reference.py, itself checked against mmseg's outputs) and check that both
give identical bytes (data/TRANSFORMS.md).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import cv2
import numpy as np

from unet_jax import preprocess
from unet_jax.preprocess import rescale_size

IGNORE_INDEX = 255


# ------------------------------------------------------------------------ shared primitives
def resize_keep_ratio(image: np.ndarray, label: np.ndarray | None,
                      scale: Sequence[float]) -> tuple[np.ndarray, np.ndarray | None]:
    """mmseg `Resize(scale, keep_ratio=True)`: image cv2 INTER_LINEAR, label INTER_NEAREST."""
    h, w = image.shape[:2]
    new_h, new_w = rescale_size(h, w, scale)
    if (new_h, new_w) != (h, w):
        image = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_LINEAR)
    if label is not None:
        if label.shape[:2] != (h, w):
            raise ValueError(f"label shape: expected {(h, w)} (the image's), found {label.shape}")
        if (new_h, new_w) != (h, w):
            label = cv2.resize(label, (new_w, new_h), interpolation=cv2.INTER_NEAREST)
    return image, label


def hflip(image: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Horizontal flip of image and label."""
    return image[:, ::-1, ...], label[:, ::-1]


def _convert(img: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    """clip(img.astype(float32) * alpha + beta, 0, 255).astype(uint8), float32 arithmetic."""
    out = img.astype(np.float32) * np.float32(alpha) + np.float32(beta)
    return np.clip(out, 0, 255).astype(np.uint8)


def normalise(img_bgr: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """SegDataPreProcessor on a BGR image: BGR->RGB, then `unet_jax.preprocess.normalise`."""
    if img_bgr.ndim != 3 or img_bgr.shape[2] != 3:
        raise ValueError(f"image: expected HxWx3 BGR, found shape {img_bgr.shape}")
    return preprocess.normalise(img_bgr[:, :, ::-1], mean, std)


# ------------------------------------------------------------- pre-drawn parameters (fast path)
NUM_CROP_DRAWS = 11  # one bbox + 10 re-draws (the last unchecked)
BRIGHTNESS_DELTA, CONTRAST_RANGE, SATURATION_RANGE, HUE_DELTA = 32, (0.5, 1.5), (0.5, 1.5), 18


@dataclass(frozen=True)
class AugParams:
    """Every random choice of one training sample, drawn up front (a fixed number of draws).

    Uniforms in [0, 1) stand for draws whose range depends on the data: `ratio_u` (resize
    ratio), `offset_u` (11 x (h, w) bbox offsets, randint(n) = floor(u * n)) and `flip_u`.
    """
    ratio_u: float
    offset_u: np.ndarray
    flip_u: float
    brightness: bool
    beta: float
    mode: int
    contrast: bool
    contrast_alpha: float
    saturation: bool
    saturation_alpha: float
    hue: bool
    hue_shift: int


def sample_params(rng: np.random.Generator) -> AugParams:
    """Draw an `AugParams` from `rng` (33 uniforms, one call)."""
    u = rng.random(33)
    lo_c, hi_c = CONTRAST_RANGE
    lo_s, hi_s = SATURATION_RANGE
    return AugParams(
        ratio_u=float(u[0]), offset_u=u[1:23].reshape(NUM_CROP_DRAWS, 2), flip_u=float(u[23]),
        brightness=bool(u[24] < 0.5), beta=float(u[25] * 2 * BRIGHTNESS_DELTA - BRIGHTNESS_DELTA),
        mode=int(u[26] < 0.5), contrast=bool(u[27] < 0.5),
        contrast_alpha=float(lo_c + u[28] * (hi_c - lo_c)),
        saturation=bool(u[29] < 0.5), saturation_alpha=float(lo_s + u[30] * (hi_s - lo_s)),
        hue=bool(u[31] < 0.5),
        hue_shift=min(int(u[32] * 2 * HUE_DELTA), 2 * HUE_DELTA - 1) - HUE_DELTA)


# -------------------------------------------------------- exact cv2 resize of a window (fast path)
def _linear_taps(dst: np.ndarray, src_len: int, dst_len: int, clamp: bool,
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """cv2 INTER_LINEAR (8-bit, fixed point) source taps and 11-bit weights of dst indices.

    fx = float32((d + 0.5) * (1 / (dst_len / src_len)) - 0.5), s = floor(fx), fx -= s; weights
    rint((1 - fx) * 2048), rint(fx * 2048). Columns (`clamp`) pin s and fx at the borders; rows
    keep their weights and only clip the two source rows, as cv2 does.
    """
    f = ((dst.astype(np.float64) + 0.5) * (1.0 / (dst_len / src_len)) - 0.5).astype(np.float32)
    s = np.floor(f).astype(np.int64)
    f -= s.astype(np.float32)
    if clamp:
        low, high = s < 0, s >= src_len - 1
        f[low | high] = 0
        s[low], s[high] = 0, src_len - 1
    w0 = np.rint((np.float32(1) - f) * np.float32(2048)).astype(np.int32)
    w1 = np.rint(f * np.float32(2048)).astype(np.int32)
    return np.clip(s, 0, src_len - 1), np.clip(s + 1, 0, src_len - 1), w0, w1


@lru_cache(maxsize=2048)
def _linear_table(src_len: int, dst_len: int, clamp: bool) -> np.ndarray:
    """`_linear_taps` of every dst index as one read-only (4, dst_len) int32 table (cached)."""
    table = np.stack(_linear_taps(np.arange(dst_len), src_len, dst_len, clamp)).astype(np.int32)
    table.setflags(write=False)
    return table


@lru_cache(maxsize=2048)
def _nearest_table(src_len: int, dst_len: int) -> np.ndarray:
    """`nearest_index` of every dst index, read-only (cached)."""
    table = nearest_index(np.arange(dst_len), src_len, dst_len)
    table.setflags(write=False)
    return table


def resize_linear_window(image: np.ndarray, out_hw: Sequence[int], rows: np.ndarray | slice,
                         cols: np.ndarray | slice) -> np.ndarray:
    """`cv2.resize(image, out_hw[::-1], INTER_LINEAR)[rows][:, cols]` of a uint8 image, computing
    only that window.

    Integer emulation of cv2's fixed-point bilinear path (horizontal S0*a0 + S1*a1, vertical
    `(((b0 * (H0 >> 4)) >> 16) + ((b1 * (H1 >> 4)) >> 16) + 2) >> 2`); tests check it against cv2.
    """
    if image.dtype != np.uint8:
        raise ValueError(f"image: expected uint8, found {image.dtype}")
    (src_h, src_w), (dst_h, dst_w) = image.shape[:2], out_hw
    y0, y1, b0, b1 = _linear_table(src_h, dst_h, False)[:, rows]
    x0, x1, a0, a1 = _linear_table(src_w, dst_w, True)[:, cols]
    img = image if image.ndim == 3 else image[:, :, None]
    top = int(y0[0]) if len(y0) else 0
    slab = img[top:int(y1[-1]) + 1] if len(y1) else img[:0]  # the source rows read (a view)
    horizontal = slab.take(x0, axis=1).astype(np.int32)
    horizontal *= a0[None, :, None]
    horizontal += slab.take(x1, axis=1).astype(np.int32) * a1[None, :, None]
    horizontal >>= 4
    out = (b0[:, None, None] * horizontal[y0 - top]) >> 16
    out += (b1[:, None, None] * horizontal[y1 - top]) >> 16
    out += 2
    out >>= 2
    return out.astype(np.uint8).reshape((len(y0), len(x0)) + image.shape[2:])


def nearest_index(dst: np.ndarray, src_len: int, dst_len: int) -> np.ndarray:
    """cv2 INTER_NEAREST source index of dst indices d:
    min(floor(d * (1 / (dst_len / src_len))), src_len - 1)."""
    return np.minimum((dst * (1.0 / (dst_len / src_len))).astype(np.int64), src_len - 1)  # d >= 0


def _accepted_many(crops: np.ndarray, cat_max_ratio: float, ignore_index: int) -> np.ndarray:
    """`crop_accepted` of each crop in a (K, h, w) uint8 stack."""
    k = crops.shape[0]
    if ignore_index > 1 and crops.max() <= 1:  # binary labels (retinal sets): two counts suffice
        ones = crops.reshape(k, -1).sum(1, dtype=np.int64)
        zeros = crops[0].size - ones
        return (ones > 0) & (zeros > 0) & (np.maximum(ones, zeros) / crops[0].size < cat_max_ratio)
    counts = np.bincount((crops.reshape(k, -1).astype(np.int64)
                          + 256 * np.arange(k)[:, None]).ravel(), minlength=256 * k)
    counts = counts.reshape(k, 256)
    counts[:, ignore_index] = 0
    total = counts.sum(1)
    return ((counts > 0).sum(1) > 1) & (counts.max(1) / np.maximum(total, 1) < cat_max_ratio)


def resize_crop(image: np.ndarray, label: np.ndarray, p: AugParams, img_scale: Sequence[int],
                ratio_range: Sequence[float], crop_size: Sequence[int],
                cat_max_ratio: float = 0.75, ignore_index: int = IGNORE_INDEX,
                ) -> tuple[np.ndarray, np.ndarray]:
    """RandomResize + RandomCrop from pre-drawn parameters, = `random_crop(*random_resize(...))`.

    Only the crop window is interpolated (cv2-exact); the candidate bboxes are checked in two
    vectorised rounds (the first, then the other nine), which picks the same bbox as mmseg's loop.
    """
    if image.shape[:2] != label.shape[:2]:
        raise ValueError(f"label shape: expected {image.shape[:2]}, found {label.shape}")
    h, w = label.shape
    lo, hi = ratio_range
    r = p.ratio_u * (hi - lo) + lo
    new_h, new_w = rescale_size(h, w, (int(img_scale[0] * r), int(img_scale[1] * r)))
    ch, cw = crop_size
    margins = np.array([max(new_h - ch, 0) + 1, max(new_w - cw, 0) + 1])
    offsets = np.minimum((p.offset_u * margins).astype(np.int64), margins - 1)  # floor(u * n)
    oh, ow = offsets[:, 0], offsets[:, 1]
    nh, nw = min(ch, new_h), min(cw, new_w)  # a crop larger than the image is clipped
    same = (new_h, new_w) == (h, w)
    rows_nh, cols_nw = np.arange(nh), np.arange(nw)
    src_rows, src_cols = _nearest_table(h, new_h), _nearest_table(w, new_w)

    def label_crops(ks: slice) -> np.ndarray:
        rows = src_rows[oh[ks, None] + rows_nh]
        cols = src_cols[ow[ks, None] + cols_nw]
        return label.reshape(-1).take(rows[:, :, None] * w + cols[:, None, :])

    pick, lab = 0, None
    if cat_max_ratio < 1.0:
        first = label_crops(slice(0, 1))
        if _accepted_many(first, cat_max_ratio, ignore_index)[0]:
            lab = first[0]
        else:
            rest = label_crops(slice(1, NUM_CROP_DRAWS - 1))
            ok = np.flatnonzero(_accepted_many(rest, cat_max_ratio, ignore_index))
            pick = int(ok[0]) + 1 if len(ok) else NUM_CROP_DRAWS - 1
            lab = rest[pick - 1] if len(ok) else None
    if lab is None:
        lab = label_crops(slice(pick, pick + 1))[0]
    y, x = int(oh[pick]), int(ow[pick])
    if same:
        return image[y:y + nh, x:x + nw], lab
    return resize_linear_window(image, (new_h, new_w), slice(y, y + nh), slice(x, x + nw)), lab


def photometric_batch(images: np.ndarray, params: Sequence[AugParams]) -> np.ndarray:
    """`photometric_distortion` of each BGR uint8 image of a (B, h, w, 3) stack, vectorised.

    Per-image steps run on the sub-batch that draws them (an unused HSV round trip is lossy, so
    it must be skipped, not applied with factor 1); cv2 colour conversions are per pixel.
    """
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(
            f"images: expected uint8 (B, h, w, 3), found {images.dtype} {images.shape}")
    if len(params) != len(images):
        raise ValueError(f"params: expected {len(images)}, found {len(params)}")
    x = images.copy()
    _, h, w, _ = x.shape

    def select(flags: list[bool]) -> np.ndarray:
        return np.flatnonzero(np.asarray(flags, bool))

    def scalar(values: list[float], idx: np.ndarray) -> np.ndarray:
        return np.asarray(values, np.float32)[idx][:, None, None, None]

    def contrast_step(mode: int) -> None:
        idx = select([p.contrast and p.mode == mode for p in params])
        if len(idx):
            x[idx] = _convert(x[idx], alpha=scalar([p.contrast_alpha for p in params], idx))

    def hsv_step(flags: list[bool], update: Any) -> None:
        idx = select(flags)
        if len(idx):
            hsv = cv2.cvtColor(x[idx].reshape(-1, w, 3), cv2.COLOR_BGR2HSV).reshape(-1, h, w, 3)
            update(hsv, idx)
            x[idx] = cv2.cvtColor(hsv.reshape(-1, w, 3), cv2.COLOR_HSV2BGR).reshape(-1, h, w, 3)

    def sat(hsv: np.ndarray, idx: np.ndarray) -> None:
        alpha = scalar([p.saturation_alpha for p in params], idx)[..., 0]
        hsv[..., 1] = _convert(hsv[..., 1], alpha=alpha)

    def hue_shift(hsv: np.ndarray, idx: np.ndarray) -> None:
        shift = np.asarray([p.hue_shift for p in params], np.int64)[idx][:, None, None]
        hsv[..., 0] = (hsv[..., 0].astype(np.int64) + shift) % 180

    idx = select([p.brightness for p in params])
    if len(idx):
        x[idx] = _convert(x[idx], beta=scalar([p.beta for p in params], idx))
    contrast_step(1)
    hsv_step([p.saturation for p in params], sat)
    hsv_step([p.hue for p in params], hue_shift)
    contrast_step(0)
    return x


def train_batch(images: Sequence[np.ndarray], labels: Sequence[np.ndarray],
                params: Sequence[AugParams], data_cfg: Any) -> tuple[np.ndarray, np.ndarray]:
    """The train pipeline on a batch of BGR images from pre-drawn parameters (the fast path).

    Returns float32 (B, ch, cw, 3) normalised RGB and int32 (B, ch, cw) labels, equal sample
    by sample to `train_sample(image, label, ParamDraws(p), data_cfg)`.
    """
    ch, cw = (int(v) for v in data_cfg.crop_size)
    crops, labs = [], []
    for image, label, p in zip(images, labels, params, strict=True):
        img, lab = resize_crop(image, label, p, data_cfg.img_scale, data_cfg.ratio_range,
                               (ch, cw), data_cfg.cat_max_ratio)
        if p.flip_u < data_cfg.flip_prob:
            img, lab = hflip(img, lab)
        crops.append(img)
        labs.append(lab)
    full = [k for k, c in enumerate(crops) if c.shape[:2] == (ch, cw)]
    if len(full) == len(crops):  # the usual case: one vectorised pass, no padding
        stack = np.stack(crops)
        if data_cfg.photometric:
            stack = photometric_batch(stack, params)
        return (preprocess.normalise(stack[..., ::-1], data_cfg.mean, data_cfg.std),
                np.stack(labs).astype(np.int32))
    out = np.zeros((len(crops), ch, cw, 3), np.float32)
    out_lab = np.full((len(crops), ch, cw), IGNORE_INDEX, np.int32)
    for k, (img, lab, p) in enumerate(zip(crops, labs, params)):
        if data_cfg.photometric:
            img = photometric_batch(img[None], [p])[0]
        gh, gw = img.shape[:2]
        out[k, :gh, :gw] = normalise(img, data_cfg.mean, data_cfg.std)
        out_lab[k, :gh, :gw] = lab
    return out, out_lab
