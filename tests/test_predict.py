"""predict CLI: label PNGs, overlays, logits; --save_logits parity with mmseg on DRIVE 01_test."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import DATA, FIXTURES, REPO, require_shared, tiny_config
from unet_jax import convert, predict, weights
from unet_jax.errors import CheckpointError, InputError
from unet_jax.models import build_model

TINY = ["--config.model.base_channels=8", "--config.model.head_channels=8"]


def fcn_config():
    """The drive fcn config at the fixtures' tiny widths."""
    return tiny_config("configs/drive.py:fcn")


@pytest.fixture(scope="module")
def pth() -> Path:
    return require_shared(FIXTURES / "models" / "fcn_drive.pth")


@pytest.fixture(scope="module")
def drive_01() -> Path:
    return require_shared(DATA / "DRIVE" / "test" / "images" / "01_test.tif")


def check_outputs(out: Path, stem: str, hw: tuple[int, int], with_logits: bool) -> np.ndarray:
    label_img = Image.open(out / f"{stem}.png")
    assert label_img.mode == "P"
    assert label_img.getpalette()[:6] == [120, 120, 120, 6, 230, 230]
    label = np.asarray(label_img)
    assert label.shape == hw and set(np.unique(label)) <= {0, 1}
    overlay = np.asarray(Image.open(out / f"{stem}_overlay.png"))
    assert overlay.shape == (*hw, 3) and overlay.dtype == np.uint8
    logits_path = out / f"{stem}_logits.npy"
    assert logits_path.exists() == with_logits
    if with_logits:
        logits = np.load(logits_path)
        assert logits.dtype == np.float32 and logits.shape == (*hw, 2)
        np.testing.assert_array_equal(logits.argmax(-1), label)
    return label


def test_predict_crop_and_odd_sizes(tmp_path: Path, pth: Path, drive_01: Path):
    rgb = np.asarray(Image.open(drive_01).convert("RGB"))
    inputs = tmp_path / "in"
    (inputs / "sub").mkdir(parents=True)
    Image.fromarray(rgb[150:350, 10:190]).save(inputs / "crop.png")
    Image.fromarray(rgb[300:337, 200:253]).save(inputs / "sub" / "odd.jpg")  # 37 x 53
    (inputs / "notes.txt").write_text("not an image, skipped in folders")
    config = fcn_config()
    out = tmp_path / "out"
    written = predict.predict_files(config, pth, [inputs], out, save_logits=True, progress=False)
    assert [r["input"].name for r in written] == ["crop.png", "odd.jpg"]
    crop = check_outputs(out, "crop", (200, 180), True)
    assert 0 < crop.mean() < 1  # both classes present (the tiny model is untrained)
    check_outputs(out, "odd", (37, 53), True)
    # without the test-pipeline resize: 37x53 < the 64x64 crop, windows padded to 48x64
    out2 = tmp_path / "out_noresize"
    predict.predict_files(config, pth, [inputs / "sub" / "odd.jpg"], out2, resize=False,
                          progress=False)
    check_outputs(out2, "odd", (37, 53), False)


def test_predict_errors(tmp_path: Path, pth: Path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(predict.ImageReadError, match="broken.png"):
        predict.predict_files(fcn_config(), pth, [bad], tmp_path / "o", progress=False)
    with pytest.raises(InputError, match="missing.png"):
        predict.predict_files(fcn_config(), pth, [tmp_path / "missing.png"], tmp_path / "o",
                              progress=False)
    with pytest.raises(CheckpointError, match="nowhere"):
        weights.load(build_model(fcn_config().model), tmp_path / "nowhere")


def test_cli_save_logits_matches_mmseg(tmp_path: Path, pth: Path, drive_01: Path):
    """.pth -> unet_jax.convert weights folder -> predict CLI --save_logits == mmseg's logits."""
    ref = np.load(require_shared(FIXTURES / "inference" / "drive_01_test_inference_model.npz"))
    weights = tmp_path / "weights"
    convert.import_mmseg(fcn_config(), pth, weights)
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "unet_jax.predict", "--config", "configs/drive.py:fcn,ce",
           *TINY, "--checkpoint", str(weights), "--input", str(drive_01),
           "--output", str(out), "--save_logits"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert str(out.absolute()) in proc.stdout
    label = check_outputs(out, "01_test", (584, 565), True)
    logits = np.load(out / "01_test_logits.npy")
    err = float(np.abs(logits - ref["seg_logits"].transpose(1, 2, 0)).max())
    assert err <= 3e-4, f"--save_logits vs mmseg: max abs error {err}"
    flips = int((label != ref["pred"]).sum())
    assert flips == 0, f"{flips} argmax flips vs mmseg"


def test_cli_reports_unreadable_image(tmp_path: Path, pth: Path):
    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"\x00" * 10)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "unet_jax.predict", "--config", "configs/drive.py", *TINY,
           "--checkpoint", str(pth), "--input", str(bad), "--output", str(tmp_path / "o")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "bad.tif" in proc.stderr and "cannot read as an image" in proc.stderr
