"""Throughput benchmarks.

    python -m unet_jax.benchmark input --config configs/drive.py [--steps 100] [--batch_size 16]
        [--config.data.manual_dir=../shared/data/DRIVE --config.data.tfds_data_dir=/tmp/tfds]

`input`: training crops per second of the input pipeline (`unet_jax.data.pipeline.train_dataset`,
tf.data with AUTOTUNE parallelism, all cores of this machine) at the config's global batch, plus
the single-thread cost of the augmentation itself. The train split comes from the TFDS builder of
`config.data` (prepared on first use from `data.manual_dir`); with `--in_memory_drive DIR` DRIVE's
training images are read straight from the official folder layout instead (no TFDS).

Subcommands are the entries of `SUBCOMMANDS` (name -> function(config) -> None).
"""
from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np


def in_memory_drive(drive_dir: str | Path):
    """DRIVE `training/` (images *.tif, 1st_manual *.gif // 128) as a tf.data.Dataset, no TFDS."""
    import tensorflow as tf
    from PIL import Image

    root = Path(drive_dir) / "training"
    names = sorted(p.name.split("_")[0] for p in (root / "images").glob("*_training.tif"))
    if not names:
        raise FileNotFoundError(
            f"{root / 'images'}: expected DRIVE *_training.tif files, found none")
    images = np.stack([np.asarray(Image.open(root / "images" / f"{n}_training.tif").convert("RGB"))
                       for n in names])
    labels = np.stack([(np.asarray(Image.open(root / "1st_manual" / f"{n}_manual1.gif")) // 128)
                       .astype(np.uint8) for n in names])
    return tf.data.Dataset.from_tensor_slices({"image": images, "label": labels,
                                               "name": np.array(names)})


def train_split(config: Any, drive_dir: str | None = None):
    """The training split as a tf.data.Dataset: TFDS via `unet_jax.data`, or DRIVE from a folder."""
    if drive_dir:
        return in_memory_drive(drive_dir)
    import unet_jax.data as data

    return data.load_split(config.data, "train")


def measure_input(config: Any, *, steps: int = 100, warmup: int = 10,
                  batch_size: int | None = None, drive_dir: str | None = None) -> dict[str, float]:
    """Crops/s of the training input pipeline; returns the numbers it prints."""
    from unet_jax.data import pipeline

    batch = int(batch_size or config.train.batch_size)
    t0 = time.perf_counter()
    ds = train_split(config, drive_dir)
    train = pipeline.train_dataset(ds, config.data, global_batch_size=batch,
                                   seed=int(config.train.seed))
    it = train.as_numpy_iterator()
    next(it)
    t1 = time.perf_counter()
    for _ in range(warmup):
        next(it)
    t2 = time.perf_counter()
    for _ in range(steps):
        next(it)
    t3 = time.perf_counter()
    pipeline_rate = steps * batch / (t3 - t2)

    sampler = pipeline.TrainSampler(pipeline.cache_records(ds), config.data, int(config.train.seed))
    n = max(batch, 256)
    sampler.batch(np.arange(n))  # warm the resize tables
    c0 = time.process_time()
    sampler.batch(np.arange(n, 2 * n))
    single = n / (time.process_time() - c0)
    return {"pipeline_crops_per_s": pipeline_rate, "single_thread_crops_per_s": single,
            "startup_s": t1 - t0, "batch": batch, "steps": steps}


def measure_train_step(config: Any, *, steps: int = 5, batch_size: int | None = None
                       ) -> float:
    """Crops/s the jitted train step consumes at the config's width and crop (random batch)."""
    import jax
    import jax.numpy as jnp

    from unet_jax.models import build_model
    from unet_jax.step import create_train_state, make_train_step

    batch = int(batch_size or config.train.batch_size)
    h, w = (int(v) for v in config.data.crop_size)
    train = create_train_state(build_model(config.model), config)
    step = jax.jit(make_train_step(train, config), donate_argnums=0)
    state = train.state
    rng = np.random.default_rng(0)
    data = {"image": jnp.asarray(rng.standard_normal((batch, h, w, 3), np.float32)),
            "label": jnp.asarray(rng.integers(0, config.model.num_classes, (batch, h, w),
                                              dtype=np.int32))}
    state = jax.block_until_ready(step(state, data))
    t0 = time.perf_counter()
    for _ in range(steps):
        state = step(state, data)
    jax.block_until_ready(state)
    return steps * batch / (time.perf_counter() - t0)


def run_input(config: Any, flags: Any) -> None:
    """`input` subcommand: print the input pipeline's training crops/s."""
    r = measure_input(config, steps=flags.steps, batch_size=flags.batch_size,
                      drive_dir=flags.in_memory_drive or None)
    crop = "x".join(str(c) for c in config.data.crop_size)
    print(f"dataset {config.data.name}, crop {crop}, global batch {r['batch']}, "
          f"{os.cpu_count()} CPU cores")
    print(f"input pipeline: {r['pipeline_crops_per_s']:.0f} training crops/s "
          f"({r['pipeline_crops_per_s'] / r['batch']:.1f} batches/s over {r['steps']} steps; "
          f"startup {r['startup_s']:.1f} s)")
    print(f"augmentation alone, one thread: {r['single_thread_crops_per_s']:.0f} crops/s "
          "(CPU time)")
    if flags.train_steps > 0:
        import jax

        rate = measure_train_step(config, steps=flags.train_steps, batch_size=flags.batch_size)
        print(f"train step ({jax.devices()[0].platform}, base_channels "
              f"{config.model.base_channels}, {config.model.dtype}): consumes {rate:.1f} crops/s")
        verdict = "not the bottleneck" if r["pipeline_crops_per_s"] > rate else "THE BOTTLENECK"
        print(f"ratio pipeline / train step: {r['pipeline_crops_per_s'] / rate:.1f}x "
              f"-> the input pipeline is {verdict}")


SUBCOMMANDS: dict[str, Callable[[Any, Any], None]] = {"input": run_input}


def main(config: Any, argv: list[str]) -> None:
    """Run the subcommand named in `argv`."""
    from absl import flags

    from unet_jax.errors import InputError

    if len(argv) != 2 or argv[1] not in SUBCOMMANDS:
        raise InputError(f"usage: python -m unet_jax.benchmark {{{'|'.join(SUBCOMMANDS)}}} "
                         f"--config configs/<dataset>.py; found arguments {argv[1:]}")
    SUBCOMMANDS[argv[1]](config, flags.FLAGS)


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_integer("steps", 100, "timed steps (after 10 warm-up steps)")
    flags.DEFINE_integer("train_steps", 5, "timed train steps for the consumption figure "
                         "(0: skip)")
    flags.DEFINE_integer("batch_size", 0, "global batch (0: config.train.batch_size)")
    flags.DEFINE_string("in_memory_drive", "", "read DRIVE's official training/ folder from "
                        "this directory instead of TFDS")


def run() -> None:
    """`python -m unet_jax.benchmark` / the `unet-jax-benchmark` console entry."""
    from unet_jax import cli

    cli.run(main, prog="unet_jax.benchmark", define_flags=_define_flags)


if __name__ == "__main__":
    sys.exit(run())
