"""Train and eval input pipelines (tf.data) around the mmseg augmentation of `augment.py`.

Train: the split is cached in host memory once (decoded arrays, or the encoded PNG bytes if the
dataset yields strings, e.g. a TFDS split read with `tfds.decode.SkipDecoding()`), sorted by
`name`; augmentation runs on whole per-host batches (`augment.train_batch`) in a parallel
tf.data map. Global sample `i = step * global_batch_size + j` is a pure function of `(seed, i)`:
its image is `permutation(seed, epoch = i // N)[i % N]` and all its augmentation randomness comes
from `numpy.random.default_rng([seed, 1, i])`. So a run resumed at `start_step` sees exactly the
batches of an uninterrupted run, and each host builds only its own rows
`j in [process_index * B_local, (process_index + 1) * B_local)` of every global batch. This
per-epoch permutation replaces mmseg's RepeatDataset + shuffled sampler.

Eval: one image per element, in the order of `ds`, no shuffling (mmseg's val loader, batch 1),
with the field-of-view mask `fov` passed through where the dataset has one (training ignores it).
"""
from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import tensorflow as tf

from unet_jax.data import augment as A

_PERM_STREAM, _AUG_STREAM = 0, 1


@dataclass(frozen=True)
class Record:
    """One cached training pair: BGR uint8 image (or encoded bytes) and label (or bytes)."""
    image: np.ndarray | bytes
    label: np.ndarray | bytes
    name: str


def _decode_image_bgr(value: np.ndarray | bytes) -> np.ndarray:
    if isinstance(value, bytes):
        img = cv2.imdecode(np.frombuffer(value, np.uint8), cv2.IMREAD_COLOR)
        if img is None:
            raise ValueError(f"could not decode an encoded image of {len(value)} bytes")
        return img
    return value


def _decode_label(value: np.ndarray | bytes) -> np.ndarray:
    if isinstance(value, bytes):
        lab = cv2.imdecode(np.frombuffer(value, np.uint8), cv2.IMREAD_UNCHANGED)
        if lab is None:
            raise ValueError(f"could not decode an encoded label of {len(value)} bytes")
        value = lab
    if value.ndim == 3 and value.shape[2] == 1:
        value = value[:, :, 0]
    if value.ndim != 2 or value.dtype != np.uint8:
        raise ValueError(f"label: expected uint8 HxW, found {value.dtype} {value.shape}")
    return value


def _rgb_to_bgr(image: np.ndarray) -> np.ndarray:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image: expected uint8 HxWx3 RGB, found {image.dtype} {image.shape}")
    return np.ascontiguousarray(image[:, :, ::-1])


def _check_spec(ds: tf.data.Dataset) -> None:
    spec = ds.element_spec
    if not isinstance(spec, dict) or "image" not in spec or "label" not in spec:
        raise ValueError("dataset elements: expected a dict with 'image', 'label' (and 'name'), "
                         f"found {spec}")


def cache_records(ds: tf.data.Dataset) -> list[Record]:
    """Read a split into host memory (images converted to BGR), sorted by name.

    Only `image`, `label` and `name` are kept (a `fov` mask is for evaluation). Encoded images
    (string features) stay encoded and their labels are PNG-encoded too, so a large split
    (Cityscapes: `decoders={'image': tfds.decode.SkipDecoding()}`) costs its compressed size;
    decoding then happens per sample, in the parallel map.
    """
    _check_spec(ds)
    records = []
    for k, ex in enumerate(ds.as_numpy_iterator()):
        image, label = ex["image"], ex["label"]
        image = image if isinstance(image, bytes) else _rgb_to_bgr(image)
        label = label if isinstance(label, bytes) else _decode_label(label)
        if isinstance(image, bytes) and not isinstance(label, bytes):
            ok, png = cv2.imencode(".png", label, [cv2.IMWRITE_PNG_COMPRESSION, 1])
            if not ok:
                raise ValueError(f"could not PNG-encode the label of element {k} {label.shape}")
            label = png.tobytes()  # large sets: keep the whole cache compressed
        name = ex.get("name", str(k))
        name = name.decode() if isinstance(name, bytes) else str(name)
        records.append(Record(image, label, name))
    if not records:
        raise ValueError("train_dataset: expected a non-empty dataset, found 0 elements")
    names = [r.name for r in records]
    if len(set(names)) == len(names):
        records.sort(key=lambda r: r.name)
    return records


