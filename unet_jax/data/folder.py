"""A dataset from a folder of images and label files (`configs/folder.py`), with no builder.

`prepare` lists the image and label files of both splits, pairs them by stem (the file name
without its suffix), checks every pair (a missing partner, unreadable files, a size mismatch, a
label value that is no class and not the ignore value, an empty split, two files with one stem),
maps the label values to class indices (0..K-1, 255 = ignore) and writes the records every reader
shares (`unet_jax.data.records`). All problems are reported together (`DataProblems`, one line
each) and nothing is written then. The records lie in `<data.tfds_data_dir>/folder/<key>/records`,
where `key` digests the settings and every file's size and modification time: editing the folder
prepares it again, an unchanged folder is prepared once. `data.root` may be a bucket folder
(`gs://...`): each host reads it from its own copy in its cache (`paths.local_folder`, in step
with the bucket), the key names the bucket's files, not the copy; `data.tfds_data_dir` may be a
bucket too (the records are written locally and uploaded).

`data.sample_weights` (optional) names a text file of `stem,weight` lines: each training image's
loss weight (mmseg's per-sample `weight`; 1 for stems it does not list). It is checked with the
pairs and read when training starts, not stored in the records (editing it prepares nothing).

`complete_config` fills what `configs/folder.py` cannot know before the folder is seen: the
number of classes, the label values and palette, and the sizes left at (0, 0) (from the most
common training image size).
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from unet_jax.data import records
from unet_jax.errors import DataProblems
from unet_jax.io import images, paths

NAME = "folder"
FOV = "the masks in data.fov_labels (nonzero = inside)"
SPLITS = ("train", "validation")
IGNORE_INDEX = 255           # the class index of ignored pixels in the records (loss.ignore_index)
_VERSION = 1                 # bump when the records written from the same files change
# Display colours of the first classes when data.palette is not given (mmseg's Cityscapes ones).
_COLOURS = ((128, 64, 128), (244, 35, 232), (70, 70, 70), (102, 102, 156), (190, 153, 153),
            (153, 153, 153), (250, 170, 30), (220, 220, 0), (107, 142, 35), (152, 251, 152),
            (70, 130, 180), (220, 20, 60), (255, 0, 0), (0, 0, 142), (0, 0, 70), (0, 60, 100))


@dataclasses.dataclass(frozen=True)
class Item:
    """One image of a split, its label file and its field-of-view mask (if any)."""
    split: str
    stem: str
    image: Path
    label: Path | None
    fov: Path | None = None


# ------------------------------------------------------------------------------ settings
def root(data: Any) -> Path:
    """`data.root` as a local folder: `~` expanded; a bucket folder (`gs://...`) is copied to
    this host's cache first and kept in step with the bucket (`paths.local_folder`)."""
    if paths.is_url(str(data.root)):
        return _COPIES.get(str(data.root)) or paths.local_folder(str(data.root))
    return Path(str(data.root)).expanduser()


def _named(data: Any, local: Path) -> str:
    """What problem lines and the summary call the folder `local` (the result of `root`): the
    bucket URL for a copy of one, else the folder itself."""
    return str(data.root).rstrip("/") if paths.is_url(str(data.root)) else str(local)


def label_values(data: Any) -> tuple[Any, ...]:
    """The pixel value of each class: ints, or (R, G, B) tuples; default 0..K-1."""
    values = tuple(data.label_values) or tuple(range(len(data.classes)))
    return tuple(tuple(int(c) for c in v) if isinstance(v, (tuple, list)) else int(v)
                 for v in values)


def ignore_value(data: Any) -> int | None:
    """The label value of ignored pixels: `data.ignore_value`, or (-1) 255 unless 255 is a
    class value (then None: no pixel is ignored). With colour labels an int v means (v, v, v)."""
    if int(data.ignore_value) >= 0:
        return int(data.ignore_value)
    values = label_values(data)
    taken = {v if isinstance(v, int) else (v[0] if len(set(v)) == 1 else None) for v in values}
    return None if 255 in taken else 255


def is_colour(data: Any) -> bool:
    """Whether the classes are given as (R, G, B) colours."""
    return any(isinstance(v, tuple) for v in label_values(data))


# ------------------------------------------------------------------------------ listing
def _suffixes(suffix: str) -> tuple[str, ...]:
    return (suffix.lower(),) if suffix else images.IMAGE_SUFFIXES


