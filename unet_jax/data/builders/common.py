"""Shared code of the retinal TFDS builders: finding, reading, decoding and validating files.

A dataset arrives either as its official archives or as the same content extracted. Both are a
`Source`: a root (archive or folder) with `/`-separated member paths. Each builder only says which
archive / folder holds which files and how names map to splits; everything else lives here.

Decoding follows mmsegmentation's converters (tools/dataset_converters/*.py): images are decoded by OpenCV exactly as
`mmcv.imread` (BGR) and returned as RGB; labels are `channel0 // 128` of the BGR colour decode
(OpenCV expands 1-bit PNGs to 0/255), GIFs are read as their first frame (the converter uses
`cv2.VideoCapture`). Every problem raises one `DataError` naming the file, what was expected and
what was found.

Field of view (the `fov` feature, 0/1): the official mask file where the dataset ships one (DRIVE,
HRF; decoded like the labels), else derived from the image as `red channel > threshold`
(`red_channel_fov`; STARE, CHASE_DB1): outside the camera's aperture the red channel is near 0,
the retina is bright red. On DRIVE that rule reproduces the official masks (red > 20: mean IoU 0.997).
"""
from __future__ import annotations

import abc
import dataclasses
import gzip
import io
import os
import re
import tarfile
import zipfile
import zlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image, UnidentifiedImageError

from unet_jax.errors import DataError
from unet_jax.io import images

TRAIN, VALIDATION = "train", "validation"
_JUNK = re.compile(r"(^|/)(\.|__MACOSX/|Thumbs\.db$|desktop\.ini$)")
MAX_MEMBER_BYTES = 1 << 30
"""Largest file read from an archive or out of a `.gz` (the biggest, HRF's images, are ~10 MB):
archives come from the internet, and a small zip or gzip can inflate to terabytes."""
_CHUNK = 1 << 20


def data_error(where: str | os.PathLike, problem: str, expected: str, found: str) -> DataError:
    """One error message: the file, the problem, what was expected and what was found."""
    return DataError(f"{where}: {problem}\n  expected: {expected}\n  found: {found}")


def _short(items: Iterable[str], limit: int = 8) -> str:
    items = list(items)
    text = ", ".join(items[:limit])
    return f"[{text}{', ...' if len(items) > limit else ''}] ({len(items)} in all)"


# ----------------------------------------------------------------------------------------------
# Sources: an archive or a folder, read through the same member paths.


class Source(abc.ABC):
    """Files under one root (zip, tar or folder), addressed by `/`-separated member paths."""

    def __init__(self, path: Path):
        self.path = path

    @abc.abstractmethod
    def files(self, subdir: str) -> list[str]:
        """Member paths of the regular files directly inside `subdir` ('' = the root)."""

    @abc.abstractmethod
    def _read(self, member: str) -> bytes:
        """Raw bytes of one member."""

    def close(self) -> None:
        """Release open handles (they are reopened on the next read)."""

    def where(self, member: str) -> str:
        """Human-readable location of a member, for error messages."""
        return f"{self.path}:{member}" if self.path.is_file() else str(self.path / member)

    def read(self, member: str) -> bytes:
        """Bytes of a member; `.gz` members are decompressed. Archive members and gzip contents
        over `MAX_MEMBER_BYTES` are refused (archive members on their declared size, before
        decompression) with a `DataError` naming the archive and member."""
        try:
            data = self._read(member)
        except (OSError, EOFError, KeyError, RuntimeError, NotImplementedError,
                zipfile.BadZipFile, tarfile.TarError, zlib.error) as e:
            raise data_error(self.where(member), "cannot be read", "a readable file",
                             f"{type(e).__name__}: {e}") from e
        if member.endswith(".gz"):
            try:
                with gzip.GzipFile(fileobj=io.BytesIO(data)) as f:
                    data = _read_capped(f, self.where(member))
            except (OSError, EOFError, zlib.error) as e:
                raise data_error(self.where(member), "is not a valid gzip file",
                                 "a complete gzip stream", f"{type(e).__name__}: {e}") from e
        return data


def _too_large(where: str, found: str) -> DataError:
    return data_error(where, "is too large to be a dataset file (a zip or gzip bomb?)",
                      f"at most MAX_MEMBER_BYTES = {MAX_MEMBER_BYTES} bytes", found)


