"""Datasets: the retinal TFDS builders (`drive`, `stare`, `chase_db1`, `hrf`), the `synthetic`
builder, Cityscapes through TFDS's `cityscapes`, `prepare` (TFDS build + the records every reader
shares), `source` (a split's records) and `load_split` (the TFDS view, a `tf.data.Dataset`).

Importing this package registers the builders with TFDS where TFDS is installed; that imports
TFDS but not TensorFlow. TensorFlow is imported only to build a dataset and write its records
(`prepare`, `source` the first time) or to read it through TFDS (`load_split`). Reading prepared records (`unet_jax.data.records`), the augmentation
and the sampler need neither (the sampler's worker processes and experiments/gpu_report.py).
"""
import importlib
import importlib.resources
import importlib.util
import sys

# tensorflow-datasets 4.9.x imports the `importlib_resources` backport at run time but declares it
# only for Python < 3.9; the standard library module is the same API (etils uses it the same way).
try:
    import importlib_resources  # noqa: F401  # pylint: disable=unused-import
except ImportError:
    sys.modules["importlib_resources"] = importlib.resources

from unet_jax.errors import DataError  # noqa: E402

if importlib.util.find_spec("tensorflow_datasets") is not None:
    # pylint: disable=wrong-import-position
    from unet_jax.data.builders import ChaseDb1, Drive, Hrf, Stare  # noqa: E402,F401
    from unet_jax.data.synthetic import (  # noqa: E402,F401
        Synthetic, SyntheticConfig, make_fov, make_sample, synthetic_config)

_LAZY = {"NAMES": "loading", "get_builder": "loading", "load_split": "loading",
         "prepare": "loading", "source": "loading", "labelids_to_trainids": "cityscapes"}

__all__ = [
    "ChaseDb1", "DataError", "Drive", "Hrf", "NAMES", "Stare", "Synthetic", "SyntheticConfig",
    "get_builder", "labelids_to_trainids", "load_split", "make_fov", "make_sample", "prepare",
    "source", "synthetic_config",
]


def __getattr__(name: str):
    """The TensorFlow-side functions, imported on first use (PEP 562)."""
    if name in _LAZY:
        return getattr(importlib.import_module(f"unet_jax.data.{_LAZY[name]}"), name)
    if name in __all__:
        raise AttributeError(f"unet_jax.data.{name} needs tensorflow-datasets, which is not "
                             "installed here (pip install -e .)")
    raise AttributeError(f"module 'unet_jax.data' has no attribute {name!r}")