def _stems(folder: Path, suffix: str, what: str, problems: list[str]) -> dict[str, Path]:
    """{stem: file} of the files in `folder` ending in `suffix` ('' = any image suffix); a
    problem for a missing folder and for two files with one stem."""
    if not folder.is_dir():
        problems.append(f"{folder}: no such folder ({what})")
        return {}
    found: dict[str, Path] = {}
    ends = _suffixes(suffix)
    for path in sorted(folder.iterdir()):
        name = path.name
        end = next((e for e in ends if name.lower().endswith(e)), None)
        if name.startswith(".") or end is None or not path.is_file():
            continue
        stem = name[:len(name) - len(end)]
        if stem in found:
            problems.append(f"{path}: duplicate stem {stem!r} ({what}; also {found[stem].name})")
            continue
        found[stem] = path
    return found


def _folder(data: Any, field: str) -> Path:
    return root(data) / str(data[field])


def find_items(data: Any) -> tuple[list[Item], list[str]]:
    """(the items of both splits, sorted by split and stem; the listing's problems)."""
    problems: list[str] = []
    if not root(data).is_dir():
        return [], [f"{root(data)}: no such folder (data.root)"]
    image_suffix, label_suffix = str(data.image_suffix), str(data.label_suffix)
    train_images = _stems(_folder(data, "train_images"), image_suffix, "data.train_images",
                          problems)
    train_labels = _stems(_folder(data, "train_labels"), label_suffix, "data.train_labels",
                          problems)
    val_stems = [str(s) for s in data.val_stems]
    if val_stems:
        missing = [s for s in val_stems if s not in train_images]
        problems += [f"{_folder(data, 'train_images')}: no image with stem {s!r} "
                     "(data.val_stems)" for s in missing]
        split_of = {s: "validation" if s in val_stems else "train" for s in train_images}
        pairs = {"train": ({s: p for s, p in train_images.items() if split_of[s] == "train"},
                           {s: p for s, p in train_labels.items() if s not in val_stems}),
                 "validation": ({s: p for s, p in train_images.items() if s in val_stems},
                                {s: p for s, p in train_labels.items() if s in val_stems})}
    else:
        pairs = {"train": (train_images, train_labels),
                 "validation": (_stems(_folder(data, "val_images"), image_suffix,
                                       "data.val_images", problems),
                                _stems(_folder(data, "val_labels"), label_suffix,
                                       "data.val_labels", problems))}
    fovs = (_stems(_folder(data, "fov_labels"), label_suffix, "data.fov_labels", problems)
            if data.fov_labels else None)
    items: list[Item] = []
    for split, (imgs, labels) in pairs.items():
        problems += [f"{labels[s]}: label without an image (no {s}.* among the {split} images)"
                     for s in sorted(set(labels) - set(imgs))]
        for stem in sorted(imgs):
            if stem not in labels:
                problems.append(f"{imgs[stem]}: image without a label (expected "
                                f"{stem}{label_suffix} among the {split} labels)")
            fov = None
            if fovs is not None:
                fov = fovs.get(stem)
                if fov is None:
                    problems.append(f"{imgs[stem]}: image without a field-of-view mask (expected "
                                    f"{stem}{label_suffix} in {_folder(data, 'fov_labels')})")
            items.append(Item(split, stem, imgs[stem], labels.get(stem), fov))
        where = (_folder(data, "train_images") if val_stems or split == "train"
                 else _folder(data, "val_images"))
        if not imgs and where.is_dir():
            which = " of data.val_stems" if val_stems and split == "validation" else ""
            problems.append(f"{where}: the {split} split is empty (no image files{which})")
    if fovs is not None and not val_stems:
        both = sorted({i.stem for i in items if i.split == "train"}
                      & {i.stem for i in items if i.split == "validation"})
        problems += [f"{_folder(data, 'val_images')}: stem {s!r} is in both splits, so its "
                     "field-of-view mask is ambiguous" for s in both]
    return items, problems


# ------------------------------------------------------------------------------ one pair
def _codes(raw: np.ndarray) -> np.ndarray:
    """Colour triples (H, W, 3) as one int per pixel."""
    raw = raw.astype(np.int64)
    return (raw[..., 0] << 16) | (raw[..., 1] << 8) | raw[..., 2]


def _show(code: int, colour: bool) -> str:
    return str((code >> 16, (code >> 8) & 255, code & 255)) if colour else str(code)