def _read_capped(stream: io.BufferedIOBase, where: str, declared: int | None = None) -> bytes:
    """All of `stream`: its `declared` size (checked against the cap first) or, when the size is
    not known (gzip), at most `MAX_MEMBER_BYTES`. Decompression stops as soon as it exceeds."""
    if declared is not None and declared > MAX_MEMBER_BYTES:
        raise _too_large(where, f"{declared} bytes (declared in the archive)")
    limit = MAX_MEMBER_BYTES if declared is None else declared
    chunks, total = [], 0
    while chunk := stream.read(_CHUNK):
        total += len(chunk)
        if total > limit:
            if declared is None:
                raise _too_large(where, f"more than {limit} bytes once decompressed")
            raise data_error(where, "holds more data than the archive declares",
                             f"{declared} bytes", f"more than {declared} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


class FolderSource(Source):
    """An extracted folder."""

    def files(self, subdir: str) -> list[str]:
        folder = self.path / subdir
        if not folder.is_dir():
            return []
        return sorted(f"{subdir}/{p.name}".lstrip("/") for p in folder.iterdir() if p.is_file())

    def _read(self, member: str) -> bytes:
        return (self.path / member).read_bytes()


class ZipSource(Source):
    """A zip archive (opened lazily, kept open until `close`)."""

    def __init__(self, path: Path):
        super().__init__(path)
        self._zip: zipfile.ZipFile | None = None
        try:
            with zipfile.ZipFile(path) as z:
                self._names = [i.filename for i in z.infolist() if not i.is_dir()]
        except (OSError, zipfile.BadZipFile) as e:
            raise data_error(path, "is not a readable zip archive", "a complete zip file",
                             f"{type(e).__name__}: {e}") from e

    def files(self, subdir: str) -> list[str]:
        prefix = f"{subdir}/" if subdir else ""
        return sorted(n for n in self._names
                      if n.startswith(prefix) and "/" not in n[len(prefix):])

    def _read(self, member: str) -> bytes:
        if self._zip is None:
            self._zip = zipfile.ZipFile(self.path)
        info = self._zip.getinfo(member)
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            # bzip2/lzma members inflate a whole compressed chunk at once: no bound on memory
            raise data_error(self.where(member), "uses an unsupported compression method",
                             "stored or deflated members (as in the official archives), or "
                             "the archive extracted into manual_dir",
                             f"compression method {info.compress_type}")
        with self._zip.open(info) as f:
            return _read_capped(f, self.where(member), info.file_size)

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()
            self._zip = None


class TarSource(Source):
    """A tar archive, optionally compressed (opened lazily, kept open until `close`)."""

    def __init__(self, path: Path):
        super().__init__(path)
        self._tar: tarfile.TarFile | None = None
        self._names: list[str] = []
        try:
            with tarfile.open(path) as t:
                for m in t:  # a bomb is refused here, before skipping past it inflates it
                    if not m.isfile():
                        continue
                    if m.size > MAX_MEMBER_BYTES:
                        raise _too_large(f"{path}:{m.name}",
                                         f"{m.size} bytes (declared in the archive)")
                    self._names.append(m.name[2:] if m.name.startswith("./") else m.name)
        except (OSError, EOFError, tarfile.TarError, zlib.error) as e:
            raise data_error(path, "is not a readable tar archive", "a complete tar file",
                             f"{type(e).__name__}: {e}") from e

    def files(self, subdir: str) -> list[str]:
        prefix = f"{subdir}/" if subdir else ""
        return sorted(n for n in self._names
                      if n.startswith(prefix) and "/" not in n[len(prefix):])

    def _read(self, member: str) -> bytes:
        if self._tar is None:
            self._tar = tarfile.open(self.path)
        try:
            info = self._tar.getmember(member)
        except KeyError:
            info = self._tar.getmember(f"./{member}")
        f = self._tar.extractfile(info) if info.isfile() else None
        if f is None:
            raise KeyError(member)
        return _read_capped(f, self.where(member), info.size)

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None


def open_archive(path: Path) -> Source:
    """A `ZipSource` or `TarSource` for an archive file."""
    if path.name.lower().endswith(".zip"):
        return ZipSource(path)
    return TarSource(path)


def find_source(manual_dir: Path, archive: str, folders: Sequence[str], marker: str,
                layout: str) -> Source:
    """The archive `manual_dir/archive` if present, else the first of `folders` holding `marker`.

    `marker` is a glob relative to the folder (e.g. `training/images` or `Image_*.jpg`); `layout`
    describes the expected content for the error message.
    """
    path = manual_dir / archive
    if path.is_file():
        return open_archive(path)
    for rel in folders:
        folder = manual_dir / rel
        if folder.is_dir() and any(folder.glob(marker)):
            return FolderSource(folder)
    looked = [str(path)] + [f"{manual_dir / rel}/{marker}" for rel in folders]
    raise data_error(manual_dir, f"neither the archive {archive} nor its extracted folder found",
                     layout, "nothing at " + ", ".join(looked))


# ----------------------------------------------------------------------------------------------
# Listing and pairing.


@dataclasses.dataclass(frozen=True)
class FileRef:
    """One member of one source."""
    source: Source
    member: str

    @property
    def where(self) -> str:
        return self.source.where(self.member)

    def read(self) -> bytes:
        return self.source.read(self.member)


@dataclasses.dataclass(frozen=True)
class Pair:
    """An image and its label, with the name mmseg's converter gives it and its split, and its
    field of view: the official mask file, or the red-channel threshold that derives it."""
    name: str
    split: str
    image: FileRef
    label: FileRef
    fov: FileRef | int


def match_files(source: Source, subdir: str, pattern: str) -> dict[str, FileRef]:
    """Files in `source/subdir` whose base name fully matches `pattern`, keyed by group 1.

    Other files are ignored (hidden files, thumbnails, the second observer's labels...).
    """
    regex = re.compile(pattern)
    found: dict[str, FileRef] = {}
    for member in source.files(subdir):
        if _JUNK.search(member):
            continue
        m = regex.fullmatch(member.rsplit("/", 1)[-1])
        if m is None:
            continue
        key = m.group(1)
        if key in found:
            raise data_error(source.where(member), f"two files give the name {key!r}",
                             "one file per name", f"{found[key].member} and {member}")
        found[key] = FileRef(source, member)
    return found


def pair_up(images: dict[str, FileRef], labels: dict[str, FileRef], *, expected: int,
            what: str, layout: str) -> list[tuple[str, FileRef, FileRef]]:
    """Sorted (name, image, label) triples; checks the image count and that every label exists."""
    where = _describe_dir(images) if images else _describe_dir(labels)
    if len(images) != expected:
        raise data_error(where or "the manual directory", f"wrong number of {what} images",
                         f"{expected} images ({layout})", _short(sorted(images)))
    missing = sorted(set(images) - set(labels))
    if missing:
        label_dir = _describe_dir(labels) or "the label folder / archive"
        raise data_error(label_dir, f"missing label for {what} image(s) {', '.join(missing)}",
                         f"one label per image ({layout})",
                         "labels for " + _short(sorted(labels)))
    return [(name, images[name], labels[name]) for name in sorted(images)]


def pick(files: dict[str, FileRef], names: Sequence[str], *, what: str, where: str,
         layout: str) -> list[FileRef]:
    """`files[name]` for each of `names` (e.g. the FOV mask of each image); a `DataError` names
    the folder (`where` if `files` is empty) and the images without a file."""
    missing = sorted(set(names) - set(files))
    if missing:
        raise data_error(_describe_dir(files) or where,
                         f"missing {what} for image(s) {', '.join(missing)}",
                         f"one {what} per image ({layout})",
                         f"{what}s for " + _short(sorted(files)))
    return [files[name] for name in names]


def _describe_dir(refs: dict[str, FileRef]) -> str:
    if not refs:
        return ""
    ref = next(iter(refs.values()))
    parent = ref.member.rsplit("/", 1)[0] if "/" in ref.member else ""
    return ref.source.where(parent) if parent else str(ref.source.path)


def first_last(names: Sequence[str], num_train: int) -> dict[str, str]:
    """name -> split for a `sorted()` list: the first `num_train` train, the rest validation."""
    names = sorted(names)
    return {n: TRAIN if i < num_train else VALIDATION for i, n in enumerate(names)}


# ----------------------------------------------------------------------------------------------
# Decoding and validation.


def _check_complete(data: bytes, where: str, what: str) -> None:
    """Fully decode with Pillow, which (unlike OpenCV) rejects truncated JPEG/PNG/TIFF data."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
    except UnidentifiedImageError:
        return  # a format Pillow does not know: OpenCV's decode is the judge
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise data_error(where, f"corrupt or truncated {what}", f"a complete {what} file",
                         f"{type(e).__name__}: {e}") from e


def _decode_bgr(data: bytes, where: str, what: str) -> np.ndarray:
    """HxWx3 uint8 BGR as `mmcv.imread(..., 'color')` (`unet_jax.io.images.decode_bgr`, the one
    decoder; GIFs: the first frame, as the converters' cv2.VideoCapture), after a full check."""
    if not data:
        raise data_error(where, f"empty {what} file", f"a {what} file", "0 bytes")
    _check_complete(data, where, what)
    try:
        return images.decode_bgr(data, where)
    except images.ImageReadError as e:
        raise data_error(where, f"cannot be decoded (corrupt, truncated or not an {what})",
                         f"an {what} file OpenCV decodes (tif, png, jpg, ppm, gif)",
                         f"{len(data)} bytes starting {data[:8]!r}") from e


def decode_image(data: bytes, where: str) -> np.ndarray:
    """RGB uint8 HxWx3: OpenCV's colour decode (the pixels mmseg sees), channels reversed."""
    return np.ascontiguousarray(_decode_bgr(data, where, "image")[:, :, ::-1])


def _decode_binary(data: bytes, where: str, image_shape: tuple[int, ...], what: str
                   ) -> tuple[np.ndarray, np.ndarray]:
    """(raw channel 0, `raw // 128` as uint8 {0, 1}) of a binary mask the size of its image."""
    raw = _decode_bgr(data, where, what)[:, :, 0]
    values = np.unique(raw)
    if values.size > 2:
        raise data_error(where, f"is not a binary {what}", "at most 2 distinct values "
                         "(e.g. {0, 255} or a 1-bit image)",
                         f"{values.size} distinct values: {_short(map(str, values), 6)}")
    if raw.shape != tuple(image_shape[:2]):
        raise data_error(where, f"{what} size differs from its image's",
                         f"H x W = {image_shape[0]} x {image_shape[1]} (the image's size)",
                         f"{raw.shape[0]} x {raw.shape[1]}")
    return values, (raw // 128).astype(np.uint8)


def decode_label(data: bytes, where: str, image_shape: tuple[int, ...]) -> np.ndarray:
    """uint8 HxW in {0, 1}: `channel0 // 128` of the BGR decode, after validation.

    Rejected: more than 2 distinct raw values (not a binary mask, e.g. a photo), no pixel >= 128
    (nothing would be a vessel), or a size that differs from the image's.
    """
    values, label = _decode_binary(data, where, image_shape, "label")
    if not label.any():
        raise data_error(where, "label has no vessel pixel after binarisation (channel0 // 128)",
                         "vessel pixels >= 128 (e.g. 255, or 1 in a 1-bit image)",
                         f"values {values.tolist()}")
    return label


def decode_fov_mask(data: bytes, where: str, image_shape: tuple[int, ...]) -> np.ndarray:
    """uint8 HxW in {0, 1} (1 = inside the field of view) of an official mask, decoded and
    validated like a label (binary, the image's size, not empty)."""
    values, fov = _decode_binary(data, where, image_shape, "FOV mask")
    if not fov.any():
        raise data_error(where, "FOV mask has no pixel inside the field of view",
                         "pixels >= 128 inside the field of view (e.g. 255)",
                         f"values {values.tolist()}")
    return fov


def red_channel_fov(image: np.ndarray, threshold: int, where: str) -> np.ndarray:
    """uint8 HxW in {0, 1}: the field of view of an RGB image without a mask, red > threshold.

    The camera's aperture leaves the background near 0 in red while the whole retina, vessels
    included, is bright in red; so a threshold above the background's noise finds the FOV.
    """
    fov = (image[:, :, 0] > threshold).astype(np.uint8)
    if not fov.any():
        raise data_error(where, "no field of view found", f"pixels with red > {threshold}",
                         f"red channel at most {int(image[:, :, 0].max())}")
    return fov


def example(name: str, image: np.ndarray, label: np.ndarray, fov: np.ndarray
            ) -> dict[str, object]:
    """A TFDS example of the retinal features (the image passed as PNG bytes)."""
    return {"image": images.encode_png(image[:, :, ::-1]), "label": label, "fov": fov,
            "name": name}


def read_pair(pair: Pair) -> dict[str, object]:
    """The TFDS example of one pair: decoded, validated image, label and FOV, and its name."""
    image = decode_image(pair.image.read(), pair.image.where)
    label = decode_label(pair.label.read(), pair.label.where, image.shape)
    if isinstance(pair.fov, FileRef):
        fov = decode_fov_mask(pair.fov.read(), pair.fov.where, image.shape)
    else:
        fov = red_channel_fov(image, pair.fov, pair.image.where)
    return example(pair.name, image, label, fov)


# ----------------------------------------------------------------------------------------------
# The builder base class.


def retinal_features() -> tfds.features.FeaturesDict:
    """image uint8 HxWx3 RGB (PNG), label uint8 HxW in {0, 1} (zlib), fov uint8 HxW in {0, 1}
    (zlib; 1 = inside the field of view), name string."""
    return tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3), dtype=np.uint8,
                                     encoding_format="png"),
        "label": tfds.features.Tensor(shape=(None, None), dtype=np.uint8,
                                      encoding=tfds.features.Encoding.ZLIB),
        "fov": tfds.features.Tensor(shape=(None, None), dtype=np.uint8,
                                    encoding=tfds.features.Encoding.ZLIB),
        "name": tfds.features.Text(),
    })


