"""mmsegmentation's training augmentation structured exactly as mmseg's transforms: the oracle.

Used only by the tests: each function mirrors one mmseg/mmcv transform
(mmseg/datasets/transforms/transforms.py: RandomCrop, PhotoMetricDistortion; mmcv/transforms/
processing.py: RandomResize, RandomFlip; mmseg/models/data_preprocessor.py: normalise and pad),
with all randomness through a `Draws` interface whose calls mirror the numpy calls mmseg makes
(`randint(2)`, `uniform(-32, 32)`, ...), so the fixtures' scripted draws replay with
`ScriptedDraws`. tests/test_transforms.py checks it against mmseg's outputs, and the fast path
the pipeline runs (`unet_jax.data.augment`) against it, through `ParamDraws`, bit for bit.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import cv2
import numpy as np

from unet_jax.data.augment import (IGNORE_INDEX, AugParams, _convert, hflip, normalise,
                                   resize_keep_ratio)
from unet_jax.preprocess import rescale_size

BBox = tuple[int, int, int, int]  # (y1, y2, x1, x2), as mmseg's crop_bbox


@runtime_checkable
class Draws(Protocol):
    """The random draws mmseg's transforms make, with numpy's legacy `RandomState` semantics."""

    def randint(self, low: int, high: int | None = None) -> int:
        """Integer in [0, low) if `high` is None, else in [low, high)."""

    def uniform(self, low: float, high: float) -> float:
        """Float in [low, high)."""

    def random(self) -> float:
        """Float in [0, 1) (`np.random.random_sample`)."""


class GeneratorDraws:
    """`Draws` backed by a `numpy.random.Generator`."""

    def __init__(self, rng: np.random.Generator):
        self.rng = rng

    def randint(self, low: int, high: int | None = None) -> int:
        if high is None:
            low, high = 0, low
        return int(self.rng.integers(low, high))

    def uniform(self, low: float, high: float) -> float:
        return float(self.rng.uniform(low, high))

    def random(self) -> float:
        return float(self.rng.random())


class ScriptedDraws:
    """`Draws` that replays `[function, args, value]` triples and checks each call against them.

    The format is the fixture README's (e.g. `[["randint", [2], 1], ["uniform", [-32, 32], 20.7]]`).
    """

    def __init__(self, script: Sequence[Sequence[Any]]):
        self.script = [(str(f), [a for a in args], v) for f, args, v in script]
        self.pos = 0

    def _next(self, fn: str, args: list[Any]) -> Any:
        if self.pos >= len(self.script):
            raise AssertionError(
                f"scripted draws exhausted: expected {len(self.script)} draws, found a call "
                f"{fn}{tuple(args)} as draw {self.pos + 1}")
        want_fn, want_args, value = self.script[self.pos]
        if want_fn != fn or [float(a) for a in want_args] != [float(a) for a in args]:
            raise AssertionError(
                f"scripted draw {self.pos}: expected {want_fn}{tuple(want_args)}, "
                f"found {fn}{tuple(args)}")
        self.pos += 1
        return value

    def randint(self, low: int, high: int | None = None) -> int:
        return int(self._next("randint", [low] if high is None else [low, high]))

    def uniform(self, low: float, high: float) -> float:
        return float(self._next("uniform", [low, high]))

    def random(self) -> float:
        return float(self._next("random_sample", []))

    @property
    def done(self) -> bool:
        """True when every scripted draw has been consumed."""
        return self.pos == len(self.script)


def as_draws(rng: np.random.Generator | Draws) -> Draws:
    """Wrap a numpy Generator as `Draws`; pass a `Draws` through."""
    if isinstance(rng, np.random.Generator):
        return GeneratorDraws(rng)
    if isinstance(rng, (GeneratorDraws, ScriptedDraws)) or isinstance(rng, Draws):
        return rng
    raise TypeError(f"rng: expected numpy.random.Generator or Draws, found {type(rng).__name__}")


# ------------------------------------------------------------------------------------ resize
def random_scale(rng: np.random.Generator | Draws, img_scale: Sequence[int],
                 ratio_range: Sequence[float] = (0.5, 2.0)) -> tuple[int, int]:
    """mmcv RandomResize's target: r = U[0,1) * (hi - lo) + lo; (int(s0 * r), int(s1 * r))."""
    lo, hi = ratio_range
    r = as_draws(rng).random() * (hi - lo) + lo
    return int(img_scale[0] * r), int(img_scale[1] * r)


def random_resize(image: np.ndarray, label: np.ndarray, rng: np.random.Generator | Draws,
                  img_scale: Sequence[int], ratio_range: Sequence[float] = (0.5, 2.0),
                  ) -> tuple[np.ndarray, np.ndarray]:
    """mmcv `RandomResize(scale=img_scale, ratio_range, keep_ratio=True)` on (image, label)."""
    image, out_label = resize_keep_ratio(image, label, random_scale(rng, img_scale, ratio_range))
    assert out_label is not None
    return image, out_label


