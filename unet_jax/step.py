"""The training state and one optimisation step, as pure functions over `nnx.split` state.

`TrainState` holds params, BatchNorm statistics, the optax state and the step counter; the
model structure (graphdef) stays outside so the step can be `jax.jit`-ed with donated buffers.
Dropout randomness is derived from (seed, step), so a resumed run draws the same masks.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from unet_jax.losses import segmentation_loss
from unet_jax.optim import make_optimizer, poly_schedule


class TrainState(NamedTuple):
    """Everything that changes during training (a pytree; the graphdef is kept apart)."""
    step: jax.Array
    params: nnx.State
    batch_stats: nnx.State
    rngs: nnx.State
    opt_state: Any


def create_train_state(model: nnx.Module, train_cfg: Any) -> tuple[nnx.GraphDef, TrainState,
                                                                   optax.GradientTransformation]:
    """Split a (train-mode) model into graphdef + TrainState and build its optimiser."""
    model.train()
    graphdef, params, batch_stats, rngs = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    tx = make_optimizer(train_cfg)
    state = TrainState(jnp.zeros((), jnp.int32), params, batch_stats, rngs, tx.init(params))
    return graphdef, state, tx


def merge_model(graphdef: nnx.GraphDef, state: TrainState) -> nnx.Module:
    """Rebuild the module from its graphdef and a TrainState (train mode as split)."""
    return nnx.merge(graphdef, state.params, state.batch_stats, state.rngs)


def train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, loss_cfg: Any,
               schedule: optax.Schedule, seed: int, state: TrainState,
               batch: dict[str, jax.Array],
               ) -> tuple[TrainState, dict[str, jax.Array]]:
    """One SGD step on a (global) batch: forward in train mode, mmseg's loss, SGD update.

    BatchNorm statistics are reduced over the whole batch, so with a batch sharded over
    devices this is SyncBN. Returns the new state and the logged terms (loss, lr, ...).
    """
    dropout_key = jax.random.fold_in(jax.random.key(seed), state.step)

    def loss_fn(params: nnx.State, batch_stats: nnx.State, rngs: nnx.State):
        model = nnx.merge(graphdef, params, batch_stats, rngs, copy=True)
        nnx.reseed(model, dropout=dropout_key)
        decode, aux = model(batch["image"])
        total, terms = segmentation_loss(decode, aux, batch["label"], loss_cfg)
        _, _, new_stats, _ = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
        return total, (terms, new_stats)

    (total, (terms, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state.batch_stats, state.rngs)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    logs = dict(terms)
    logs["loss"] = total
    logs["lr"] = schedule(state.step)
    return TrainState(state.step + 1, params, new_stats, state.rngs, opt_state), logs


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, config: Any):
    """`train_step` bound to a config, ready for `jax.jit(..., donate_argnums=0)`."""
    loss_cfg = config.loss
    seed = config.train.seed
    schedule = poly_schedule(config.train)

    def step(state: TrainState, batch: dict[str, jax.Array]):
        return train_step(graphdef, tx, loss_cfg, schedule, seed, state, batch)

    return step
