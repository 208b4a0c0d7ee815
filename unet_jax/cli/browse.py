"""Show what the model is fed: training samples after augmentation and the validation images,
each with its label blended over it (mmseg's tools/analysis_tools/browse_dataset.py).

    python -m unet_jax.browse --config configs/drive.py:fcn,ce --output browse/drive [--num 16]

Writes PNGs of `image | label overlay` side by side (a white gap of `GAP` pixels between them;
label colours from `data.palette` blended at alpha 0.5, ignored pixels (255, e.g. the padding of
a crop) left as the image):

* `DIR/train/step<S>_<R>.png`: the first --num samples a single-host training run with this
  config draws (global batch `train.batch_size`, seed `train.seed`: sample R of step S), made by
  the real input pipeline (`unet_jax.data.sampler.train_batches`): random resize, crop, flip and
  photometric distortion, at the crop size `data.crop_size`. The pipeline's images are normalised
  float RGB; they are de-normalised with `data.mean` / `data.std` for display
  (`unet_jax.preprocess.denormalise`, the inverse of the pipelines' `normalise`) (the padding of a
  crop then shows the mean colour).
* `DIR/validation/<K>_<name>.png`: the first --num validation images at their original size with
  their labels (`unet_jax.data.records.samples`, the image the metrics are computed on).

The dataset is prepared first if needed (as for training). `DIR/train` and `DIR/validation` must
not exist or be empty.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from unet_jax.cli import common
from unet_jax.errors import InputError
from unet_jax.evaluate import overlay_image
from unet_jax.preprocess import denormalise

GAP = 4  # white pixels between the image and its overlay
ALPHA = 0.5
TRAIN_DIR, VALIDATION_DIR = "train", "validation"


def side_by_side(image: np.ndarray, label: np.ndarray, palette: Sequence[Sequence[int]]
                 ) -> np.ndarray:
    """uint8 (H, 2 W + GAP, 3): the image, a white gap, the label blended over the image."""
    image = np.asarray(image, np.uint8)
    height, width = image.shape[:2]
    canvas = np.full((height, 2 * width + GAP, 3), 255, np.uint8)
    canvas[:, :width] = image
    canvas[:, width + GAP:] = overlay_image(image, label, palette, alpha=ALPHA)
    return canvas


def _file_stem(name: str) -> str:
    """A dataset sample name as a safe file-name part."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "image"


def _check_output(output: str | Path) -> tuple[Path, Path]:
    out = Path(output).expanduser().absolute()
    if out.exists() and not out.is_dir():
        raise InputError(f"--output {out}: exists and is not a folder")
    dirs = out / TRAIN_DIR, out / VALIDATION_DIR
    for d in dirs:
        if d.exists() and (not d.is_dir() or any(d.iterdir())):
            raise InputError(f"--output {out}: {d.name}/ already exists and is not empty; "
                             "choose another --output (browse never overwrites)")
    return dirs


def browse(config: Any, output: str | Path, num: int = 16, *, progress: bool = True,
           ) -> dict[str, list[Path]]:
    """Write the first `num` training samples and validation images as PNGs (module docstring);
    returns the written paths per split: {'train': [...], 'validation': [...]}."""
    import tensorflow as tf

    from unet_jax import data
    from unet_jax.data.records import samples as eval_samples
    from unet_jax.data.sampler import train_batches

    if num < 1:
        raise InputError(f"--num: expected a positive number of samples, found {num}")
    train_dir, val_dir = _check_output(output)
    tf.config.set_visible_devices([], "GPU")  # the input pipeline runs on the host
    d, batch = config.data, int(config.train.batch_size)
    train_split, val_split = data.source(d, "train"), data.source(d, "validation")
    bar = tqdm(total=num + min(num, len(val_split)), desc="browse", unit="png",
               disable=not progress)
    written: dict[str, list[Path]] = {TRAIN_DIR: [], VALIDATION_DIR: []}
    train_dir.mkdir(parents=True, exist_ok=True)
    batches = train_batches(train_split, d, global_batch_size=batch,
                            seed=int(config.train.seed), host_shard=bool(d.host_shard),
                            workers=0)
    for step in range((num + batch - 1) // batch):
        samples = next(batches)
        for row in range(min(batch, num - step * batch)):
            image = denormalise(samples["image"][row], d.mean, d.std)
            path = train_dir / f"step{step:05d}_{row:02d}.png"
            Image.fromarray(side_by_side(image, samples["label"][row], d.palette)).save(path)
            written[TRAIN_DIR].append(path)
            bar.update()
    val_dir.mkdir(parents=True, exist_ok=True)
    for k, sample in enumerate(eval_samples(val_split, max_images=num)):
        path = val_dir / f"{k:04d}_{_file_stem(sample['name'])}.png"
        Image.fromarray(side_by_side(sample["image"], sample["label"], d.palette)).save(path)
        written[VALIDATION_DIR].append(path)
        bar.update()
    bar.close()
    return written


def main(config: Any, argv: Sequence[str]) -> None:
    """Write the browse PNGs of `config`'s dataset to --output."""
    from absl import flags, logging

    del argv
    logging.set_verbosity(logging.WARNING)
    f = flags.FLAGS
    written = browse(config, f.output, f.num)
    out = Path(f.output).absolute()
    print(f"wrote {len(written[TRAIN_DIR])} augmented training samples to {out / TRAIN_DIR} and "
          f"{len(written[VALIDATION_DIR])} validation images to {out / VALIDATION_DIR}")


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("output", None, "folder for train/ and validation/")
    flags.DEFINE_integer("num", 16, "training samples, and at most as many validation images",
                         lower_bound=1)
    flags.mark_flags_as_required(["output"])


def run() -> None:
    """`python -m unet_jax.browse` / the `unet-jax-browse` console entry."""
    common.run(main, prog="unet_jax.browse", define_flags=_define_flags)


if __name__ == "__main__":
    run()
