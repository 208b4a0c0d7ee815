"""Where float32 loses precision in one train step: JAX float32 vs float64, layer by layer, op by op.

Builds a train_step fixture model (tests/conftest.py, exactly as tests/test_train_step.py
does), computes the iteration-1 gradient in float32 and in float64 (jax_enable_x64, model dtype
float64, float64 parameters) and prints:

  A. per ConvModule (conv -> BN -> ReLU), end to end: the f32-vs-f64 error of the BN output y
     (forward), of the gradient at the BN output (dy), at the BN input = conv output (dz), of
     the conv kernel gradient, and how many ReLU gates (y > 0) differ;
  B. the same ops alone, fed the float64 values rounded to float32 (f32 arithmetic vs f64
     arithmetic on identical inputs): BN batch mean / var, the BN backward (dz from dy) and
     the conv kernel gradient (from x and dz);
  C. the parameter gradients with the largest f32-vs-f64 error;
  E. ReLU gates: the f32 gradient with the f64 run's gates imposed; each differing gate alone;
     and an "ideal float32" forward (float64 arithmetic, one random float32-sized relative
     error on every conv and BN output) over several seeds;
  D. parameters after iterations 1 and 2 of the jitted train step: f32 vs f64, both vs the
     mmseg fixture.

Errors are max|a - b| and, in brackets, max|a - b| / max|b|, b being the float64 value.
At iteration 1 the parameter error is lr (0.01) times the gradient error.

Findings (fcn_drive, XLA:CPU): no op loses precision. Alone, every BN statistic, BN backward and
conv kernel gradient is within 1e-7 .. 6e-7 relative of float64 (B). The 1.37e-2 gradient error
(1.37e-4 on parameters after iteration 1) comes from 5 of ~400k ReLU gates whose pre-activation
is within float32 forward error of 0 (|y| ~ 2e-6 .. 1.3e-5): with the float64 run's gates
imposed, the float32 gradient error is 2.1e-6 (E). One of them, in the 4x4 bottleneck
(encoder.4.1.convs.1, 32 values per channel), alone moves the gradient by 1.37e-2; the
"ideal float32" forward flips it in 3 of 12 seeds, so any float32 implementation can land there.

    PYTHONPATH=. python experiments/studies/f32_vs_f64_step.py [--variant fcn_drive] [--seeds 12]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))

from conftest import FIXTURES  # noqa: E402
from conftest import fixture_model  # noqa: E402
from unet_jax.losses import segmentation_loss  # noqa: E402
from unet_jax.models import build_model, layers  # noqa: E402

VARIANTS = {"fcn_drive": ("fcn_drive", ""), "pspnet_drive": ("pspnet_drive", ""),
            "fcn_drive_ce1_dice3": ("fcn_drive", ",ce_dice")}


def setup(variant: str, dtype: str):
    """(config, train-mode model with the fixture weights, batch) as the train-step test."""
    start, arg = VARIANTS[variant]
    config, model = fixture_model(start, arg_suffix=arg, dtype=dtype)
    config.model.dropout_ratio = 0.0
    config.loss.dice_form = "v1"
    fresh = build_model(config.model)
    nnx.update(fresh, nnx.state(model, (nnx.Param, nnx.BatchStat)))
    fresh.train()
    b = np.load(FIXTURES / "train_step" / "batch.npz")
    batch = {"image": jnp.asarray(b["inputs"].transpose(0, 2, 3, 1)),
             "label": jnp.asarray(b["labels"].astype(np.int32))}
    return config, fresh, batch


def flat(state) -> dict[str, np.ndarray]:
    return {".".join(map(str, path)): np.asarray(v.get_value() if hasattr(v, "get_value")
                                                 else v.value)
            for path, v in nnx.to_flat_state(state)}


# ---------------------------------------------------------------------------------------------
# Probing ConvModule: record its input x and conv output z, and add zero "taps" to z and to the
# BN output y whose gradients are dL/dz and dL/dy. ConvModule's result is unchanged.

class _Probe:
    taps: dict | None = None
    rec: dict | None = None
    shapes: dict | None = None
    gates: dict | None = None
    noise: dict | None = None


PROBE = _Probe()
_conv_module_call = layers.ConvModule.__call__


def _tap(key: str, v: jax.Array) -> jax.Array:
    if PROBE.taps is None:
        PROBE.shapes[key] = jax.ShapeDtypeStruct(v.shape, v.dtype)
        return v
    return v + PROBE.taps[key]


def _probed_call(self, x):
    name = getattr(self, "probe_name", None)
    if PROBE.rec is None or name is None:
        return _conv_module_call(self, x)
    z = self.conv(x)
    if PROBE.noise is not None:  # one random float32-sized rounding error per value
        z = z * PROBE.noise[name + "/z"]
    z = _tap(name + "/z", z)
    PROBE.rec[name + "/x"] = x
    PROBE.rec[name + "/z"] = z
    y = self.bn(z)
    if PROBE.noise is not None:
        y = y * PROBE.noise[name + "/y"]
    y = _tap(name + "/y", y)
    PROBE.rec[name + "/y"] = y
    if PROBE.gates is not None:  # ReLU with imposed gates (y > 0 of another run)
        return jnp.where(PROBE.gates[name], y, 0.0)
    return jax.nn.relu(y)


layers.ConvModule.__call__ = _probed_call


def probe_gradients(config, model, batch, gates=None, noise_seed=None):
    """Parameter gradients, dL/dz and dL/dy per ConvModule, and the recorded x, z, y (numpy).

    `gates` ({ConvModule name: bool array}) replaces each ReLU's own y > 0 decision.
    `noise_seed` multiplies every conv output z and BN output y by 1 + U(-1, 1) 2^-24: an
    "ideal float32" forward (float64 arithmetic, one float32-sized rounding error per op).
    """
    names = []
    for path, m in nnx.iter_graph(model):
        if isinstance(m, layers.ConvModule):
            m.probe_name = ".".join(map(str, path))
            names.append(m.probe_name)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    loss_cfg = config.loss

    def loss_fn(params, taps):
        PROBE.taps, PROBE.rec = taps, {}
        m = nnx.merge(graphdef, params, rest, copy=True)
        decode, aux = m(batch["image"])
        total, _ = segmentation_loss(decode, aux, batch["label"], loss_cfg)
        rec, PROBE.taps, PROBE.rec = PROBE.rec, None, None
        return total, rec

    PROBE.shapes, PROBE.gates = {}, None
    jax.eval_shape(lambda p: loss_fn(p, None), params)
    PROBE.gates = None if gates is None else {k: jnp.asarray(v) for k, v in gates.items()}
    if noise_seed is not None:
        rng = np.random.default_rng(noise_seed)
        PROBE.noise = {k: jnp.asarray(1.0 + rng.uniform(-1, 1, s.shape) * 2.0**-24, s.dtype)
                       for k, s in PROBE.shapes.items()}
    taps = {k: jnp.zeros(s.shape, s.dtype) for k, s in PROBE.shapes.items()}
    (gparams, gtaps), rec = jax.jit(jax.grad(loss_fn, argnums=(0, 1), has_aux=True))(
        params, taps)
    PROBE.gates = PROBE.noise = None
    out = {k: np.asarray(v) for k, v in rec.items()}
    out.update({k[:-2] + "/d" + k[-1]: np.asarray(v) for k, v in gtaps.items()})
    modules = {n: m for n, m in ((".".join(map(str, p)), m) for p, m in nnx.iter_graph(model))
               if n in names}
    return names, modules, flat(gparams), out


# ---------------------------------------------------------------------------------------------
# Single ops.

def bn_train(z, scale, bias):
    """The library's BatchNorm in training mode (batch statistics), as a function."""
    bn = layers.BatchNorm(z.shape[-1], param_dtype=z.dtype)
    bn.scale[...] = scale
    bn.bias[...] = bias
    return bn(z)


