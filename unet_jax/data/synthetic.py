"""TFDS builder `synthetic`: fundus-like images with branching vessel trees, made on the fly.

Needs no download. Each sample is a pure function of (config seed, split, index): an orange-red
circular field of view with vignetting, low-frequency texture, a bright optic disc, a darker
macula, vessel trees of decreasing width (darker veins, lighter arteries) growing from the disc,
and sensor noise. The label is the vessel mask (0/1) inside the field of view; `fov` is that
circular field of view (0/1). Features and splits are those of the retinal builders (`image`,
`label`, `fov`, `name`; `train`, `validation`).
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence

import cv2
import numpy as np
import tensorflow_datasets as tfds

from unet_jax.data.builders.common import TRAIN, VALIDATION, example, retinal_features

_SUPERSAMPLE = 4  # vessels are drawn 4x finer, then averaged: smooth edges, exact-ish widths


@dataclasses.dataclass(eq=False)
class SyntheticConfig(tfds.core.BuilderConfig):
    """Size and count of the synthetic dataset (square images of `image_size` pixels)."""
    image_size: int = 192
    num_train: int = 20
    num_validation: int = 8
    seed: int = 0


def _grow_tree(rng: np.random.Generator, canvas: np.ndarray, start: np.ndarray, angle: float,
               width: float, centre: np.ndarray, radius: float, size: int) -> None:
    """Draw one branching vessel tree (random walk with bifurcations) on a supersampled canvas."""
    step = 0.022 * size
    stack = [(start, angle, width)]
    segments = 0
    while stack and segments < 3000:
        pos, ang, w = stack.pop()
        for _ in range(200):
            ang += rng.normal(0.0, 0.16)
            new = pos + step * np.array([math.cos(ang), math.sin(ang)])
            p0 = tuple(int(v) for v in np.round(pos * _SUPERSAMPLE))
            p1 = tuple(int(v) for v in np.round(new * _SUPERSAMPLE))
            cv2.line(canvas, p0, p1, 255, thickness=max(1, round(w * _SUPERSAMPLE)))
            segments += 1
            pos = new
            w *= 0.985
            if np.hypot(*(pos - centre)) > radius * 1.02 or w < 0.7:
                break
            if w > 1.2 and rng.random() < 0.1:
                child = w * rng.uniform(0.55, 0.8)
                w *= 0.9
                side = 1.0 if rng.random() < 0.5 else -1.0
                stack.append((pos.copy(), ang + side * rng.uniform(0.45, 1.0), child))


def _field_of_view(rng: np.random.Generator, s: int) -> tuple[np.ndarray, float, np.ndarray]:
    """(centre, radius, r = distance / radius per pixel): the sample's first draws."""
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) + 0.5
    centre = s / 2 + rng.normal(0.0, 0.01 * s, 2)
    radius = s * rng.uniform(0.44, 0.48)
    return centre, radius, np.hypot(xx - centre[0], yy - centre[1]) / radius


def make_fov(seed: int | Sequence[int], image_size: int = 192) -> np.ndarray:
    """The field of view (uint8 HxW in {0, 1}) of `make_sample(seed, image_size)`."""
    _, _, r = _field_of_view(np.random.default_rng(seed), int(image_size))
    return (r <= 1.0).astype(np.uint8)


