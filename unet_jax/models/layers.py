"""Building blocks shared by the backbone and the heads, with mmcv's semantics.

ConvModule is conv (no bias) -> BatchNorm -> ReLU, initialised as mmcv does (Kaiming normal,
fan_out). BatchNorm follows torch: the running variance is updated with the unbiased batch
variance while normalisation uses the biased one; momentum 0.1 in torch terms.
Everything is NHWC. Attribute names mirror mmseg's state_dict so the converter is mechanical.

Dtypes: `dtype` is the compute dtype (float32, bfloat16 or float64). Parameters and BatchNorm
statistics are float32, except in a float64 model where everything is float64
(`param_dtype_for`, `float_dtype_for`).
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def float_dtype_for(dtype) -> jnp.dtype:
    """The accumulation dtype of a compute dtype: float32, or float64 for float64."""
    return jnp.promote_types(dtype, jnp.float32)


def param_dtype_for(dtype) -> jnp.dtype:
    """The parameter dtype of a compute dtype: float32 master weights, float64 for float64."""
    return float_dtype_for(dtype)


def host_normal(std_of_shape):
    """Normal initialiser: numpy draws on the host, seeded by the JAX key, on every path.

    The draws run in a `jax.pure_callback`, so building a model eagerly, under `jax.jit` (e.g.
    `jax.jit(init, out_shardings=...)` for a sharded start) or under `nnx.eval_shape` (no draw at
    all) gives bit-identical weights for a seed: there is one random path. numpy is also fast
    where JAX's eager random ops would compile once per kernel shape.
    """

    def init(key: jax.Array, shape: Sequence[int], dtype=jnp.float32) -> jax.Array:
        shape = tuple(int(d) for d in shape)
        std = std_of_shape(shape)
        out_dtype = np.dtype(dtype)

        def draw(key_data: np.ndarray) -> np.ndarray:
            seed = np.asarray(key_data).astype(np.uint32).ravel().tolist()
            sample = np.random.default_rng(seed).standard_normal(shape, np.float32) * std
            return sample.astype(out_dtype)

        return jax.pure_callback(draw, jax.ShapeDtypeStruct(shape, out_dtype),
                                 jax.random.key_data(key))

    return init


# mmengine KaimingInit defaults: mode fan_out, normal, gain sqrt(2): std = sqrt(2 / (kh*kw*O)).
KAIMING_FAN_OUT = host_normal(lambda s: float(np.sqrt(2.0 / (np.prod(s[:-2]) * s[-1]))))
SEG_NORMAL = host_normal(lambda s: 0.01)


# ------------------------------------------------------------------------------ convolutions
def _im2col(x: jax.Array, k: int, padding: int, dilation: int) -> jax.Array:
    """(N*H*W, k*k*C): the k x k (dilated) neighbourhoods of every output pixel, tap-major."""
    n, h, w, c = x.shape
    out_h = h + 2 * padding - dilation * (k - 1)
    out_w = w + 2 * padding - dilation * (k - 1)
    xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    taps = [xp[:, i * dilation:i * dilation + out_h, j * dilation:j * dilation + out_w]
            for i in range(k) for j in range(k)]
    return jnp.concatenate(taps, axis=-1).reshape(n * out_h * out_w, k * k * c)


def _col2im(cols: jax.Array, shape: tuple[int, int, int, int], k: int, padding: int,
            dilation: int) -> jax.Array:
    """The adjoint of `_im2col`: every tap's slice added back where it was read."""
    n, h, w, c = shape
    out_h = h + 2 * padding - dilation * (k - 1)
    out_w = w + 2 * padding - dilation * (k - 1)
    cols = cols.reshape(n, out_h, out_w, k * k, c)
    hp, wp = h + 2 * padding, w + 2 * padding
    total = None
    for t in range(k * k):
        i, j = divmod(t, k)
        y0, x0 = i * dilation, j * dilation
        part = jnp.pad(cols[:, :, :, t], ((0, 0), (y0, hp - y0 - out_h), (x0, wp - x0 - out_w),
                                          (0, 0)))
        total = part if total is None else total + part
    return total[:, padding:padding + h, padding:padding + w]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv2d_gemm(x: jax.Array, kernel: jax.Array, padding: int, dilation: int) -> jax.Array:
    """A stride-1 conv (NHWC x HWIO) as one matrix product of im2col columns and the kernel.

    Same maths as `lax.conv_general_dilated`; its backward is two more matrix products (and the
    adjoint of im2col), where XLA:CPU's own conv backward first materialises a flipped,
    transposed copy of the kernel: for the deep layers (512-1024 channels on 4x4..16x16 maps)
    that copy and the small-spatial conv kernels cost 3-5x the matrix products
    (experiments/studies/conv_formulations.py).
    """
    return _conv2d_gemm_fwd(x, kernel, padding, dilation)[0]


