"""Decode heads used by the UNet zoo: FCNHead, PSPHead and ASPPHead (mmseg decode_heads).

Each head picks one backbone map (`in_index`), computes features and ends in mmseg's cls_seg
(Dropout2d then a 1x1 conv with bias). Logits are float32 NHWC at the input map's resolution.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from unet_jax.errors import ConfigError
from unet_jax.models.layers import AdaptiveAvgPool, ConvModule, DecodeHead, resize_bilinear


def _positive_ints(head: str, name: str, values: object) -> tuple[int, ...]:
    """`values` as a non-empty tuple of positive ints, or a one-line `ConfigError` (mmseg asserts
    a list or tuple here; an int would fail later with "'int' object is not iterable")."""
    if (not isinstance(values, (list, tuple)) or not values
            or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values)):
        raise ConfigError(f"{head}: {name} must be a non-empty list or tuple of positive ints, "
                          f"got {values!r}")
    return tuple(values)


class FCNHead(DecodeHead):
    """`num_convs` kxk ConvModules (+ optional conv_cat over [x, convs(x)]), then cls_seg."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, *, in_index: int,
                 num_convs: int = 2, kernel_size: int = 3, concat_input: bool = True,
                 dilation: int = 1, dropout_ratio: float = 0.1, dtype=jnp.float32,
                 rngs: nnx.Rngs):
        if not isinstance(num_convs, int) or num_convs < 0:
            raise ConfigError(f"FCNHead: num_convs must be an int >= 0, got {num_convs!r}")
        if not isinstance(dilation, int) or dilation <= 0:
            raise ConfigError(f"FCNHead: dilation must be an int > 0, got {dilation!r}")
        if num_convs == 0 and in_channels != channels:
            raise ConfigError(f"FCNHead: num_convs=0 passes the input through, so in_channels "
                              f"({in_channels}) must equal channels ({channels})")
        self.in_index = in_index
        pad = (kernel_size // 2) * dilation
        self.convs = nnx.List([
            ConvModule(in_channels if k == 0 else channels, channels, kernel_size,
                       padding=pad, dilation=dilation, dtype=dtype, rngs=rngs)
            for k in range(num_convs)])
        self.conv_cat = (ConvModule(in_channels + channels, channels, kernel_size,
                                    padding=kernel_size // 2, dtype=dtype, rngs=rngs)
                         if concat_input else None)
        self.init_cls_seg(channels, num_classes, dropout_ratio, dtype=dtype, rngs=rngs)

    def __call__(self, feats: Sequence[jax.Array], dropout_key: jax.Array | None = None
                 ) -> jax.Array:
        x = feats[self.in_index]
        out = x
        for conv in self.convs:
            out = conv(out)
        if self.conv_cat is not None:
            out = self.conv_cat(jnp.concatenate([x, out], axis=-1))
        return self.cls_seg(out, dropout_key)


class PSPHead(DecodeHead):
    """Pyramid pooling: adaptive-average-pool branches resized back and fused with the input."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, *, in_index: int,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout_ratio: float = 0.1,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        pool_scales = _positive_ints("PSPHead", "pool_scales", pool_scales)
        self.in_index = in_index
        self.psp_modules = nnx.List([
            nnx.List([AdaptiveAvgPool(s),
                      ConvModule(in_channels, channels, 1, dtype=dtype, rngs=rngs)])
            for s in pool_scales])
        self.bottleneck = ConvModule(in_channels + len(pool_scales) * channels, channels, 3,
                                     padding=1, dtype=dtype, rngs=rngs)
        self.init_cls_seg(channels, num_classes, dropout_ratio, dtype=dtype, rngs=rngs)

    def __call__(self, feats: Sequence[jax.Array], dropout_key: jax.Array | None = None
                 ) -> jax.Array:
        x = feats[self.in_index]
        outs = [x]
        for pool, conv in self.psp_modules:
            outs.append(resize_bilinear(conv(pool(x)), x.shape[1:3]))
        return self.cls_seg(self.bottleneck(jnp.concatenate(outs, axis=-1)), dropout_key)


class ASPPHead(DecodeHead):
    """DeepLabV3's ASPP: image pooling + parallel dilated convs, fused by a 3x3 bottleneck."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, *, in_index: int,
                 dilations: Sequence[int] = (1, 6, 12, 18), dropout_ratio: float = 0.1,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        dilations = _positive_ints("ASPPHead", "dilations", dilations)
        self.in_index = in_index
        self.image_pool = nnx.List([
            AdaptiveAvgPool(1), ConvModule(in_channels, channels, 1, dtype=dtype, rngs=rngs)])
        self.aspp_modules = nnx.List([
            ConvModule(in_channels, channels, 1 if d == 1 else 3, dilation=d,
                       padding=0 if d == 1 else d, dtype=dtype, rngs=rngs)
            for d in dilations])
        self.bottleneck = ConvModule((len(dilations) + 1) * channels, channels, 3, padding=1,
                                     dtype=dtype, rngs=rngs)
        self.init_cls_seg(channels, num_classes, dropout_ratio, dtype=dtype, rngs=rngs)

    def __call__(self, feats: Sequence[jax.Array], dropout_key: jax.Array | None = None
                 ) -> jax.Array:
        x = feats[self.in_index]
        pooled = x
        for layer in self.image_pool:
            pooled = layer(pooled)
        outs = [resize_bilinear(pooled, x.shape[1:3])]
        outs += [m(x) for m in self.aspp_modules]
        return self.cls_seg(self.bottleneck(jnp.concatenate(outs, axis=-1)), dropout_key)
