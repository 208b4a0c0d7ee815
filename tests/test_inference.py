"""Slide / whole inference and TTA against mmseg's outputs (fixtures/mmseg/inference/)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import cv2
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from conftest import FIXTURES, require_shared, tiny_config, check_argmax
from unet_jax import inference as inf
from unet_jax.preprocess import rescale_size, tta_view_hw
from unet_jax.models import build_model
from unet_jax.models.mmseg import extract_state_dict, load_state_dict
from unet_jax.io.pth import load_pth

WINDOWS = 16  # batch_windows used for the 32x32-crop fixtures: one compiled forward for all

DRIVE_BGR_SHA256 = "1a4b95c412a4947ff6f00abfae18e901fc17460a608fb5e2d9577a74fa2bed78"
TTA_CROP_BGR_SHA256 = "f6da137906366204a941765adbbee867f77b06281e788b554986e4ebf57bc2dc"


def fcn_config():
    """The drive fcn config at the fixtures' tiny widths."""
    return tiny_config("configs/drive.py:fcn")


@pytest.fixture(scope="module")
def apply_fn():
    """The tiny fcn_drive fixture model, wrapped for inference (shared by the module's tests)."""
    path = require_shared(FIXTURES / "models" / "fcn_drive.pth")
    model = build_model(fcn_config().model)  # no random init: the weights are loaded
    load_state_dict(model, extract_state_dict(load_pth(path), path), str(path))
    return inf.make_apply_fn(model)


def nchw_to_hwc(a: np.ndarray) -> np.ndarray:
    return np.asarray(a)[0].transpose(1, 2, 0) if a.ndim == 4 else np.asarray(a).transpose(1, 2, 0)


def test_window_grid_drive():
    windows = inf.slide_windows(584, 565, (64, 64), (42, 42))
    assert len(windows) == 14 * 13 == 182
    ys = sorted({w[0] for w in windows})
    assert ys == list(range(0, 505, 42)) + [520]
    assert all(w[1] - w[0] == 64 and w[3] - w[2] == 64 for w in windows)
    assert inf.window_count(584, 565, windows).min() >= 1
    # smaller than the crop: one window the size of the image
    assert inf.slide_windows(20, 50, (64, 64), (42, 42)) == [(0, 20, 0, 50)]


def test_slide_batch_shapes_do_not_depend_on_the_size():
    """Full batches of `batch_windows` (a whole number per device) and a last one rounded up to
    a multiple of TAIL_WINDOWS = 8: few batch shapes, so few model compiles for any sizes."""
    hrf = len(inf.slide_windows(2336, 3504, (256, 256), (170, 170)))
    assert hrf == 294
    assert inf.slide_batch(hrf, 64, 1) == (64, 40)
    assert inf.slide_batch(182, 64, 1) == (64, 56)  # DRIVE: 184 forwards for 182 windows
    assert inf.slide_batch(140, 64, 1) == (64, 16)
    assert inf.slide_batch(128, 64, 1) == (64, 64)
    assert inf.slide_batch(hrf, 62, 4) == (64, 40)
    assert [inf.slide_batch(n, 64, 1)[1] for n in (1, 8, 9, 63)] == [8, 8, 16, 64]
    assert inf.slide_batch(3, 64, 16) == (64, 16)
    assert inf.CPU_WINDOW_PIXELS // (256 * 256) == 16 and inf.CPU_WINDOW_PIXELS // 64**2 >= 64


def test_one_model_compile_for_many_sizes(apply_fn):
    """Slide inference on images of three sizes traces (so compiles) the model once: the cheap
    per-size programs do not contain it."""
    rng = np.random.default_rng(2)
    traced = []

    def forward(x):
        traced.append(x.shape)
        return apply_fn(x)

    for hw in ((70, 90), (90, 75), (101, 66)):  # 12, 16, 15 windows: one batch of 16 each
        x = rng.normal(size=(*hw, 3)).astype(np.float32)
        logits = inf.slide_inference(forward, x, (32, 32), (21, 21), 2, batch_windows=WINDOWS)
        assert logits.shape == (*hw, 2)
    assert traced == [(WINDOWS, 32, 32, 3)]


@pytest.mark.parametrize("tag", ["100x90", "64x64"])
def test_slide_matches_mmseg(apply_fn, fixtures_dir: Path, tag: str):
    d = np.load(fixtures_dir / "inference" / "slide.npz")
    x = d[f"slide_{tag}_input"][0].transpose(1, 2, 0)  # (H, W, 3)
    logits = inf.slide_inference(apply_fn, x, (32, 32), (21, 21), 2, batch_windows=WINDOWS)
    count = inf.window_count(*x.shape[:2], inf.slide_windows(*x.shape[:2], (32, 32), (21, 21)))
    np.testing.assert_array_equal(count, d[f"slide_{tag}_count"])
    err = float(np.abs(np.asarray(logits) - nchw_to_hwc(d[f"slide_{tag}_logits"])).max())
    assert err < 1e-4, f"slide {tag}: max abs logits error {err}"


def test_slide_batches_independent_of_batch_size(apply_fn, fixtures_dir: Path):
    d = np.load(fixtures_dir / "inference" / "slide.npz")
    x = d["slide_100x90_input"][0].transpose(1, 2, 0)
    a = inf.slide_inference(apply_fn, x, (32, 32), (21, 21), 2, batch_windows=WINDOWS)
    n_compiled = inf._predict._cache_size()
    b = inf.slide_inference(apply_fn, x + 0.5, (32, 32), (21, 21), 2, batch_windows=WINDOWS)
    assert inf._predict._cache_size() == n_compiled, "same shapes must not recompile the model"
    assert not np.allclose(np.asarray(a), np.asarray(b))


