"""Prepare and read the dataset of a config's `data` section (name, manual_dir, tfds_data_dir)."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import tensorflow as tf
import tensorflow_datasets as tfds

from unet_jax.data import cityscapes
from unet_jax.data.builders import chase_db1, drive, hrf, stare
from unet_jax.data.builders.common import DataError, check_manual_dir, data_error
from unet_jax.data.synthetic import synthetic_config

RETINAL = {"drive": drive.LAYOUT, "stare": stare.LAYOUT, "chase_db1": chase_db1.LAYOUT,
           "hrf": hrf.LAYOUT}
CITYSCAPES_CONFIG = "cityscapes/semantic_segmentation"
NAMES = (*RETINAL, "synthetic", "cityscapes")


def _get(data: Any, key: str, default: Any = None) -> Any:
    if isinstance(data, Mapping):
        return data.get(key, default)
    return getattr(data, key, default) if hasattr(data, key) else default


def get_builder(data: Any) -> tfds.core.DatasetBuilder:
    """The TFDS builder for `data.name` with `data_dir=data.tfds_data_dir` (nothing prepared).

    `data.name`: drive | stare | chase_db1 | hrf | synthetic | cityscapes (TFDS's
    `name/config` form is accepted too). For `synthetic`, an optional `data.synthetic` mapping
    (image_size, num_train, num_validation, seed) picks the config.
    """
    name = str(_get(data, "name", ""))
    base = name.split("/", 1)[0]
    if base not in NAMES:
        raise ValueError(f"data.name: expected one of {', '.join(NAMES)}, found {name!r}")
    data_dir = _get(data, "tfds_data_dir")
    data_dir = str(data_dir) if data_dir else None
    if base == "synthetic" and "/" not in name and _get(data, "synthetic"):
        options = dict(_get(data, "synthetic"))
        return tfds.builder("synthetic", data_dir=data_dir, config=synthetic_config(**options))
    if name == "cityscapes":
        name = CITYSCAPES_CONFIG
    return tfds.builder(name, data_dir=data_dir)


def prepare(data: Any) -> tfds.core.DatasetBuilder:
    """Build the dataset into `data.tfds_data_dir` unless it is there already; returns the builder.

    The retinal sets and Cityscapes read `data.manual_dir`; the synthetic set needs nothing.
    TFDS writes into a temporary folder and renames it when done, so an interrupted preparation
    is never taken for a finished one: the next call prepares again.
    """
    builder = get_builder(data)
    if builder.is_prepared():
        return builder
    base = builder.name
    manual_dir = _get(data, "manual_dir")
    if base in RETINAL or base == "cityscapes":
        layout = RETINAL.get(base, cityscapes.INSTRUCTIONS)
        check_manual_dir(Path(manual_dir).expanduser() if manual_dir else None, layout)
        manual_dir = str(Path(manual_dir).expanduser())
    if base == "cityscapes":
        for zip_name in ("leftImg8bit_trainvaltest.zip", "gtFine_trainvaltest.zip"):
            if not (Path(manual_dir) / zip_name).is_file():
                raise data_error(Path(manual_dir) / zip_name, "Cityscapes archive missing",
                                 cityscapes.INSTRUCTIONS, "no such file")
    config = tfds.download.DownloadConfig(manual_dir=manual_dir if base != "synthetic" else None,
                                          try_download_gcs=False)
    builder.download_and_prepare(download_config=config)
    return builder


def load_split(data: Any, split: str, *, shuffle_files: bool = False,
               read_config: tfds.ReadConfig | None = None,
               decoders: Mapping[str, Any] | None = None) -> tf.data.Dataset:
    """One split (e.g. 'train', 'validation', or any TFDS split string such as 'train[:50%]')
    as a `tf.data.Dataset` of {'image' uint8 HxWx3 RGB, 'label' uint8 HxW, 'name' string}.

    Prepares the dataset first if needed. Cityscapes labels come as the 19 train ids and 255.
    `decoders` (e.g. {'image': tfds.decode.SkipDecoding()}) is passed to TFDS; for Cityscapes
    the label must stay decoded (it is remapped).
    """
    builder = prepare(data)
    ds = builder.as_dataset(split=split, shuffle_files=shuffle_files, read_config=read_config,
                            decoders=dict(decoders) if decoders else None)
    if builder.name == "cityscapes":
        ds = ds.map(cityscapes.to_common_features, num_parallel_calls=tf.data.AUTOTUNE)
    return ds


__all__ = ["DataError", "NAMES", "get_builder", "load_split", "prepare"]