def map_label(raw: np.ndarray, values: Sequence[Any], ignore: int | None,
              where: str | Path) -> tuple[np.ndarray, str | None]:
    """(class indices uint8 (H, W), 255 = ignored or unknown; a problem line naming the values
    that are neither a class nor `ignore`, or None) of a label file's raw values."""
    colour = any(isinstance(v, tuple) for v in values)
    if colour:
        if raw.ndim == 2:
            raw = np.repeat(raw[..., None], 3, axis=-1)
        pixels = _codes(raw)
        keys = [_codes(np.array(v)) for v in values]
        ignore_key = None if ignore is None else _codes(np.array([ignore] * 3))
    else:
        if raw.ndim == 3:
            if not (np.array_equal(raw[..., 0], raw[..., 1])
                    and np.array_equal(raw[..., 0], raw[..., 2])):
                return (np.full(raw.shape[:2], IGNORE_INDEX, np.uint8),
                        f"{where}: a colour label, but data.label_values are ints; give (R, G, B) "
                        "triples, e.g. --config.data.label_values=\"((0,0,0),(255,0,0))\"")
            raw = raw[..., 0]
        pixels, keys, ignore_key = raw.astype(np.int64), list(values), ignore
    out = np.full(pixels.shape, IGNORE_INDEX, np.uint8)
    known = np.zeros(pixels.shape, bool)
    for k, key in enumerate(keys):
        hit = pixels == key
        out[hit] = k
        known |= hit
    if ignore_key is not None:
        known |= pixels == ignore_key
    if known.all():
        return out, None
    found, counts = np.unique(pixels[~known], return_counts=True)
    order = np.argsort(-counts)[:4]
    shown = ", ".join(f"{_show(int(found[i]), colour)} ({100 * counts[i] / pixels.size:.2g}% of "
                      "pixels)" for i in order)
    more = f" and {len(found) - 4} more" if len(found) > 4 else ""
    kind = "colour" if colour else "value"
    ignored = ("no ignore value" if ignore is None else
               f"the ignore value {(ignore,) * 3 if colour else ignore}")
    return out, (f"{where}: label {kind} {shown}{more} is no class (data.label_values "
                 f"{tuple(values)}) and not {ignored}")


def read_item(item: Item, data: Any) -> tuple[dict[str, Any] | None, list[str]]:
    """(the record's example {image RGB, label classes, name[, fov]}, or None; its problems)."""
    problems: list[str] = []
    rgb = raw = fov = None
    try:
        rgb = images.read_rgb(item.image)
    except images.ImageReadError as err:
        problems.append(str(err))
    try:
        raw = images.read_label(item.label)
    except images.ImageReadError as err:
        problems.append(str(err))
    if item.fov is not None:
        try:
            fov = images.read_label(item.fov)
        except images.ImageReadError as err:
            problems.append(str(err))
    if rgb is None or raw is None or (item.fov is not None and fov is None):
        return None, problems
    for path, array, what in ((item.label, raw, "label"), (item.fov, fov, "field-of-view mask")):
        if array is not None and array.shape[:2] != rgb.shape[:2]:
            problems.append(f"{path}: {what} is {array.shape[1]}x{array.shape[0]} (WxH), its image "
                            f"{item.image.name} is {rgb.shape[1]}x{rgb.shape[0]}")
    if problems:
        return None, problems
    label, problem = map_label(raw, label_values(data), ignore_value(data), item.label)
    if problem is not None:
        return None, [problem]
    example = {"image": rgb, "label": label, "name": item.stem}
    if fov is not None:
        example["fov"] = ((fov if fov.ndim == 2 else fov[..., 0]) > 0).astype(np.uint8)
    return example, []


# ------------------------------------------------------------------------------ sample weights
def _weights_file(data: Any) -> Path | None:
    name = str(data.get("sample_weights", ""))
    return (root(data) / name) if name else None


def read_sample_weights(data: Any, train_stems: Sequence[str]
                        ) -> tuple[dict[str, float], list[str]]:
    """(stem -> weight from `data.sample_weights`; its problems, one line each naming the file
    and line): a line is `stem,weight` (blank lines and `#` comments skipped), the weight a
    finite number >= 0, the stem one of the training split's, each stem once."""
    path = _weights_file(data)
    if path is None:
        return {}, []
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as err:
        return {}, [f"{path}: cannot read the sample weights (data.sample_weights): "
                    f"{getattr(err, 'strerror', None) or err}"]
    known, weights, problems = set(train_stems), {}, []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        stem, _, value = (part.strip() for part in line.rpartition(","))
        where = f"{path}:{number}"
        try:
            weight = float(value)
        except ValueError:
            weight = float("nan")
        if not stem or not np.isfinite(weight) or weight < 0:
            problems.append(f"{where}: expected 'stem,weight' with a finite weight >= 0, found "
                            f"{line!r}")
        elif stem not in known:
            problems.append(f"{where}: {stem!r} is no image of the training split")
        elif stem in weights:
            problems.append(f"{where}: {stem!r} is listed twice")
        else:
            weights[stem] = weight
    return weights, problems


