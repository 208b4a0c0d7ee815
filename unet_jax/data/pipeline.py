"""The tf.data ends of the input pipelines: reading a TFDS split into the training records, and
the validation images one at a time.

Training batches themselves are built by `unet_jax.data.sampler.train_batches` (worker
processes, a pure function of (seed, step)) from the records `cache_records` reads. Eval: one
image per element, in the order of `ds`, no shuffling (mmseg's val loader, batch 1), with the
field-of-view mask `fov` passed through where the dataset has one (training ignores it).
"""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import cv2
import numpy as np
import tensorflow as tf

from unet_jax.data import augment as A
from unet_jax.data.sampler import Record, decode_image_bgr, decode_label

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
    decoding then happens per sample, in the workers.
    """
    _check_spec(ds)
    records = []
    for k, ex in enumerate(ds.as_numpy_iterator()):
        image, label = ex["image"], ex["label"]
        image = image if isinstance(image, bytes) else _rgb_to_bgr(image)
        label = label if isinstance(label, bytes) else decode_label(label)
        if isinstance(image, bytes) and not isinstance(label, bytes):
            ok, png = cv2.imencode(".png", label, [cv2.IMWRITE_PNG_COMPRESSION, 1])
            if not ok:
                raise ValueError(f"could not PNG-encode the label of element {k} {label.shape}")
            label = png.tobytes()  # large sets: keep the whole cache compressed
        name = ex.get("name", str(k))
        name = name.decode() if isinstance(name, bytes) else str(name)
        records.append(Record(image, label, name))
    if not records:
        raise ValueError("training split: expected a non-empty dataset, found 0 elements")
    names = [r.name for r in records]
    if len(set(names)) == len(names):
        records.sort(key=lambda r: r.name)
    return records


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
        bgr = decode_image_bgr(image) if isinstance(image, bytes) else _rgb_to_bgr(image)
        return (np.ascontiguousarray(bgr[:, :, ::-1]), A.eval_image(bgr, data_cfg),
                decode_label(label))

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
