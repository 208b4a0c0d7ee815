"""The original U-Net (Ronneberger, Fischer and Brox 2015, arXiv 1505.04597, Fig. 1) in Flax NNX.

Contracting path: per level two 3x3 unpadded convolutions + ReLU, then a 2x2 max-pool, channels
64 -> 128 -> 256 -> 512 -> 1024. Expanding path: a 2x2 up-convolution (transposed, stride 2)
that halves the channels, followed by ReLU (the 2015 Caffe release's phseg_v5 prototxt, not said
in the paper: "release-derived"), the centre crop of the skip map concatenated in front, and two
3x3 unpadded convolutions + ReLU; a 1x1 convolution gives the class logits. 23 convolutions.
Every weight is drawn from a Gaussian with std sqrt(2 / fan_in) (paper §3), biases start at 0.
Dropout (rate `dropout_rate`, 0.5 in the release) acts at the end of contracting levels 4 and 5
(after conv_d3b-c and conv_d4b-c of the release), the paper's "end of the contracting path".

Sizes: no padding, so the output is smaller than the input (572 -> 388, 92 px of context on each
side) and every 2x2 pool must see an even size: valid inputs are 60 + 16 b for b >= 8 (188, 204,
..., 572, ..., 700), and the output side is 16 b - 124. `valid_input_sizes` names the nearest.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from unet_jax.models.layers import ConvTranspose, host_normal, max_pool_2x2

CHANNELS = (64, 128, 256, 512, 1024)
CONTEXT = 92  # input pixels each side of the output that an output pixel sees
# He et al.'s normal with fan_in = kh * kw * in_channels of an HWIO kernel (paper §3).
FAN_IN_NORMAL = host_normal(lambda s: float(np.sqrt(2.0 / np.prod(s[:-1]))))


def output_size(size: int) -> int:
    """The output side for a valid input side: 572 -> 388."""
    return 16 * ((size - 60) // 16) - 124


def valid_input_sizes(size: int) -> tuple[int, int]:
    """The valid input sides nearest to `size`: (largest <= size, smallest >= size), 188 at least."""
    below = max(188, 60 + 16 * ((size - 60) // 16))
    above = max(188, 60 + 16 * -(-(size - 60) // 16))
    return below, above


def check_input_size(height: int, width: int) -> None:
    """Raise a one-line ValueError unless both sides pool evenly at every level."""
    bad = [s for s in (height, width) if s < 188 or (s - 60) % 16]
    if bad:
        near = " or ".join(f"{lo} / {hi}" if lo != hi else f"{lo}"
                           for lo, hi in (valid_input_sizes(s) for s in (height, width)))
        raise ValueError(f"original U-Net input {height} x {width}: every side must be 60 + 16 b "
                         f"(b >= 8: 188, 204, ..., 572, ...) so that each 2x2 max-pool sees an "
                         f"even size; nearest valid sides: {near}")


def centre_crop(x: jax.Array, height: int, width: int) -> jax.Array:
    """The centre height x width window of (N, H, W, ...) maps: the paper's skip-connection
    crop, and the crop of full-tile labels and weights to an unpadded net's logits."""
    top, left = (x.shape[1] - height) // 2, (x.shape[2] - width) // 2
    return x[:, top:top + height, left:left + width]


class Conv(nnx.Module):
    """A stride-1 convolution with bias and no padding (NHWC, HWIO kernel)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        shape = (kernel_size, kernel_size, in_channels, out_channels)
        self.kernel = nnx.Param(FAN_IN_NORMAL(rngs.params(), shape, jnp.float32))
        self.bias = nnx.Param(jnp.zeros((out_channels,), jnp.float32))
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jax.lax.conv_general_dilated(x.astype(self.dtype), self.kernel[...].astype(self.dtype),
                                         (1, 1), "VALID",
                                         dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + self.bias[...].astype(self.dtype)


def up_conv(in_channels: int, out_channels: int, *, dtype=jnp.float32,
            rngs: nnx.Rngs) -> ConvTranspose:
    """The 2x2 up-convolution: torch's ConvTranspose2d(kernel 2, stride 2) with bias, He init
    (fan_in = in_channels: each output pixel sums one input pixel's channels), bias 0."""
    return ConvTranspose(in_channels, out_channels, 2, stride=2, dtype=dtype,
                         kernel_init=host_normal(lambda s: float(np.sqrt(2.0 / s[2]))),
                         bias_init=lambda key, shape, dtype: jnp.zeros(shape, dtype), rngs=rngs)


class DoubleConv(nnx.Module):
    """Two 3x3 unpadded convolutions, each followed by ReLU."""

    def __init__(self, in_channels: int, out_channels: int, *, dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.conv1 = Conv(in_channels, out_channels, 3, dtype=dtype, rngs=rngs)
        self.conv2 = Conv(out_channels, out_channels, 3, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(self.conv2(jax.nn.relu(self.conv1(x))))


class UNet2015(nnx.Module):
    """The 2015 U-Net: (N, H, W, in_channels) -> (N, H - 184, W - 184, num_classes) logits.

    31,030,658 parameters for 1 input channel and 2 classes (biases included).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 2, *,
                 dropout_rate: float = 0.5, base_channels: int = 64, dtype=jnp.float32,
                 rngs: nnx.Rngs):
        if not 0.0 <= dropout_rate < 1.0:
            raise ValueError(f"dropout_rate: expected 0 <= rate < 1, found {dropout_rate}")
        self.dropout_rate = float(dropout_rate)
        # the paper's widths for base_channels 64; narrower nets (tests, CPU smoke runs) scale
        chans = tuple(base_channels * c // CHANNELS[0] for c in CHANNELS)
        ins = (in_channels,) + chans[:-1]
        self.down = nnx.List([DoubleConv(i, o, dtype=dtype, rngs=rngs)
                              for i, o in zip(ins, chans)])
        self.up = nnx.List([up_conv(chans[k + 1], chans[k], dtype=dtype, rngs=rngs)
                            for k in reversed(range(4))])
        self.dec = nnx.List([DoubleConv(2 * chans[k], chans[k], dtype=dtype, rngs=rngs)
                             for k in reversed(range(4))])
        self.cls = Conv(chans[0], num_classes, 1, dtype=dtype, rngs=rngs)

    def _dropout(self, x: jax.Array, key: jax.Array | None) -> jax.Array:
        if key is None or self.dropout_rate == 0.0:
            return x
        keep = jax.random.bernoulli(key, 1.0 - self.dropout_rate, x.shape)
        return jnp.where(keep, x / (1.0 - self.dropout_rate), jnp.zeros_like(x))

    def __call__(self, x: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
        """Logits (float32) of a batch; `dropout_key` None means evaluation (no dropout)."""
        check_input_size(int(x.shape[1]), int(x.shape[2]))
        keys = (None, None) if dropout_key is None else tuple(jax.random.split(dropout_key))
        skips = []
        for level, block in enumerate(self.down):
            x = block(x)
            if level >= 3:  # ends of contracting levels 4 and 5 (release: d3b-c, d4b-c)
                x = self._dropout(x, keys[level - 3])
            if level < 4:
                skips.append(x)
                x = max_pool_2x2(x)
        for up, dec, skip in zip(self.up, self.dec, reversed(skips)):
            x = jax.nn.relu(up(x))
            x = dec(jnp.concatenate([centre_crop(skip, x.shape[1], x.shape[2]), x], axis=-1))
        return self.cls(x).astype(jnp.float32)