# -------------------------------------------------------------------------------------- crop
def crop_bbox(shape: Sequence[int], crop_size: Sequence[int],
              rng: np.random.Generator | Draws) -> BBox:
    """One random bbox: offsets randint(0, max(H - ch, 0) + 1) then the same for W."""
    draws = as_draws(rng)
    ch, cw = crop_size
    oh = draws.randint(0, max(shape[0] - ch, 0) + 1)
    ow = draws.randint(0, max(shape[1] - cw, 0) + 1)
    return oh, oh + ch, ow, ow + cw


def crop(array: np.ndarray, bbox: BBox) -> np.ndarray:
    """array[y1:y2, x1:x2] (clipped at the border, as mmseg)."""
    y1, y2, x1, x2 = bbox
    return array[y1:y2, x1:x2, ...]


def crop_accepted(label_crop: np.ndarray, cat_max_ratio: float,
                  ignore_index: int = IGNORE_INDEX) -> bool:
    """mmseg's test: >= 2 classes (ignore excluded) and max count / total < cat_max_ratio."""
    counts = np.bincount(label_crop.ravel(), minlength=256)
    counts[ignore_index] = 0
    present = counts[counts > 0]
    return len(present) > 1 and present.max() / present.sum() < cat_max_ratio


def random_crop_bbox(label: np.ndarray, crop_size: Sequence[int], rng: np.random.Generator | Draws,
                     cat_max_ratio: float = 0.75, ignore_index: int = IGNORE_INDEX) -> BBox:
    """mmseg RandomCrop's bbox: one draw, then up to 10 checked re-draws; the 11th is unchecked."""
    draws = as_draws(rng)
    bbox = crop_bbox(label.shape, crop_size, draws)
    if cat_max_ratio < 1.0:
        for _ in range(10):
            if crop_accepted(crop(label, bbox), cat_max_ratio, ignore_index):
                break
            bbox = crop_bbox(label.shape, crop_size, draws)
    return bbox


def random_crop(image: np.ndarray, label: np.ndarray, rng: np.random.Generator | Draws,
                crop_size: Sequence[int], cat_max_ratio: float = 0.75,
                ignore_index: int = IGNORE_INDEX) -> tuple[np.ndarray, np.ndarray]:
    """mmseg `RandomCrop(crop_size, cat_max_ratio, ignore_index)` on an (image, label) pair."""
    if image.shape[:2] != label.shape[:2]:
        raise ValueError(f"label shape: expected {image.shape[:2]}, found {label.shape}")
    bbox = random_crop_bbox(label, crop_size, rng, cat_max_ratio, ignore_index)
    return crop(image, bbox), crop(label, bbox)


