"""Prepare and read the dataset of a config's `data` section (name, manual_dir, tfds_data_dir).

`prepare` builds the TFDS dataset once and writes its splits as the records every reader shares
(`unet_jax.data.records`); `source` opens a split's records; `load_split` is the TFDS view of a
split as a `tf.data.Dataset` (the public TFDS contract; the library itself reads the records).

Every dataset is one row of `DATASETS`: its TFDS builder name (none for `folder`, the user's
own folder of images and labels, which `unet_jax.data.folder` checks and writes as records), what
`manual_dir` must hold (`None`: nothing, the data are generated), the archives that must be there, how its examples
map onto the common features, and what its `fov` feature holds (`None`: no field-of-view masks,
no FOV metrics). Nothing else in the library knows a dataset by name.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import ml_collections
import tensorflow_datasets as tfds

from unet_jax.config import DATASET_NAMES
from unet_jax.errors import DataError, storage_error
from unet_jax.data import cityscapes, folder, records
from unet_jax.data.builders import chase_db1, drive, hrf, stare
from unet_jax.data.builders.common import check_manual_dir, data_error
from unet_jax.data.synthetic import Synthetic, synthetic_config
from unet_jax.io import paths
from unet_jax.io.paths import AnyPath, as_path  # a local folder or a bucket URL


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """How one dataset is prepared and read."""
    tfds_name: str
    layout: str | None                    # what manual_dir holds; None: generated, no download
    required_files: tuple[str, ...] = ()  # files manual_dir must contain (checked up front)
    to_common: Callable[[dict[str, Any]], dict[str, Any]] | None = None  # on tf tensors
    options: Callable[[Any], tfds.core.BuilderConfig] | None = None  # builder config from data
    fov: str | None = None                # what the `fov` feature holds; None: no such feature
    image_feature: str = "image"          # the builder's image feature (stored encoded as is)
    records: Callable[[Any], Path] | None = None  # writes its records itself (no TFDS builder)


DATASETS: dict[str, DatasetSpec] = {
    "drive": DatasetSpec("drive", drive.LAYOUT, fov=drive.Drive.FOV),
    "stare": DatasetSpec("stare", stare.LAYOUT, fov=stare.Stare.FOV),
    "chase_db1": DatasetSpec("chase_db1", chase_db1.LAYOUT, fov=chase_db1.ChaseDb1.FOV),
    "hrf": DatasetSpec("hrf", hrf.LAYOUT, fov=hrf.Hrf.FOV),
    "cityscapes": DatasetSpec(
        "cityscapes/semantic_segmentation", cityscapes.INSTRUCTIONS,
        required_files=("leftImg8bit_trainvaltest.zip", "gtFine_trainvaltest.zip"),
        to_common=cityscapes.to_common_features, image_feature="image_left"),
    "synthetic": DatasetSpec(
        "synthetic", None, options=lambda data: synthetic_config(**dict(data.synthetic)),
        fov=Synthetic.FOV),
    "folder": DatasetSpec("", None, fov=folder.FOV, records=folder.prepare),
}
assert tuple(sorted(DATASETS)) == tuple(sorted(DATASET_NAMES)), "config.DATASET_NAMES is stale"
NAMES = tuple(DATASETS)


def _data(data: Any) -> Any:
    """`config.data`, or a plain dict of its fields (name, manual_dir, tfds_data_dir, ...)."""
    if isinstance(data, Mapping) and not isinstance(data, ml_collections.ConfigDict):
        data = ml_collections.ConfigDict(dict(data))
    return data


def get_builder(data: Any) -> tfds.core.DatasetBuilder:
    """The TFDS builder of `data.name` with `data_dir=data.tfds_data_dir` (nothing prepared).

    `data` is `config.data` or a dict with the same fields.
    """
    data = _data(data)
    spec = DATASETS[data.name]
    if spec.records is not None:
        raise DataError(f"data.name {data.name!r}: no TFDS builder; its records are read with "
                        "unet_jax.data.source")
    if spec.options is not None:
        return tfds.builder(spec.tfds_name, data_dir=data.tfds_data_dir,
                            config=spec.options(data))
    return tfds.builder(spec.tfds_name, data_dir=data.tfds_data_dir)


RECORD_SPLITS = ("train", "validation")


def _tensorflow() -> Any:
    """TensorFlow, imported only to build a dataset or to read it through TFDS (about 8 s of CPU
    and 1 GB that training, evaluation and predict on prepared records do not pay), and kept off
    the accelerators, which are JAX's."""
    import tensorflow as tf
    tf.config.set_visible_devices([], "GPU")
    return tf


def records_dir(builder: tfds.core.DatasetBuilder) -> AnyPath:
    """The folder of a prepared dataset's records (inside the builder's versioned folder)."""
    return as_path(builder.data_dir) / "records"


