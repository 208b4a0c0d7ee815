"""The training-curve figure: a run with one logged step still shows its loss point."""
from __future__ import annotations

import cv2
import numpy as np

from unet_jax import run_logs

LINE_BGR = np.array([180, 119, 31])  # matplotlib's first colour, C0 = #1f77b4


def _line_pixels(png, left: bool) -> int:
    image = cv2.imread(str(png))
    half = image[:, : image.shape[1] // 2] if left else image[:, image.shape[1] // 2:]
    return int((np.abs(half.astype(int) - LINE_BGR).sum(axis=-1) < 60).sum())


def test_single_loss_point_is_drawn(tmp_path):
    records = [{"step": 20, "split": "train", "loss": 0.7, "lr": 0.1}]
    png = run_logs.plot_curves(records, tmp_path / "curves.png")
    assert _line_pixels(png, left=True) > 0


def test_no_loss_no_line(tmp_path):
    """The pixel count above can fail: a figure with only validation points has no C0 pixels
    in the loss panel."""
    records = [{"step": 20, "split": "validation", "mDice": 50.0}]
    png = run_logs.plot_curves(records, tmp_path / "curves.png")
    assert _line_pixels(png, left=True) == 0 and _line_pixels(png, left=False) > 0