def bn_stats(z):
    axes = tuple(range(z.ndim - 1))
    mean = jnp.mean(z, axis=axes)
    return mean, jnp.mean(jnp.square(z - mean), axis=axes)


def conv_fn(conv: nnx.Conv):
    def pair(v):
        return tuple(v) if isinstance(v, (tuple, list)) else (v, v)

    def fn(x, k):
        return jax.lax.conv_general_dilated(
            x, k, window_strides=pair(conv.strides), padding=conv.padding,
            rhs_dilation=pair(conv.kernel_dilation), dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return fn


def f32_vs_f64(fn, args64, ct64=None):
    """fn's outputs (ct64 None) or its vjp, jitted, in f32 and in f64 on the f32-rounded inputs."""
    args32 = [np.asarray(a, np.float32) for a in args64]
    res = []
    for enable, dt in ((False, np.float32), (True, np.float64)):
        with jax.enable_x64(enable):
            args = tuple(jnp.asarray(a, dt) for a in args32)
            if ct64 is None:
                out = jax.jit(fn)(*args)
            else:
                ct = jnp.asarray(np.asarray(ct64, np.float32), dt)
                out = jax.jit(lambda a, c: jax.vjp(fn, *a)[1](c))(args, ct)
            res.append([np.asarray(o, np.float64) for o in jax.tree_util.tree_leaves(out)])
    return res[0], res[1]


def err(a, b) -> tuple[float, float]:
    d = float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
    return d, d / max(float(np.max(np.abs(b))), 1e-300)


def fmt(e) -> str:
    return f"{e[0]:.1e} ({e[1]:.0e})"


def grad_err(g: dict, ref: dict) -> tuple[float, str]:
    worst = max(ref, key=lambda k: float(np.max(np.abs(g[k] - ref[k]))))
    return float(np.max(np.abs(g[worst] - ref[worst]))), worst


# ---------------------------------------------------------------------------------------------
# End to end: parameters after the jitted train step.

def run_steps(variant: str, dtype: str):
    """[(params under state_dict keys, logs)] after iterations 1 and 2 (tests/test_train_step.py's
    run; the state_dict arrays are float32, enough for the errors printed here)."""
    from test_train_step import run_iterations
    with jax.enable_x64(dtype == "float64"):
        _, out, _, _ = run_iterations(FIXTURES, variant, dtype)
    keep = lambda sd: {k: v.astype(np.float64) for k, v in sd.items() if "running" not in k
                       and not k.endswith("num_batches_tracked")}
    return [(keep(sd), logs) for logs, sd in out]


def end_to_end(variant: str) -> None:
    ref = np.load(FIXTURES / "train_step" / f"{variant}.npz")
    r32, r64 = run_steps(variant, "float32"), run_steps(variant, "float64")
    for it in (1, 2):
        p32, p64 = r32[it - 1][0], r64[it - 1][0]
        fx = {k: ref[f"after{it}/{k}"].astype(np.float64) for k in p32}
        e, k = grad_err(p32, p64)
        e32, _ = grad_err(p32, fx)
        e64, _ = grad_err(p64, fx)
        loss = abs(r32[it - 1][1]["loss"] - r64[it - 1][1]["loss"])
        print(f"  it.{it}: f32 vs f64 {e:.2e} ({k}); f32 vs fixture {e32:.2e}; "
              f"f64 vs fixture {e64:.2e}; |loss32 - loss64| {loss:.1e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variant", default="fcn_drive", choices=sorted(VARIANTS))
    ap.add_argument("--seeds", type=int, default=12, help="ideal-float32 seeds in section E")
    ap.add_argument("--sections", default="ABCED", help="which sections to print")
    args = ap.parse_args()
    v = args.variant

    with jax.enable_x64(True):
        config, m64, b64 = setup(v, "float64")
        names, mods, g64, r64 = probe_gradients(config, m64, b64)
        assert all(a.dtype == np.float64 for a in g64.values())
    with jax.enable_x64(False):
        config, m32, b32 = setup(v, "float32")
        _, _, g32, r32 = probe_gradients(config, m32, b32)
    assert all(a.dtype == np.float32 for a in g32.values())
    gates64 = {n: r64[f"{n}/y"] > 0 for n in names}
    flips = {n: np.argwhere((r32[f"{n}/y"] > 0) != gates64[n]) for n in names}

    if "A" in args.sections or "B" in args.sections:
        print(f"A/B. {v}, iteration 1, per ConvModule (conv -> BN -> ReLU). A = end to end "
              f"f32 vs f64; B = the op alone, f32 vs f64 arithmetic on identical inputs.")
        hdr = (f"{'ConvModule':46s} {'pixels':>6s} | {'A: y':>13s} {'A: dy':>13s} "
               f"{'A: dz':>13s} {'A: dkernel':>13s} {'gates':>5s} | {'B: mean':>13s} "
               f"{'B: var':>13s} {'B: BN dz':>13s} {'B: dkernel':>13s}")
        print(hdr)
        print("-" * len(hdr))
        for n in names:
            z64, dz64, dy64, x64 = (r64[f"{n}/{s}"] for s in ("z", "dz", "dy", "x"))
            mod = mods[n]
            scale, bias = (np.asarray(getattr(mod.bn, s).get_value()) for s in ("scale", "bias"))
            kernel = np.asarray(mod.conv.kernel.get_value())
            a = [err(r32[f"{n}/{s}"], r64[f"{n}/{s}"]) for s in ("y", "dy", "dz")]
            a.append(err(g32[f"{n}.conv.kernel"], g64[f"{n}.conv.kernel"]))
            s32, s64 = f32_vs_f64(bn_stats, [z64])
            b = [err(s32[0], s64[0]), err(s32[1], s64[1])]
            o32, o64 = f32_vs_f64(bn_train, [z64, scale, bias], dy64)
            b.append(err(o32[0], o64[0]))
            o32, o64 = f32_vs_f64(conv_fn(mod.conv), [x64, kernel], dz64)
            b.append(err(o32[1], o64[1]))
            pixels = z64.size // z64.shape[-1]
            print(f"{n:46s} {pixels:6d} | " + " ".join(f"{fmt(e):>13s}" for e in a)
                  + f" {len(flips[n]):5d} | " + " ".join(f"{fmt(e):>13s}" for e in b))

    if "C" in args.sections:
        print(f"\nC. {v}: parameter gradients, f32 vs f64, the 10 worst by abs error:")
        for k in sorted(g64, key=lambda k: -err(g32[k], g64[k])[0])[:10]:
            e = err(g32[k], g64[k])
            print(f"  {k:50s} |g|max {np.max(np.abs(g64[k])):.2e}  err {e[0]:.2e} "
                  f"(/|g|max {e[1]:.1e})")

    if "E" in args.sections:
        print(f"\nE. {v}: ReLU gates (y > 0). f32 gradient error vs f64 (param error at it.1 "
              f"= 0.01 x that):")
        print(f"  f32, its own gates ({sum(map(len, flips.values()))} differ from f64): "
              f"{grad_err(g32, g64)[0]:.2e} ({grad_err(g32, g64)[1]})")
        with jax.enable_x64(False):
            config, m, b = setup(v, "float32")
            _, _, g, _ = probe_gradients(config, m, b, gates=gates64)
        print(f"  f32 with the f64 run's gates imposed:   {grad_err(g, g64)[0]:.2e}")
        for n in names:
            for i in (tuple(int(j) for j in f) for f in flips[n]):
                gates = dict(gates64)
                gates[n] = gates64[n].copy()
                gates[n][i] = not gates[n][i]
                with jax.enable_x64(False):
                    config, m, b = setup(v, "float32")
                    _, _, g, _ = probe_gradients(config, m, b, gates=gates)
                print(f"  f32 with the f64 gates except {n} {i} (y64 {r64[f'{n}/y'][i]:+.1e},"
                      f" y32 {r32[f'{n}/y'][i]:+.1e}): {grad_err(g, g64)[0]:.2e}")
        print(f"  'ideal float32' (f64 arithmetic, every conv/BN output x (1 + U(-1,1) 2^-24)):")
        with jax.enable_x64(True):
            for seed in range(args.seeds):
                config, m, b = setup(v, "float64")
                _, _, g, r = probe_gradients(config, m, b, noise_seed=seed)
                nflip = sum(int(np.sum((r[f"{n}/y"] > 0) != gates64[n])) for n in names)
                yerr = max(err(r[f"{n}/y"], r64[f"{n}/y"])[0] for n in names)
                print(f"    seed {seed:2d}: max y err {yerr:.1e}, {nflip} gates differ, "
                      f"gradient err {grad_err(g, g64)[0]:.2e}")

    if "D" in args.sections:
        print(f"\nD. {v}: parameters after the jitted train step (mmseg's own f32 vs f64 at "
              f"it.1 / it.2: fcn 6.8e-6 / 1.8e-4, psp 8.9e-7 / 6.0e-5, ce+dice 1.4e-5 / 3.6e-4):")
        end_to_end(v)


if __name__ == "__main__":
    main()
