"""Flax NNX modules of the UNet zoo: backbone, heads and the EncoderDecoder segmentor."""
from unet_jax.models.segmentor import EncoderDecoder, build_model, count_params, head_channels

__all__ = ["EncoderDecoder", "build_model", "count_params", "head_channels"]
