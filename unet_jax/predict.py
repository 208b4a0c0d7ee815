"""Segment your own images with a converted mmseg checkpoint or a unet_jax run.

    python -m unet_jax.predict --config configs/drive.py:fcn,ce --checkpoint CKPT \\
        --input IMAGE_OR_FOLDER [MORE ...] --output DIR [--save_logits] [--noresize] \\
        [--config.eval.tta=True] [--config.model.base_channels=8 ...]

CKPT is a weights folder (`python -m unet_jax.convert` output), an mmseg `.pth` read directly
(no torch needed), or a training workdir (its latest checkpoint). Inputs are image files or
folders (searched recursively for png/jpg/jpeg/tif/tiff/gif/ppm/bmp); any size works.

For every image `<stem>` it writes to DIR:
* `<stem>.png`: the label map, a palette PNG whose pixel values are the class ids and whose
  palette is `config.data.palette`;
* `<stem>_overlay.png`: the label colours blended over the image (alpha 0.5);
* with --save_logits, `<stem>_logits.npy`: float32 H x W x C at the image's original size, the
  window-averaged logits; with `--config.eval.tta=True` the view-averaged softmax probabilities
  instead (mmseg merges TTA views in probability space).

Preprocessing is mmseg's test pipeline: keep-ratio resize of the image to `data.img_scale`
(cv2 bilinear; an identity at the dataset's native size, e.g. 584x565 for DRIVE), then slide or
whole inference per `config.eval`, logits resized back to the original size. `--noresize` runs at
the image's own size instead. Sides that are not multiples of 16 are zero-padded and cropped back
(see `unet_jax.inference`); mmseg would raise on those.
"""
from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm import tqdm

from unet_jax import cli
from unet_jax import weights
from unet_jax.evaluate import overlay_image
from unet_jax.inference import make_apply_fn, segment
from unet_jax.models import build_model
from unet_jax.errors import InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".gif", ".ppm", ".bmp")


class ImageReadError(InputError):
    """An input file could not be decoded as an image."""


# ------------------------------------------------------------------------------ images
def list_images(inputs: Sequence[str | Path]) -> list[Path]:
    """Files as given plus the image files inside folders (recursive, sorted)."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*")
                           if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise InputError(f"--input {path}: folder holds no image files "
                                        f"(expected suffixes {', '.join(IMAGE_SUFFIXES)})")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise InputError(f"--input {path}: no such file or folder")
    stems: dict[str, Path] = {}
    for f in files:
        if f.stem in stems and stems[f.stem] != f:
            raise InputError(f"inputs {stems[f.stem]} and {f} would both write {f.stem}.png; "
                             f"predict them into different --output folders")
        stems[f.stem] = f
    return list(dict.fromkeys(files))


def read_image(path: str | Path) -> np.ndarray:
    """uint8 RGB (H, W, 3) of an image file (PIL; first frame of a GIF / multi-page TIFF)."""
    path = Path(path)
    try:
        with Image.open(path) as img:
            img.seek(0)
            rgb = np.asarray(img.convert("RGB"))
    except (OSError, ValueError, EOFError) as err:
        raise ImageReadError(f"{path}: cannot read as an image (expected one of "
                             f"{', '.join(IMAGE_SUFFIXES)}): {err}") from err
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.shape[0] < 1 or rgb.shape[1] < 1:
        raise ImageReadError(f"{path}: expected an H x W x 3 image, found shape {rgb.shape}")
    return np.ascontiguousarray(rgb, dtype=np.uint8)


def full_palette(palette: Sequence[Sequence[int]], num_classes: int) -> list[list[int]]:
    """`palette` extended (deterministically) to `num_classes` colours."""
    colours = [[int(v) for v in p] for p in palette][:num_classes]
    rng = np.random.default_rng(0)
    while len(colours) < num_classes:
        colours.append([int(v) for v in rng.integers(0, 256, 3)])
    return colours


def save_label_png(path: str | Path, label_map: np.ndarray,
                   palette: Sequence[Sequence[int]]) -> None:
    """Write a label map as a palette ('P') PNG: values are class ids, colours the palette."""
    label_map = np.asarray(label_map)
    if label_map.max(initial=0) > 255 or label_map.min(initial=0) < 0:
        raise ValueError(f"{path}: label ids must fit in uint8; found range "
                         f"[{label_map.min()}, {label_map.max()}]")
    img = Image.fromarray(label_map.astype(np.uint8))
    flat = [v for colour in palette for v in colour]
    img.putpalette(flat + [0] * (768 - len(flat)))
    img.save(path)


# ------------------------------------------------------------------------------ the command
def predict_files(config: Any, checkpoint: str | Path, inputs: Sequence[str | Path],
                  output: str | Path, *, save_logits: bool = False, resize: bool = True,
                  progress: bool = True) -> list[dict[str, Any]]:
    """Segment every input image; returns one dict per image {input, label, overlay, logits}."""
    files = list_images(inputs)
    out_dir = Path(output)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = build_model(config.model)
    weights.load(model, checkpoint)
    apply_fn = make_apply_fn(model)
    num_classes = int(config.model.num_classes)
    palette = full_palette(config.data.palette, num_classes)
    written = []
    for path in tqdm(files, desc="predict", unit="img", disable=not progress):
        image = read_image(path)
        scores, pred = segment(apply_fn, image, config, resize=resize)
        pred = np.asarray(pred).astype(np.uint8)
        record: dict[str, Any] = {"input": path, "label": out_dir / f"{path.stem}.png",
                                  "overlay": out_dir / f"{path.stem}_overlay.png"}
        save_label_png(record["label"], pred, palette)
        Image.fromarray(overlay_image(image, pred, palette, alpha=0.5)).save(record["overlay"])
        if save_logits:
            record["logits"] = out_dir / f"{path.stem}_logits.npy"
            np.save(record["logits"], np.asarray(scores, np.float32))
        written.append(record)
    return written


def main(config: Any, argv: Sequence[str]) -> None:
    """Segment the --input images with `config` and --checkpoint."""
    from absl import flags, logging

    logging.set_verbosity(logging.WARNING)
    f = flags.FLAGS
    inputs = list(f.input or []) + list(argv[1:])  # `--input a.png b.png` leaves b.png in argv
    if not inputs:
        raise InputError("give at least one --input image or folder")
    written = predict_files(config, f.checkpoint, inputs, f.output,
                            save_logits=f.save_logits, resize=f.resize)
    what = "label maps + overlays" + (" + logits" if f.save_logits else "")
    print(f"wrote {what} of {len(written)} image(s) to {Path(f.output).absolute()}")


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_string("checkpoint", None,
                        "mmseg .pth, weights folder (unet_jax.convert) or training workdir")
    flags.DEFINE_multi_string("input", None, "image file or folder (repeatable; extra "
                              "positional paths are inputs too)")
    flags.DEFINE_string("output", None, "output folder")
    flags.DEFINE_bool("save_logits", False, "also write <stem>_logits.npy (float32 H x W x C)")
    flags.DEFINE_bool("resize", True, "keep-ratio resize to data.img_scale as mmseg's test "
                      "pipeline (--noresize: run at the image's own size)")
    flags.mark_flags_as_required(["checkpoint", "output"])


def run() -> None:
    """`python -m unet_jax.predict` / the `unet-jax-predict` console entry."""
    cli.run(main, prog="unet_jax.predict", define_flags=_define_flags)


if __name__ == "__main__":
    run()
