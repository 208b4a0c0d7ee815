"""TFDS builder `chase_db1`: CHASE_DB1 as mmsegmentation's converter splits it (20 / 8)."""
from __future__ import annotations

from pathlib import Path

from unet_jax.data.builders import common

FOV_RED_THRESHOLD = 20  # higher thresholds cut the dim rim and its vessels; see data/README.md
LAYOUT = f"""CHASE_DB1 (Kingston University, https://researchdata.kingston.ac.uk/96/)
  in `manual_dir`, either
  the official archive:  CHASEDB1.zip with 84 files at its root: Image_NNX.jpg,
                         Image_NNX_1stHO.png, Image_NNX_2ndHO.png (NN = 01..14, X = L or R)
  or them extracted:     the same files flat in manual_dir (or in CHASEDB1/ or CHASE_DB1/).
  Label = 1st observer (_1stHO). Sorted: Image_01L..Image_10R train, Image_11L..Image_14R val.
  CHASE_DB1 ships no FOV masks: fov = red channel > {FOV_RED_THRESHOLD}."""


class ChaseDb1(common.RetinalBuilder):
    """CHASE_DB1 retinal vessels: 28 RGB fundus images 999x960; label = 1st human observer."""

    LAYOUT = LAYOUT
    HOMEPAGE = "https://researchdata.kingston.ac.uk/96/"
    FOV = f"red channel > {FOV_RED_THRESHOLD} (derived; CHASE_DB1 ships no FOV masks)"
    MANUAL_DOWNLOAD_INSTRUCTIONS = LAYOUT

    def find_pairs(self, manual_dir: Path) -> list[common.Pair]:
        src = common.find_source(manual_dir, "CHASEDB1.zip", (".", "CHASEDB1", "CHASE_DB1"),
                                 "Image_*.jpg", LAYOUT)
        images = common.match_files(src, "", r"(Image_\d{2}[LR])\.jpg")
        labels = common.match_files(src, "", r"(Image_\d{2}[LR])_1stHO\.png")
        triples = common.pair_up(images, labels, expected=28, what="CHASE_DB1", layout=LAYOUT)
        split = common.first_last([t[0] for t in triples], 20)
        return [common.Pair(n, split[n], i, l, FOV_RED_THRESHOLD) for n, i, l in triples]
