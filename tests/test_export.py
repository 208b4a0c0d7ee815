"""unet_jax.export / unet_jax.serving: the SavedModel's serving_default equals predict's test
pipeline (`unet_jax.inference.segment`) on images whose sides are not multiples of 16 (slide
mode, whole mode, TTA); the TensorFlow pipeline pieces equal cv2 / the JAX code; refusals."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from conftest import DATA, FIXTURES, REPO, fixture_model, require_shared, tiny_config
from unet_jax import inference, serving
from unet_jax.cli import export
from unet_jax.errors import InputError
from unet_jax.losses import resize_logits_to
from unet_jax.preprocess import rescale_size

TINY = ["--config.model.base_channels=8", "--config.model.head_channels=8"]
REL_TOL = 1e-4  # max |saved model - predict| / max |predict|


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


def test_saved_model_equals_predict_at_two_odd_sizes(drive_export: Path, drive_rgb: np.ndarray):
    """Slide mode (64x64 windows, stride 42) after the keep-ratio resize to 584x565: 100x90 ->
    584x526 and 77x123 -> 367x584, both through one loaded SavedModel."""
    serve = tf.saved_model.load(str(drive_export)).signatures["serving_default"]
    spec = serve.structured_input_signature[1]["image"]
    assert spec.dtype == tf.uint8 and spec.shape.as_list() == [None, None, 3]
    assert set(serve.structured_outputs) == {"labels", "scores"}
    config, model = fixture_model("fcn_drive")
    for y, x, h, w in ((200, 150, 100, 90), (300, 250, 77, 123)):
        check_against_segment(serve, config, model, np.ascontiguousarray(
            drive_rgb[y:y + h, x:x + w]))
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


@pytest.mark.parametrize("name,overrides,hw", [
    # whole mode: 100x90 -> 167x150, padded to 176x160 and cropped back
    ("fcn_cityscapes", {"data.img_scale": (200, 150)}, (100, 90)),
    # TTA: the view 50x45 (one window, padded to 64x48) and its flip
    ("fcn_drive", {"eval.tta": True, "eval.tta_scales": (0.5,)}, (100, 90)),
])
def test_whole_mode_and_tta(tmp_path: Path, drive_rgb: np.ndarray, name, overrides, hw):
    config, model = fixture_model(name)
    for dotted, value in overrides.items():
        section, field = dotted.split(".")
        config[section][field] = value
    module = export.make_module(config, model, ["cpu"])
    out = export.save_module(module, tmp_path / "saved", {"test": name})
    serve = tf.saved_model.load(str(out)).signatures["serving_default"]
    image = np.ascontiguousarray(drive_rgb[250:250 + hw[0], 200:200 + hw[1]])
    check_against_segment(serve, config, model, image)


@pytest.mark.parametrize("name", ["pspnet_drive", "deeplabv3_drive"])
def test_forward_converts_for_the_other_heads(name):
    """PSP's and ASPP's adaptive pools trace with symbolic sizes (the forward is lowered once
    for [None, None, None, 3]) and the converted forward equals the JAX one."""
    _, model = fixture_model(name)
    forward, variables = export.tf_forward(model, ["cpu"])
    assert variables and not any(v.trainable for v in variables)
    x = np.random.default_rng(0).standard_normal((2, 48, 32, 3)).astype(np.float32)
    got = forward(tf.constant(x)).numpy()
    assert relative_error(got, np.asarray(inference.make_apply_fn(model)(x))) <= REL_TOL


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
    for _ in range(300):
        h, w = (int(v) for v in rng.integers(1, 5000, 2))
        scale = tuple(int(v) for v in rng.integers(1, 4000, 2))
        got = serving.rescale_size(tf.constant(h), tf.constant(w), scale)
        assert tuple(int(v) for v in got) == rescale_size(h, w, scale), (h, w, scale)
        ratio = float(rng.choice([0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 0.3]))
        got = serving.tta_view_size(tf.constant(h), tf.constant(w), ratio)
        assert tuple(int(v) for v in got) == inference.tta_view_hw(h, w, ratio), (h, w, ratio)


def _toy_forward_tf(x: tf.Tensor) -> tf.Tensor:
    """A position-dependent stand-in for the model: cumulative sums down and across a window."""
    return tf.concat([tf.cumsum(x[..., :1], axis=1), tf.cumsum(x[..., 1:2], axis=2)], axis=-1)


def _toy_forward_jax(x):
    x = jnp.asarray(x)
    return jnp.concatenate([jnp.cumsum(x[..., :1], axis=1), jnp.cumsum(x[..., 1:2], axis=2)],
                           axis=-1)


@pytest.mark.parametrize("hw,batch", [((100, 90), 3), ((64, 64), 64), ((37, 150), 4),
                                      ((20, 30), 2), ((130, 107), 64)])
def test_slide_and_whole_inference_equal_jax(hw, batch):
    x = np.random.default_rng(hw[0]).standard_normal((*hw, 3)).astype(np.float32)
    got = serving.slide_inference(_toy_forward_tf, tf.constant(x), (64, 64), (42, 42), 2,
                                  batch_windows=batch, size_divisor=16).numpy()
    ref = inference.slide_inference(_toy_forward_jax, x, (64, 64), (42, 42), 2,
                                    batch_windows=batch, size_divisor=16)
    np.testing.assert_allclose(got, np.asarray(ref), rtol=1e-5, atol=1e-5)
    got = serving.whole_inference(_toy_forward_tf, tf.constant(x), 2, size_divisor=16).numpy()
    ref = inference.whole_inference(_toy_forward_jax, x, 2, size_divisor=16)
    np.testing.assert_allclose(got, np.asarray(ref), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("src,dst", [((584, 526), (100, 90)), ((13, 7), (40, 33)),
                                     ((50, 60), (50, 61))])
def test_resize_logits_equals_jax(src, dst):
    logits = np.random.default_rng(2).standard_normal((*src, 3)).astype(np.float32)
    got = serving.resize_logits(tf.constant(logits), *dst).numpy()
    ref = np.asarray(resize_logits_to(jnp.asarray(logits)[None], dst)[0])
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)


def test_first_argmax_breaks_ties_low():
    scores = tf.constant([[[1.0, 1.0, 0.0], [0.0, 2.0, 2.0], [3.0, 1.0, 3.0]]])
    np.testing.assert_array_equal(serving.first_argmax(scores).numpy(), [[0, 1, 0]])
