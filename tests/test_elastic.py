"""The original U-Net's augmentation and weight map (unet_jax.data.elastic) and its weighted loss."""
from __future__ import annotations

from types import SimpleNamespace

import jax.numpy as jnp
import numpy as np
import pytest

from unet_jax.data import elastic
from unet_jax.weighted_loss import weighted_cross_entropy, weighted_segmentation_loss

CFG = SimpleNamespace(grid_points=3, sigma=10.0, max_angle=180.0, gain=(0.8, 1.2),
                      offset=(-20.0, 20.0))


def _identity(hw):
    return elastic.ElasticParams(centre=((hw[0] - 1) / 2, (hw[1] - 1) / 2), flip_y=False,
                                 flip_x=False, angle=0.0, grid=np.zeros((2, 3, 3)), gain=1.0,
                                 offset=0.0)


def _pair(seed=0, hw=(40, 30)):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (*hw, 3), dtype=np.uint8)
    label = np.where(rng.random(hw) < 0.3, 1, 0).astype(np.uint8)
    label[0, :5] = 255
    return image, label


def test_identity_displacement_is_the_identity():
    image, label = _pair()
    weight = np.random.default_rng(1).random(label.shape).astype(np.float32)
    out, lab, w = elastic.augment(image, label, weight, _identity(label.shape), label.shape)
    # spline interpolation passes through the samples: float64 error ~1e-12 of 255
    np.testing.assert_allclose(out, image, atol=1e-6)
    assert np.array_equal(lab, label) and lab.dtype == label.dtype
    np.testing.assert_allclose(w, weight, atol=1e-6)


def test_flip_and_shift_move_pixels_exactly():
    image, label = _pair()
    p = _identity(label.shape)
    flipped = elastic.ElasticParams(**{**p.__dict__, "flip_x": True})
    assert np.array_equal(elastic.augment(image, label, None, flipped, label.shape)[1],
                          label[:, ::-1])
    shifted = elastic.ElasticParams(**{**p.__dict__, "centre": (p.centre[0] + 3, p.centre[1])})
    lab = elastic.augment(image, label, None, shifted, label.shape)[1]
    assert np.array_equal(lab[:-3], label[3:])


def test_random_deformation_keeps_label_values_and_is_a_pure_function_of_the_rng():
    image, label = _pair(2)
    draws = [elastic.sample_params(np.random.default_rng([7, 1, 5]), label.shape, CFG)
             for _ in range(2)]
    a, b = (elastic.augment(image, label, None, p, (36, 36)) for p in draws)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert a[0].shape == (36, 36, 3) and set(np.unique(a[1])) <= set(np.unique(label))
    assert np.abs(draws[0].grid).max() > 0 and not np.array_equal(a[1][:30, :30], label[:30, :30])


def test_displacement_field_interpolates_the_coarse_grid():
    """A constant grid gives that constant everywhere (bicubic weights sum to one)."""
    d = elastic.displacement(np.full((2, 3, 3), 4.5), (20, 17))
    np.testing.assert_allclose(d, 4.5, atol=1e-5)


def test_weight_map_peaks_between_two_touching_cells():
    """Cells at columns 0-9 and 11-20, a one-pixel membrane at column 10, background beyond.
    On the membrane d1 = d2 = 1: w = w_c + 10 exp(-4 / 50); nowhere is w higher."""
    label = np.zeros((12, 30), np.uint8)
    label[:, 0:10] = 1
    label[:, 11:21] = 1
    w = elastic.weight_map(label, cell_class=1, w0=10.0, sigma=5.0)
    frac_bg = np.mean(label == 0)
    w_bg = (1 - frac_bg) / frac_bg                   # class balance: largest frequency / own
    np.testing.assert_allclose(w[:, 10], w_bg + 10 * np.exp(-4 / 50), rtol=1e-6)
    assert np.all(w[label == 1] == 1.0)
    assert w.max() == w[0, 10] and np.all(w[:, 21:] < w[0, 10])
    # the background column 21 is d1 = 1 from the right cell and d2 = 12 from the left one
    np.testing.assert_allclose(w[:, 21], w_bg + 10 * np.exp(-169 / 50), rtol=1e-6)