def make_sample(seed: int | Sequence[int], image_size: int = 192) -> tuple[np.ndarray, np.ndarray]:
    """One (image uint8 HxWx3 RGB, label uint8 HxW in {0, 1}) pair, deterministic in `seed`."""
    rng = np.random.default_rng(seed)
    s = int(image_size)
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) + 0.5
    centre, radius, r = _field_of_view(rng, s)

    base = np.array([rng.uniform(170, 215), rng.uniform(65, 100), rng.uniform(20, 45)], np.float32)
    texture = cv2.resize(rng.normal(0, 1, (6, 6)).astype(np.float32), (s, s),
                         interpolation=cv2.INTER_CUBIC)
    shade = (1.0 - rng.uniform(0.35, 0.55) * r ** 2) * (1.0 + 0.06 * texture)
    img = base[None, None, :] * shade[..., None]

    side = 1.0 if rng.random() < 0.5 else -1.0
    disc = centre + np.array([side * rng.uniform(0.5, 0.6), rng.normal(0, 0.05)]) * radius
    disc_r = radius * rng.uniform(0.12, 0.16)
    d = np.hypot(xx - disc[0], yy - disc[1]) / disc_r
    w_disc = np.exp(-d ** 4)[..., None]
    img = img * (1 - w_disc) + np.array([250, 215, 140], np.float32) * w_disc
    macula = centre - np.array([side * 0.35, 0.0]) * radius
    m = np.hypot(xx - macula[0], yy - macula[1]) / (0.25 * radius)
    img *= (1.0 - 0.25 * np.exp(-m ** 2))[..., None]

    big = s * _SUPERSAMPLE
    canvases = [np.zeros((big, big), np.uint8), np.zeros((big, big), np.uint8)]  # veins, arteries
    n_trees = int(rng.integers(4, 7))
    for k in range(n_trees):
        angle = 2 * math.pi * k / n_trees + rng.normal(0, 0.3)
        start = disc + 0.3 * disc_r * np.array([math.cos(angle), math.sin(angle)])
        width = s * rng.uniform(0.016, 0.024) * (1.0 if k % 2 == 0 else 0.8)
        _grow_tree(rng, canvases[k % 2], start, angle, width, centre, radius, s)
    cover = [cv2.resize(c.astype(np.float32) / 255.0, (s, s), interpolation=cv2.INTER_AREA)
             for c in canvases]

    fov = r <= 1.0
    label = ((np.maximum(cover[0], cover[1]) >= 0.5) & fov).astype(np.uint8)
    for c, dark in zip(cover, ((0.45, 0.6, 0.5), (0.3, 0.45, 0.35))):
        profile = cv2.GaussianBlur(c, (0, 0), 0.7)[..., None]
        img *= 1.0 - profile * np.array(dark, np.float32)

    edge = np.clip((1.0 - r) * radius / 1.5, 0.0, 1.0)[..., None]
    img = img * edge + np.array([8, 5, 3], np.float32) * (1 - edge)
    img += rng.normal(0.0, rng.uniform(2.0, 5.0), img.shape).astype(np.float32)
    return np.clip(np.round(img), 0, 255).astype(np.uint8), label


class Synthetic(tfds.core.GeneratorBasedBuilder):
    """Synthetic retinal vessel dataset (no download): fundus-like images, vessel masks 0/1."""

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.0.0": "First version.",
                     "1.1.0": "Adds `fov`, the circular field of view (uint8 0/1)."}
    FOV = "the generated circular field of view"
    BUILDER_CONFIGS = [
        SyntheticConfig(name="default", description="20 train / 8 validation, 192x192."),
        SyntheticConfig(name="small", description="24 train / 8 validation, 128x128.",
                        image_size=128, num_train=24, num_validation=8),
    ]
    DEFAULT_CONFIG_NAME = "default"

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=self.__doc__, features=retinal_features(),
            supervised_keys=("image", "label"))

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # nothing to download
        cfg = self.builder_config
        return {TRAIN: self._generate_examples(0, cfg.num_train),
                VALIDATION: self._generate_examples(1, cfg.num_validation)}

    def _generate_examples(self, split_id: int, count: int
                           ) -> Iterator[tuple[str, dict[str, object]]]:
        cfg = self.builder_config
        prefix = (TRAIN, VALIDATION)[split_id]
        for i in range(count):
            seed = [cfg.seed, split_id, i]
            image, label = make_sample(seed, cfg.image_size)
            name = f"{prefix}_{i:04d}"
            yield name, example(name, image, label, make_fov(seed, cfg.image_size))


def synthetic_config(image_size: int = 192, num_train: int = 20, num_validation: int = 8,
                     seed: int = 0) -> SyntheticConfig:
    """The predefined config with these values, else a new one named after them."""
    values = dict(image_size=int(image_size), num_train=int(num_train),
                  num_validation=int(num_validation), seed=int(seed))
    for cfg in Synthetic.BUILDER_CONFIGS:
        if all(getattr(cfg, k) == v for k, v in values.items()):
            return cfg
    if min(values["image_size"], values["num_train"], values["num_validation"]) < 1:
        raise ValueError(f"synthetic dataset: expected positive image_size and counts, "
                         f"found {values}")
    name = "s{image_size}_t{num_train}_v{num_validation}_seed{seed}".format(**values)
    return SyntheticConfig(name=name, description=f"Custom: {values}.", **values)
