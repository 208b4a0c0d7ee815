"""Crop statistics of the training pipeline on DRIVE vs an independent mmseg reference.

Run:
    python experiments/crop_stats.py [--drive_dir ../shared/data/DRIVE] [--crops 20000] [--seed 0]
Expected runtime: about 1 min on one CPU core for 20000 + 20000 crops.

What it measures, over random 64x64 training crops of the 20 DRIVE training images:
share of crops containing vessel, mean vessel fraction per crop, and the share of crops that pass
mmseg's cat_max_ratio test (i.e. ended on an accepted bbox rather than the unchecked 11th).
"ours" is `unet_jax.data.sampler.TrainSampler` (the real batch path); "reference" is a plain,
sequential numpy/cv2 re-implementation of mmseg's RandomResize + RandomCrop(cat_max_ratio=0.75)
written here from mmseg's RandomResize/RandomCrop, sharing no code with
`unet_jax/data/augment.py` or tests/mmseg_reference.py.
The two must agree within 2 percentage points (exit status 1 otherwise). The default 20000
crops each keep the standard error of the accepted-share difference at ~0.5 pp (with 5000 it is
~1 pp, so a 2 pp bound would fail by chance for about 1 seed in 20).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DRIVE = REPO.parent / "shared" / "data" / "DRIVE"
IMG_SCALE, CROP, RATIO_RANGE, CAT_MAX_RATIO, IGNORE = (584, 565), (64, 64), (0.5, 2.0), 0.75, 255
TOLERANCE_PP = 2.0


def load_drive_training(drive_dir: Path) -> tuple[list[np.ndarray], list[np.ndarray], list[str]]:
    """The 20 DRIVE training images (RGB uint8) and labels (first GIF frame // 128), by name."""
    root = drive_dir / "training"
    names = sorted(p.name.split("_")[0] for p in (root / "images").glob("*_training.tif"))
    if len(names) != 20:
        raise FileNotFoundError(
            f"{root / 'images'}: expected 20 *_training.tif, found {len(names)}")
    images = [np.asarray(Image.open(root / "images" / f"{n}_training.tif").convert("RGB"))
              for n in names]
    labels = [(np.asarray(Image.open(root / "1st_manual" / f"{n}_manual1.gif")) // 128)
              .astype(np.uint8) for n in names]
    return images, labels, names


# ----------------------------------------------------------- independent reference (from the spec)
def reference_crop_labels(labels: list[np.ndarray], count: int, seed: int) -> np.ndarray:
    """`count` label crops through mmseg's RandomResize + RandomCrop, written out step by step.

    The image is drawn uniformly (mmseg's shuffled sampler over RepeatDataset), then:
    r = U * 1.5 + 0.5; target = (int(584 r), int(565 r)); sf = min(max(t)/max(h,w),
    min(t)/min(h,w)); size = int(x sf + 0.5); label cv2 INTER_NEAREST; bbox offsets
    randint(0, max(H - 64, 0) + 1); 10 checks (>= 2 classes, max share < 0.75), 11th unchecked.
    """
    rs = np.random.RandomState(seed)
    out = np.empty((count,) + CROP, np.uint8)
    for n in range(count):
        label = labels[rs.randint(len(labels))]
        ratio = rs.random_sample() * (RATIO_RANGE[1] - RATIO_RANGE[0]) + RATIO_RANGE[0]
        target = (int(IMG_SCALE[0] * ratio), int(IMG_SCALE[1] * ratio))
        h, w = label.shape
        sf = min(max(target) / max(h, w), min(target) / min(h, w))
        new_w, new_h = int(w * sf + 0.5), int(h * sf + 0.5)
        resized = cv2.resize(label, (new_w, new_h), interpolation=cv2.INTER_NEAREST)

        def draw() -> tuple[int, int]:
            return (rs.randint(0, max(new_h - CROP[0], 0) + 1),
                    rs.randint(0, max(new_w - CROP[1], 0) + 1))

        y, x = draw()
        for _ in range(10):
            values, counts = np.unique(resized[y:y + CROP[0], x:x + CROP[1]], return_counts=True)
            counts = counts[values != IGNORE]
            if len(counts) > 1 and counts.max() / counts.sum() < CAT_MAX_RATIO:
                break
            y, x = draw()
        out[n] = resized[y:y + CROP[0], x:x + CROP[1]]
    return out


# ------------------------------------------------------------------------------- our pipeline
def pipeline_crop_labels(images: list[np.ndarray], labels: list[np.ndarray], names: list[str],
                         count: int, seed: int) -> np.ndarray:
    """`count` label crops of global samples 0..count-1 of unet_jax's training pipeline."""
    from unet_jax.config import load_config
    from unet_jax.data import sampler as data_sampler

    order = np.argsort(names)  # the records' order (sorted by name)
    pairs = _Pairs([np.ascontiguousarray(images[k][:, :, ::-1]) for k in order],
                   [labels[k] for k in order])
    sampler = data_sampler.TrainSampler(pairs, load_config("configs/drive.py").data, seed)
    parts = [sampler.batch(np.arange(s, min(s + 256, count)))[1] for s in range(0, count, 256)]
    return np.concatenate(parts).astype(np.uint8)


class _Pairs:
    """The sampler's source protocol (`len`, `train_pair`) over decoded arrays in memory."""

    def __init__(self, images_bgr: list[np.ndarray], labels: list[np.ndarray]):
        self.images, self.labels = images_bgr, labels

    def __len__(self) -> int:
        return len(self.images)

    def train_pair(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.images[k], self.labels[k]


# ----------------------------------------------------------------------------------- statistics
def crop_statistics(crops: np.ndarray) -> dict[str, float]:
    """Share with vessel, mean vessel fraction, share passing cat_max_ratio (fractions)."""
    flat = crops.reshape(len(crops), -1)
    valid = (flat != IGNORE).sum(1)
    vessel = (flat == 1).sum(1)
    fraction = vessel / np.maximum(valid, 1)
    majority = np.maximum(vessel, valid - vessel) / np.maximum(valid, 1)
    accepted = (vessel > 0) & (vessel < valid) & (majority < CAT_MAX_RATIO)
    return {"share_with_vessel": float((vessel > 0).mean()),
            "mean_vessel_fraction": float(fraction.mean()),
            "share_accepted": float(accepted.mean()),
            "se_share_with_vessel": float(np.sqrt((vessel > 0).var() / len(crops))),
            "se_mean_vessel_fraction": float(fraction.std() / np.sqrt(len(crops))),
            "se_share_accepted": float(np.sqrt(accepted.var() / len(crops)))}


def compare(ours: dict[str, float], ref: dict[str, float],
            ) -> list[tuple[str, float, float, float, float]]:
    """Rows (metric, ours %, reference %, difference pp, standard error of the difference pp)."""
    rows = []
    for key in ("share_with_vessel", "mean_vessel_fraction", "share_accepted"):
        se = np.hypot(ours[f"se_{key}"], ref[f"se_{key}"]) * 100
        rows.append((key, ours[key] * 100, ref[key] * 100, (ours[key] - ref[key]) * 100, float(se)))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--drive_dir", type=Path, default=DEFAULT_DRIVE)
    parser.add_argument("--crops", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    images, labels, names = load_drive_training(args.drive_dir)
    t0 = time.perf_counter()
    ours = crop_statistics(pipeline_crop_labels(images, labels, names, args.crops, args.seed))
    t1 = time.perf_counter()
    ref = crop_statistics(reference_crop_labels(labels, args.crops, args.seed))
    t2 = time.perf_counter()
    print(f"DRIVE training, {len(names)} images, {args.crops} random 64x64 crops each "
          f"(seed {args.seed}; ours {t1 - t0:.1f} s, reference {t2 - t1:.1f} s)\n")
    print("| metric | unet_jax | mmseg reference | difference (pp) | s.e. of difference (pp) |")
    print("|---|---|---|---|---|")
    worst = 0.0
    for key, a, b, diff, se in compare(ours, ref):
        print(f"| {key} | {a:.2f} % | {b:.2f} % | {diff:+.2f} | {se:.2f} |")
        worst = max(worst, abs(diff))
    ok = worst <= TOLERANCE_PP
    print(f"\nlargest |difference| {worst:.2f} pp: {'PASS' if ok else 'FAIL'} "
          f"(tolerance {TOLERANCE_PP} pp)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
