"""The synthetic retinal dataset: deterministic, fundus-like, binary vessel labels, no download."""
from __future__ import annotations

import numpy as np
import pytest
import tensorflow_datasets as tfds

import unet_jax.data as D
from unet_jax.data.synthetic import Synthetic, make_fov, make_sample, synthetic_config


def test_deterministic_by_seed():
    a = make_sample([0, 0, 3], 96)
    b = make_sample([0, 0, 3], 96)
    c = make_sample([0, 0, 4], 96)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])


@pytest.mark.parametrize("seed", range(4))
def test_fundus_like_with_vessel_trees(seed):
    image, label = make_sample([7, 0, seed], 128)
    assert image.shape == (128, 128, 3) and image.dtype == np.uint8
    assert label.shape == (128, 128) and label.dtype == np.uint8
    assert set(np.unique(label).tolist()) == {0, 1}
    yy, xx = np.mgrid[:128, :128]
    r = np.hypot(yy - 64, xx - 64)
    inside, outside = r < 45, r > 64
    assert not label[outside].any()                         # vessels only inside the field of view
    assert 0.03 < label[inside].mean() < 0.3                # DRIVE-like vessel density
    red, green, blue = (image[..., k][inside & (label == 0)].mean() for k in range(3))
    assert red > green > blue and red > 100                 # orange-red fundus
    assert image[outside].mean() < 25                       # dark outside the field of view
    assert image[..., 1][inside & (label == 1)].mean() < green  # vessels darker than background
    center, rim = image[..., 0][r < 20].mean(), image[..., 0][(r > 50) & (r < 56)].mean()
    assert rim < center                                     # vignetting
    # one connected tree per trunk, several branches: many distinct widths along the vessels
    assert label.sum() > 300
    fov = make_fov([7, 0, seed], 128)  # the disc of radius 0.44-0.48 x 128 around the centre
    assert fov.dtype == np.uint8 and fov[inside].all() and not fov[outside].any()
    assert (label <= fov).all() and 0.6 < fov.mean() < 0.73
    assert image[fov == 0].mean() < 40 < image[fov == 1].mean()


def test_configs():
    names = [c.name for c in Synthetic.BUILDER_CONFIGS]
    assert names == ["default", "small"]
    default = tfds.builder_cls("synthetic").BUILDER_CONFIGS[0]
    assert (default.image_size, default.num_train, default.num_validation) == (192, 20, 8)
    assert synthetic_config(128, 24, 8).name == "small"
    custom = synthetic_config(image_size=40, num_train=3, num_validation=2, seed=5)
    assert custom.name == "s40_t3_v2_seed5"
    with pytest.raises(ValueError, match="positive"):
        synthetic_config(image_size=0)


def test_builder_needs_no_download(tmp_path):
    data = dict(name="synthetic", manual_dir="", tfds_data_dir=str(tmp_path),
                synthetic=dict(image_size=40, num_train=3, num_validation=2, seed=5))
    train = list(D.load_split(data, "train").as_numpy_iterator())
    val = list(D.load_split(data, "validation").as_numpy_iterator())
    assert len(train) == 3 and len(val) == 2
    names = sorted(ex["name"].decode() for ex in train)
    assert names == ["train_0000", "train_0001", "train_0002"]
    for ex in train + val:
        assert ex["image"].shape == (40, 40, 3) and ex["label"].shape == (40, 40)
        split_id = 0 if ex["name"].startswith(b"train") else 1
        seed = [5, split_id, int(ex["name"][-4:])]
        image, label = make_sample(seed, 40)
        np.testing.assert_array_equal(ex["image"], image)
        np.testing.assert_array_equal(ex["label"], label)
        np.testing.assert_array_equal(ex["fov"], make_fov(seed, 40))
    assert (tmp_path / "synthetic" / "s40_t3_v2_seed5" / "1.1.0").is_dir()
    for split, examples in (("train", train), ("validation", val)):  # the records, by name
        got = list(D.source(data, split))
        assert [g["name"] for g in got] == sorted(ex["name"].decode() for ex in examples)
        for g, ex in zip(got, sorted(examples, key=lambda ex: ex["name"])):
            for key in ("image", "label", "fov"):
                np.testing.assert_array_equal(g[key], ex[key])