def sample_weights(data: Any, names: Sequence[str]) -> np.ndarray | None:
    """The loss weight of each training record (`names` in record order), or None when
    `data.sample_weights` is not set; the file was checked when the set was prepared."""
    if _weights_file(data) is None:
        return None
    weights, problems = read_sample_weights(data, names)
    if problems:  # the file changed since preparation
        raise DataProblems(problems)
    return np.asarray([weights.get(n, 1.0) for n in names], np.float32)


# ------------------------------------------------------------------------------ preparing
def _key(data: Any, items: Sequence[Item]) -> str:
    """A digest of everything the records depend on: settings, and each file's size and time.

    A bucket folder is named by its URL and its files by their names in it (their copies keep
    the objects' times), so the digest does not depend on where this host keeps the copy."""
    local = root(data)
    remote = paths.is_url(str(data.root))

    def name(path: Path) -> str:
        if not remote:
            return str(path)
        return f"{_named(data, local)}/{path.relative_to(local).as_posix()}"

    def stat(path: Path | None) -> Any:
        if path is None:
            return None
        try:
            st = path.stat()
        except OSError:
            return name(path)
        return [name(path), st.st_size, st.st_mtime_ns]
    text = json.dumps({"version": _VERSION,
                       "root": _named(data, local) if remote else str(local.resolve()),
                       "values": label_values(data), "ignore": ignore_value(data),
                       "items": [[i.split, i.stem, stat(i.image), stat(i.label), stat(i.fov)]
                                 for i in items]})
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def records_folder(data: Any, items: Sequence[Item]) -> paths.AnyPath:
    """Where the records of `data` (listed as `items`) lie once prepared (a local folder or a
    bucket URL, as `data.tfds_data_dir`)."""
    base = str(data.tfds_data_dir)
    base_path = paths.as_path(base) if paths.is_url(base) else Path(base).expanduser()
    return base_path / NAME / _key(data, items) / "records"


class _Stats:
    """Counts for the summary: pairs per split, image sizes, pixels per class."""

    def __init__(self, num_classes: int):
        self.pairs: collections.Counter[str] = collections.Counter()
        self.sizes: collections.Counter[tuple[int, int]] = collections.Counter()
        self.pixels = np.zeros(num_classes + 1, np.int64)  # the last: ignored

    def add(self, split: str, example: dict[str, Any]) -> None:
        self.pairs[split] += 1
        self.sizes[example["label"].shape] += 1
        counts = np.bincount(example["label"].ravel(), minlength=256)
        self.pixels[:-1] += counts[:len(self.pixels) - 1]
        self.pixels[-1] += counts[IGNORE_INDEX]

    def summary(self, data: Any, where: Path) -> str:
        sizes = ", ".join(f"{w}x{h} ({n})" for (h, w), n in self.sizes.most_common(4))
        if len(self.sizes) > 4:
            sizes += f" and {len(self.sizes) - 4} more sizes"
        total = max(int(self.pixels.sum()), 1)
        shares = ", ".join(f"{name} {100 * n / total:.1f}%"
                           for name, n in zip(data.classes, self.pixels[:-1]))
        return (f"folder dataset {_named(data, root(data))}: {self.pairs['train']} train and "
                f"{self.pairs['validation']} validation pairs; image sizes (WxH) {sizes}; class "
                f"pixel shares: {shares}, ignored {100 * self.pixels[-1] / total:.1f}%; records "
                f"in {where}")


def _examples(items: Sequence[Item], data: Any, split: str, stats: _Stats,
              problems: list[str]) -> Iterator[dict[str, Any]]:
    for item in items:
        if item.split != split:
            continue
        example, found = (None, []) if item.label is None else read_item(item, data)
        problems += found
        if example is not None:
            stats.add(split, example)
            yield example


_COPIES: dict[str, Path] = {}  # a bucket data.root -> its copy, while one operation runs on it


@contextlib.contextmanager
def _from_bucket(data: Any) -> Iterator[None]:
    """For a bucket `data.root`: bring its copy in step once for the whole operation (`root`
    then lists the bucket no more), and let problem lines name the bucket's files, not the
    copy's."""
    url = str(data.root)
    if not paths.is_url(url) or url in _COPIES:
        yield
        return
    local = _COPIES[url] = paths.local_folder(url)
    try:
        yield
    except DataProblems as err:
        raise DataProblems([line.replace(str(local), _named(data, local))
                            for line in err.problems]) from None
    finally:
        _COPIES.pop(url, None)


def prepare(data: Any) -> paths.AnyPath:
    """Check every pair of the folder dataset of `data` and write its records once; returns
    the records folder (see the module). Raises `DataProblems` listing every problem; nothing is
    written then."""
    with _from_bucket(data):
        return _prepare(data)


