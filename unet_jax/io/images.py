"""Reading an image file exactly as mmseg reads it: the one image reader of predict and the API.

mmseg's `LoadImageFromFile` reads the file's bytes and decodes them with
`mmcv.imfrombytes(buf, flag="color", backend="cv2")`, i.e. `cv2.imdecode(buf, cv2.IMREAD_COLOR)`
(BGR); its data preprocessor then swaps BGR to RGB. `read_rgb` does the same, so predict on a
file sees the pixels mmseg would see. What that means for unusual files (all cv2's rules):

* the EXIF orientation (JPEG, PNG eXIf, WebP, TIFF) is applied: a portrait photo stored
  landscape with orientation 6 or 8 comes out portrait;
* 16-bit samples become 8-bit by keeping the high byte (`value >> 8`), not by clipping;
* grey, grey + alpha and palette images are expanded to 3 channels, alpha is dropped;
* an animated GIF or multi-page TIFF gives its first frame / page;
* 32-bit samples (float or integer TIFFs) are refused: cv2 cannot decode them with
  IMREAD_COLOR ("can not handle images with 32-bit samples"), so neither can mmseg; convert them
  to 8 or 16 bits first.

Files cv2 cannot decode but PIL can (with OpenCV builds that lack a GIF decoder that is GIF,
which mmseg cannot read at all) fall back to PIL: the first frame, EXIF orientation applied,
converted to RGB; only for 8-bit PIL modes, so the 32-bit rule above still holds.

Decompression bombs: before anything is decoded, the size declared in the file header (read by
PIL, which parses headers without decoding pixels) is checked against `MAX_PIXELS`. For formats
PIL cannot parse, cv2's own header check applies (`OPENCV_IO_MAX_IMAGE_PIXELS`, default 2**30
pixels, read when cv2 is first imported) and the decoded size is checked against `MAX_PIXELS`.
"""
from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from unet_jax.io.paths import as_path  # a local path or a bucket URL
from unet_jax.errors import InputError

# What predict looks for in folders (a file given by name may be any format cv2 or PIL reads).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".gif", ".ppm", ".bmp")
# The largest image decoded: 2**27 pixels (about 11585 x 11585; 384 MiB as uint8 RGB).
MAX_PIXELS = 1 << 27
# PIL modes whose samples are 8-bit; only these may take the PIL fallback.
_PIL_8BIT_MODES = ("1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK",
                   "YCbCr", "LAB", "HSV")


class ImageReadError(InputError):
    """An input file could not be decoded as an image (or is too large to decode safely)."""


def header_size(path: str | Path, max_pixels: int = MAX_PIXELS) -> tuple[int, int] | None:
    """(height, width) that the header of `path` declares, or None if PIL cannot parse it.

    Raises `ImageReadError` if the declared size is above `max_pixels` (nothing is decoded).
    """
    return _declared_size(Path(path), Path(path), max_pixels)


def _declared_size(source: Path | io.BytesIO, where: str | Path, max_pixels: int,
                   ) -> tuple[int, int] | None:
    """The header's (height, width) read by PIL (no pixels decoded); None without PIL or when
    PIL cannot parse it (machines without Pillow keep cv2's own header check)."""
    try:
        from PIL import Image  # pylint: disable=import-outside-toplevel  # optional at read time
    except ImportError:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                width, height = img.size
    except Image.DecompressionBombError as err:
        raise ImageReadError(f"{where}: refusing to decode: the header declares an image far "
                             f"above the cap of {max_pixels} pixels ({err})") from err
    except Exception:  # noqa: BLE001 -- not a format PIL knows, or a damaged header: cv2 decides
        return None
    _check_pixels(where, height, width, max_pixels)
    return height, width


def _check_pixels(path: str | Path, height: int, width: int, max_pixels: int) -> None:
    if height * width > max_pixels:
        raise ImageReadError(f"{path}: refusing to decode: the image is {height} x {width} = "
                             f"{height * width} pixels, above the cap of {max_pixels} pixels "
                             "(unet_jax.io.images.MAX_PIXELS); a decompression bomb, or an image "
                             "to tile first")


def _cv2_decode(buf: np.ndarray, flags: int = cv2.IMREAD_COLOR) -> np.ndarray | None:
    """cv2.imdecode(buf, flags) with cv2's own warnings silenced; None if it fails."""
    logging = cv2.utils.logging
    previous = logging.getLogLevel()
    logging.setLogLevel(logging.LOG_LEVEL_SILENT)
    try:
        return cv2.imdecode(buf, flags) if buf.size else None
    except cv2.error:
        return None
    finally:
        logging.setLogLevel(previous)


