"""unet_jax.browse on the tiny synthetic set: what is written, at which sizes, and that the
images and label overlays are the pipeline's."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from unet_jax import data
from unet_jax.cli import browse
from unet_jax.data.sampler import train_batches
from unet_jax.errors import InputError


def halves(path: Path, width: int) -> tuple[np.ndarray, np.ndarray]:
    png = np.asarray(Image.open(path))
    assert png.shape[1] == 2 * width + browse.GAP and png.dtype == np.uint8
    assert (png[:, width:width + browse.GAP] == 255).all()
    return png[:, :width].astype(np.float32), png[:, width + browse.GAP:].astype(np.float32)


def check_overlay(image: np.ndarray, overlay: np.ndarray, label: np.ndarray, palette) -> None:
    """overlay == rint(image / 2 + colour / 2) where the label is a class, == image elsewhere."""
    for cls, colour in enumerate(palette):
        where = label == cls
        want = np.rint(0.5 * image[where] + 0.5 * np.asarray(colour, np.float32))
        np.testing.assert_array_equal(overlay[where], want, err_msg=f"class {cls}")
    ignored = label >= len(palette)
    np.testing.assert_array_equal(overlay[ignored], image[ignored])


def test_browse_writes_what_the_model_is_fed(train_config, tmp_path: Path):
    config = train_config()  # synthetic 64 x 64 images, 4 train / 2 validation, crops 32 x 32
    d = config.data
    written = browse.browse(config, tmp_path / "out", num=3, progress=False)
    train, val = written["train"], written["validation"]
    assert [p.name for p in train] == ["step00000_00.png", "step00000_01.png",
                                       "step00001_00.png"]  # batch size 2
    assert len(val) == 2  # the whole validation split (2 < num)
    assert sorted((tmp_path / "out" / "train").iterdir()) == sorted(train)
    # the same samples, drawn again by the training pipeline with the config's seed
    batches = train_batches(data.source(d, "train"), d, global_batch_size=2,
                            seed=config.train.seed)
    samples = [(b["image"][r], b["label"][r]) for b in (next(batches), next(batches))
               for r in range(2)][:3]
    for path, (normalised, label) in zip(train, samples):
        image, overlay = halves(path, d.crop_size[1])
        assert image.shape[:2] == tuple(d.crop_size)
        # de-normalised with the right mean/std per channel: back on integer pixel values
        raw = normalised * np.asarray(d.std, np.float32) + np.asarray(d.mean, np.float32)
        assert np.abs(raw - np.rint(raw)).max() < 1e-3
        np.testing.assert_array_equal(image, np.clip(np.rint(raw), 0, 255))
        assert (label == 1).any()
        check_overlay(image, overlay, label, d.palette)
    # the validation images by name, read through TFDS (independent of the records browse reads)
    by_name = {ex["name"].decode(): ex
               for ex in data.load_split(d, "validation").as_numpy_iterator()}
    assert {path.stem.split("_", 1)[1] for path in val} == set(by_name)
    for path in val:
        ex = by_name[path.stem.split("_", 1)[1]]
        image, overlay = halves(path, ex["image"].shape[1])
        np.testing.assert_array_equal(image, ex["image"])  # the original, 64 x 64
        assert (ex["label"] == 1).any()
        check_overlay(image, overlay, ex["label"], d.palette)


def test_browse_refuses_non_empty_outputs(train_config, tmp_path: Path):
    config = train_config()
    (tmp_path / "validation").mkdir()
    (tmp_path / "validation" / "mine.png").write_bytes(b"")
    with pytest.raises(InputError, match="validation/ already exists"):
        browse.browse(config, tmp_path, num=1, progress=False)
    assert not (tmp_path / "train").exists()
    with pytest.raises(InputError, match="--num"):
        browse.browse(config, tmp_path / "other", num=0, progress=False)
