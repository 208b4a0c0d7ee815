"""The prepared records that training, evaluation, browse, the benchmark and the GPU report all
read: one ArrayRecord file per split, readable without TensorFlow or TFDS.

`unet_jax.data.loading.prepare` writes them once, from the TFDS builder's examples, into
`<builder data dir>/records/<split>.array_record`, sorted by name. One record is the bytes of an
uncompressed `.npz` (numpy's own container, read with `allow_pickle=False`, so a record file
cannot execute anything): `image` (PNG of the BGR image), `label` and, where the dataset has one,
`fov` (one-channel PNGs) and `name`. PNG keeps a split at its compressed size (Cityscapes' train
split: ~7 GB decoded) and the decode is OpenCV's, the one of `unet_jax.io.images`.

`RecordSource` is grain's random-access data source protocol (`len`, `[i]`) over one split or a
slice of it (a host's rows); it pickles as its path, so grain's worker processes reopen the file
instead of receiving the data. It needs numpy, OpenCV and `array_record` only.
"""
from __future__ import annotations

import io
import os
import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from array_record.python import array_record_data_source, array_record_module

from unet_jax.errors import DataError
from unet_jax.io import images, paths
from unet_jax.io.paths import as_path

SUFFIX = ".array_record"
_FIELDS = ("image", "label", "fov", "name")
# Decoded training pairs kept per process; DRIVE's 20 images take 20 MB, Cityscapes' do not fit
# and are decoded per sample (as they would be from any compressed store).
CACHE_BYTES = 512 << 20


def split_path(folder: str | os.PathLike, split: str) -> Path:
    """Where the records of `split` lie in a records folder."""
    return as_path(folder) / f"{split}{SUFFIX}"


def encode(example: Mapping[str, Any]) -> bytes:
    """One record from an example: `image` uint8 RGB (H, W, 3) or PNG/JPEG bytes, `label` uint8
    (H, W), optional `fov` uint8 (H, W), `name` str or bytes."""
    image = example["image"]
    if not isinstance(image, bytes):
        image = images.encode_png(np.asarray(image)[:, :, ::-1])
    fields = {"image": np.frombuffer(image, np.uint8),
              "label": np.frombuffer(images.encode_png(np.asarray(example["label"])), np.uint8),
              "name": np.array(_text(example["name"]))}
    if "fov" in example:
        fields["fov"] = np.frombuffer(images.encode_png(np.asarray(example["fov"])), np.uint8)
    buf = io.BytesIO()
    np.savez(buf, **fields)
    return buf.getvalue()


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def write_split(examples: Iterable[Mapping[str, Any]], path: str | os.PathLike) -> int:
    """Write examples sorted by name to `path`; returns the number of records.

    The examples are written as they come to a scratch file, then copied in name order (one
    record in memory at a time: Cityscapes' train split is ~7 GB of PNG). The result is renamed
    into place when complete, so a half-written file is never read; a bucket object is written
    locally and uploaded whole (`paths.staged`: ArrayRecord writes local files only).
    """
    with paths.staged(as_path(path)) as local:
        count = _write_local(examples, local)
    return count


