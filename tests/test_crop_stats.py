"""Crop statistics of the training pipeline vs the independent mmseg reference of
experiments/crop_stats.py, on the real DRIVE training images (fast version: 600 crops each)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def _crop_stats_module():
    spec = importlib.util.spec_from_file_location("crop_stats",
                                                  REPO / "experiments" / "crop_stats.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_crop_statistics_match_reference(data_dir: Path) -> None:
    cs = _crop_stats_module()
    images, labels, names = cs.load_drive_training(data_dir / "DRIVE")
    n = 600
    ours = cs.crop_statistics(cs.pipeline_crop_labels(images, labels, names, n, seed=1))
    ref = cs.crop_statistics(cs.reference_crop_labels(labels, n, seed=1))
    # Independent samples: the difference of the two estimates has standard error
    # se = hypot(se_ours, se_ref) (~1.3 pp for the vessel share, ~2.9 pp for the accepted
    # share, ~0.8 pp for the mean fraction at n = 600). Allow 4.5 se: a false failure has
    # probability < 1e-5 per metric, while a real 2-5 pp bias (e.g. a wrong retry count or no
    # cat_max_ratio at all, which moves the accepted share by ~50 pp) is still caught.
    for key, a, b, diff, se in cs.compare(ours, ref):
        assert abs(diff) <= 4.5 * se, (f"{key}: ours {a:.2f} %, reference {b:.2f} %, "
                                       f"|diff| {abs(diff):.2f} pp > 4.5 x {se:.2f} pp")
    # sanity: the cat_max_ratio rule is active (about half the crops end accepted: mmseg RandomCrop)
    assert 0.4 < ours["share_accepted"] < 0.65
    assert 0.9 < ours["share_with_vessel"] <= 1.0
    assert np.isfinite(ours["mean_vessel_fraction"])