# -------------------------------------------------------------------------------------- flip
def random_flip(image: np.ndarray, label: np.ndarray, rng: np.random.Generator | Draws,
                prob: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """mmcv `RandomFlip(prob)`, horizontal: flip with probability `prob`."""
    if as_draws(rng).random() < prob:
        return hflip(image, label)
    return image, label


# ------------------------------------------------------------------------ photometric (BGR)
def brightness(img: np.ndarray, draws: Draws, delta: float = 32) -> np.ndarray:
    """With p=0.5 add beta ~ U(-delta, delta)."""
    if draws.randint(2):
        return _convert(img, beta=draws.uniform(-delta, delta))
    return img


def contrast(img: np.ndarray, draws: Draws, lower: float = 0.5, upper: float = 1.5) -> np.ndarray:
    """With p=0.5 multiply by alpha ~ U(lower, upper)."""
    if draws.randint(2):
        return _convert(img, alpha=draws.uniform(lower, upper))
    return img


def saturation(img: np.ndarray, draws: Draws, lower: float = 0.5,
               upper: float = 1.5) -> np.ndarray:
    """With p=0.5 scale S of cv2's uint8 HSV by alpha ~ U(lower, upper) and convert back."""
    if draws.randint(2):
        hsv = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
        hsv[:, :, 1] = _convert(hsv[:, :, 1], alpha=draws.uniform(lower, upper))
        return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
    return img


def hue(img: np.ndarray, draws: Draws, delta: int = 18) -> np.ndarray:
    """With p=0.5 shift H (cv2 uint8 HSV, [0, 180)) by randint(-delta, delta): -delta..delta-1."""
    if draws.randint(2):
        hsv = cv2.cvtColor(img, cv2.COLOR_BGR2HSV)
        shift = draws.randint(-delta, delta)
        hsv[:, :, 0] = (hsv[:, :, 0].astype(np.int64) + shift) % 180
        return cv2.cvtColor(hsv, cv2.COLOR_HSV2BGR)
    return img


def photometric_distortion(img_bgr: np.ndarray, rng: np.random.Generator | Draws,
                           brightness_delta: float = 32,
                           contrast_range: Sequence[float] = (0.5, 1.5),
                           saturation_range: Sequence[float] = (0.5, 1.5),
                           hue_delta: int = 18) -> np.ndarray:
    """mmseg `PhotoMetricDistortion` on a BGR uint8 image (mode 1: contrast before HSV steps)."""
    if img_bgr.dtype != np.uint8 or img_bgr.ndim != 3 or img_bgr.shape[2] != 3:
        raise ValueError(f"image: expected uint8 HxWx3 BGR, found {img_bgr.dtype} {img_bgr.shape}")
    draws = as_draws(rng)
    img = np.ascontiguousarray(img_bgr)
    img = brightness(img, draws, brightness_delta)
    mode = draws.randint(2)
    if mode == 1:
        img = contrast(img, draws, *contrast_range)
    img = saturation(img, draws, *saturation_range)
    img = hue(img, draws, hue_delta)
    if mode == 0:
        img = contrast(img, draws, *contrast_range)
    return img


# ---------------------------------------------------------------------- normalise and pad
def pad_to(image: np.ndarray, label: np.ndarray | None, size: Sequence[int],
           pad_val: float = 0.0, seg_pad_val: int = IGNORE_INDEX,
           ) -> tuple[np.ndarray, np.ndarray | None]:
    """Pad bottom/right to `size` (h, w): image with `pad_val`, label with `seg_pad_val`."""
    h, w = image.shape[:2]
    th, tw = size
    if h > th or w > tw:
        raise ValueError(f"pad_to: expected an image at most {tuple(size)}, found {(h, w)}")
    if (h, w) != (th, tw):
        out = np.full((th, tw) + image.shape[2:], pad_val, image.dtype)
        out[:h, :w] = image
        image = out
        if label is not None:
            lab = np.full((th, tw), seg_pad_val, label.dtype)
            lab[:h, :w] = label
            label = lab
    return image, label


# ----------------------------------------------------------- reference composition (mmseg)
def train_sample(image_bgr: np.ndarray, label: np.ndarray, rng: np.random.Generator | Draws,
                 data_cfg: Any) -> tuple[np.ndarray, np.ndarray]:
    """The train pipeline on one BGR image, structured exactly as mmseg (full cv2 resize).

    `data_cfg` needs img_scale, crop_size, ratio_range, cat_max_ratio, flip_prob, photometric,
    mean, std (config.data). Returns (float32 crop_h x crop_w x 3 normalised RGB, int32 label).
    This is the reference; the pipeline runs `train_batch`, which gives the same output.
    """
    draws = as_draws(rng)
    img, lab = random_resize(image_bgr, label, draws, data_cfg.img_scale, data_cfg.ratio_range)
    img, lab = random_crop(img, lab, draws, data_cfg.crop_size, data_cfg.cat_max_ratio)
    img, lab = random_flip(img, lab, draws, data_cfg.flip_prob)
    if data_cfg.photometric:
        img = photometric_distortion(img, draws)
    out, out_lab = pad_to(normalise(img, data_cfg.mean, data_cfg.std), lab.astype(np.int32),
                          data_cfg.crop_size)
    assert out_lab is not None
    return out, out_lab


def _scaled_int(u: float, n: int) -> int:
    """randint(n) from a uniform: floor(u * n), kept below n against float rounding."""
    return min(int(u * n), n - 1)


class ParamDraws:
    """`Draws` that answers the reference pipeline's calls from an `AugParams`.

    Calls are told apart by signature: random() -> ratio then flip; randint(0, n) -> the bbox
    offsets in order; randint(2) -> the PMD coin flips in mmseg's order; uniform(a, b) -> the PMD
    amounts in order; randint(-d, d) -> the hue shift. With it, `train_sample` consumes exactly
    the randomness `train_batch` uses, so the two can be compared bit for bit.
    """

    def __init__(self, p: AugParams):
        self.randoms = [p.ratio_u, p.flip_u]
        self.offsets = list(p.offset_u.ravel())
        c1, c0 = (p.contrast, None) if p.mode == 1 else (None, p.contrast)
        self.coins = [int(c) for c in (p.brightness, p.mode, c1, p.saturation, p.hue, c0)
                      if c is not None]
        amounts = [(p.brightness, p.beta), (p.mode == 1 and p.contrast, p.contrast_alpha),
                   (p.saturation, p.saturation_alpha),
                   (p.mode == 0 and p.contrast, p.contrast_alpha)]
        self.amounts = [v for use, v in amounts if use]
        self.hue_shift = p.hue_shift

    def randint(self, low: int, high: int | None = None) -> int:
        if high is None and low == 2:
            return self.coins.pop(0)
        if high is not None and low == 0:
            return _scaled_int(self.offsets.pop(0), high)
        if high is not None and low == -high:
            return self.hue_shift
        raise ValueError(f"ParamDraws: unexpected call randint{(low, high)}")

    def uniform(self, low: float, high: float) -> float:
        return self.amounts.pop(0)

    def random(self) -> float:
        return self.randoms.pop(0)
