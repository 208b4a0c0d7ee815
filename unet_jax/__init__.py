"""unet_jax: mmsegmentation's UNet-S5-D16 model zoo in JAX/Flax, numerically identical to mmseg.

`unet_jax.Segmenter` (the Python API, `unet_jax.segmenter`) is imported on first use, so that
`import unet_jax` stays light (no JAX, no TensorFlow). Importing it, or any of its modules,
changes no process-wide setting: the command lines choose XLA's CPU flags
(`unet_jax.cli.common.use_cpu_xla_flags`) before JAX starts.
"""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["Segmenter", "__version__"]


def __getattr__(name: str) -> Any:
    """Lazy attributes: `Segmenter`."""
    if name == "Segmenter":
        from unet_jax.segmenter import Segmenter
        return Segmenter
    raise AttributeError(f"module 'unet_jax' has no attribute {name!r}")
