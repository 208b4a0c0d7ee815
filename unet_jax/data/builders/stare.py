"""TFDS builder `stare`: STARE as mmsegmentation's converter splits it (sorted: 10 / 10)."""
from __future__ import annotations

from pathlib import Path

from unet_jax.data.builders import common

FOV_RED_THRESHOLD = 40  # the aperture's red reaches 32 (im0044, im0240); see data/README.md
LAYOUT = f"""STARE vessel subset (https://cecas.clemson.edu/~ahoover/stare/probing/) in `manual_dir`,
  either the official archives:  stare-images.tar (20 x imNNNN.ppm.gz),
                                 labels-ah.tar (20 x imNNNN.ah.ppm.gz)
  or them extracted:             stare-images/imNNNN.ppm[.gz], labels-ah/imNNNN.ah.ppm[.gz]
                                 (also inside a STARE/ folder).
  Label = Adam Hoover's (labels-ah); labels-vk.tar is not used. Sorted names: first 10 train.
  STARE ships no FOV masks: fov = red channel > {FOV_RED_THRESHOLD}."""


class Stare(common.RetinalBuilder):
    """STARE retinal vessels: 20 RGB fundus images 700x605; label = observer A. Hoover (ah)."""

    LAYOUT = LAYOUT
    HOMEPAGE = "https://cecas.clemson.edu/~ahoover/stare/"
    FOV = f"red channel > {FOV_RED_THRESHOLD} (derived; STARE ships no FOV masks)"
    MANUAL_DOWNLOAD_INSTRUCTIONS = LAYOUT

    def find_pairs(self, manual_dir: Path) -> list[common.Pair]:
        images_src = common.find_source(manual_dir, "stare-images.tar",
                                        ("stare-images", "STARE/stare-images"), "im*", LAYOUT)
        labels_src = common.find_source(manual_dir, "labels-ah.tar",
                                        ("labels-ah", "STARE/labels-ah"), "im*", LAYOUT)
        images = common.match_files(images_src, "", r"(im\d{4})\.ppm(?:\.gz)?")
        labels = common.match_files(labels_src, "", r"(im\d{4})\.ah\.p[pg]m(?:\.gz)?")
        triples = common.pair_up(images, labels, expected=20, what="STARE", layout=LAYOUT)
        split = common.first_last([t[0] for t in triples], 10)
        return [common.Pair(n, split[n], i, l, FOV_RED_THRESHOLD) for n, i, l in triples]