def _conv2d_gemm_fwd(x, kernel, padding, dilation):
    k, _, c, o = kernel.shape
    n, h, w, _ = x.shape
    cols = _im2col(x, k, padding, dilation)
    out_h = h + 2 * padding - dilation * (k - 1)
    out_w = w + 2 * padding - dilation * (k - 1)
    y = jax.lax.dot_general(cols, kernel.reshape(k * k * c, o), (((1,), (0,)), ((), ())),
                            preferred_element_type=float_dtype_for(x.dtype))
    return y.astype(x.dtype).reshape(n, out_h, out_w, o), (cols, kernel, x.shape)


def _conv2d_gemm_bwd(padding, dilation, res, dy):
    cols, kernel, shape = res
    k, _, c, o = kernel.shape
    dy2 = dy.reshape(-1, o)
    dkernel = jax.lax.dot_general(cols, dy2, (((0,), (0,)), ((), ())),
                                  preferred_element_type=float_dtype_for(cols.dtype))
    dcols = jax.lax.dot_general(dy2, kernel.reshape(k * k * c, o), (((1,), (1,)), ((), ())))
    dx = _col2im(dcols, shape, k, padding, dilation)
    return dx.astype(dy.dtype), dkernel.reshape(kernel.shape).astype(kernel.dtype)


conv2d_gemm.defvjp(_conv2d_gemm_fwd, _conv2d_gemm_bwd)

def _lax_conv(x: jax.Array, kernel: jax.Array, padding: int, dilation: int) -> jax.Array:
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), [(padding, padding)] * 2,
                                        rhs_dilation=(dilation, dilation),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv2d_wgrad_gemm(x: jax.Array, kernel: jax.Array, padding: int, dilation: int) -> jax.Array:
    """A stride-1 conv as XLA's conv, whose weight gradient is one matrix product per tap.

    Forward and input gradient are XLA's own; for the weight gradient XLA:CPU runs a conv over
    transposed copies of x and dy whose innermost dimension is the batch size (4 at DRIVE), plus
    layout copies; `sum_pixels x_tap^T dy` per kernel tap is the same maths as well-shaped GEMMs
    (`experiments/step_profile.py` measures both; ../shared/docs/research/cpu_conv_speed.md).
    """
    return _lax_conv(x, kernel, padding, dilation)


def _wgrad_gemm_fwd(x, kernel, padding, dilation):
    return _lax_conv(x, kernel, padding, dilation), (x, kernel)


def _wgrad_gemm_bwd(padding, dilation, res, dy):
    x, kernel = res
    k, _, c, o = kernel.shape
    dx = jax.linear_transpose(lambda a: _lax_conv(a, kernel, padding, dilation), x)(dy)[0]
    xp = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
    out_h, out_w = dy.shape[1], dy.shape[2]
    dy2 = dy.reshape(-1, o)
    acc = float_dtype_for(x.dtype)
    taps = [jax.lax.dot_general(
        xp[:, i * dilation:i * dilation + out_h, j * dilation:j * dilation + out_w].reshape(-1, c),
        dy2, (((0,), (0,)), ((), ())), preferred_element_type=acc)
        for i in range(k) for j in range(k)]
    return dx, jnp.stack(taps).reshape(kernel.shape).astype(kernel.dtype)


conv2d_wgrad_gemm.defvjp(_wgrad_gemm_fwd, _wgrad_gemm_bwd)

# Output maps of at most this many pixels per image run as `conv2d_gemm`, larger ones as XLA's
# conv (measured per UNet shape at crops 64 and 128 in experiments/studies/conv_formulations.py: the
# matrix form wins from 8 x 8 down, where the channels are 512-1024, and loses from 16 x 16 up).
GEMM_MAX_PIXELS = 64
# Larger stride-1 maps take their weight gradient as per-tap matrix products
# (`conv2d_wgrad_gemm`); measured in experiments/step_profile.py and results/step_profile.md.
WGRAD_AS_GEMM = False


def _small(height, width) -> bool:
    """Whether an output map is small enough for `conv2d_gemm` (False for symbolic sizes, as
    in a shape-polymorphic export)."""
    if not all(isinstance(v, int) for v in (height, width)):
        return False
    return height * width <= GEMM_MAX_PIXELS


