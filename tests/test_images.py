"""read_rgb decodes as mmseg does (cv2.imdecode IMREAD_COLOR, BGR -> RGB), refuses bombs."""
from __future__ import annotations

import struct
import time
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from unet_jax.io import images
from unet_jax.io.images import ImageReadError, read_rgb

RNG = np.random.default_rng(0)


def cv2_rgb(path: Path) -> np.ndarray:
    """What mmseg's LoadImageFromFile + bgr_to_rgb give for `path`."""
    bgr = cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_COLOR)
    assert bgr is not None, f"cv2 cannot decode {path}"
    return bgr[..., ::-1]


def png_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR declares width x height RGB pixels, with one tiny IDAT."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


def test_16bit_grey_png_keeps_the_high_byte(tmp_path: Path):
    grey = RNG.integers(0, 65536, (20, 30), dtype=np.uint16)
    cv2.imwrite(str(tmp_path / "g16.png"), grey)
    rgb = read_rgb(tmp_path / "g16.png")
    assert rgb.dtype == np.uint8 and rgb.shape == (20, 30, 3)
    np.testing.assert_array_equal(rgb, cv2.imread(str(tmp_path / "g16.png"))[..., ::-1])
    np.testing.assert_array_equal(rgb, np.repeat((grey >> 8).astype(np.uint8)[..., None], 3, -1))
    assert 100 < rgb.mean() < 155  # not the all-white image PIL's convert("RGB") gives


def test_exif_orientation_is_applied(tmp_path: Path):
    rgb = np.zeros((40, 60, 3), np.uint8)
    rgb[:10, :20] = (255, 0, 0)  # a red block top-left
    img = Image.fromarray(rgb)
    for orientation, corner in ((6, (0, -1)), (8, (-1, 0))):  # 90 deg clockwise / anticlockwise
        exif = img.getexif()
        exif[0x0112] = orientation
        path = tmp_path / f"exif{orientation}.jpg"
        img.save(path, exif=exif.tobytes(), quality=95)
        out = read_rgb(path)
        assert out.shape == (60, 40, 3)  # the displayed (rotated) size, as cv2 gives it
        np.testing.assert_array_equal(out, cv2_rgb(path))
        assert out[corner][0] > 200 and out[corner][1] < 60  # the red block moved there


def test_float_tiff_is_refused_as_cv2_does(tmp_path: Path):
    path = tmp_path / "f32.tif"
    cv2.imwrite(str(path), np.linspace(0, 1, 600, dtype=np.float32).reshape(20, 30))
    assert cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_COLOR) is None  # mmseg fails
    with pytest.raises(ImageReadError, match=r"f32\.tif.*'F'.*32-bit"):
        read_rgb(path)


def test_palette_png_and_gif_fallback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    index = (np.arange(600).reshape(20, 30) % 4).astype(np.uint8)
    img = Image.fromarray(index, mode="P")
    img.putpalette([10, 20, 30, 200, 100, 0, 0, 255, 0, 1, 2, 3])
    img.save(tmp_path / "pal.png")
    img.save(tmp_path / "pal.gif")
    expected = np.array([[10, 20, 30], [200, 100, 0], [0, 255, 0], [1, 2, 3]], np.uint8)[index]
    np.testing.assert_array_equal(read_rgb(tmp_path / "pal.png"), expected)
    np.testing.assert_array_equal(cv2_rgb(tmp_path / "pal.png"), expected)
    np.testing.assert_array_equal(read_rgb(tmp_path / "pal.gif"), expected)
    # an OpenCV without a GIF decoder: PIL's first frame
    monkeypatch.setattr(images, "_cv2_decode", lambda buf: None)
    np.testing.assert_array_equal(read_rgb(tmp_path / "pal.gif"), expected)


def test_decompression_bomb_is_refused_before_decoding(tmp_path: Path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(png_header(100_000, 100_000))
    start = time.perf_counter()
    with pytest.raises(ImageReadError, match=r"bomb\.png: refusing to decode"):
        read_rgb(bomb)
    assert time.perf_counter() - start < 1.0
    big = tmp_path / "big.png"
    big.write_bytes(png_header(12_000, 12_000))  # 144 M pixels > MAX_PIXELS, < PIL's error
    with pytest.raises(ImageReadError, match=r"big\.png.*12000 x 12000 = 144000000 pixels"):
        read_rgb(big)
    small = tmp_path / "small.png"
    cv2.imwrite(str(small), np.zeros((20, 30, 3), np.uint8))
    with pytest.raises(ImageReadError, match=r"20 x 30 = 600 pixels, above the cap of 500"):
        read_rgb(small, max_pixels=500)
    assert read_rgb(small, max_pixels=600).shape == (20, 30, 3)


def test_unreadable_files(tmp_path: Path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "junk.tif").write_bytes(b"\0" * 10)
    good = np.asarray(RNG.integers(0, 256, (20, 30, 3), dtype=np.uint8))
    Image.fromarray(good).save(tmp_path / "cut.png")
    data = (tmp_path / "cut.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[:len(data) // 2])
    for name in ("empty.png", "junk.tif", "cut.png", "missing.png"):
        with pytest.raises(ImageReadError, match=name.replace(".", r"\.")):
            read_rgb(tmp_path / name)
    with pytest.raises(ImageReadError, match="cannot read"):
        read_rgb(tmp_path)  # a folder
