"""TFDS builder `drive`: DRIVE as mmsegmentation's converter splits it (20 train / 20 val)."""
from __future__ import annotations

from pathlib import Path

from unet_jax.data.builders import common

LAYOUT = """DRIVE (2004 release; https://drive.grand-challenge.org/) in `manual_dir`, either
  the official archives:  training.zip (training/images/NN_training.tif,
                                        training/1st_manual/NN_manual1.gif,
                                        training/mask/NN_training_mask.gif)
                          test.zip     (test/images/NN_test.tif, test/1st_manual/NN_manual1.gif,
                                        test/mask/NN_test_mask.gif)
  or them extracted:      training/... and test/... (also accepted inside a DRIVE/ folder).
  training = ids 21-40, validation = the 20 test images 01-20; mask = the official FOV masks;
  2nd_manual is not used."""


class Drive(common.RetinalBuilder):
    """DRIVE retinal vessels: 40 RGB fundus images 565x584; label = 1st observer (1st_manual)."""

    LAYOUT = LAYOUT
    HOMEPAGE = "https://drive.grand-challenge.org/"
    FOV = "official masks (training/mask, test/mask)"
    MANUAL_DOWNLOAD_INSTRUCTIONS = LAYOUT + """
  The current Grand-Challenge test.zip lacks test/1st_manual; the full 2004 release is needed."""

    def find_pairs(self, manual_dir: Path) -> list[common.Pair]:
        pairs = []
        for split, part in ((common.TRAIN, "training"), (common.VALIDATION, "test")):
            src = common.find_source(manual_dir, f"{part}.zip", (".", "DRIVE"),
                                     f"{part}/images", LAYOUT)
            images = common.match_files(src, f"{part}/images", rf"(\d+)_{part}\.tif")
            labels = common.match_files(src, f"{part}/1st_manual", r"(\d+)_manual1\.gif")
            masks = common.match_files(src, f"{part}/mask", rf"(\d+)_{part}_mask\.gif")
            triples = common.pair_up(images, labels, expected=20, what=part, layout=LAYOUT)
            fovs = common.pick(masks, [name for name, _, _ in triples], what="FOV mask",
                               where=src.where(f"{part}/mask"), layout=LAYOUT)
            for (name, image, label), fov in zip(triples, fovs):
                pairs.append(common.Pair(name, split, image, label, fov))
        return pairs
