"""mmseg's UNet backbone (mmseg/models/backbones/unet.py), general over its constructor options.

Module attributes mirror mmseg's names (`encoder.{i}.{j}.convs.{k}`, `decoder.{j}.conv_block`,
`decoder.{j}.upsample.interp_upsample.1`, `decoder.{j}.upsample.deconv_upsamping.0` with mmseg's
spelling) so that state paths map one-to-one onto state_dict keys.

The decoder's x2 upsampling is mmseg's `upsample_cfg` (`unet_jax.recipe.UPSAMPLES` spells out each).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from unet_jax.errors import ConfigError
from unet_jax.models.layers import (BatchNorm, ConvModule, ConvTranspose, MaxPool, Upsample,
                                    param_dtype_for)
from unet_jax.recipe import UPSAMPLES


class BasicConvBlock(nnx.Module):
    """`num_convs` 3x3 ConvModules; the first carries the stride, the others the dilation."""

    def __init__(self, in_channels: int, out_channels: int, num_convs: int = 2, stride: int = 1,
                 dilation: int = 1, *, with_cp: bool = False, dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.with_cp = with_cp
        convs = []
        for k in range(num_convs):
            convs.append(ConvModule(
                in_channels if k == 0 else out_channels, out_channels, 3,
                stride=stride if k == 0 else 1, dilation=1 if k == 0 else dilation,
                padding=1 if k == 0 else dilation, dtype=dtype, rngs=rngs))
        self.convs = nnx.List(convs)

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.with_cp:  # mmseg with_cp: recompute activations in the backward pass
            return nnx.remat(BasicConvBlock._forward)(self, x)
        return self._forward(x)

    def _forward(self, x: jax.Array) -> jax.Array:
        for conv in self.convs:
            x = conv(x)
        return x


class InterpConv(nnx.Module):
    """mmseg InterpConv: x2 interpolation (bilinear or nearest) then a 1x1 ConvModule, or the
    conv first with `conv_first` (cheaper: the conv runs at the lower resolution)."""

    def __init__(self, in_channels: int, out_channels: int, *, mode: str = "bilinear",
                 conv_first: bool = False, dtype=jnp.float32, rngs: nnx.Rngs):
        layers = [Upsample(mode), ConvModule(in_channels, out_channels, 1, dtype=dtype,
                                             rngs=rngs)]
        self.interp_upsample = nnx.List(layers[::-1] if conv_first else layers)

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.interp_upsample:
            x = layer(x)
        return x


class DeconvModule(nnx.Module):
    """mmseg DeconvModule: ConvTranspose2d(kernel_size, stride=scale_factor, padding=(kernel_size
    - scale_factor) / 2, with bias) -> BatchNorm -> ReLU; the map grows by `scale_factor`."""

    def __init__(self, in_channels: int, out_channels: int, *, kernel_size: int = 4,
                 scale_factor: int = 2, dtype=jnp.float32, rngs: nnx.Rngs):
        check_deconv(kernel_size, scale_factor)
        self.deconv_upsamping = nnx.List([
            ConvTranspose(in_channels, out_channels, kernel_size, stride=scale_factor,
                          padding=(kernel_size - scale_factor) // 2, dtype=dtype,
                          param_dtype=param_dtype_for(dtype), rngs=rngs),
            BatchNorm(out_channels, param_dtype=param_dtype_for(dtype))])

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.deconv_upsamping:
            x = layer(x)
        return jax.nn.relu(x)


def check_deconv(kernel_size: int, scale_factor: int = 2) -> None:
    """Refuse, as mmseg's DeconvModule asserts, a kernel smaller than the scale or of another
    parity (the output would not be scale_factor times the input)."""
    if kernel_size < scale_factor or (kernel_size - scale_factor) % 2:
        raise ConfigError(f"DeconvModule: kernel_size must be >= scale_factor ({scale_factor}) "
                          f"and differ from it by an even number, found {kernel_size}")


class UpConvBlock(nnx.Module):
    """Upsample the deeper map, concatenate [skip, upsampled], then a BasicConvBlock."""

    def __init__(self, in_channels: int, skip_channels: int, out_channels: int, num_convs: int,
                 dilation: int, upsample: bool, *, upsample_type: str = "bilinear",
                 conv_first: bool = False, deconv_kernel_size: int = 4, with_cp: bool = False,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        self.conv_block = BasicConvBlock(2 * skip_channels, out_channels, num_convs, 1, dilation,
                                         with_cp=with_cp, dtype=dtype, rngs=rngs)
        if upsample and upsample_type == "deconv":
            self.upsample = DeconvModule(in_channels, skip_channels,
                                         kernel_size=deconv_kernel_size, dtype=dtype, rngs=rngs)
        elif upsample:
            self.upsample = InterpConv(in_channels, skip_channels, mode=upsample_type,
                                       conv_first=conv_first, dtype=dtype, rngs=rngs)
        else:
            self.upsample = ConvModule(in_channels, skip_channels, 1, dtype=dtype, rngs=rngs)

    def __call__(self, skip: jax.Array, x: jax.Array) -> jax.Array:
        x = self.upsample(x)
        return self.conv_block(jnp.concatenate([skip, x], axis=-1))


class UNet(nnx.Module):
    """UNet encoder-decoder; returns the decoder maps from deepest to shallowest
    (mmseg/models/backbones/unet.py, UNet.forward)."""

    def __init__(self, *, in_channels: int = 3, base_channels: int = 64, num_stages: int = 5,
                 strides: Sequence[int] = (1, 1, 1, 1, 1),
                 enc_num_convs: Sequence[int] = (2, 2, 2, 2, 2),
                 dec_num_convs: Sequence[int] = (2, 2, 2, 2),
                 downsamples: Sequence[bool] = (True, True, True, True),
                 enc_dilations: Sequence[int] = (1, 1, 1, 1, 1),
                 dec_dilations: Sequence[int] = (1, 1, 1, 1), with_cp: bool = False,
                 norm_eval: bool = False, upsample: str = "bilinear",
                 upsample_conv_first: bool = False, deconv_kernel_size: int = 4,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        for name, value, want in (("strides", strides, num_stages),
                                  ("enc_num_convs", enc_num_convs, num_stages),
                                  ("enc_dilations", enc_dilations, num_stages),
                                  ("dec_num_convs", dec_num_convs, num_stages - 1),
                                  ("downsamples", downsamples, num_stages - 1),
                                  ("dec_dilations", dec_dilations, num_stages - 1)):
            if len(value) != want:
                raise ConfigError(f"UNet: {name} must have {want} entries (num_stages="
                                 f"{num_stages}), found {len(value)}: {tuple(value)}")
        if upsample not in UPSAMPLES:
            raise ConfigError(f"UNet: upsample must be one of {UPSAMPLES}, found {upsample!r}")
        if upsample == "deconv":
            if upsample_conv_first:
                raise ConfigError("UNet: upsample_conv_first is an InterpConv option (upsample "
                                  "'bilinear' or 'nearest'); DeconvModule has no conv_first")
            check_deconv(deconv_kernel_size)
        self.strides = tuple(strides)
        self.downsamples = tuple(downsamples)
        encoder, decoder = [], []
        channels_in = in_channels
        for i in range(num_stages):
            width = base_channels * 2 ** i
            stage = []
            if i != 0:
                if strides[i] == 1 and downsamples[i - 1]:
                    stage.append(MaxPool())
                grows = strides[i] != 1 or downsamples[i - 1]
                decoder.append(UpConvBlock(width, width // 2, width // 2, dec_num_convs[i - 1],
                                           dec_dilations[i - 1], grows, upsample_type=upsample,
                                           conv_first=upsample_conv_first,
                                           deconv_kernel_size=deconv_kernel_size,
                                           with_cp=with_cp, dtype=dtype, rngs=rngs))
            stage.append(BasicConvBlock(channels_in, width, enc_num_convs[i], strides[i],
                                        enc_dilations[i], with_cp=with_cp, dtype=dtype,
                                        rngs=rngs))
            encoder.append(nnx.List(stage))
            channels_in = width
        self.encoder = nnx.List(encoder)
        self.decoder = nnx.List(decoder)
        if norm_eval:  # mmseg norm_eval: backbone BatchNorms keep their running statistics
            for _, module in nnx.iter_graph(self):
                if isinstance(module, BatchNorm):
                    module.frozen = True

    @property
    def downsample_rate(self) -> int:
        """Total downsampling of the encoder (16 for S5-D16); inputs must be multiples of it."""
        rate = 1
        for i in range(1, len(self.strides)):
            if self.strides[i] == 2 or self.downsamples[i - 1]:
                rate *= 2
        return rate

    def check_input_divisible(self, x: jax.Array) -> None:
        """Raise, as mmseg asserts, when H or W is not a multiple of the downsample rate."""
        h, w = x.shape[1], x.shape[2]
        rate = self.downsample_rate
        if h % rate or w % rate:
            raise ValueError(
                f"UNet input size (h={h}, w={w}) is not divisible by the whole downsample rate "
                f"{rate}: both sides must be multiples of {rate}. Pad or crop the image to a "
                f"multiple of {rate}, or use slide inference with a crop that is one "
                f"(unet_jax.predict pads and crops back for you).")

    def __call__(self, x: jax.Array) -> list[jax.Array]:
        self.check_input_divisible(x)
        enc_outs = []
        for stage in self.encoder:
            for layer in stage:
                x = layer(x)
            enc_outs.append(x)
        dec_outs = [x]
        for i in reversed(range(len(self.decoder))):
            x = self.decoder[i](enc_outs[i], x)
            dec_outs.append(x)
        return dec_outs
