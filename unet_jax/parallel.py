"""Devices: multi-host start-up, the `data` mesh, shardings and host batch -> global array.

One code path serves one CPU, several GPUs on a host and a TPU pod: a 1-D mesh over every device
(of every process) with the axis `data`; the batch is split along it and the training state is
replicated, so the jitted step computes BatchNorm statistics over the global batch (SyncBN).
"""
from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from unet_jax.errors import ConfigError

DATA_AXIS = "data"

# Environment variables whose presence means "one of several processes of a job".
_MULTIHOST_ENV = ("JAX_COORDINATOR_ADDRESS", "MEGASCALE_COORDINATOR_ADDRESS")


def _env_int(name: str) -> int:
    value = os.environ.get(name, "")
    return int(value) if value.isdigit() else 0


def detect_multihost_env() -> str | None:
    """The kind of multi-process job the environment describes (None for a single process).

    Recognised: a JAX coordinator variable, a Cloud TPU pod slice (several TPU worker hosts),
    SLURM with more than one task, and Open MPI with more than one rank.
    """
    for name in _MULTIHOST_ENV:
        if os.environ.get(name):
            return name
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "") or os.environ.get(
        "TPU_PROCESS_ADDRESSES", "")
    if len([h for h in hosts.split(",") if h.strip()]) > 1:
        return "TPU pod"
    if os.environ.get("SLURM_JOB_ID") and _env_int("SLURM_NTASKS") > 1 and (
            "SLURM_PROCID" in os.environ):
        return "SLURM"
    if _env_int("OMPI_COMM_WORLD_SIZE") > 1:
        return "Open MPI"
    return None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """Start JAX's multi-process runtime when asked to or when the environment says so.

    With `coordinator_address` (HOST:PORT), `num_processes` and `process_id` given, they are used;
    otherwise `jax.distributed.initialize()` is called without arguments (it reads the cluster's
    variables) if `detect_multihost_env` finds a multi-process job. Must run before any other JAX
    call. Returns True if the runtime is (now) initialised. Safe to call twice.
    """
    if jax.distributed.is_initialized():
        return True
    explicit = [coordinator_address, num_processes, process_id]
    if any(v is not None and v != "" for v in explicit):
        if coordinator_address in (None, "") or num_processes is None or process_id is None:
            raise ValueError(
                "multi-host start: expected --coordinator_address HOST:PORT, --num_processes N "
                f"and --process_id I together; found coordinator_address={coordinator_address!r}, "
                f"num_processes={num_processes!r}, process_id={process_id!r}")
        if not 0 <= int(process_id) < int(num_processes):
            raise ValueError(f"--process_id: expected 0..{int(num_processes) - 1}, "
                             f"found {process_id}")
        jax.distributed.initialize(coordinator_address=coordinator_address,
                                   num_processes=int(num_processes), process_id=int(process_id))
        return True
    kind = detect_multihost_env()
    if kind is None:
        return False
    logging.info("multi-process job detected (%s): jax.distributed.initialize()", kind)
    jax.distributed.initialize()
    return True


def is_main_process() -> bool:
    """True on the process that writes logs, images and tables (process 0)."""
    return jax.process_index() == 0


def make_mesh(devices: list[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh with axis `data` over all devices of all processes (or `devices`)."""
    devices = list(devices) if devices is not None else jax.devices()
    return jax.make_mesh((len(devices),), (DATA_AXIS,),
                         axis_types=(jax.sharding.AxisType.Auto,), devices=devices)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over `data`, other axes whole."""
    return NamedSharding(mesh, P(DATA_AXIS))


def jit_step(step_fn: Any, state: Any, mesh: Mesh) -> Any:
    """`step_fn(state, batch) -> state` jitted for `mesh`: the state keeps the shardings it has,
    the batch is split over `data`, and the state's buffers are donated."""
    sharding = jax.tree.map(lambda x: x.sharding, state)
    return jax.jit(step_fn, in_shardings=(sharding, batch_sharding(mesh)),
                   out_shardings=sharding, donate_argnums=0)


def replicated(mesh: Mesh) -> NamedSharding:
    """The whole array on every device."""
    return NamedSharding(mesh, P())


def check_batch_size(global_batch_size: int, mesh: Mesh) -> int:
    """The per-process batch size; a ConfigError if the global batch does not split evenly."""
    devices = mesh.devices.size
    if global_batch_size <= 0 or global_batch_size % devices:
        raise ConfigError(
            f"train.batch_size: expected a positive multiple of the device count {devices} "
            f"({jax.process_count()} process(es) x {jax.local_device_count()} local devices), "
            f"found {global_batch_size}; set --config.train.batch_size accordingly")
    return global_batch_size // jax.process_count()


def global_batch(local: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's rows of every batch entry -> global arrays sharded on `data`.

    Every process passes its own `B / process_count` rows (in process order); the result has
    the global batch `B` as leading dimension.
    """
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in local.items()}


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Place a pytree (identical on every process) on every device of the mesh."""
    sharding = replicated(mesh)
    if jax.process_count() == 1:
        return jax.device_put(tree, sharding)

    def one(x: Any) -> Any:
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            data = one(jax.random.key_data(x))
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        value = np.asarray(x)
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])
    return jax.tree.map(one, tree)


def put_replicated(value: Any, like: jax.Array) -> jax.Array:
    """A host value placed with the sharding of `like` (works across processes)."""
    value = np.asarray(value, dtype=like.dtype)
    return jax.make_array_from_callback(value.shape, like.sharding, lambda index: value[index])


def to_host(tree: Any) -> Any:
    """Replicated (or single-device) jax arrays -> numpy, on any process."""
    def one(x: Any) -> Any:
        if isinstance(x, jax.Array):
            return np.asarray(x.addressable_data(0) if not x.is_fully_addressable else x)
        return x
    return jax.tree.map(one, tree)


def broadcast_from_main(value: Any) -> Any:
    """Process 0's value (a pytree of numbers/arrays) on every process; identity on one process."""
    if jax.process_count() == 1:
        return value
    return multihost_utils.broadcast_one_to_all(value)


def sync(name: str) -> None:
    """Barrier across processes (no-op on one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
