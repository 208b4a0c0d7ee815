"""The training state and one optimisation step, the NNX way.

`TrainState` is `nnx.split((model, optimizer, logs))` once: a graphdef kept outside and one
state (model parameters and BatchNorm statistics, the `nnx.Optimizer`'s step and optax state,
the on-device log sums) that the jitted step takes and returns with its buffers donated.
Dropout keys are derived from (seed, step), so a resumed run draws the same masks; the log sums
live in the state, so they are checkpointed with it and read only at log steps.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from unet_jax.losses import segmentation_loss
from unet_jax.models.segmentor import output_channels
from unet_jax.optim import make_optimizer, poly_schedule
from unet_jax.models.unet2015 import centre_crop
from unet_jax.weighted_loss import weighted_segmentation_loss

MODEL, OPTIMIZER, LOGS = 0, 1, 2  # positions in the split state


class LogState(nnx.Variable):
    """Training-log accumulators (not trained, not BatchNorm statistics)."""


class LogSums(nnx.Module):
    """Sums of the logged terms since the last log line, the number of steps summed, the lr of
    the last step and the first step whose loss was not finite (-1 if none)."""

    def __init__(self, names: Sequence[str]):
        self.names = tuple(names)
        self.sums = LogState(jnp.zeros((len(self.names),), jnp.float32))
        self.count = LogState(jnp.zeros((), jnp.int32))
        self.lr = LogState(jnp.zeros((), jnp.float32))
        self.first_nonfinite = LogState(jnp.full((), -1, jnp.int32))

    def add(self, step: jax.Array, terms: dict[str, jax.Array], lr: jax.Array) -> None:
        """Accumulate one step's terms (on device, inside the jitted step)."""
        values = jnp.stack([terms[name].astype(jnp.float32) for name in self.names])
        self.sums[...] = self.sums[...] + values
        self.count[...] = self.count[...] + 1
        self.lr[...] = lr.astype(jnp.float32)
        finite = jnp.isfinite(terms["loss"])
        first = self.first_nonfinite[...]
        self.first_nonfinite[...] = jnp.where((first < 0) & ~finite, step.astype(jnp.int32), first)


@dataclasses.dataclass
class TrainState:
    """What training carries from step to step: one graphdef, one state, the optimiser."""
    graphdef: nnx.GraphDef
    state: nnx.State
    tx: optax.GradientTransformation
    log_names: tuple[str, ...]

    @property
    def model_state(self) -> nnx.State:
        """Parameters and BatchNorm statistics (what a weights checkpoint holds)."""
        return self.state[MODEL]

    def step(self) -> int:
        """The number of optimisation steps taken (a host sync)."""
        return int(np.asarray(jax.device_get(_addressable(self.state[OPTIMIZER]["step"][...]))))

    def model(self) -> nnx.Module:
        """The training model (train mode) over the current arrays; no copy."""
        model, _, _ = nnx.merge(self.graphdef, self.state)
        return model

    def read_logs(self) -> dict[str, Any]:
        """The log accumulators on the host: {'means': {name: mean}, 'count', 'lr', ...}."""
        logs = jax.device_get(jax.tree.map(_addressable, self.state[LOGS]))
        names = self.log_names
        count = int(np.asarray(logs["count"][...]))
        sums = np.asarray(logs["sums"][...], np.float64)
        return {"means": {n: float(s) / max(count, 1) for n, s in zip(names, sums)},
                "count": count, "lr": float(np.asarray(logs["lr"][...])),
                "first_nonfinite": int(np.asarray(logs["first_nonfinite"][...]))}

    def reset_logs(self) -> None:
        """Zero the sums and count after a log line (the state's other arrays are untouched)."""
        logs = self.state[LOGS]
        for name in ("sums", "count"):
            logs[name][...] = _zeros_like(logs[name][...])


_zeros_like = jax.jit(jnp.zeros_like)  # jit: works on arrays that span several processes


def _addressable(x: Any) -> Any:
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return x.addressable_data(0)
    return x


def log_names(config: Any) -> tuple[str, ...]:
    """The names the step logs: `loss` and the loss terms of `config.loss`, in a fixed order."""
    c = output_channels(config.model)
    h = w = 32
    dec = jax.ShapeDtypeStruct((1, h, w, c), jnp.float32)
    aux = jax.ShapeDtypeStruct((1, h // 2, w // 2, c), jnp.float32) if config.model.aux else None
    labels = jax.ShapeDtypeStruct((1, h, w), jnp.int32)
    _, terms = jax.eval_shape(lambda d, a, y: segmentation_loss(d, a, y, config.loss),
                              dec, aux, labels)
    return ("loss", *sorted(terms))


def create_train_state(model: nnx.Module, config: Any) -> TrainState:
    """Wrap a (train-mode) model with its optimiser and log sums, split once."""
    model.train()
    tx = make_optimizer(config.train)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    logs = LogSums(log_names(config))
    graphdef, state = nnx.split((model, optimizer, logs))
    return TrainState(graphdef, state, tx, logs.names)


def train_step(graphdef: nnx.GraphDef, loss_cfg: Any, schedule: optax.Schedule, seed: int,
               state: nnx.State, batch: dict[str, jax.Array]) -> nnx.State:
    """One SGD step on a (global) batch: forward in train mode, mmseg's loss, SGD update.

    BatchNorm statistics are reduced over the whole batch, so with a batch sharded over
    devices this is SyncBN. The logged terms are added to the state's log sums.
    """
    model, optimizer, logs = nnx.merge(graphdef, state)
    step = optimizer.step[...]
    dropout_key = jax.random.fold_in(jax.random.key(seed), step)

    def loss_fn(model: nnx.Module):
        decode, aux = model(batch["image"], dropout_key=dropout_key)
        if "weight" in batch:  # the original U-Net's weight map (unet_jax.data.elastic)
            return weighted_segmentation_loss(decode, batch["label"], batch["weight"], loss_cfg)
        labels = batch["label"]
        if decode.shape[1:3] != labels.shape[1:3] and aux is None:  # an unpadded net's output
            labels = centre_crop(labels, decode.shape[1], decode.shape[2])
        return segmentation_loss(decode, aux, labels, loss_cfg,
                                 sample_weight=batch.get("sample_weight"))

    (total, terms), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    lr = schedule(step)
    optimizer.update(model, grads)
    logs.add(step, {**terms, "loss": total}, lr)
    return nnx.state((model, optimizer, logs))


def make_train_step(train_state: TrainState, config: Any):
    """`train_step` bound to a config, ready for `jax.jit(..., donate_argnums=0)`."""
    schedule = poly_schedule(config.train)
    graphdef, loss_cfg, seed = train_state.graphdef, config.loss, config.train.seed

    def step(state: nnx.State, batch: dict[str, jax.Array]) -> nnx.State:
        return train_step(graphdef, loss_cfg, schedule, seed, state, batch)

    return step
