"""Cityscapes through TFDS's own `cityscapes/semantic_segmentation` builder, with mmseg's labels.

TFDS's builder reads `leftImg8bit_trainvaltest.zip` and `gtFine_trainvaltest.zip` from
`manual_dir` and gives `image_left` (1024x2048x3), `segmentation_label` (1024x2048x1, the
`*_gtFine_labelIds.png` ids 0..33) and `image_id`; splits train (2975), validation (500) and test.
mmsegmentation trains on `*_gtFine_labelTrainIds.png`, which cityscapesscripts' `json2labelImg`
draws from the same polygons as the labelIds image, with each label's trainId instead of its id
(background: unlabeled, id 0 / trainId 255; id -1 is never drawn). So mapping every pixel of the
labelIds image through the table below gives the trainIds image.
"""
from __future__ import annotations

import sys
from typing import Any

import numpy as np

IGNORE_INDEX = 255

# cityscapesscripts/helpers/labels.py: (name, id, trainId); trainId 255 = ignored in training.
LABELS: tuple[tuple[str, int, int], ...] = (
    ("unlabeled", 0, 255), ("ego vehicle", 1, 255), ("rectification border", 2, 255),
    ("out of roi", 3, 255), ("static", 4, 255), ("dynamic", 5, 255), ("ground", 6, 255),
    ("road", 7, 0), ("sidewalk", 8, 1), ("parking", 9, 255), ("rail track", 10, 255),
    ("building", 11, 2), ("wall", 12, 3), ("fence", 13, 4), ("guard rail", 14, 255),
    ("bridge", 15, 255), ("tunnel", 16, 255), ("pole", 17, 5), ("polegroup", 18, 255),
    ("traffic light", 19, 6), ("traffic sign", 20, 7), ("vegetation", 21, 8), ("terrain", 22, 9),
    ("sky", 23, 10), ("person", 24, 11), ("rider", 25, 12), ("car", 26, 13), ("truck", 27, 14),
    ("bus", 28, 15), ("caravan", 29, 255), ("trailer", 30, 255), ("train", 31, 16),
    ("motorcycle", 32, 17), ("bicycle", 33, 18), ("license plate", -1, -1),
)

ID_TO_TRAINID: dict[int, int] = {i: t for _, i, t in LABELS if i >= 0}
# Lookup table over every uint8 value; ids outside the table (34..255) are ignored.
_LUT = np.full(256, IGNORE_INDEX, np.uint8)
for _id, _train_id in ID_TO_TRAINID.items():
    _LUT[_id] = _train_id
LUT: np.ndarray = _LUT
LUT.setflags(write=False)


def labelids_to_trainids(label: Any) -> Any:
    """Map Cityscapes labelIds (uint8, any shape) to the 19 train ids and 255 (ignore).

    Works on numpy arrays (returns numpy) and on tf tensors (returns a tf.uint8 tensor; usable
    inside `tf.data` maps and `tf.function`).
    """
    tf = sys.modules.get("tensorflow")  # a tf tensor exists only once TensorFlow is imported
    if tf is not None and isinstance(label, (tf.Tensor, tf.Variable)):
        return tf.gather(tf.constant(LUT), tf.cast(label, tf.int32))
    arr = np.asarray(label)
    if arr.dtype != np.uint8:
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise ValueError(f"labelIds: expected values in 0..255, found {arr.min()}..{arr.max()}")
        arr = arr.astype(np.uint8)
    return LUT[arr]


def to_common_features(example: dict[str, Any]) -> dict[str, Any]:
    """TFDS cityscapes example (tf tensors) -> {'image' HxWx3 RGB, 'label' HxW trainIds, 'name'}."""
    label = example["segmentation_label"]
    if label.shape.rank == 3:
        label = label[..., 0]
    return {"image": example["image_left"], "label": labelids_to_trainids(label),
            "name": example["image_id"]}


INSTRUCTIONS = """Cityscapes (https://www.cityscapes-dataset.com/, registration needed): put
  leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip in `manual_dir` (not extracted: TFDS's
  `cityscapes` builder reads the zips and extracts them under `tfds_data_dir/downloads`)."""
