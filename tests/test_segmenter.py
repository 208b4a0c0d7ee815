"""The Python API: Segmenter.load + predict == mmseg's inference_model on DRIVE 01_test."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import DATA, FIXTURES, REPO, require_shared, check_argmax
from unet_jax import Segmenter
from unet_jax.errors import CheckpointError, ConfigError, InputError
from unet_jax.io.images import read_rgb

TINY = {"model.base_channels": 8, "model.head_channels": 8}  # the fixture widths


@pytest.fixture(scope="module")
def segmenter() -> Segmenter:
    pth = require_shared(FIXTURES / "models" / "fcn_drive.pth")
    return Segmenter.load(f"{REPO / 'configs' / 'drive.py'}:fcn", pth, overrides=TINY)


def test_predict_matches_mmseg_on_drive(segmenter: Segmenter):
    ref = np.load(require_shared(FIXTURES / "inference" / "drive_01_test_inference_model.npz"))
    image = read_rgb(require_shared(DATA / "DRIVE" / "test" / "images" / "01_test.tif"))
    labels, scores = segmenter.predict(image)
    assert labels.dtype == np.uint8 and labels.shape == (584, 565)
    assert scores.dtype == np.float32 and scores.shape == (584, 565, 2)
    err = float(np.abs(scores - ref["seg_logits"].transpose(1, 2, 0)).max())
    assert err <= 3e-4, f"Segmenter scores vs mmseg: max abs error {err}"
    check_argmax(labels, ref["seg_logits"], ref["pred"], atol=3e-4)
    np.testing.assert_array_equal(labels, scores.argmax(-1))
    assert segmenter.classes == ("background", "vessel")
    assert segmenter.palette == [[120, 120, 120], [6, 230, 230]]


def test_predict_rejects_what_is_not_one_rgb_image(segmenter: Segmenter):
    for bad in (np.zeros((8, 8, 3), np.float32), np.zeros((8, 8), np.uint8),
                np.zeros((1, 8, 8, 3), np.uint8), np.zeros((0, 8, 3), np.uint8)):
        with pytest.raises(InputError, match="expected one uint8 RGB image"):
            segmenter.predict(bad)


def test_load_errors(tmp_path: Path):
    config = f"{REPO / 'configs' / 'drive.py'}:fcn"
    with pytest.raises(ConfigError, match="model.base_channel"):
        Segmenter.load(config, tmp_path, overrides={"model.base_channel": 8})
    with pytest.raises(ConfigError, match="does not exist"):
        Segmenter.load(str(tmp_path / "nope.py"), tmp_path)
    pth = require_shared(FIXTURES / "models" / "fcn_drive.pth")
    with pytest.raises(CheckpointError, match="base_channels"):  # default widths do not fit
        Segmenter.load(config, pth)


def test_import_stays_light():
    """`import unet_jax` loads neither JAX nor TensorFlow; Segmenter is imported on first use."""
    assert Segmenter.__module__ == "unet_jax.segmenter"
    code = ("import sys, unet_jax; heavy = [m for m in ('jax', 'tensorflow', 'cv2') "
            "if m in sys.modules]; assert not heavy, heavy; "
            "assert 'Segmenter' in unet_jax.__all__ and 'Segmenter' not in vars(unet_jax)")
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
