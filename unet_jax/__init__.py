"""unet_jax: mmsegmentation's UNet-S5-D16 model zoo in JAX/Flax, numerically identical to mmseg."""

__version__ = "0.1.0"
