"""Building blocks shared by the backbone and the heads, with mmcv's semantics.

ConvModule is conv (no bias) -> BatchNorm -> ReLU, initialised as mmcv does (Kaiming normal,
fan_out). BatchNorm follows torch: the running variance is updated with the unbiased batch
variance while normalisation uses the biased one; momentum 0.1 in torch terms.
Everything is NHWC. Attribute names mirror mmseg's state_dict so the converter is mechanical.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

KAIMING_FAN_OUT = jax.nn.initializers.variance_scaling(2.0, "fan_out", "normal")


class BatchNorm(nnx.Module):
    """torch.nn.BatchNorm2d over the last axis (eps 1e-5, momentum 0.1, unbiased running var).

    Statistics are reduced over every axis but the last; under `jax.jit` with a batch sharded
    over devices the reduction is global, which is SyncBN's behaviour.
    """

    def __init__(self, num_features: int, *, eps: float = 1e-5, momentum: float = 0.1,
                 use_running_average: bool = False):
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.use_running_average = use_running_average
        self.scale = nnx.Param(jnp.ones((num_features,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))
        self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        xf = x.astype(jnp.float32)
        if self.use_running_average:
            mean, var = self.mean[...], self.var[...]
        else:
            axes = tuple(range(x.ndim - 1))
            mean = jnp.mean(xf, axis=axes)
            var = jnp.mean(jnp.square(xf - mean), axis=axes)
            n = x.size // x.shape[-1]
            unbiased = var * (n / max(n - 1, 1))
            m = self.momentum
            self.mean[...] = (1.0 - m) * self.mean[...] + m * jax.lax.stop_gradient(mean)
            self.var[...] = (1.0 - m) * self.var[...] + m * jax.lax.stop_gradient(unbiased)
        y = (xf - mean) * jax.lax.rsqrt(var + self.eps) * self.scale[...] + self.bias[...]
        return y.astype(dtype)


class ConvModule(nnx.Module):
    """mmcv ConvModule with BatchNorm and ReLU: conv (bias only without norm) -> bn -> relu."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, *,
                 stride: int = 1, padding: int = 0, dilation: int = 1, dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.conv = nnx.Conv(
            in_channels, out_channels, (kernel_size, kernel_size), strides=stride,
            padding=((padding, padding), (padding, padding)),
            kernel_dilation=dilation, use_bias=False, kernel_init=KAIMING_FAN_OUT,
            dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
        self.bn = BatchNorm(out_channels)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(self.bn(self.conv(x)))


class MaxPool(nnx.Module):
    """nn.MaxPool2d(kernel_size=2): stride 2, no padding, floor mode. Holds no parameters."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1),
                                     "VALID")


class Upsample(nnx.Module):
    """Bilinear x2 upsampling with align_corners=False (mmseg's `Upsample` wrapper)."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return resize_bilinear(x, (x.shape[1] * 2, x.shape[2] * 2))


def resize_bilinear(x: jax.Array, size: Sequence[int]) -> jax.Array:
    """Resize NHWC `x` to `size` (h, w) like torch bilinear, align_corners=False, no antialias."""
    h, w = int(size[0]), int(size[1])
    if (x.shape[1], x.shape[2]) == (h, w):
        return x
    return jax.image.resize(x, (x.shape[0], h, w, x.shape[3]), "bilinear",
                            antialias=False).astype(x.dtype)


def adaptive_pool_matrix(length: int, bins: int) -> jax.Array:
    """(bins, length) averaging matrix of torch's AdaptiveAvgPool with its overlapping bins."""
    rows = []
    for i in range(bins):
        start = (i * length) // bins
        end = -((-(i + 1) * length) // bins)
        rows.append([1.0 / (end - start) if start <= j < end else 0.0 for j in range(length)])
    return jnp.asarray(rows, jnp.float32)


class AdaptiveAvgPool(nnx.Module):
    """nn.AdaptiveAvgPool2d(bins) on NHWC, bins computed exactly as torch (they may overlap)."""

    def __init__(self, bins: int):
        self.bins = bins

    def __call__(self, x: jax.Array) -> jax.Array:
        ph = adaptive_pool_matrix(x.shape[1], self.bins)
        pw = adaptive_pool_matrix(x.shape[2], self.bins)
        y = jnp.einsum("ih,nhwc,jw->nijc", ph, x.astype(jnp.float32), pw,
                       precision=jax.lax.Precision.HIGHEST)
        return y.astype(x.dtype)


class DecodeHead(nnx.Module):
    """mmseg BaseDecodeHead's `cls_seg`: channel-wise Dropout2d, then the 1x1 `conv_seg`.

    `conv_seg` has a bias and is initialised N(0, 0.01); logits come out in float32.
    """

    def init_cls_seg(self, channels: int, num_classes: int, dropout_ratio: float, *,
                     dtype=jnp.float32, rngs: nnx.Rngs) -> None:
        self.dropout = (nnx.Dropout(dropout_ratio, broadcast_dims=(1, 2), rngs=rngs)
                        if dropout_ratio > 0 else None)
        self.conv_seg = nnx.Conv(
            channels, num_classes, (1, 1), use_bias=True,
            kernel_init=jax.nn.initializers.normal(0.01), bias_init=jax.nn.initializers.zeros,
            dtype=dtype, param_dtype=jnp.float32, rngs=rngs)

    def cls_seg(self, x: jax.Array) -> jax.Array:
        if self.dropout is not None:
            x = self.dropout(x)
        return self.conv_seg(x).astype(jnp.float32)