def test_small_and_odd_inputs_are_padded(apply_fn):
    """Windows smaller than the crop / whole images off the 16-grid: zero pad, crop back."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 45, 3)).astype(np.float32)
    logits = np.asarray(inf.slide_inference(apply_fn, x, (32, 32), (21, 21), 2,
                                            batch_windows=WINDOWS))
    # windows (0:20, 0:32) and (0:20, 13:45), each padded to 32x32
    expect = np.zeros((20, 45, 2), np.float32)
    for x1 in (0, 13):
        win = np.zeros((WINDOWS, 32, 32, 3), np.float32)
        win[0, :20] = x[:, x1:x1 + 32]
        expect[:, x1:x1 + 32] += np.asarray(apply_fn(win))[0, :20]
    expect[:, 13:32] /= 2
    np.testing.assert_allclose(logits, expect, atol=1e-5)

    y = rng.normal(size=(40, 50, 3)).astype(np.float32)
    whole = np.asarray(inf.whole_inference(apply_fn, y, 2))
    padded = np.zeros((1, 48, 64, 3), np.float32)
    padded[0, :40, :50] = y
    np.testing.assert_allclose(whole, np.asarray(apply_fn(padded))[0, :40, :50], atol=1e-6)


def test_drive_01_test_inference_model(apply_fn, fixtures_dir: Path, data_dir: Path):
    """mmseg inference_model on the full DRIVE 01_test.tif: logits and argmax."""
    path = data_dir / "DRIVE" / "test" / "images" / "01_test.tif"
    rgb = np.asarray(Image.open(path).convert("RGB"))
    bgr_sha = hashlib.sha256(np.ascontiguousarray(rgb[:, :, ::-1]).tobytes()).hexdigest()
    assert bgr_sha == DRIVE_BGR_SHA256, "PIL decode differs from mmseg's cv2 decode"
    ref = np.load(fixtures_dir / "inference" / "drive_01_test_inference_model.npz")
    config = fcn_config()
    scores, pred = inf.segment(apply_fn, rgb, config)
    err = float(np.abs(np.asarray(scores) - ref["seg_logits"].transpose(1, 2, 0)).max())
    assert err <= 3e-4, f"DRIVE 01_test: max abs logits error {err}"
    check_argmax(pred, ref["seg_logits"], ref["pred"], atol=3e-4)


def test_tta_drive_crop(apply_fn, fixtures_dir: Path):
    """SegTTAModel on a 200x180 DRIVE crop: 12 views, merged softmax, argmax, per-view logits."""
    folder = fixtures_dir / "inference"
    bgr = cv2.imread(str(folder / "tta_input_01_test_crop.png"), cv2.IMREAD_COLOR)
    assert hashlib.sha256(bgr.tobytes()).hexdigest() == TTA_CROP_BGR_SHA256
    rgb = np.ascontiguousarray(bgr[:, :, ::-1])
    ref = np.load(folder / "tta_drive_crop.npz")
    config = fcn_config()
    config.eval.crop_size = (32, 32)
    config.eval.stride = (21, 21)
    config.eval.batch_windows = WINDOWS
    probs = inf.tta_inference(apply_fn, rgb, config)
    views = list(inf.tta_views(apply_fn, rgb, config))
    assert len(views) == 12
    view_errs = [float(np.abs(np.asarray(v)[::16, ::16]
                              - ref[f"view{k:02d}_logits_sub16"].transpose(1, 2, 0)).max())
                 for k, v in enumerate(views)]
    assert max(view_errs) < 2e-4, f"per-view logits errors {view_errs}"
    err = float(np.abs(np.asarray(probs) - ref["merged_probs"].transpose(1, 2, 0)).max())
    assert err < 2e-5, f"merged probabilities: max abs error {err}"
    flips = int((np.asarray(probs).argmax(-1) != ref["pred"][0]).sum())
    assert flips == 0, f"TTA: {flips} argmax flips"
    # segment() with eval.tta gives the same
    config.eval.tta = True
    scores, pred = inf.segment(apply_fn, rgb, config)
    np.testing.assert_allclose(np.asarray(scores), np.asarray(probs), atol=1e-6)
    assert pred.shape == (200, 180)


def test_tta_view_sizes():
    sizes = [tta_view_hw(200, 180, r) for r in (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)]
    assert sizes == [(100, 90), (150, 135), (200, 180), (250, 225), (300, 270), (350, 315)]
    assert rescale_size(584, 565, (584, 565)) == (584, 565)
    assert rescale_size(1024, 2048, (2048, 1024)) == (1024, 2048)


def test_make_apply_fn_leaves_model_mode(apply_fn, fixtures_dir: Path):
    path = fixtures_dir / "models" / "fcn_drive.pth"
    model = build_model(fcn_config().model)
    load_state_dict(model, extract_state_dict(load_pth(path), path), str(path))
    model.train()
    fn = inf.make_apply_fn(model)
    assert fn.size_divisor == 16
    x = jnp.asarray(np.random.default_rng(1).normal(size=(WINDOWS, 32, 32, 3)), jnp.float32)
    a = np.asarray(fn(x))
    np.testing.assert_array_equal(a, np.asarray(fn(x)))  # eval mode: no dropout
    np.testing.assert_array_equal(a, np.asarray(apply_fn(x)))  # BN running stats
    # the model itself stays in train mode
    assert any(getattr(m, "deterministic", None) is False for _, m in model.iter_modules())