def prepare(data: Any) -> AnyPath:
    """Build the dataset into `data.tfds_data_dir` and write its records, unless they are there
    already; returns the records folder.

    TFDS writes into a temporary folder and renames it when done, and each records file is
    renamed into place once complete, so an interrupted preparation is never taken for a
    finished one: the next call prepares (or writes the records) again.
    """
    data = _data(data)
    if DATASETS[data.name].records is not None:
        return DATASETS[data.name].records(data)
    try:
        builder = get_builder(data)  # lists a bucket's folder: no permission fails here
        if paths.is_url(builder.data_dir):
            return _prepare_remote(builder, data)
        if not builder.is_prepared():
            _tensorflow()
            _build(builder, data)
        for split in RECORD_SPLITS:
            path = records.split_path(records_dir(builder), split)
            if not path.is_file():
                _tensorflow()
                records.write_split(_examples(builder, data, split), path)
    except Exception as err:  # TFDS and TensorFlow wrap OS errors in their own types
        reason = storage_error(err)
        if reason is None:
            raise
        raise DataError(f"{data.tfds_data_dir}: cannot prepare {data.name} there: {reason}"
                        ) from err
    return records_dir(builder)


def _prepare_remote(builder: tfds.core.DatasetBuilder, data: Any) -> AnyPath:
    """The records folder in a bucket (`data.tfds_data_dir` a URL): there already, or built in
    a local temporary folder and uploaded split by split, each file one object.

    TFDS writes through TensorFlow's own GCS client (which ignores `STORAGE_EMULATOR_HOST`) and
    ArrayRecord writes local files only, so the dataset is built locally; only the records go
    up (what every reader here reads), not the TFDS files, so `load_split` (the TFDS view)
    does not read a bucket that only this prepared.
    """
    remote = records_dir(builder)
    targets = {split: records.split_path(remote, split) for split in RECORD_SPLITS}
    if all(path.is_file() for path in targets.values()):
        return remote
    with tempfile.TemporaryDirectory(prefix="unet_jax_prepare_") as tmp:
        local = ml_collections.ConfigDict(data.to_dict())
        local.tfds_data_dir = tmp
        folder = prepare(local)
        for split, target in targets.items():
            if not target.is_file():
                paths.move(records.split_path(folder, split), target)
    print(f"records of {data.name} uploaded to {remote}")
    return remote


def _build(builder: tfds.core.DatasetBuilder, data: Any) -> None:
    spec = DATASETS[data.name]
    manual_dir = None
    if spec.layout is not None:
        path = Path(data.manual_dir).expanduser() if data.manual_dir else None
        check_manual_dir(path, spec.layout)
        manual_dir = str(path)
        for name in spec.required_files:
            if not (path / name).is_file():
                raise data_error(path / name, "archive missing", spec.layout, "no such file")
    config = tfds.download.DownloadConfig(manual_dir=manual_dir, try_download_gcs=False)
    # TFDS prints "Downloading and preparing dataset Unknown size ..." to stdout, untrue here
    # (nothing is downloaded); one line of ours says what happens. Its progress bars stay.
    print(f"preparing {data.name} once into {builder.data_dir} from "
          f"{manual_dir or 'generated images'}")
    with contextlib.redirect_stdout(io.StringIO()):
        builder.download_and_prepare(download_config=config)


def _examples(builder: tfds.core.DatasetBuilder, data: Any, split: str):
    """The split's examples as numpy, images still PNG-encoded (stored as they are)."""
    skip = {DATASETS[data.name].image_feature: tfds.decode.SkipDecoding()}
    ds = _as_dataset(builder, data, split, decoders=skip)
    return ds.as_numpy_iterator()


def source(data: Any, split: str) -> records.RecordSource:
    """The records of `split` ('train' or 'validation') of `config.data`; prepares first if
    needed. Samples: {image uint8 (H, W, 3) RGB, label uint8 (H, W), name str} and fov uint8
    (H, W) where `DATASETS[name].fov` says so."""
    if split not in RECORD_SPLITS:
        raise ValueError(f"split: expected one of {RECORD_SPLITS}, found {split!r}")
    return records.RecordSource(records.split_path(prepare(_data(data)), split))


def load_split(data: Any, split: str, *, shuffle_files: bool = False,
               read_config: tfds.ReadConfig | None = None,
               decoders: Mapping[str, Any] | None = None) -> Any:
    """One split (e.g. 'train', 'validation', or any TFDS split string such as 'train[:50%]')
    as a `tf.data.Dataset` of {'image' uint8 HxWx3 RGB, 'label' uint8 HxW, 'name' string}, and
    'fov' uint8 HxW (1 = inside the field of view) where `DATASETS[name].fov` says so.

    Prepares the dataset first if needed. `decoders` (e.g. {'image':
    tfds.decode.SkipDecoding()}) is passed to TFDS; labels that are remapped (Cityscapes' ids to
    train ids) must stay decoded.
    """
    data = _data(data)
    prepare(data)
    return _as_dataset(get_builder(data), data, split, shuffle_files=shuffle_files,
                       read_config=read_config, decoders=decoders)


def _as_dataset(builder: tfds.core.DatasetBuilder, data: Any, split: str, *,
                shuffle_files: bool = False, read_config: tfds.ReadConfig | None = None,
                decoders: Mapping[str, Any] | None = None) -> Any:
    tf = _tensorflow()
    ds = builder.as_dataset(split=split, shuffle_files=shuffle_files, read_config=read_config,
                            decoders=dict(decoders) if decoders else None)
    to_common = DATASETS[data.name].to_common
    if to_common is not None:
        ds = ds.map(to_common, num_parallel_calls=tf.data.AUTOTUNE)
    return ds


__all__ = ["DATASETS", "NAMES", "get_builder", "load_split", "prepare", "records_dir", "source"]
