"""The original U-Net's training augmentation (Ronneberger et al. 2015, §3.1) and weight map (§3).

One sample = one input tile of `data.crop_size` cut from a training image around a random
centre (shift), mirrored horizontally / vertically (flips), rotated by a random angle, warped by
an elastic deformation and changed in grey value. All geometric steps are one map from tile
pixels to source coordinates, sampled once: the image bicubically (spline order 3), the label by
nearest neighbour (order 0, so its values stay a subset of the input's), the weight map
linearly; coordinates outside the image read its mirror image (as overlap-tile inference fills
the context). Elastic deformation: displacement vectors on a coarse 3 x 3 grid drawn from a
Gaussian with std 10 px, interpolated bicubically to every pixel (cv2 INTER_CUBIC).

Every random draw is made up front (`ElasticParams`, `sample_params`) from one numpy Generator,
so a sample is a pure function of (seed, index) like `unet_jax.data.augment` and resume stays
bit-exact. The ranges the paper leaves open (`data.elastic`: rotation, grey values) are the
config's, each marked there with its source. scipy.ndimage does the spline sampling, the
connected components and the distance transforms.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
from scipy import ndimage

from unet_jax import preprocess

IGNORE_INDEX = 255


@dataclass(frozen=True)
class ElasticParams:
    """Every random choice of one sample: the tile centre (y, x) in source pixels, flips, the
    rotation (radians), the coarse displacement grid (2, g, g) in px, grey gain and offset."""
    centre: tuple[float, float]
    flip_y: bool
    flip_x: bool
    angle: float
    grid: np.ndarray
    gain: float
    offset: float


def sample_params(rng: np.random.Generator, image_hw: Sequence[int], cfg: Any) -> ElasticParams:
    """Draw an `ElasticParams` for an image of `image_hw` from `rng` (a fixed number of draws).

    `cfg` holds grid_points, sigma (px), max_angle (degrees), gain (lo, hi), offset (lo, hi:
    grey levels of 0..255).
    """
    u = rng.random(7)
    g = int(cfg.grid_points)
    grid = rng.normal(0.0, float(cfg.sigma), (2, g, g))
    height, width = (int(v) for v in image_hw)
    (g_lo, g_hi), (o_lo, o_hi) = cfg.gain, cfg.offset
    return ElasticParams(
        centre=(float(u[0] * (height - 1)), float(u[1] * (width - 1))),
        flip_y=bool(u[2] < 0.5), flip_x=bool(u[3] < 0.5),
        angle=float(np.deg2rad((2 * u[4] - 1) * float(cfg.max_angle))),
        grid=grid, gain=float(g_lo + u[5] * (g_hi - g_lo)),
        offset=float(o_lo + u[6] * (o_hi - o_lo)))


def displacement(grid: np.ndarray, tile_hw: Sequence[int]) -> np.ndarray:
    """The per-pixel displacement (2, h, w) float32: the coarse grid resized bicubically."""
    h, w = (int(v) for v in tile_hw)
    return np.stack([cv2.resize(np.asarray(g, np.float32), (w, h), interpolation=cv2.INTER_CUBIC)
                     for g in grid])


def source_coordinates(p: ElasticParams, tile_hw: Sequence[int]) -> np.ndarray:
    """Where each tile pixel reads the source image: (2, h, w) float64 (y, x) coordinates."""
    h, w = (int(v) for v in tile_hw)
    vy, vx = np.meshgrid(np.arange(h) - (h - 1) / 2, np.arange(w) - (w - 1) / 2, indexing="ij")
    if p.flip_y:
        vy = -vy
    if p.flip_x:
        vx = -vx
    cos, sin = np.cos(p.angle), np.sin(p.angle)
    ry, rx = cos * vy - sin * vx, sin * vy + cos * vx
    d = displacement(p.grid, (h, w)).astype(np.float64)
    return np.stack([p.centre[0] + ry + d[0], p.centre[1] + rx + d[1]])


def warp(array: np.ndarray, coords: np.ndarray, order: int) -> np.ndarray:
    """`array` (H, W) or (H, W, C) sampled at `coords` (2, h, w) by a spline of `order`
    (3 bicubic, 1 linear, 0 nearest), the outside read from the mirror image; float64 for
    order > 0, the input dtype for order 0."""
    if array.ndim == 3:
        return np.stack([warp(array[..., c], coords, order) for c in range(array.shape[2])],
                        axis=-1)
    dtype = array.dtype if order == 0 else np.float64
    return ndimage.map_coordinates(array.astype(np.float64 if order else array.dtype), coords,
                                   order=order, mode="mirror", output=dtype)


def augment(image_bgr: np.ndarray, label: np.ndarray, weight: np.ndarray | None,
            p: ElasticParams, tile_hw: Sequence[int]
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """One sample: (image float32 (h, w, 3) BGR 0..255, label (h, w), weight (h, w) or None)."""
    coords = source_coordinates(p, tile_hw)
    grey = image_bgr.ndim == 3 and all(np.array_equal(image_bgr[..., 0], image_bgr[..., c])
                                       for c in range(1, image_bgr.shape[2]))
    if grey:  # a grey image decoded to equal channels (ISBI): warp one, the same numbers
        image = np.repeat(warp(image_bgr[..., 0], coords, 3)[..., None], image_bgr.shape[2], -1)
    else:
        image = warp(image_bgr, coords, 3)
    image = image * p.gain + p.offset
    image = np.clip(image, 0.0, 255.0).astype(np.float32)
    out_weight = None if weight is None else warp(weight, coords, 1).astype(np.float32)
    return image, warp(label, coords, 0), out_weight


def train_batch(images: Sequence[np.ndarray], labels: Sequence[np.ndarray],
                weights: Sequence[np.ndarray | None], params: Sequence[ElasticParams],
                data_cfg: Any) -> dict[str, np.ndarray]:
    """A batch: image float32 (B, h, w, 3) normalised RGB, label int32 (B, h, w), and with
    weight maps given, weight float32 (B, h, w)."""
    tile = tuple(int(v) for v in data_cfg.crop_size)
    out = [augment(i, l, w, p, tile) for i, l, w, p in zip(images, labels, weights, params,
                                                           strict=True)]
    batch = {"image": preprocess.normalise(np.stack([o[0] for o in out])[..., ::-1],
                                           data_cfg.mean, data_cfg.std),
             "label": np.stack([o[1] for o in out]).astype(np.int32)}
    if all(o[2] is not None for o in out):
        batch["weight"] = np.stack([o[2] for o in out])
    return batch


# ------------------------------------------------------------------------------ weight map
def weight_map(label: np.ndarray, cell_class: int, w0: float = 10.0, sigma: float = 5.0
               ) -> np.ndarray:
    """The paper's w(x) = w_c(x) + w0 exp(-(d1 + d2)^2 / (2 sigma^2)) of one label, float32.

    Cells are the 4-connected components of `label == cell_class`; d1 / d2 are the Euclidean
    distances to the nearest / second nearest cell. The border term is added on pixels outside
    the cells (as the 2019 official tool and the Miltos-90 port: inside a cell d1 = 0 and the
    term would only weight the cell's own rim). w_c balances the classes of this label,
    w_c(k) = (largest class frequency) / (frequency of k) (ours: the paper gives no formula).
    Pixels labelled 255 weigh 0. Each cell's distance transform is computed only within
    ceil(6 sigma) px of it: beyond, d1 + d2 > 6 sigma and the term is below w0 * 1.6e-8.
    """
    label = np.asarray(label)
    valid = label != IGNORE_INDEX
    classes, counts = np.unique(label[valid], return_counts=True)
    table = np.zeros(256, np.float64)
    table[classes] = counts.max() / counts
    weight = table[label]
    cells, n = ndimage.label(label == cell_class)  # 4-connected (the cross structure)
    d1 = np.full(label.shape, np.inf)
    d2 = np.full(label.shape, np.inf)
    margin = int(np.ceil(6 * sigma))
    height, width = label.shape
    for k, (ys, xs) in enumerate(ndimage.find_objects(cells), start=1):
        y0, y1 = max(ys.start - margin, 0), min(ys.stop + margin, height)
        x0, x1 = max(xs.start - margin, 0), min(xs.stop + margin, width)
        d = ndimage.distance_transform_edt(cells[y0:y1, x0:x1] != k)
        a, b = d1[y0:y1, x0:x1], d2[y0:y1, x0:x1]
        b[...] = np.minimum(b, np.maximum(a, d))
        a[...] = np.minimum(a, d)
    if n >= 2:
        border = w0 * np.exp(-np.square(d1 + d2) / (2.0 * sigma ** 2))
        weight = weight + np.where(cells == 0, border, 0.0)
    return np.where(valid, weight, 0.0).astype(np.float32)