def test_weight_map_ignores_255_and_has_no_border_term_for_one_cell():
    label = np.zeros((8, 8), np.uint8)
    label[2:5, 2:5] = 1
    label[0, 0] = 255
    w = elastic.weight_map(label, cell_class=1)
    assert w[0, 0] == 0.0
    assert set(np.unique(w[1:]).tolist()) == {1.0, 54 / 9}  # 54 background pixels, 9 cell


def test_weighted_cross_entropy_is_the_weighted_mean_of_the_nll():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 5, 4, 3)).astype(np.float32)
    labels = rng.integers(0, 3, (2, 5, 4))
    labels[0, 0, 0] = 255
    weights = rng.random((2, 5, 4)).astype(np.float32) * 5
    logp = logits - np.log(np.exp(logits.astype(np.float64)).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, np.where(labels == 255, 0, labels)[..., None], -1)[..., 0]
    want = np.sum(np.where(labels == 255, 0, nll * weights)) / labels.size
    got = float(weighted_cross_entropy(jnp.asarray(logits), jnp.asarray(labels),
                                       jnp.asarray(weights)))
    assert got == pytest.approx(want, rel=1e-5)


def test_weighted_loss_crops_full_tile_labels_to_the_logits():
    labels = np.zeros((1, 8, 8), np.int32)
    labels[:, 2:6, 2:6] = 1
    weights = np.ones((1, 8, 8), np.float32)
    logits = np.zeros((1, 4, 4, 2), np.float32)
    logits[..., 1] = 10.0          # predicts 1 everywhere: right on the centre 4 x 4 only
    loss_cfg = SimpleNamespace(ce_weight=1.0, ignore_index=255)
    _, terms = weighted_segmentation_loss(jnp.asarray(logits), jnp.asarray(labels),
                                          jnp.asarray(weights), loss_cfg)
    assert float(terms["decode.acc_seg"]) == pytest.approx(100.0)


class _Records:
    """Two 40 x 30 records (a PairSource)."""

    def __init__(self):
        self.pairs = [_pair(0), _pair(1)]

    def __len__(self):
        return len(self.pairs)

    def train_pair(self, k):
        return self.pairs[k]


def test_sampler_carries_the_warped_weight_map_as_a_pure_function_of_seed_and_index():
    from unet_jax import recipe
    from unet_jax.config import check_config
    from unet_jax.data.sampler import TrainSampler
    from tests.tiny_config import get_config
    config = recipe.unet2015(get_config())
    config.data.crop_size = (188, 188)
    check_config(config)
    records = _Records()
    a, b = (TrainSampler(records, config.data, seed=3).batch_dict(np.arange(4, 6))
            for _ in range(2))
    assert sorted(a) == ["image", "label", "weight"] and a["image"].shape == (2, 188, 188, 3)
    for key in a:
        assert np.array_equal(a[key], b[key]), key
    sampler = TrainSampler(records, config.data, seed=3)
    k = sampler.image_index(5)
    p = elastic.sample_params(np.random.default_rng([3, 1, 5]), (40, 30), config.data.elastic)
    want = elastic.augment(*records.train_pair(k), sampler.weight_map(k), p, (188, 188))
    assert np.array_equal(a["label"][1], want[1]) and np.array_equal(a["weight"][1], want[2])


def test_grey_images_are_warped_once_with_the_same_numbers():
    image, label = _pair(3)
    grey = np.repeat(image[..., :1], 3, axis=-1)
    p = elastic.sample_params(np.random.default_rng(4), label.shape, CFG)
    got = elastic.augment(grey, label, None, p, (30, 30))[0]
    want = np.clip(elastic.warp(grey, elastic.source_coordinates(p, (30, 30)), 3) * p.gain
                   + p.offset, 0, 255).astype(np.float32)
    assert np.array_equal(got, want)