class Conv(nnx.Module):
    """torch.nn.Conv2d without bias on NHWC (HWIO `kernel`, as nnx.Conv), formulated per shape.

    Stride-1 convs on small maps (<= GEMM_MAX_PIXELS output pixels per image) run as one matrix
    product (`conv2d_gemm`), the others as `lax.conv_general_dilated`; same maths, different
    summation order. The kernel is drawn exactly as nnx.Conv draws it (one `rngs.params()`).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *,
                 stride: int = 1, padding: int = 0, dilation: int = 1, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        shape = (kernel_size, kernel_size, in_channels, out_channels)
        self.kernel = nnx.Param(KAIMING_FAN_OUT(rngs.params(), shape, param_dtype))
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.astype(self.dtype)
        kernel = self.kernel[...].astype(self.dtype)
        k, p, d, s = kernel.shape[0], self.padding, self.dilation, self.stride
        if s == 1 and _small(x.shape[1] + 2 * p - d * (k - 1), x.shape[2] + 2 * p - d * (k - 1)):
            return conv2d_gemm(x, kernel, p, d)
        if s == 1 and WGRAD_AS_GEMM:
            return conv2d_wgrad_gemm(x, kernel, p, d)
        return jax.lax.conv_general_dilated(x, kernel, (s, s), [(p, p), (p, p)],
                                            rhs_dilation=(d, d),
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))


class BatchNorm(nnx.Module):
    """torch.nn.BatchNorm2d over the last axis (eps 1e-5, momentum 0.1, unbiased running var).

    Statistics are reduced over every axis but the last; under `jax.jit` with a batch sharded
    over devices the reduction is global, which is SyncBN's behaviour.
    """

    def __init__(self, num_features: int, *, eps: float = 1e-5, momentum: float = 0.1,
                 use_running_average: bool = False, frozen: bool = False,
                 param_dtype=jnp.float32):
        self.num_features = num_features
        self.frozen = frozen  # mmseg norm_eval: running statistics even in training
        self.eps = eps
        self.momentum = momentum
        self.use_running_average = use_running_average
        pdt = np.dtype(param_dtype)
        ones, zeros = np.ones((num_features,), pdt), np.zeros((num_features,), pdt)
        self.scale = nnx.Param(jnp.asarray(ones))
        self.bias = nnx.Param(jnp.asarray(zeros))
        self.mean = nnx.BatchStat(jnp.asarray(zeros))
        self.var = nnx.BatchStat(jnp.asarray(ones))

    def set_view(self, use_running_average: bool | None = None) -> None:
        """`nnx.view(model, use_running_average=True)`: an eval view sharing the arrays."""
        if use_running_average is not None:
            self.use_running_average = use_running_average

    def __call__(self, x: jax.Array) -> jax.Array:
        dtype = x.dtype
        xf = x.astype(jnp.promote_types(float_dtype_for(dtype), self.scale[...].dtype))
        if self.use_running_average or self.frozen:
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
        self.conv = Conv(in_channels, out_channels, kernel_size, stride=stride,
                         padding=padding, dilation=dilation, dtype=dtype,
                         param_dtype=param_dtype_for(dtype), rngs=rngs)
        self.bn = BatchNorm(out_channels, param_dtype=param_dtype_for(dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        return jax.nn.relu(self.bn(self.conv(x)))


@jax.custom_vjp
def max_pool_2x2(x: jax.Array) -> jax.Array:
    """nn.MaxPool2d(2) on NHWC (floor mode); the gradient goes to the first maximum of each
    window in raster order, as torch's. XLA's reduce_window gradient tracks argmax indices
    in four int32 arrays the size of the input; this costs four compares instead."""
    return _max_pool_fwd(x)[0]


def _windows(x: jax.Array) -> jax.Array:
    n, h, w, c = x.shape
    return x[:, :h // 2 * 2, :w // 2 * 2].reshape(n, h // 2, 2, w // 2, 2, c)


def _max_pool_fwd(x):
    y = jnp.max(_windows(x), axis=(2, 4))
    return y, (x, y)


def _max_pool_bwd(res, dy):
    x, y = res
    win = _windows(x)
    taken = jnp.zeros(y.shape, bool)
    parts = []
    for i, j in ((0, 0), (0, 1), (1, 0), (1, 1)):
        hit = (win[:, :, i, :, j] == y) & ~taken if (i, j) != (1, 1) else ~taken
        taken = taken | hit
        parts.append(jnp.where(hit, dy, jnp.zeros_like(dy)))
    n, hh, ww, c = y.shape
    grad = jnp.stack(parts, axis=3).reshape(n, hh, ww, 2, 2, c)
    grad = grad.transpose(0, 1, 3, 2, 4, 5).reshape(n, 2 * hh, 2 * ww, c)
    pad = ((0, 0), (0, x.shape[1] - 2 * hh), (0, x.shape[2] - 2 * ww), (0, 0))
    return (jnp.pad(grad, pad),)


max_pool_2x2.defvjp(_max_pool_fwd, _max_pool_bwd)


class MaxPool(nnx.Module):
    """nn.MaxPool2d(kernel_size=2): stride 2, no padding, floor mode. Holds no parameters."""

    def __call__(self, x: jax.Array) -> jax.Array:
        return max_pool_2x2(x)


class Upsample(nnx.Module):
    """x2 upsampling as mmseg's `Upsample` wrapper: bilinear with align_corners=False, or
    nearest (torch's: output pixel d reads input pixel floor(d / 2), i.e. each one repeated)."""

    def __init__(self, mode: str = "bilinear"):
        self.mode = mode

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.mode == "nearest":
            return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return resize_bilinear(x, (x.shape[1] * 2, x.shape[2] * 2))


class ConvTranspose(nnx.Module):
    """torch.nn.ConvTranspose2d (with bias) on NHWC: output size (H - 1) stride - 2 padding + k.

    `kernel` is (k, k, in, out), torch's (in, out, k, k) weight with its axes moved, not flipped:
    input pixel y adds `x[y] * kernel[i]` to output pixel y * stride - padding + i. It runs as
    the equivalent stride-1 conv of the flipped kernel over the input dilated by `stride`, or,
    when kernel = stride and no padding (the output blocks do not overlap: the 2015 U-Net's 2x2
    up-convolution, mmseg's DeconvModule with kernel 2), as one matrix product per input pixel,
    y[s i + a, s j + b] = x[i, j] @ kernel[a, b]: no dilated input, no conv over its zeros.
    By default initialised with the variance of torch's default (uniform, bound
    1 / sqrt(out k k)), which mmseg keeps for it (its UNet's Kaiming init names Conv2d only);
    `kernel_init` / `bias_init` (key, shape, dtype) -> array replace it (e.g. the 2015 U-Net's
    He init of its 2x2 up-convolution, which is this layer with kernel 2, stride 2).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, *, stride: int,
                 padding: int = 0, dtype=jnp.float32, param_dtype=jnp.float32,
                 kernel_init=None, bias_init=None, rngs: nnx.Rngs):
        std = float(1.0 / np.sqrt(3.0 * out_channels * kernel_size * kernel_size))
        torch_like = host_normal(lambda s: std)
        shape = (kernel_size, kernel_size, in_channels, out_channels)
        self.kernel = nnx.Param((kernel_init or torch_like)(rngs.params(), shape, param_dtype))
        self.bias = nnx.Param((bias_init or torch_like)(rngs.params(), (out_channels,),
                                                        param_dtype))
        self.stride, self.padding = stride, padding
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...].astype(self.dtype)
        k = kernel.shape[0]
        if k == self.stride and self.padding == 0:
            n, h, w, _ = x.shape
            y = jnp.einsum("nhwc,abco->nhawbo", x.astype(self.dtype), kernel)
            return y.reshape(n, h * k, w * k, kernel.shape[-1]) + self.bias[...].astype(self.dtype)
        kernel = kernel[::-1, ::-1]
        edge = kernel.shape[0] - 1 - self.padding
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype), kernel, (1, 1), [(edge, edge), (edge, edge)],
            lhs_dilation=(self.stride, self.stride),
            dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return y + self.bias[...].astype(self.dtype)


def _bilinear_matrix(n_in: int, n_out: int, dtype: jnp.dtype) -> jax.Array:
    """(n_out, n_in) weights of torch's bilinear (align_corners=False) along one axis.

    The source coordinate src = (d + 0.5) n_in / n_out - 0.5 (clamped at 0) is kept as the
    exact fraction num / (2 n_out) in int32, so the taps floor(src), floor(src) + 1 (clipped to
    the last index) and the weight lam = src - floor(src) are exact but for lam's one rounding,
    whatever the sizes, and the same whether they are concrete or symbolic (a shape-polymorphic
    export, `unet_jax.export`). int32 holds 2 n_in n_out for n_in n_out < 2^30 (e.g. 584
    logits rows to 1.8 M image rows).
    """
    d = jnp.arange(n_out, dtype=jnp.int32)
    den = 2 * n_out
    num = jnp.maximum((2 * d + 1) * n_in - n_out, 0)
    i0 = num // den
    lam = ((num - i0 * den).astype(dtype) / jnp.asarray(den, dtype))[:, None]
    i1 = jnp.minimum(i0 + 1, n_in - 1)
    src = jnp.arange(n_in, dtype=jnp.int32)[None, :]
    return (jnp.where(src == i0[:, None], 1 - lam, 0) + jnp.where(src == i1[:, None], lam, 0))


def resize_bilinear(x: jax.Array, size: Sequence[int]) -> jax.Array:
    """Resize NHWC `x` to `size` (h, w) like torch's `F.interpolate(mode="bilinear",
    align_corners=False)`, up or down, no antialiasing: the one such resize of the package
    (the model's upsampling and pyramid pools, the loss, the test pipeline's logits).

    Rows then columns, each a product with the two-tap weight matrix of `_bilinear_matrix`
    at full precision (in float32, or float64 for float64 `x`; the result in `x`'s dtype), so
    it equals torch to float32 rounding for any scale. `size` may hold symbolic dimensions.
    """
    h, w = size[0], size[1]
    if (x.shape[1], x.shape[2]) == (h, w):
        return x
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    hi = jax.lax.Precision.HIGHEST
    y = jnp.einsum("oh,nhwc->nowc", _bilinear_matrix(x.shape[1], h, dtype), x.astype(dtype),
                   precision=hi)
    y = jnp.einsum("pw,nowc->nopc", _bilinear_matrix(x.shape[2], w, dtype), y, precision=hi)
    return y.astype(x.dtype)


def adaptive_pool_matrix(length: int, bins: int, dtype=jnp.float32) -> jax.Array:
    """(bins, length) averaging matrix of torch's AdaptiveAvgPool with its overlapping bins.

    Bin i covers [floor(i L / bins), ceil((i + 1) L / bins)) with weight 1 / its width. Built from
    an iota rather than a Python list so that `length` may be a symbolic dimension (a
    shape-polymorphic export, `unet_jax.export`); 1 / width is rounded once to `dtype`.
    """
    j = jnp.arange(length)
    rows = []
    for i in range(bins):
        start = (i * length) // bins
        end = -((-(i + 1) * length) // bins)
        weight = jnp.asarray(1, dtype) / jnp.asarray(end - start, dtype)
        rows.append(jnp.where((j >= start) & (j < end), weight, jnp.asarray(0, dtype)))
    return jnp.stack(rows)


class AdaptiveAvgPool(nnx.Module):
    """nn.AdaptiveAvgPool2d(bins) on NHWC, bins computed exactly as torch (they may overlap)."""

    def __init__(self, bins: int):
        self.bins = bins

    def __call__(self, x: jax.Array) -> jax.Array:
        acc = float_dtype_for(x.dtype)
        ph = adaptive_pool_matrix(x.shape[1], self.bins, acc)
        pw = adaptive_pool_matrix(x.shape[2], self.bins, acc)
        y = jnp.einsum("ih,nhwc,jw->nijc", ph, x.astype(acc), pw,
                       precision=jax.lax.Precision.HIGHEST)
        return y.astype(x.dtype)


class DecodeHead(nnx.Module):
    """mmseg BaseDecodeHead's `cls_seg`: channel-wise Dropout2d, then the 1x1 `conv_seg`.

    `conv_seg` has a bias and is initialised N(0, 0.01); logits come out in float32 (float64
    in a float64 model). Dropout draws its mask from the key of the call (training), so the
    model holds no random state.
    """

    def init_cls_seg(self, channels: int, num_classes: int, dropout_ratio: float, *,
                     dtype=jnp.float32, rngs: nnx.Rngs) -> None:
        self.dropout = (nnx.Dropout(dropout_ratio, broadcast_dims=(1, 2))
                        if dropout_ratio > 0 else None)
        self.conv_seg = nnx.Conv(
            channels, num_classes, (1, 1), use_bias=True,
            kernel_init=SEG_NORMAL, bias_init=lambda key, shape, dtype: jnp.asarray(
                np.zeros(shape, dtype)),
            dtype=dtype, param_dtype=param_dtype_for(dtype), rngs=rngs)

    def cls_seg(self, x: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
        if self.dropout is not None:
            x = self.dropout(x, rngs=dropout_key)
        y = self.conv_seg(x)
        return y.astype(float_dtype_for(y.dtype))