def manual_dir_of(dl_manager: tfds.download.DownloadManager, layout: str) -> Path:
    """`dl_manager.manual_dir` as a Path, with one clear error when it is missing or empty."""
    # TFDS's own check raises a bare AssertionError; read the configured path to name it.
    path = getattr(dl_manager, "_manual_dir", None)
    check_manual_dir(Path(path) if path else None, layout)
    return Path(dl_manager.manual_dir)


def check_manual_dir(path: Path | None, layout: str) -> None:
    """Raise a `DataError` unless `path` is an existing, non-empty folder."""
    if path is None:
        raise data_error("manual_dir", "no manual directory given", layout, "None")
    if not path.is_dir():
        raise data_error(path, "manual directory does not exist", layout, "no such folder")
    if not any(path.iterdir()):
        raise data_error(path, "manual directory is empty", layout, "an empty folder")


VERSION = tfds.core.Version("1.1.0")
RELEASE_NOTES = {
    "1.0.0": "Splits, names and labels as mmsegmentation 1.2.2's converters.",
    "1.1.0": "Adds `fov`, the field-of-view mask (uint8 0/1): the official masks of DRIVE and "
             "HRF; red channel > threshold for STARE and CHASE_DB1, which ship none.",
}


class RetinalBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base class: subclasses set `LAYOUT`, `FOV`, the instructions and `find_pairs`."""

    VERSION = VERSION
    RELEASE_NOTES = RELEASE_NOTES
    LAYOUT = ""
    HOMEPAGE = ""
    FOV = ""
    """What the `fov` feature holds (printed with the FOV metrics)."""

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=self.__doc__, features=retinal_features(),
            supervised_keys=("image", "label"), homepage=self.HOMEPAGE)

    @abc.abstractmethod
    def find_pairs(self, manual_dir: Path) -> list[Pair]:
        """Every (image, label) pair with its name and split; raises `DataError` on bad layout."""

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        pairs = self.find_pairs(manual_dir_of(dl_manager, self.LAYOUT))
        return {split: self._generate_examples([p for p in pairs if p.split == split])
                for split in (TRAIN, VALIDATION)}

    def _generate_examples(self, pairs: list[Pair]) -> Iterator[tuple[str, dict[str, object]]]:
        sources = {id(p.image.source): p.image.source for p in pairs}
        sources.update({id(p.label.source): p.label.source for p in pairs})
        sources.update({id(p.fov.source): p.fov.source for p in pairs
                        if isinstance(p.fov, FileRef)})
        try:
            for pair in pairs:
                yield pair.name, read_pair(pair)
        finally:
            for source in sources.values():
                source.close()

