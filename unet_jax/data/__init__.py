"""Datasets: the retinal TFDS builders (`drive`, `stare`, `chase_db1`, `hrf`), the `synthetic`
builder, Cityscapes through TFDS's `cityscapes`, and `prepare` / `load_split` for configs.

Importing this package registers the builders with TFDS. Where TensorFlow Datasets is not
installed (e.g. a bare GPU machine), or with UNET_JAX_LIGHT_DATA=1 (the augmentation worker
processes), only the TensorFlow-free modules are there: `augment`, `sampler`, `folders`.
"""
import importlib.resources
import importlib.resources.abc
import importlib.util
import os
import sys

LIGHT = (os.environ.get("UNET_JAX_LIGHT_DATA") == "1"
         or importlib.util.find_spec("tensorflow_datasets") is None)

# tensorflow-datasets 4.9.x imports the `importlib_resources` backport at run time but declares it
# only for Python < 3.9; the standard library module is the same API (etils uses it the same way).
try:
    import importlib_resources  # noqa: F401  # pylint: disable=unused-import
except ImportError:
    sys.modules["importlib_resources"] = importlib.resources

# pylint: disable=wrong-import-position
if not LIGHT:
    from unet_jax.data.builders import ChaseDb1, DataError, Drive, Hrf, Stare  # noqa: E402
    from unet_jax.data.cityscapes import labelids_to_trainids  # noqa: E402
    from unet_jax.data.loading import NAMES, get_builder, load_split, prepare  # noqa: E402
    from unet_jax.data.synthetic import (  # noqa: E402
        Synthetic, SyntheticConfig, make_fov, make_sample, synthetic_config)

__all__ = [
    "ChaseDb1", "DataError", "Drive", "Hrf", "NAMES", "Stare", "Synthetic", "SyntheticConfig",
    "get_builder", "labelids_to_trainids", "load_split", "make_fov", "make_sample", "prepare",
    "synthetic_config",
]


def __getattr__(name: str):
    """A clear error for the TFDS parts where TensorFlow Datasets is absent."""
    if LIGHT and name in __all__:
        raise AttributeError(f"unet_jax.data.{name} needs tensorflow-datasets, which is not "
                             "installed here (pip install -e .)")
    raise AttributeError(f"module 'unet_jax.data' has no attribute {name!r}")
