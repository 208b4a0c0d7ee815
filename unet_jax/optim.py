"""mmseg's optimiser and learning-rate schedule: torch SGD + mmengine PolyLR
(configs/_base_/schedules/schedule_40k.py; mmengine/optim/scheduler/lr_scheduler.py, PolyLR)."""
from __future__ import annotations

from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any

import jax.numpy as jnp
import optax


def _poly_args(train_cfg: Any) -> tuple[float, float, float, int]:
    lr, lr_min, power = train_cfg.lr, train_cfg.lr_min, train_cfg.power
    num_steps = train_cfg.num_steps
    # mmengine: total_iters T = end - begin - 1. T = 0 (a 1-step run) never decays; use 1.
    return lr, lr_min, power, max(num_steps - 1, 1)


def poly_lr(step: int, train_cfg: Any) -> float:
    """The PolyLR learning rate of iteration `step` (0-based) as a Python float (float64).

    `(lr - lr_min) * (1 - t/T)^power + lr_min` with T = num_steps - 1 and t clamped to [0, T].
    """
    lr, lr_min, power, total = _poly_args(train_cfg)
    t = min(max(int(step), 0), total)
    return (lr - lr_min) * ((total - t) / total) ** power + lr_min


def poly_schedule(train_cfg: Any) -> optax.Schedule:
    """An optax schedule (jit-able, float32) giving mmengine PolyLR's lr at optimiser step t.

    Uses the closed form of mmengine's recursive update; after the last step it stays at lr_min.
    """
    lr, lr_min, power, total = _poly_args(train_cfg)

    def schedule(count: Any) -> Any:
        t = jnp.clip(jnp.asarray(count), 0, total)
        # (T - t) is exact in float32 for T < 2**24; dividing afterwards keeps the relative
        # error at float32 rounding even near the end (1 - t/T would cancel catastrophically).
        frac = (total - t).astype(jnp.float32) / jnp.float32(total)
        return jnp.float32(lr - lr_min) * frac ** jnp.float32(power) + jnp.float32(lr_min)

    return schedule


def make_optimizer(train_cfg: Any) -> optax.GradientTransformation:
    """torch `SGD(lr=PolyLR, momentum, weight_decay)` as optax: weight decay on every leaf it sees.

    Pass it only the trainable parameters (nnx.Param state), never BatchNorm running statistics.
    The momentum buffer is `m = momentum*m + g + wd*p` (first step `m = g + wd*p`) and the update
    is `-lr_t * m`, as in torch (nesterov False, dampening 0).
    """
    weight_decay, momentum = train_cfg.weight_decay, train_cfg.momentum
    # Both links are always present so the optimiser-state structure never depends on the values.
    return optax.chain(
        optax.add_decayed_weights(weight_decay),
        optax.sgd(poly_schedule(train_cfg), momentum=momentum, nesterov=False),
    )


SCHEDULE_FIELDS = ("num_steps", "lr", "lr_min", "power", "momentum", "weight_decay")


def schedule_changes(saved: Mapping[str, Any], train_cfg: Any, step: int) -> str | None:
    """A one-line note of the schedule fields that differ between a run's recorded `train`
    config (`saved`, from its config.json) and `train_cfg`, with the learning rate the next step
    gets under each; None if none differ.

    PolyLR is a function of (step, num_steps), so a new `num_steps` moves the lr of the resumed
    step at once (e.g. near lr_min at the old end, far above it under a longer schedule).
    """
    changed = [f"train.{k} {saved[k]!r} -> {train_cfg[k]!r}" for k in SCHEDULE_FIELDS
               if k in saved and saved[k] != train_cfg[k]]
    if not changed:
        return None
    recorded = SimpleNamespace(**{k: saved.get(k, train_cfg[k]) for k in SCHEDULE_FIELDS})
    return (f"note: resuming at step {step} with a changed schedule ({', '.join(changed)}): "
            f"training continues on the new one; lr of step {step + 1}: "
            f"{poly_lr(step, train_cfg):.4g} "
            f"(the recorded schedule: {poly_lr(step, recorded):.4g})")