class TrainSampler:
    """Global sample index -> augmented (image, label), a pure function of (seed, index)."""

    def __init__(self, records: list[Record], data_cfg: Any, seed: int,
                 stream: tuple[int, ...] = ()):
        if seed < 0:
            raise ValueError(f"seed: expected a non-negative int, found {seed}")
        if not records:
            raise ValueError("training split: expected at least one example, found none")
        self.records, self.data_cfg, self.seed = records, data_cfg, int(seed)
        self.stream = tuple(int(v) for v in stream)  # extra permutation key (a host's shard)
        self._perms: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()  # the parallel map calls in from several threads

    def _permutation(self, epoch: int) -> np.ndarray:
        with self._lock:
            perm = self._perms.get(epoch)
            if perm is None:
                perm = np.random.default_rng([self.seed, _PERM_STREAM, *self.stream, epoch]
                                             ).permutation(
                    len(self.records))
                if len(self._perms) >= 8:
                    del self._perms[min(self._perms)]
                self._perms[epoch] = perm
            return perm

    def image_index(self, i: int) -> int:
        """Which cached image global sample `i` uses."""
        n = len(self.records)
        return int(self._permutation(i // n)[i % n])

    def params(self, i: int) -> A.AugParams:
        """All augmentation randomness of global sample `i`."""
        return A.sample_params(np.random.default_rng([self.seed, _AUG_STREAM, int(i)]))

    def pair(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """The decoded (BGR image, label) that global sample `i` augments."""
        rec = self.records[self.image_index(int(i))]
        return _decode_image_bgr(rec.image), _decode_label(rec.label)

    def batch(self, indices: np.ndarray, image_indices: np.ndarray | None = None,
              ) -> tuple[np.ndarray, np.ndarray]:
        """Samples `indices`: float32 (B, h, w, 3) normalised RGB and int32 (B, h, w) labels.

        Augmentation randomness comes from `indices`; the images from `image_indices` (default
        the same), which lets a host draw images from its own shard only.
        """
        picks = indices if image_indices is None else image_indices
        pairs = [self.pair(i) for i in picks]
        return A.train_batch([p[0] for p in pairs], [p[1] for p in pairs],
                             [self.params(i) for i in indices], self.data_cfg)


def step_indices(step: int, global_batch_size: int, process_index: int = 0,
                 process_count: int = 1) -> np.ndarray:
    """Global sample indices of this host's rows of global batch `step`."""
    local = global_batch_size // process_count
    start = step * global_batch_size + process_index * local
    return np.arange(start, start + local, dtype=np.int64)


def train_dataset(ds: tf.data.Dataset, data_cfg: Any, *, global_batch_size: int, seed: int,
                  start_step: int = 0, process_index: int = 0, process_count: int = 1,
                  host_shard: bool = False) -> tf.data.Dataset:
    """Infinite training batches of this host:
    dict(image float32 (B_local, h, w, 3) normalised RGB, label int32 (B_local, h, w)).

    (h, w) = data_cfg.crop_size; B_local = global_batch_size // process_count. The k-th element
    is step `start_step + k`; its rows are global rows [process_index * B_local, ...) of that step.
    With `host_shard`, `ds` is this host's shard of the split (`host_train_split`): images are
    drawn from it alone, by a per-host permutation of the host's own sample counter, so batches
    depend on (seed, step, process_count) and each host reads only its files. Without it every
    host caches the whole split and batches are independent of the process count.
    Iterate with `.as_numpy_iterator()` (or feed tensors directly).
    """
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ValueError(f"global_batch_size: expected a positive multiple of process_count="
                         f"{process_count}, found {global_batch_size}")
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index: expected 0..{process_count - 1}, found {process_index}")
    if start_step < 0:
        raise ValueError(f"start_step: expected >= 0, found {start_step}")
    stream = (process_count, process_index) if host_shard else ()
    sampler = TrainSampler(cache_records(ds), data_cfg, seed, stream)
    local = global_batch_size // process_count
    ch, cw = (int(x) for x in data_cfg.crop_size)

    def make(step: np.int64) -> tuple[np.ndarray, np.ndarray]:
        rows = step_indices(int(step), global_batch_size, process_index, process_count)
        own = step_indices(int(step), local) if host_shard else None
        return sampler.batch(rows, own)

    def load(step: tf.Tensor) -> dict[str, tf.Tensor]:
        image, label = tf.numpy_function(make, [step], (tf.float32, tf.int32), stateful=False)
        image.set_shape((local, ch, cw, 3))
        label.set_shape((local, ch, cw))
        return {"image": image, "label": label}

    out = tf.data.Dataset.range(start_step, np.iinfo(np.int64).max)
    out = out.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    options = tf.data.Options()
    options.deterministic = True
    return out.prefetch(tf.data.AUTOTUNE).with_options(options)


def host_train_split(process_index: int, process_count: int) -> Any:
    """The TFDS split of this host's shard of `train` (even, remainder spread over hosts)."""
    import tensorflow_datasets as tfds

    if process_count == 1:
        return "train"
    return tfds.even_splits("train", n=process_count, drop_remainder=False)[process_index]


def eval_dataset(ds: tf.data.Dataset, data_cfg: Any, max_images: int = 0,
                 ) -> Iterator[dict[str, Any]]:
    """Validation images one at a time, in dataset order.

    Yields dict(image uint8 (H, W, 3) RGB original, image_normalised float32 (h, w, 3) RGB after
    the keep-ratio resize to data_cfg.img_scale (identity at native size), label uint8 (H, W)
    at original size, name str), plus fov uint8 (H, W) (1 = inside the field of view) when the
    dataset has a `fov` feature.
    """
    _check_spec(ds)
    if max_images < 0:
        raise ValueError(f"max_images: expected >= 0 (0 = all), found {max_images}")
    if max_images:
        ds = ds.take(max_images)

    def prepare(image: np.ndarray | bytes, label: np.ndarray | bytes,
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        bgr = _decode_image_bgr(image) if isinstance(image, bytes) else _rgb_to_bgr(image)
        return (np.ascontiguousarray(bgr[:, :, ::-1]), A.eval_image(bgr, data_cfg),
                _decode_label(label))

    def load(ex: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        image, norm, label = tf.numpy_function(
            prepare, [ex["image"], ex["label"]], (tf.uint8, tf.float32, tf.uint8), stateful=False)
        image.set_shape((None, None, 3))
        norm.set_shape((None, None, 3))
        label.set_shape((None, None))
        name = ex["name"] if "name" in ex else tf.constant("")
        out = {"image": image, "image_normalised": norm, "label": label, "name": name}
        if "fov" in ex:
            out["fov"] = ex["fov"]
        return out

    out = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    for k, ex in enumerate(out.prefetch(2).as_numpy_iterator()):
        name = ex["name"].decode() if isinstance(ex["name"], bytes) else str(ex["name"])
        ex["name"] = name or str(k)
        yield ex
