"""TFDS builder `hrf`: HRF as mmsegmentation's converter splits it (per category 5 / 10)."""
from __future__ import annotations

from pathlib import Path

from unet_jax.data.builders import common

CATEGORIES = (("healthy", "h"), ("glaucoma", "g"), ("diabetic_retinopathy", "dr"))
LAYOUT = """HRF (https://www5.cs.fau.de/research/data/fundus-images/) in `manual_dir`, either
  the official archives:  healthy.zip, glaucoma.zip, diabetic_retinopathy.zip (15 images each at
                          the root: NN_h.jpg, NN_g.jpg, NN_dr.JPG) and their labels
                          healthy_manualsegm.zip, glaucoma_manualsegm.zip,
                          diabetic_retinopathy_manualsegm.zip (NN_h.tif, NN_g.tif, NN_dr.tif)
                          and their FOV masks healthy_fovmask.zip, glaucoma_fovmask.zip,
                          diabetic_retinopathy_fovmask.zip (NN_h_mask.tif, ...)
  or them extracted:      the whole-dataset layout images/ + manual1/ + mask/, or one folder per
                          archive, named as the archive (healthy/, healthy_fovmask/, ...).
  Per category, sorted: first 5 train, last 10 validation (15 / 30 in all)."""


class Hrf(common.RetinalBuilder):
    """HRF retinal vessels: 45 RGB fundus images 3504x2336 (15 healthy, glaucoma, DR each)."""

    LAYOUT = LAYOUT
    HOMEPAGE = "https://www5.cs.fau.de/research/data/fundus-images/"
    FOV = "official masks (*_fovmask.zip)"
    MANUAL_DOWNLOAD_INSTRUCTIONS = LAYOUT

    def find_pairs(self, manual_dir: Path) -> list[common.Pair]:
        pairs = []
        for category, s in CATEGORIES:
            images_src = common.find_source(manual_dir, f"{category}.zip",
                                            (category, "images", "HRF/images"), f"*_{s}.*", LAYOUT)
            labels_src = common.find_source(
                manual_dir, f"{category}_manualsegm.zip",
                (f"{category}_manualsegm", "manual1", "HRF/manual1"), f"*_{s}.*", LAYOUT)
            masks_src = common.find_source(
                manual_dir, f"{category}_fovmask.zip",
                (f"{category}_fovmask", "mask", "HRF/mask"), f"*_{s}_mask.*", LAYOUT)
            images = common.match_files(images_src, "", rf"(\d+_{s})\.(?i:jpe?g|tiff?|png)")
            labels = common.match_files(labels_src, "", rf"(\d+_{s})\.(?i:tiff?|png|gif)")
            masks = common.match_files(masks_src, "", rf"(\d+_{s})_mask\.(?i:tiff?|png|gif)")
            triples = common.pair_up(images, labels, expected=15, what=category, layout=LAYOUT)
            names = [t[0] for t in triples]
            fovs = common.pick(masks, names, what="FOV mask", where=str(masks_src.path),
                               layout=LAYOUT)
            split = common.first_last(names, 5)
            pairs += [common.Pair(n, split[n], i, l, f) for (n, i, l), f in zip(triples, fovs)]
        return pairs