def _prepare(data: Any) -> paths.AnyPath:
    items, problems = find_items(data)
    problems += read_sample_weights(data, [i.stem for i in items if i.split == "train"])[1]
    folder = records_folder(data, items)
    if not problems and all(records.split_path(folder, s).is_file() for s in SPLITS):
        return folder
    remote = paths.is_url(folder)  # records in a bucket: written locally, uploaded per split
    stage = (Path(tempfile.mkdtemp(prefix="unet_jax_folder_")) if remote else
             folder.parent.with_name(f".{folder.parent.name}.partial-{os.getpid()}"))
    stats = _Stats(len(data.classes))
    try:
        for split in SPLITS:
            records.write_split(_examples(items, data, split, stats, problems),
                                records.split_path(stage / "records", split))
        if problems:
            raise DataProblems(problems)
        if remote:
            for split in SPLITS:
                paths.move(records.split_path(stage / "records", split),
                           records.split_path(folder, split))
            print(stats.summary(data, folder))
            return folder
        folder.parent.parent.mkdir(parents=True, exist_ok=True)
        if folder.parent.exists():  # records of these files, damaged (a records file deleted)
            shutil.rmtree(folder.parent)
        try:
            os.replace(stage, folder.parent)
        except OSError:  # another process finished first: its records are the same
            if not all(records.split_path(folder, s).is_file() for s in SPLITS):
                raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    print(stats.summary(data, folder))
    return folder


# ------------------------------------------------------------------------------ the config
def _common_size(data: Any) -> tuple[int, int]:
    """The most common (height, width) of the training images (headers only where possible)."""
    if not root(data).is_dir():
        raise DataProblems([f"{root(data)}: no such folder (data.root)"])
    problems: list[str] = []
    files = _stems(_folder(data, "train_images"), str(data.image_suffix),
                   "data.train_images", problems)
    if problems or not files:
        raise DataProblems(problems or [f"{_folder(data, 'train_images')}: no image files "
                                        "(data.train_images)"])
    sizes: collections.Counter[tuple[int, int]] = collections.Counter()
    for path in list(files.values())[:200]:
        size = images.header_size(path)
        sizes[size if size is not None else images.read_rgb(path).shape[:2]] += 1
    return sizes.most_common(1)[0][0]


def default_crop(size: tuple[int, int], rate: int = 16, largest: int = 256) -> int:
    """The default training crop side: the image's short side, at most `largest`, rounded down
    to a multiple of the UNet's downsample `rate`."""
    return max(rate, min(largest, min(size)) // rate * rate)


def complete_config(config: Any) -> None:
    """Fill in place what `configs/folder.py` leaves to the data: `model.num_classes` =
    len(data.classes); `data.label_values` (0..K-1) and `data.palette` (the colour label values,
    else fixed colours) when empty; and, when left at (0, 0), `data.image_size` (the most common
    training image size), `data.img_scale` (= image_size: the test resize is an identity),
    `data.crop_size` (`default_crop`), `eval.crop_size` (= the training crop) and `eval.stride`
    (2/3 of the window, mmseg's 64/42)."""
    d = config.data
    k = len(d.classes)
    config.model.num_classes = k
    if not d.label_values:
        d.label_values = tuple(range(k))
    if not d.palette:
        values = label_values(d)
        rng = np.random.default_rng(0)
        d.palette = tuple(v if isinstance(v, tuple) else
                          (_COLOURS[i] if i < len(_COLOURS) else
                           tuple(int(c) for c in rng.integers(0, 256, 3)))
                          for i, v in enumerate(values))
    zero = (0, 0)
    if zero in (tuple(d.image_size), tuple(d.img_scale), tuple(d.crop_size)):
        if tuple(d.image_size) != zero:
            size = tuple(d.image_size)
        else:
            with _from_bucket(d):
                size = _common_size(d)
        d.image_size = size
        if tuple(d.img_scale) == zero:
            d.img_scale = tuple(size)
        if tuple(d.crop_size) == zero:
            side = default_crop(size)
            d.crop_size = (side, side)
    if tuple(config.eval.crop_size) == zero:
        config.eval.crop_size = tuple(d.crop_size)
    if tuple(config.eval.stride) == zero:
        config.eval.stride = tuple(max(1, 2 * c // 3) for c in config.eval.crop_size)


__all__ = ["DataProblems", "FOV", "Item", "complete_config", "default_crop", "find_items",
           "ignore_value", "label_values", "map_label", "prepare", "read_item", "records_folder"]
