"""mmsegmentation's training augmentation as plain numpy/cv2 functions with explicit randomness.

Spec §6.2: RandomResize -> RandomCrop(cat_max_ratio) -> RandomFlip -> PhotoMetricDistortion
(on the BGR uint8 image) -> BGR->RGB + (x - mean) / std -> pad to the crop size (0 / 255).

Images are **BGR uint8** here, as cv2 (and so mmseg) decodes them; `normalise` is the step that
returns RGB. The pipeline (`pipeline.py`) converts the RGB TFDS images to BGR once when it caches
them. All randomness goes through a small `Draws` interface whose calls mirror the numpy calls
mmseg makes (`randint(2)`, `uniform(-32, 32)`, ...), so the fixtures' scripted draws can be
replayed with `ScriptedDraws`; `GeneratorDraws` wraps a `numpy.random.Generator` for real use.
cv2 is used for resizing and the HSV round trips because only cv2 reproduces cv2 bit-exactly.

Two implementations of the same maths:
* the reference, structured like mmseg (`random_resize`, `random_crop`, `random_flip`,
  `photometric_distortion`, `normalise`, `pad_to`, composed by `train_sample`), checked against
  the mmseg fixtures;
* the fast path the pipeline runs (`fast_transforms.py`: `sample_params` -> `train_batch`):
  every draw made up front
  (`AugParams`), the resize computed only inside the chosen crop window by an integer emulation
  of cv2's bilinear/nearest resize, the cat_max_ratio candidates checked vectorised, and the
  photometric distortion vectorised over the batch. `ParamDraws` feeds the same `AugParams` to
  the reference, and the tests check the two paths are equal bit for bit.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import cv2
import numpy as np

from unet_jax.sizes import rescale_size

IGNORE_INDEX = 255
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
def hflip(image: np.ndarray, label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Horizontal flip of image and label."""
    return image[:, ::-1, ...], label[:, ::-1]


def random_flip(image: np.ndarray, label: np.ndarray, rng: np.random.Generator | Draws,
                prob: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """mmcv `RandomFlip(prob)`, horizontal: flip with probability `prob`."""
    if as_draws(rng).random() < prob:
        return hflip(image, label)
    return image, label


# ------------------------------------------------------------------------ photometric (BGR)
def _convert(img: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    """clip(img.astype(float32) * alpha + beta, 0, 255).astype(uint8), float32 arithmetic."""
    out = img.astype(np.float32) * np.float32(alpha) + np.float32(beta)
    return np.clip(out, 0, 255).astype(np.uint8)


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
def normalise(img_bgr: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """SegDataPreProcessor: BGR->RGB, float32, (x - mean) / std with RGB-order mean/std."""
    if img_bgr.ndim != 3 or img_bgr.shape[2] != 3:
        raise ValueError(f"image: expected HxWx3 BGR, found shape {img_bgr.shape}")
    rgb = img_bgr[:, :, ::-1].astype(np.float32)
    return (rgb - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


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


def eval_image(image_bgr: np.ndarray, data_cfg: Any) -> np.ndarray:
    """Test pipeline image: keep-ratio resize to data.img_scale (identity at native size),
    normalised RGB."""
    img, _ = resize_keep_ratio(image_bgr, None, data_cfg.img_scale)
    return normalise(img, data_cfg.mean, data_cfg.std)
