"""DRIVE straight from its official folder layout, without TensorFlow: training records and
validation samples, decoded as mmseg's converter decodes them.

For where TFDS is absent or unwanted: the input benchmark (`python -m unet_jax.benchmark input
--drive_dir ...`) and the GPU report (experiments/gpu_report.py), which runs on machines with
jax, numpy and opencv only. Images are read with cv2 (BGR, `mmcv.imread`); labels are
`channel0 // 128` of the 1st observer's GIF, first frame, as tools/dataset_converters/drive.py
reads it with `cv2.VideoCapture`; the FOV is the official `mask` GIF. The TFDS builder
(`unet_jax.data.builders.drive`) gives the same pixels (tests/test_data_builders.py checks both
against mmseg's converter output).
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from unet_jax.data.sampler import Record
from unet_jax.errors import DataError


def _read_gif(path: Path) -> np.ndarray:
    """First frame of a GIF as BGR uint8 (cv2's decoder, its video reader, else Pillow)."""
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        capture = cv2.VideoCapture(str(path))
        ok, image = capture.read()
        capture.release()
        if not ok:
            image = None
    if image is None:
        try:
            from PIL import Image
        except ImportError as err:
            raise DataError(f"{path}: this OpenCV cannot decode GIFs and Pillow is not "
                            "installed") from err
        with Image.open(path) as im:
            im.seek(0)
            image = np.asarray(im.convert("RGB"))[:, :, ::-1]
    return np.ascontiguousarray(image)


def _pairs(root: Path, part: str) -> list[tuple[str, Path, Path, Path]]:
    images = sorted((root / part / "images").glob(f"*_{part}.tif"))
    if not images:
        raise DataError(f"{root / part / 'images'}: expected DRIVE's *_{part}.tif images "
                        "(the official layout: training/ and test/ with images/, 1st_manual/, "
                        "mask/), found none")
    out = []
    for image in images:
        name = image.name.split("_")[0]
        label = root / part / "1st_manual" / f"{name}_manual1.gif"
        mask = root / part / "mask" / f"{name}_{part}_mask.gif"
        for path in (label, mask):
            if not path.is_file():
                raise DataError(f"{path}: missing (every DRIVE image needs its 1st_manual "
                                "label and mask)")
        out.append((name, image, label, mask))
    return out


def _read_image(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise DataError(f"{path}: cannot be decoded as an image")
    return image


def drive_records(drive_dir: str | Path) -> list[Record]:
    """DRIVE's 20 training pairs (ids 21-40) as `Record`s (BGR image, label 0/1), by name."""
    root = Path(drive_dir)
    return [Record(_read_image(img), (_read_gif(lab)[:, :, 0] // 128).astype(np.uint8), name)
            for name, img, lab, _ in _pairs(root, "training")]


def drive_validation(drive_dir: str | Path) -> list[dict]:
    """DRIVE's 20 validation samples (the test images 01-20), as `pipeline.eval_dataset` yields
    them without the normalised image: {image RGB, label, fov, name}."""
    root = Path(drive_dir)
    out = []
    for name, img, lab, mask in _pairs(root, "test"):
        out.append({"image": np.ascontiguousarray(_read_image(img)[:, :, ::-1]),
                    "label": (_read_gif(lab)[:, :, 0] // 128).astype(np.uint8),
                    "fov": (_read_gif(mask)[:, :, 0] // 128).astype(np.uint8), "name": name})
    return out
