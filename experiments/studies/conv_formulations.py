"""How fast XLA:CPU runs the UNet's 3x3 convolutions, forward and backward, written three ways.

    python experiments/studies/conv_formulations.py [--batch 4] [--crop 64] [--reps 5]

For every 3x3 conv shape of UNet-S5-D16 at the given crop (and the 1x1 InterpConv / head convs
it implies), times jitted value-and-grad (w.r.t. input and kernel) of
  xla     jax.lax.conv_general_dilated (what nnx.Conv lowers to),
  taps    the sum over the 9 kernel taps of a shifted input times a (C, O) matrix: 9 GEMMs,
  im2col  the 9 shifted inputs concatenated on channels times a (9C, O) matrix: one GEMM,
and prints ms per call and GFLOP/s (forward + backward = 3x the forward FLOPs), median of --reps
after warm-up. It is the measurement behind `unet_jax.models.layers.conv2d`'s choice per shape.
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


def conv_xla(x, w, dilation=1):
    pad = dilation * (w.shape[0] // 2)
    return jax.lax.conv_general_dilated(x, w, (1, 1), [(pad, pad), (pad, pad)],
                                        rhs_dilation=(dilation, dilation),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _shifts(x, k, dilation):
    pad = dilation * (k // 2)
    xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    h, w = x.shape[1], x.shape[2]
    return [xp[:, i * dilation:i * dilation + h, j * dilation:j * dilation + w]
            for i in range(k) for j in range(k)]


def conv_taps(x, w, dilation=1):
    k = w.shape[0]
    out = None
    for t, xs in enumerate(_shifts(x, k, dilation)):
        y = jnp.einsum("nhwc,co->nhwo", xs, w[t // k, t % k])
        out = y if out is None else out + y
    return out


def conv_im2col(x, w, dilation=1):
    k = w.shape[0]
    cols = jnp.concatenate(_shifts(x, k, dilation), axis=-1)
    return jnp.einsum("nhwc,co->nhwo", cols, w.reshape(k * k * w.shape[2], w.shape[3]))


def conv_gemm(x, w, dilation=1):
    """The library's GEMM formulation (custom VJP, no kernel transposes)."""
    from unet_jax.models.layers import conv2d_gemm
    pad = dilation * (w.shape[0] // 2)
    return conv2d_gemm(x, w, pad, dilation)


FORMS = {"xla": conv_xla, "taps": conv_taps, "im2col": conv_im2col, "gemm": conv_gemm}


def shapes(batch: int, crop: int, base: int = 64):
    """(name, N, H, W, C, O, k) of UNet-S5-D16's convs (encoder, decoder, heads)."""
    out = []
    c_in = 3
    for i in range(5):
        s, width = crop >> i, base << i
        out.append((f"enc{i}.conv0", batch, s, s, c_in, width, 3))
        out.append((f"enc{i}.conv1", batch, s, s, width, width, 3))
        c_in = width
    for j in range(4):
        s, width = crop >> j, base << j
        out.append((f"dec{j}.conv0", batch, s, s, 2 * width, width, 3))
        out.append((f"dec{j}.conv1", batch, s, s, width, width, 3))
        out.append((f"dec{j}.up1x1", batch, s, s, 2 * width, width, 1))
    return out


def time_fn(fn, args, reps):
    jax.block_until_ready(fn(*args))
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--crop", type=int, default=64)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    print(f"{jax.devices()[0].platform}, batch {args.batch}, crop {args.crop}")
    print(f"{'conv':<12} {'N x H x W x C -> O':<24}" + "".join(f"{f:>16}" for f in FORMS))
    totals = {f: 0.0 for f in FORMS}
    for name, n, h, w, c, o, k in shapes(args.batch, args.crop):
        x = jnp.asarray(rng.standard_normal((n, h, w, c)), jnp.float32)
        kern = jnp.asarray(rng.standard_normal((k, k, c, o)) * 0.05, jnp.float32)
        gflop = 3 * 2 * n * h * w * c * o * k * k / 1e9
        row = []
        for form, conv in FORMS.items():
            if k == 1 and form != "xla":
                conv = lambda x, w: jnp.einsum("nhwc,co->nhwo", x, w[0, 0])
            step = jax.jit(jax.value_and_grad(lambda x, w, f=conv: jnp.sum(f(x, w) ** 2),
                                              argnums=(0, 1)))
            t = time_fn(step, (x, kern), args.reps)
            totals[form] += t
            row.append(f"{t * 1e3:8.1f} ({gflop / t:4.0f})")
        print(f"{name:<12} {f'{n}x{h}x{w}x{c}->{o}':<24}" + "".join(f"{r:>16}" for r in row))
    print(f"{'total ms':<37}" + "".join(f"{totals[f] * 1e3:16.1f}" for f in FORMS))


if __name__ == "__main__":
    main()
