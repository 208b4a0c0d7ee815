"""unet_jax.export / unet_jax.serving: the SavedModel's serving_default equals predict's test
pipeline (`unet_jax.inference.segment`, whose JAX part it runs through jax2tf with symbolic
sizes) on images of extreme and odd sizes (slide mode, whole mode, TTA); the TensorFlow resize
and sizes equal cv2 / Python; the other heads convert; refusals."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from conftest import DATA, FIXTURES, REPO, fixture_model, require_shared, tiny_config
from unet_jax import inference, serving
from unet_jax.cli import export
from unet_jax.errors import InputError
from unet_jax.preprocess import rescale_size, tta_view_hw

TINY = ["--config.model.base_channels=8", "--config.model.head_channels=8"]
REL_TOL = 1e-4  # max |saved model - predict| / max |predict|
LABELS_AGREE = 0.9999  # fraction of pixels whose label is predict's


def relative_error(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def drive_rgb() -> np.ndarray:
    path = require_shared(DATA / "DRIVE" / "test" / "images" / "01_test.tif")
    return np.asarray(Image.open(path).convert("RGB"))


def check_against_segment(serve, config, model, image: np.ndarray) -> float:
    """Run one image through the SavedModel and predict's pipeline; returns the relative error."""
    out = serve(image=tf.constant(image))
    scores, labels = out["scores"].numpy(), out["labels"].numpy()
    ref, pred = (np.asarray(v) for v in segment_ref(config, model, image))
    assert scores.dtype == np.float32 and labels.dtype == np.uint8
    assert scores.shape == ref.shape == (*image.shape[:2], config.model.num_classes)
    assert labels.shape == image.shape[:2]
    err = relative_error(scores, ref)
    assert err <= REL_TOL, f"{image.shape}: scores vs predict, relative error {err}"
    np.testing.assert_array_equal(labels, scores.argmax(-1))
    assert (labels == pred).mean() >= LABELS_AGREE, f"{image.shape}: labels vs predict"
    top2 = np.sort(ref, axis=-1)[..., -2:]
    clear = (top2[..., 1] - top2[..., 0]) > 2 * REL_TOL * np.abs(ref).max()
    np.testing.assert_array_equal(labels[clear], pred[clear])
    assert clear.mean() > 0.95
    return err


def segment_ref(config, model, image):
    return inference.segment(inference.make_apply_fn(model), image, config)


