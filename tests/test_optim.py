"""PolyLR schedule against mmengine (fixtures/mmseg/schedule.npz) and the torch-SGD update rule."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from unet_jax.optim import make_optimizer, poly_lr, poly_schedule


def _train_cfg(num_steps: int = 40000, **over) -> ml_collections.ConfigDict:
    cfg = dict(num_steps=num_steps, lr=0.01, lr_min=1e-4, power=0.9, momentum=0.9,
               weight_decay=5e-4)
    cfg.update(over)
    return ml_collections.ConfigDict(cfg)


@pytest.mark.parametrize("tag,num_steps", [("40k", 40000), ("160k", 160000)])
def test_schedule_matches_mmengine(fixtures_dir, tag, num_steps):
    d = np.load(fixtures_dir / "schedule.npz")
    iters, lrs = d[f"iters_{tag}"], d[f"lr_{tag}"]
    cfg = _train_cfg(num_steps)
    # float64 closed form vs mmengine's recursive form: measured max rel 3.7e-14 / 9.1e-14.
    py = np.array([poly_lr(int(i), cfg) for i in iters])
    np.testing.assert_allclose(py, lrs, rtol=1e-9, atol=0)
    # The jit-able optax schedule is float32: measured max rel 7.4e-8 / 9.6e-8 (<= 2 ulp).
    sched = jax.jit(poly_schedule(cfg))
    f32 = np.array([sched(jnp.int32(i)) for i in iters], dtype=np.float64)
    np.testing.assert_allclose(f32, lrs, rtol=2.5e-7, atol=0)
    assert f32[0] == np.float32(0.01) and f32[-1] == np.float32(1e-4)


def test_closed_form_equals_recursive_everywhere():
    cfg = _train_cfg(5000)
    total = 4999
    lr, worst = 0.01, 0.0
    for t in range(1, 5003):
        if t <= total:
            lr = (lr - 1e-4) * (1 - 1 / (total - t + 1)) ** 0.9 + 1e-4
        worst = max(worst, abs(lr - poly_lr(t, cfg)) / lr)
    assert worst < 1e-12


def _tiny_params():
    rng = np.random.default_rng(0)
    return {"conv": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32),
                     "bias": jnp.asarray(rng.normal(size=(4,)), jnp.float32)},
            "bn": {"scale": jnp.asarray(rng.uniform(0.5, 1.5, size=(4,)), jnp.float32)}}


def test_sgd_matches_torch_formula():
    cfg = _train_cfg(40000)
    tx = make_optimizer(cfg)
    params = _tiny_params()
    state = tx.init(params)
    rng = np.random.default_rng(1)
    grads = [jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
             for _ in range(3)]

    ref_p = jax.tree.map(lambda p: np.asarray(p, np.float64), params)
    buf = None
    p = params
    for step, g in enumerate(grads):
        updates, state = jax.jit(tx.update)(g, state, p)
        p = optax.apply_updates(p, updates)
        # torch SGD: d = g + wd*p; buf = d (first step) else momentum*buf + d; p -= lr_t * buf.
        lr_t = poly_lr(step, cfg)
        d = jax.tree.map(lambda gg, pp: np.asarray(gg, np.float64) + 5e-4 * pp, g, ref_p)
        buf = d if buf is None else jax.tree.map(lambda b, dd: 0.9 * b + dd, buf, d)
        ref_p = jax.tree.map(lambda pp, b: pp - lr_t * b, ref_p, buf)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, rtol=0, atol=2e-7),
                     p, ref_p)
    # The momentum buffer in the optax state equals torch's.
    traces = [s for s in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, optax.TraceState))
              if isinstance(s, optax.TraceState)]
    assert len(traces) == 1
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, rtol=1e-6, atol=1e-6),
                 traces[0].trace, buf)


def test_first_update_is_lr_times_grad_plus_decay():
    cfg = _train_cfg(100, lr=0.02, weight_decay=1e-3)
    tx = make_optimizer(cfg)
    params = {"w": jnp.array([1.0, -2.0, 3.0])}
    grads = {"w": jnp.array([0.5, 0.25, -1.0])}
    updates, _ = tx.update(grads, tx.init(params), params)
    expected = -0.02 * (np.array([0.5, 0.25, -1.0]) + 1e-3 * np.array([1.0, -2.0, 3.0]))
    np.testing.assert_allclose(np.asarray(updates["w"]), expected, rtol=1e-6)

