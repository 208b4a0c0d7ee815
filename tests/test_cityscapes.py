"""Cityscapes: the labelIds -> trainIds table, and TFDS's `cityscapes` builder on a tiny fixture."""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pytest
import tensorflow as tf

import unet_jax.data as D
from unet_jax.data import cityscapes as C
from unet_jax.data.builders.common import DataError
from unet_jax.config import load_config

H, W = 1024, 2048  # TFDS's builder fixes this shape
SPLIT_CITIES = {"train": "aachen", "val": "frankfurt", "test": "berlin"}


def test_table_is_cityscapesscripts():
    train = {name: t for name, _, t in C.LABELS if t not in (255, -1)}
    assert tuple(sorted(train, key=train.get)) == tuple(
        load_config("configs/cityscapes.py").data.classes)
    assert sorted(train.values()) == list(range(19))
    assert len(C.LABELS) == 35 and [i for _, i, _ in C.LABELS][:34] == list(range(34))
    assert C.ID_TO_TRAINID[7] == 0 and C.ID_TO_TRAINID[26] == 13 and C.ID_TO_TRAINID[33] == 18
    ignored = [i for i, t in C.ID_TO_TRAINID.items() if t == 255]
    assert ignored == [0, 1, 2, 3, 4, 5, 6, 9, 10, 14, 15, 16, 18, 29, 30]


def test_mapping_numpy_and_tf_agree():
    ids = np.arange(256, dtype=np.uint8).reshape(16, 16)
    expected = np.array([C.ID_TO_TRAINID.get(i, 255) for i in range(256)], np.uint8).reshape(16, 16)
    np.testing.assert_array_equal(C.labelids_to_trainids(ids), expected)
    np.testing.assert_array_equal(C.labelids_to_trainids(tf.constant(ids)).numpy(), expected)
    mapped = tf.function(C.labelids_to_trainids)(tf.constant(ids[..., None]))
    assert mapped.dtype == tf.uint8 and mapped.shape == (16, 16, 1)
    np.testing.assert_array_equal(C.labelids_to_trainids(ids.astype(np.int64)), expected)
    with pytest.raises(ValueError, match="0..255"):
        C.labelids_to_trainids(np.array([-1, 3]))


def label_ids(seed: int) -> np.ndarray:
    """Horizontal bands of every id 0..33 plus an unknown value 200."""
    values = np.array(list(range(34)) + [200], np.uint8)
    rng = np.random.default_rng(seed)
    rows = values[np.arange(H) * len(values) // H]
    out = np.repeat(rows[:, None], W, axis=1)
    out[:, : 64] = rng.permutation(values)[0]
    return out


def write_cityscapes(root: Path) -> dict[str, tuple[str, np.ndarray]]:
    """The two official zips with one image per split (one city each); returns id -> labelIds."""
    root.mkdir(parents=True, exist_ok=True)
    labels = {}
    with zipfile.ZipFile(root / "leftImg8bit_trainvaltest.zip", "w") as zl, \
            zipfile.ZipFile(root / "gtFine_trainvaltest.zip", "w") as zg:
        for k, (split, city) in enumerate(SPLIT_CITIES.items()):
            image_id = f"{city}_000000_0000{19 + k}"
            img = np.zeros((H, W, 3), np.uint8)
            img[:, :, k] = 50 + 40 * k
            zl.writestr(f"leftImg8bit/{split}/{city}/{image_id}_leftImg8bit.png",
                        cv2.imencode(".png", img)[1].tobytes())
            ids = label_ids(k)
            gt = f"gtFine/{split}/{city}/{image_id}_gtFine"
            zg.writestr(f"{gt}_labelIds.png", cv2.imencode(".png", ids)[1].tobytes())
            zg.writestr(f"{gt}_polygons.json", json.dumps({"imgHeight": H, "imgWidth": W,
                                                           "objects": []}))
            labels[image_id] = (split, ids)
    return labels


def test_tfds_cityscapes_builder_prepares_fixture(tmp_path):
    labels = write_cityscapes(tmp_path / "manual")
    data = dict(name="cityscapes", manual_dir=str(tmp_path / "manual"),
                tfds_data_dir=str(tmp_path / "tfds"))
    seen = {}
    for split in ("train", "validation", "test"):
        for ex in D.load_split(data, split).as_numpy_iterator():
            name = ex["name"].decode()
            seen[name] = split
            assert ex["image"].shape == (H, W, 3) and ex["label"].shape == (H, W)
            _, ids = labels[name]
            np.testing.assert_array_equal(ex["label"], C.LUT[ids])
            assert set(np.unique(ex["label"]).tolist()) == set(range(19)) | {255}
    assert seen == {i: {"val": "validation"}.get(s, s) for i, (s, _) in labels.items()}
    for split in ("train", "validation"):  # the records: train ids, the image bytes as stored
        (sample,) = list(D.source(data, split))
        _, ids = labels[sample["name"]]
        assert set(sample) == {"image", "label", "name"}
        assert sample["image"].shape == (H, W, 3) and sample["image"].dtype == np.uint8
        np.testing.assert_array_equal(sample["label"], C.LUT[ids])


def test_cityscapes_missing_zip(tmp_path):
    (tmp_path / "manual").mkdir()
    (tmp_path / "manual" / "gtFine_trainvaltest.zip").write_bytes(b"")
    data = dict(name="cityscapes", manual_dir=str(tmp_path / "manual"),
                tfds_data_dir=str(tmp_path / "tfds"))
    with pytest.raises(DataError, match="leftImg8bit_trainvaltest.zip"):
        D.prepare(data)
