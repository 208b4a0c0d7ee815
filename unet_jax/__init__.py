"""unet_jax: mmsegmentation's UNet-S5-D16 model zoo in JAX/Flax, numerically identical to mmseg.

`unet_jax.Segmenter` (the Python API, `unet_jax.segmenter`) is imported on first use, so that
`import unet_jax` stays light (no JAX, no TensorFlow).
"""
from __future__ import annotations

import os
from typing import Any

__version__ = "0.1.0"

# XLA:CPU runs matmuls and reductions through YNNPACK with this flag: against jaxlib's defaults
# the UNet's train step ran 1.4-1.7x and DRIVE slide inference 1.5x as fast on a 2-core CPU
# (experiments/cpu_flags.py, results/cpu_flags.md); other
# platforms ignore it. It only takes effect when set before JAX starts its CPU backend, so it is
# set here, at import; UNET_JAX_XLA_DEFAULTS=0, or any value of the flag in XLA_FLAGS, leaves
# XLA_FLAGS alone.
CPU_XLA_FLAGS = "--xla_cpu_experimental_ynn_fusion_type=dot,reduce"
if (os.environ.get("UNET_JAX_XLA_DEFAULTS", "1") != "0"
        and "xla_cpu_experimental_ynn_fusion_type" not in os.environ.get("XLA_FLAGS", "")):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {CPU_XLA_FLAGS}".strip()
__all__ = ["Segmenter", "__version__"]


def __getattr__(name: str) -> Any:
    """Lazy attributes: `Segmenter`."""
    if name == "Segmenter":
        from unet_jax.segmenter import Segmenter
        return Segmenter
    raise AttributeError(f"module 'unet_jax' has no attribute {name!r}")