def _pil_decode_bgr(data: bytes, where: str | Path) -> np.ndarray:
    """The PIL fallback: first frame, EXIF orientation applied, BGR; 8-bit modes only."""
    from PIL import Image, ImageOps  # pylint: disable=import-outside-toplevel
    with Image.open(io.BytesIO(data)) as img:
        img.seek(0)
        if img.mode not in _PIL_8BIT_MODES:
            raise ImageReadError(
                f"{where}: cannot read: cv2 (mmseg's decoder) cannot decode it, and its samples "
                f"are {img.mode!r} (not 8-bit; 32-bit float/integer images are not supported "
                "by cv2 either); convert it to an 8- or 16-bit image")
        rgb = np.asarray(ImageOps.exif_transpose(img).convert("RGB"))
    return np.ascontiguousarray(rgb[:, :, ::-1])


def decode_bgr(data: bytes, where: str | Path, *, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """uint8 BGR (H, W, 3) of an encoded image, as `mmcv.imfrombytes(data, "color")` (see module).

    The one image decoder: predict's `read_rgb`, the dataset builders and the training records
    all decode through it. Raises `ImageReadError` naming `where` if the bytes cannot be decoded
    or declare more than `max_pixels` pixels.
    """
    _declared_size(io.BytesIO(data), where, max_pixels)
    bgr = _cv2_decode(np.frombuffer(data, np.uint8))
    if bgr is None:
        try:
            bgr = _pil_decode_bgr(data, where)
        except ImageReadError:
            raise
        except Exception as err:  # noqa: BLE001 -- PIL's decoders raise many types on bad data
            raise ImageReadError(f"{where}: cannot read as an image (cv2 and PIL both fail; "
                                 f"expected e.g. {', '.join(IMAGE_SUFFIXES)}): {err}") from err
    if bgr.ndim == 2:
        bgr = np.repeat(bgr[..., None], 3, axis=-1)
    if bgr.dtype != np.uint8 or bgr.ndim != 3 or bgr.shape[2] != 3 or min(bgr.shape[:2]) < 1:
        raise ImageReadError(f"{where}: expected an 8-bit H x W x 3 image after decoding, found "
                             f"{bgr.dtype} {bgr.shape}")
    _check_pixels(where, bgr.shape[0], bgr.shape[1], max_pixels)
    return bgr


def read_rgb(path: str | Path, *, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """uint8 RGB (H, W, 3) of an image file, decoded exactly as mmseg decodes it (see module).

    Raises `ImageReadError` (an `InputError`) naming the file if it cannot be read, cannot be
    decoded, or declares more than `max_pixels` pixels.
    """
    path = as_path(path)
    data = _read_bytes(path)
    return np.ascontiguousarray(decode_bgr(data, path, max_pixels=max_pixels)[:, :, ::-1])


def _read_bytes(path: Any) -> bytes:
    """The file's bytes; an OS error is an `ImageReadError` naming the file."""
    try:
        return path.read_bytes()
    except OSError as err:
        raise ImageReadError(f"{path}: cannot read: {err.strerror or err}") from err


def encode_png(array: np.ndarray) -> bytes:
    """Lossless PNG bytes of a uint8 H x W (grey) or H x W x 3 (BGR) array, as cv2 writes them
    (about 10x faster than TFDS's TensorFlow encoder)."""
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(array), [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise ValueError(f"PNG encoding failed for an array of shape {array.shape}")
    return buf.tobytes()


def decode_grey(data: bytes, where: str | Path) -> np.ndarray:
    """uint8 (H, W) of a one-channel PNG written by `encode_png` (a label or a FOV mask)."""
    grey = _cv2_decode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if grey is None or grey.ndim != 2 or grey.dtype != np.uint8:
        found = "undecodable bytes" if grey is None else f"{grey.dtype} {grey.shape}"
        raise ImageReadError(f"{where}: expected a uint8 one-channel PNG, found {found}")
    return grey


def read_label(path: str | Path, *, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """The raw values of a label file, as mmseg's `LoadAnnotations` reads them (PIL, unchanged):
    (H, W) for grey, 16-bit and palette images (a palette PNG gives its indices, not its
    colours: cv2 would expand it to BGR), (H, W, 3) RGB for colour images (alpha dropped).

    Raises `ImageReadError` naming the file if it cannot be read or decoded, holds float
    samples, or declares more than `max_pixels` pixels.
    """
    from PIL import Image  # pylint: disable=import-outside-toplevel  # Pillow keeps palette indices
    path = Path(path)
    data = _read_bytes(path)
    _declared_size(io.BytesIO(data), path, max_pixels)
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.mode == "F":
                raise ImageReadError(f"{path}: label holds float samples; expected integer "
                                     "class values (8- or 16-bit grey, palette or RGB)")
            if img.mode == "1":
                return np.asarray(img.convert("L"))
            if img.mode in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
                return np.asarray(img).copy()
            if img.mode in ("LA", "PA"):
                return np.asarray(img)[:, :, 0].copy()
            return np.asarray(img.convert("RGB")).copy()
    except ImageReadError:
        raise
    except Exception as err:  # noqa: BLE001 -- PIL's decoders raise many types on bad data
        raise ImageReadError(f"{path}: cannot read as a label image: {err}") from err