# ------------------------------------------------------------------------------ the command
@pytest.fixture(scope="module")
def drive_export(tmp_path_factory) -> Path:
    """`python -m unet_jax.export` of the fcn_drive fixture (drive config, fixture widths)."""
    pth = require_shared(FIXTURES / "models" / "fcn_drive.pth")
    out = tmp_path_factory.mktemp("export") / "drive_fcn"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               TF_CPP_MIN_LOG_LEVEL="3")
    cmd = [sys.executable, "-m", "unet_jax.export", "--config", "configs/drive.py:fcn", *TINY,
           "--checkpoint", str(pth), "--output", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert str(out) in proc.stdout
    return out


@pytest.fixture(scope="module")
def drive_serve(drive_export: Path):
    """The exported fcn_drive SavedModel's serving_default, loaded once."""
    return tf.saved_model.load(str(drive_export)).signatures["serving_default"]


@pytest.mark.parametrize("hw", [(1, 5000), (7, 3), (601, 599), (2000, 40)])
def test_saved_model_equals_predict(drive_export: Path, drive_serve, drive_rgb: np.ndarray, hw):
    """Slide mode (64x64 windows, stride 42) after the keep-ratio resize to 584x565, at the sizes
    where the TensorFlow copy of the pipeline drifted: 1x5000 -> 1x584 (a 1-pixel side, windows
    of 1x64), 7x3 -> 584x250, 601x599 -> 584x582 and 2000x40 -> 584x12 (windows narrower than
    the crop, padded to 16)."""
    serve = drive_serve
    spec = serve.structured_input_signature[1]["image"]
    assert spec.dtype == tf.uint8 and spec.shape.as_list() == [None, None, 3]
    assert set(serve.structured_outputs) == {"labels", "scores"}
    config, model = fixture_model("fcn_drive")
    image = cv2.resize(drive_rgb, hw[::-1], interpolation=cv2.INTER_AREA).reshape(*hw, 3)
    check_against_segment(serve, config, model, image)
    meta = json.loads((drive_export / export.META_FILE).read_text())
    assert meta["classes"] == ["background", "vessel"] and meta["platforms"] == ["cpu", "cuda"]
    assert meta["config"]["model"]["base_channels"] == 8


def test_refuses_a_non_empty_output(tmp_path: Path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    config = tiny_config("configs/drive.py:fcn")
    with pytest.raises(InputError, match="not an empty folder"):
        export.export_checkpoint(config, FIXTURES / "models" / "fcn_drive.pth", out)
    assert os.listdir(out) == ["keep.txt"]
    with pytest.raises(InputError, match="--platforms"):
        export.check_platforms(["cpu", "gpu"])
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "unet_jax.export", "--config", "configs/drive.py:fcn", *TINY,
           "--checkpoint", "x.pth", "--output", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("unet_jax.export: error: --output")


def test_whole_mode_and_tta(tmp_path: Path, drive_rgb: np.ndarray):
    """Whole mode with TTA (one export, one compiled size): the 100x90 image's views at ratio
    0.5, 50x45 and its flip, each padded to 64x48 and cropped back, merged as probabilities."""
    config, model = fixture_model("fcn_cityscapes")
    config.eval.tta, config.eval.tta_scales = True, (0.5,)
    module = export.make_module(config, model, ["cpu"])
    out = export.save_module(module, tmp_path / "saved", {"test": "whole+tta"})
    serve = tf.saved_model.load(str(out)).signatures["serving_default"]
    image = np.ascontiguousarray(drive_rgb[250:350, 200:290])
    err = check_against_segment(serve, config, model, image)
    scores = serve(image=tf.constant(image))["scores"].numpy()
    np.testing.assert_allclose(scores.sum(-1), 1, atol=1e-5)  # probabilities
    assert err <= REL_TOL


def test_pipeline_converts_for_pspnet():
    """PSP's adaptive pools (bins 1, 2, 3, 6; ASPP's image pool is bin 1) lower with symbolic
    sizes: tracing the converted pipeline for [None, None, 3] images (FCN's numbers are checked
    above)."""
    config, model = fixture_model("pspnet_drive")
    config.eval.mode = "whole"  # the slide loop is the same for every head
    scores, variables = export.tf_scores(config, model, ["cpu"])
    assert variables and not any(v.trainable for v in variables)
    out = scores.get_concrete_function().structured_outputs
    assert out.shape.as_list() == [None, None, config.model.num_classes]


# ------------------------------------------------------------------------------ the TF pieces
def test_resize_uint8_is_cv2_bit_exact():
    rng = np.random.default_rng(0)
    pairs = [((7, 5), (7, 5)), ((1, 1), (9, 4)), ((40, 30), (20, 15)), ((33, 21), (66, 42)),
             ((100, 90), (584, 526)), ((584, 565), (292, 283)), ((9, 200), (1, 3))]
    pairs += [(tuple(rng.integers(1, 90, 2)), tuple(rng.integers(1, 180, 2))) for _ in range(40)]
    for (sh, sw), (dh, dw) in pairs:
        img = rng.integers(0, 256, (sh, sw, 3), dtype=np.uint8)
        ref = cv2.resize(img, (int(dw), int(dh)), interpolation=cv2.INTER_LINEAR)
        got = serving.resize_uint8(tf.constant(img), int(dh), int(dw)).numpy()
        np.testing.assert_array_equal(got, ref, err_msg=f"{(sh, sw)} -> {(dh, dw)}")


def test_sizes_equal_python():
    rng = np.random.default_rng(1)
    cases = [(1, 5000, (584, 565)), (5000, 1, (565, 584)), (2000, 40, (584, 565))]
    cases += [(*(int(v) for v in rng.integers(1, 5000, 2)),
               tuple(int(v) for v in rng.integers(1, 4000, 2))) for _ in range(300)]
    for h, w, scale in cases:
        got = serving.rescale_size(tf.constant(h), tf.constant(w), scale)
        assert tuple(int(v) for v in got) == rescale_size(h, w, scale), (h, w, scale)
        ratio = float(rng.choice([0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 0.3]))
        got = serving.tta_view_size(tf.constant(h), tf.constant(w), ratio)
        assert tuple(int(v) for v in got) == tta_view_hw(h, w, ratio), (h, w, ratio)


def test_first_argmax_breaks_ties_low():
    scores = tf.constant([[[1.0, 1.0, 0.0], [0.0, 2.0, 2.0], [3.0, 1.0, 3.0]]])
    np.testing.assert_array_equal(serving.first_argmax(scores).numpy(), [[0, 1, 0]])