def _write_local(examples: Iterable[Mapping[str, Any]], path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(f".{path.name}.unsorted")
    partial = path.with_name(f".{path.name}.partial")
    names = []
    try:
        writer = array_record_module.ArrayRecordWriter(str(scratch), "group_size:1")
        for ex in examples:
            names.append(_text(ex["name"]))
            writer.write(encode(ex))
        writer.close()
        if len(set(names)) != len(names):
            raise DataError(f"{path}: two examples share a name; expected unique names")
        with array_record_data_source.ArrayRecordDataSource(str(scratch)) as reader:
            writer = array_record_module.ArrayRecordWriter(str(partial), "group_size:1")
            for k in sorted(range(len(names)), key=names.__getitem__):
                writer.write(reader[k])
            writer.close()
        os.replace(partial, path)
    finally:  # nothing half-written stays behind, whatever failed (a full disk included)
        scratch.unlink(missing_ok=True)
        partial.unlink(missing_ok=True)
    return len(names)


class _Cache:
    """A byte-bounded least-recently-used map, per process (a plain dict with a size budget:
    functools.lru_cache bounds entries, not bytes)."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.size = max_bytes, 0
        self.items: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key: int) -> tuple[np.ndarray, np.ndarray] | None:
        with self.lock:
            value = self.items.get(key)
            if value is not None:
                self.items.move_to_end(key)
            return value

    def put(self, key: int, value: tuple[np.ndarray, np.ndarray]) -> None:
        nbytes = sum(v.nbytes for v in value)
        if nbytes > self.max_bytes:
            return
        with self.lock:
            if key in self.items:
                return
            self.items[key] = value
            self.size += nbytes
            while self.size > self.max_bytes:
                _, old = self.items.popitem(last=False)
                self.size -= sum(v.nbytes for v in old)


class RecordSource:
    """The samples of one split (or the rows `rows` of it), by index: grain's data source.

    `source[i]` is the evaluation sample {image uint8 (H, W, 3) RGB, label uint8 (H, W), name
    str} plus fov uint8 (H, W) where the dataset has one; `train_pair(i)` is what the training
    augmentation reads, (BGR image, label), decoded once per process while `CACHE_BYTES` allow.
    """

    def __init__(self, path: str | os.PathLike, rows: range | None = None,
                 cache_bytes: int = CACHE_BYTES):
        self.path = as_path(path)
        if not self.path.is_file():
            raise DataError(f"{self.path}: no prepared records here (expected the file "
                            f"<split>{SUFFIX} that unet_jax.data.prepare writes)")
        self._reader: Any = None
        total = len(self._open())
        self.rows = range(total) if rows is None else rows
        if self.rows and (self.rows.start < 0 or self.rows[-1] >= total):
            raise ValueError(f"rows {self.rows}: outside the {total} records of {self.path}")
        self.cache_bytes = cache_bytes
        self._cache = _Cache(cache_bytes)

    def _open(self) -> Any:
        if self._reader is None:
            local = paths.local_copy(self.path)
            self._reader = array_record_data_source.ArrayRecordDataSource(str(local))
        return self._reader

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "rows": self.rows, "cache_bytes": self.cache_bytes}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.path, self.rows, self.cache_bytes = state["path"], state["rows"], state["cache_bytes"]
        self._reader, self._cache = None, _Cache(self.cache_bytes)

    def __len__(self) -> int:
        return len(self.rows)

    def __repr__(self) -> str:
        return f"RecordSource({str(self.path)!r}, rows={self.rows})"

    def shard(self, rows: range) -> RecordSource:
        """The records `rows` of this source (positions in it), e.g. one host's share."""
        return RecordSource(self.path, self.rows[rows.start:rows.stop], self.cache_bytes)

    def _fields(self, i: int) -> dict[str, np.ndarray]:
        if not 0 <= i < len(self.rows):
            raise IndexError(f"record {i} of {len(self.rows)}")
        raw = self._open()[self.rows[i]]
        with np.load(io.BytesIO(raw), allow_pickle=False) as npz:
            return {k: npz[k] for k in _FIELDS if k in npz.files}

    def _where(self, i: int) -> str:
        return f"{self.path}[{self.rows[i]}]"

    def __getitem__(self, i: int) -> dict[str, Any]:
        fields = self._fields(int(i))
        where = self._where(int(i))
        bgr = images.decode_bgr(fields["image"].tobytes(), where)
        sample = {"image": np.ascontiguousarray(bgr[:, :, ::-1]),
                  "label": images.decode_grey(fields["label"].tobytes(), where),
                  "name": str(fields["name"])}
        if "fov" in fields:
            sample["fov"] = images.decode_grey(fields["fov"].tobytes(), where)
        return sample

    def train_pair(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(BGR uint8 (H, W, 3), label uint8 (H, W)) of record `i` (read only; cached)."""
        i = int(i)
        pair = self._cache.get(i)
        if pair is None:
            fields, where = self._fields(i), self._where(i)
            pair = (images.decode_bgr(fields["image"].tobytes(), where),
                    images.decode_grey(fields["label"].tobytes(), where))
            for array in pair:
                array.flags.writeable = False
            self._cache.put(i, pair)
        return pair

    def names(self) -> list[str]:
        """The names of the records, in order."""
        return [str(self._fields(i)["name"]) for i in range(len(self))]


def host_rows(count: int, process_index: int, process_count: int) -> range:
    """This host's contiguous share of `count` records (remainder spread over the first hosts,
    as `tfds.even_splits(drop_remainder=False)`)."""
    base, extra = divmod(count, process_count)
    start = process_index * base + min(process_index, extra)
    return range(start, start + base + (process_index < extra))


def samples(source: RecordSource, max_images: int = 0) -> Iterator[dict[str, Any]]:
    """The evaluation samples of `source` in order (the first `max_images`; 0: all)."""
    if max_images < 0:
        raise ValueError(f"max_images: expected >= 0 (0 = all), found {max_images}")
    count = len(source) if not max_images else min(max_images, len(source))
    for i in range(count):
        yield source[i]


__all__ = ["RecordSource", "encode", "host_rows", "samples", "split_path", "write_split"]
