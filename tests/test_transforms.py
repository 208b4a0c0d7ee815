"""The mmseg-structured reference vs mmseg's outputs (fixtures/mmseg/data/transforms.npz, exact),
and unet_jax.data.augment, the fast path the pipeline runs, vs the reference (bit for bit)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

import mmseg_reference as T
from unet_jax.data import augment as F
from unet_jax.preprocess import rescale_size

# fixture README, "Transform details": full sha256 of the RandomResize outputs of image 21.
RESIZE = {
    0.5: ((291, 282), "35155ab9f104db8b7af08569f7aa0b174f63c405df6a63afc2ac3e38c7c3ec48",
          "b3eb047985b4fe1bb4366a84cdf8f759e9609c8b63740c477a63b1f7ba28ef72", 6157),
    0.73: ((426, 412), "9fdd4074bc33a353d66dd5fc0768fe919c26fabb0d7b9a3bd7392c718c9b7987",
           "d175f43086a7e617032093d407f7501417bf9d3657e164e76740dfbaffd33a6c", 13123),
    1.37: ((800, 774), "e9e383909a7f2c6fec04cb44cda0ae1236c03b217b5b1c8e3c3dcc3d951139a5",
           "7ffedec433601805d256d8a2f502bf6ae82c4b3e20f933eb60db861b7dbc3a64", 46232),
    2.0: ((1168, 1130), "2f74c74f75c2874666049e7fffdf5403e4647ee66532fec7f1734889987dbbcd",
          "9eeeb5674f98493d126cd4819f0680d3f7a2d9beec57982a2886fe5b2ab89c1a", 98632),
}
IMAGE_SHA = "f020e3ab60a3b9b6811020a3a68a0cbf4752ce712eead68028b3dc7e8821b993"
LABEL_SHA = "dd2a7d800d38152507551b67c796b8c18cd00b790f14af689464a41c911ee5a0"

# fixture README, PhotoMetricDistortion table: case -> (method, scripted draws).
PMD = {
    "brightness_p20.7": ("brightness", [["randint", [2], 1], ["uniform", [-32, 32], 20.7]]),
    "brightness_m31.3": ("brightness", [["randint", [2], 1], ["uniform", [-32, 32], -31.3]]),
    "brightness_skip": ("brightness", [["randint", [2], 0]]),
    "contrast_1.37": ("contrast", [["randint", [2], 1], ["uniform", [0.5, 1.5], 1.37]]),
    "contrast_0.61": ("contrast", [["randint", [2], 1], ["uniform", [0.5, 1.5], 0.61]]),
    "saturation_1.42": ("saturation", [["randint", [2], 1], ["uniform", [0.5, 1.5], 1.42]]),
    "saturation_0.55": ("saturation", [["randint", [2], 1], ["uniform", [0.5, 1.5], 0.55]]),
    "hue_p11": ("hue", [["randint", [2], 1], ["randint", [-18, 18], 11]]),
    "hue_m18": ("hue", [["randint", [2], 1], ["randint", [-18, 18], -18]]),
    "hue_p17": ("hue", [["randint", [2], 1], ["randint", [-18, 18], 17]]),
    "full_mode0": ("transform", [
        ["randint", [2], 1], ["uniform", [-32, 32], 12.5], ["randint", [2], 0],
        ["randint", [2], 1], ["uniform", [0.5, 1.5], 1.3], ["randint", [2], 1],
        ["randint", [-18, 18], -7], ["randint", [2], 1], ["uniform", [0.5, 1.5], 0.8]]),
    "full_mode1": ("transform", [
        ["randint", [2], 1], ["uniform", [-32, 32], -20.25], ["randint", [2], 1],
        ["randint", [2], 1], ["uniform", [0.5, 1.5], 1.45], ["randint", [2], 1],
        ["uniform", [0.5, 1.5], 0.7], ["randint", [2], 1], ["randint", [-18, 18], 5]]),
    "full_mode1_partial": ("transform", [
        ["randint", [2], 0], ["randint", [2], 1], ["randint", [2], 0], ["randint", [2], 1],
        ["uniform", [0.5, 1.5], 1.2], ["randint", [2], 0]]),
}
MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)


def _sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


@pytest.fixture
def fx(fixtures_dir: Path) -> dict[str, np.ndarray]:
    with np.load(fixtures_dir / "data" / "transforms.npz") as d:
        return {k: d[k] for k in d.files}


@pytest.fixture
def pair21(data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """DRIVE training image 21 as LoadImageFromFile (BGR) and its label as LoadAnnotations."""
    root = data_dir / "DRIVE" / "training"
    img = cv2.imread(str(root / "images" / "21_training.tif"), cv2.IMREAD_COLOR)
    lab = (np.asarray(Image.open(root / "1st_manual" / "21_manual1.gif")) // 128).astype(np.uint8)
    assert _sha(img) == IMAGE_SHA and _sha(lab) == LABEL_SHA
    return img, lab


@pytest.mark.parametrize("r", sorted(RESIZE))
def test_random_resize_matches_mmseg(r: float, pair21, fx) -> None:
    img, lab = pair21
    out_img, out_lab = T.random_resize(img, lab, np.random.default_rng(0), (584, 565), (r, r))
    shape, img_sha, lab_sha, vessels = RESIZE[r]
    assert out_img.shape == shape + (3,) and out_lab.shape == shape
    assert _sha(out_img) == img_sha
    assert _sha(out_lab) == lab_sha
    assert int((out_lab == 1).sum()) == vessels
    if r == 0.5:
        np.testing.assert_array_equal(out_img, fx["resize_0.5_img"])
        np.testing.assert_array_equal(out_lab, fx["resize_0.5_label"])


def test_rescale_size_truncation() -> None:
    assert T.random_scale(T.ScriptedDraws([["random_sample", [], 0.0]]), (584, 565)) == (292, 282)
    assert rescale_size(584, 565, (292, 282)) == (291, 282)   # not 292 x 282
    assert rescale_size(584, 565, (584, 565)) == (584, 565)   # identity at native size


def test_crop_accept_grid(pair21, fx) -> None:
    _, lab = pair21
    grid = fx["crop_accept_grid"]
    ours = np.array([[T.crop_accepted(lab[h:h + 64, w:w + 64], 0.75)
                      for w in fx["crop_accept_grid_offsets_w"]]
                     for h in fx["crop_accept_grid_offsets_h"]], np.uint8)
    np.testing.assert_array_equal(ours, grid)
    assert abs(grid.mean() - 0.0492) < 5e-5


def test_crop_eleventh_draw_unchecked(pair21) -> None:
    img, lab = pair21
    offsets = [[0, 0], [520, 0], [0, 501], [520, 501], [10, 10], [500, 10], [10, 490],
               [510, 490], [5, 5], [515, 5], [0, 250]]
    script = [d for oh, ow in offsets
              for d in (["randint", [0, 521], oh], ["randint", [0, 502], ow])]
    draws = T.ScriptedDraws(script)
    assert T.random_crop_bbox(lab, (64, 64), draws, 0.75) == (0, 64, 250, 314)
    assert draws.done  # 22 draws


def test_crop_then_flip(pair21, fx) -> None:
    img, lab = pair21
    draws = T.ScriptedDraws([["randint", [0, 521], 416], ["randint", [0, 502], 200]])
    c_img, c_lab = T.random_crop(img, lab, draws, (64, 64), 0.75)
    assert draws.done  # accepted on its first draw
    np.testing.assert_array_equal(c_img, fx["crop_img"])
    np.testing.assert_array_equal(c_lab, fx["crop_label"])
    f_img, f_lab = T.random_flip(c_img, c_lab, T.ScriptedDraws([["random_sample", [], 0.3]]), 0.5)
    np.testing.assert_array_equal(f_img, fx["flip_img"])
    np.testing.assert_array_equal(f_lab, fx["flip_label"])
    n_img, n_lab = T.random_flip(c_img, c_lab, T.ScriptedDraws([["random_sample", [], 0.7]]), 0.5)
    assert n_img is c_img and n_lab is c_lab


@pytest.mark.parametrize("case", sorted(PMD))
def test_photometric_distortion_cases(case: str, fx) -> None:
    method, script = PMD[case]
    draws = T.ScriptedDraws(script)
    src = fx["pmd_input"]
    np.testing.assert_array_equal(src, fx["crop_img"])
    if method == "transform":
        out = T.photometric_distortion(src, draws)
    else:
        out = getattr(T, method)(src.copy(), draws)
    assert draws.done, f"{case}: used {draws.pos} of {len(script)} draws"
    expected = src if case == "brightness_skip" else fx[f"pmd_{case}"]
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, expected)


def test_normalise_exact(fx) -> None:
    hwc_bgr = fx["norm_input_chw_bgr"].transpose(1, 2, 0)
    out = F.normalise(hwc_bgr, MEAN, STD)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out.transpose(2, 0, 1), fx["norm_output"])


def test_pad_exact(fx) -> None:
    hwc_bgr = fx["pad_input_chw_bgr"].transpose(1, 2, 0)
    label = fx["pad_output_label"][:40, :50].copy()
    assert set(np.unique(label)) <= {0, 1}
    img, lab = T.pad_to(F.normalise(hwc_bgr, MEAN, STD), label, (64, 64))
    np.testing.assert_array_equal(img.transpose(2, 0, 1), fx["pad_output"])
    np.testing.assert_array_equal(lab, fx["pad_output_label"])
    with pytest.raises(ValueError, match="expected an image at most"):
        T.pad_to(img, lab, (32, 32))


def test_scripted_draws_checks_calls() -> None:
    draws = T.ScriptedDraws([["randint", [2], 1]])
    with pytest.raises(AssertionError, match="expected randint"):
        draws.uniform(0, 1)


# ------------------------------------------------------------------------ fast path == reference
class _Data:
    """The config.data fields the composed transforms read (DRIVE's values)."""
    img_scale, crop_size, ratio_range, cat_max_ratio = (584, 565), (64, 64), (0.5, 2.0), 0.75
    flip_prob, photometric, mean, std = 0.5, True, MEAN, STD


def test_resize_linear_window_equals_cv2() -> None:
    rng = np.random.default_rng(0)
    cases = [((584, 565), (291, 282)), ((100, 80), (50, 40)), ((40, 30), (80, 60)),
             ((1024, 2048), (512, 1024)), ((7, 300), (13, 150))]
    cases += [((int(h), int(w)), (max(1, int(h * r)), max(1, int(w * r * s))))
              for h, w, r, s in zip(rng.integers(8, 300, 40), rng.integers(8, 300, 40),
                                    rng.uniform(0.3, 2.5, 40), rng.uniform(0.8, 1.2, 40))]
    for k, ((h, w), (dh, dw)) in enumerate(cases):
        shape = (h, w, 3) if k % 3 else (h, w)
        img = cv2.GaussianBlur(rng.integers(0, 256, shape, dtype=np.uint8), (5, 5), 1.5)
        ref = cv2.resize(img, (dw, dh), interpolation=cv2.INTER_LINEAR)
        ours = F.resize_linear_window(img, (dh, dw), np.arange(dh), np.arange(dw))
        np.testing.assert_array_equal(ours, ref, err_msg=f"{(h, w)} -> {(dh, dw)}")
        y, x = int(rng.integers(0, dh)), int(rng.integers(0, dw))
        win = F.resize_linear_window(img, (dh, dw), np.arange(y, dh), np.arange(x, dw))
        np.testing.assert_array_equal(win, ref[y:, x:])
        ref_nn = cv2.resize(img, (dw, dh), interpolation=cv2.INTER_NEAREST)
        nn = img[F.nearest_index(np.arange(dh), h, dh)][:, F.nearest_index(np.arange(dw), w, dw)]
        np.testing.assert_array_equal(nn, ref_nn, err_msg=f"nearest {(h, w)} -> {(dh, dw)}")


def test_train_batch_equals_reference(pair21) -> None:
    img, lab = pair21
    rng = np.random.default_rng(1)
    params = [F.sample_params(rng) for _ in range(24)]
    # two special cases: ratio exactly 1 (no resize) and the smallest ratio
    params[0] = F.AugParams(**{**params[0].__dict__, "ratio_u": 1 / 3})
    params[1] = F.AugParams(**{**params[1].__dict__, "ratio_u": 0.0})
    out, out_lab = F.train_batch([img] * 24, [lab] * 24, params, _Data)
    assert out.shape == (24, 64, 64, 3) and out.dtype == np.float32
    assert out_lab.shape == (24, 64, 64) and out_lab.dtype == np.int32
    for k, p in enumerate(params):
        draws = T.ParamDraws(p)
        ref_img, ref_lab = T.train_sample(img, lab, draws, _Data)
        assert not (draws.coins or draws.amounts or draws.randoms), f"sample {k}: draws left"
        np.testing.assert_array_equal(out[k], ref_img, err_msg=f"sample {k}")
        np.testing.assert_array_equal(out_lab[k], ref_lab, err_msg=f"sample {k}")


def test_train_batch_pads_small_crops() -> None:
    rng = np.random.default_rng(2)
    img = cv2.GaussianBlur(rng.integers(0, 256, (50, 70, 3), dtype=np.uint8), (5, 5), 2)
    lab = (rng.random((50, 70)) < 0.3).astype(np.uint8)
    lab[:3] = 255

    class Small(_Data):
        img_scale, crop_size = (70, 50), (64, 64)

    params = [F.sample_params(rng) for _ in range(6)]
    out, out_lab = F.train_batch([img] * 6, [lab] * 6, params, Small)
    for k, p in enumerate(params):
        ref_img, ref_lab = T.train_sample(img, lab, T.ParamDraws(p), Small)
        np.testing.assert_array_equal(out[k], ref_img)
        np.testing.assert_array_equal(out_lab[k], ref_lab)
    assert (out_lab == 255).any() and (out == 0).all(axis=-1).any()


def test_vectorised_acceptance_equals_crop_accepted() -> None:
    rng = np.random.default_rng(3)
    binary = (rng.random((40, 16, 16)) < rng.random((40, 1, 1))).astype(np.uint8)
    multi = rng.choice(np.array([0, 3, 7, 255], np.uint8), size=(40, 16, 16),
                       p=[0.6, 0.2, 0.1, 0.1])
    multi[:5] = np.where(multi[:5] == 3, 0, multi[:5])
    multi[5] = 255
    for crops in (binary, multi, np.zeros((3, 8, 8), np.uint8)):
        for ratio in (0.75, 0.7, 0.5):
            expected = [T.crop_accepted(c, ratio) for c in crops]
            np.testing.assert_array_equal(F._accepted_many(crops, ratio, 255), expected)
