"""Throughput benchmarks of the train step, the evaluation path and the input pipeline.

    python -m unet_jax.benchmark step  --config FILE[:ARG] [--batch_size N] [--json PATH]
    python -m unet_jax.benchmark infer --config FILE[:ARG] [--image_size H,W] [--json PATH]
    python -m unet_jax.benchmark input --config FILE[:ARG] --workers N [--records DIR] [--json PATH]

`step`: the jitted, donated train step at the config's crop on random data, median of `--steps`
(>= 5) steps after warm-up, each blocked on its result. `infer`: the evaluation path (mmseg's test
pipeline with `eval.mode` slide or whole, `inference.segment`) on one random uint8 image of
`--image_size` (default `data.image_size`), median of `--reps`. `input`: training crops/s of the
real pipeline (`sampler.train_batches`, `--workers` grain processes) on the real dataset (the
prepared train records of `config.data`, or of the records folder `--records`); `batch_sha256` hashes
the first 4 batches, the same bits for any worker count. Each prints its figures and, with
`--json`, writes them. experiments/bench_vs_mmseg.py puts these next to mmseg's own timings.
"""
from __future__ import annotations

import hashlib
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from unet_jax.cli import common
from unet_jax.errors import InputError

COMMANDS = ("step", "infer", "input")


def _median_time(fn: Callable[[], Any], reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _platform() -> dict[str, Any]:
    import jax
    return {"platform": jax.devices()[0].platform, "devices": jax.device_count(),
            "device_kind": jax.devices()[0].device_kind}


def measure_step(config: Any, *, batch_size: int = 0, steps: int = 5) -> dict[str, Any]:
    """The train step as training jits it (`parallel.jit_step`: the batch split over every
    device, the state replicated and donated) on one random batch at the config's crop
    (ms/step, images/s)."""
    import jax

    from unet_jax import parallel
    from unet_jax.models import build_model
    from unet_jax.step import create_train_state, make_train_step

    batch = batch_size or config.train.batch_size
    h, w = config.data.crop_size
    mesh = parallel.make_mesh()
    parallel.check_batch_size(batch, mesh)
    train = create_train_state(build_model(config.model), config)
    state = parallel.replicate(train.state, mesh)
    step = parallel.jit_step(make_train_step(train, config), state, mesh)
    rng = np.random.default_rng(0)
    data = parallel.global_batch(
        {"image": rng.standard_normal((batch, h, w, 3)).astype(np.float32),
         "label": rng.integers(0, config.model.num_classes, (batch, h, w)).astype(np.int32)},
        mesh)
    t0 = time.perf_counter()
    compiled = step.lower(state, data).compile()
    compile_s = time.perf_counter() - t0
    step = compiled
    state = jax.block_until_ready(step(state, data))
    first = time.perf_counter() - t0
    state = jax.block_until_ready(step(state, data))  # a second warm-up step
    holder = [state]

    def one() -> None:
        holder[0] = jax.block_until_ready(step(holder[0], data))

    seconds = _median_time(one, max(steps, 5))
    return {"ms_per_step": seconds * 1e3, "images_per_s": batch / seconds, "batch": batch,
            "crop": [h, w], "dtype": config.model.dtype, "first_call_s": first,
            "compile_s": compile_s, "steps": max(steps, 5),
            "xla_memory_bytes": _program_bytes(compiled),
            "peak_bytes_in_use": _device_peak_bytes(), **_platform()}


def _program_bytes(compiled: Any) -> int | None:
    """What XLA plans for one call of a compiled program: arguments + outputs + temporaries,
    less the donated buffers that outputs reuse (None where the backend does not say)."""
    try:
        m = compiled.memory_analysis()
        return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
                   + m.temp_size_in_bytes)
    except (AttributeError, TypeError, NotImplementedError):
        return None


def _device_peak_bytes() -> int | None:
    """The device allocator's peak so far in this process (GPU/TPU; None on CPU)."""
    import jax
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return None if peak is None else int(peak)


def measure_infer(config: Any, *, image_size: tuple[int, int] | None = None,
                  reps: int = 3) -> dict[str, Any]:
    """The evaluation path on one random image (s/image; the first call includes compilation)."""
    import jax

    from unet_jax.inference import make_apply_fn, segment, slide_windows
    from unet_jax.models import build_model
    from unet_jax.preprocess import rescale_size

    h, w = image_size or tuple(config.data.image_size)
    image = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    apply_fn = make_apply_fn(build_model(config.model))

    def run() -> None:
        jax.block_until_ready(segment(apply_fn, image, config))

    t0 = time.perf_counter()
    run()
    first = time.perf_counter() - t0
    rh, rw = rescale_size(h, w, config.data.img_scale)  # the test pipeline's resize
    windows = (len(slide_windows(rh, rw, config.eval.crop_size, config.eval.stride))
               if config.eval.mode == "slide" else 1)
    seconds = _median_time(run, reps)
    return {"s_per_image": seconds, "first_call_s": first, "image_size": [h, w],
            "mode": config.eval.mode, "windows": windows, "tta": config.eval.tta,
            "dtype": config.model.dtype, "reps": reps, **_platform()}


def training_source(config: Any, records_dir: str | None = None) -> Any:
    """The training records: those in `records_dir` (a prepared records folder, e.g. the GPU
    report's bundle), or those of `config.data` (prepared first if needed)."""
    from unet_jax.data import records
    if records_dir:
        return records.RecordSource(records.split_path(records_dir, "train"))
    import unet_jax.data as data
    return data.source(config.data, "train")


def measure_input(config: Any, *, workers: int, steps: int = 100, batch_size: int = 0,
                  records_dir: str | None = None) -> dict[str, Any]:
    """Training crops/s of `sampler.train_batches` with `workers` processes."""
    from unet_jax.data.sampler import train_batches

    batch = batch_size or config.train.batch_size
    records = training_source(config, records_dir)
    t0 = time.perf_counter()
    batches = train_batches(records, config.data, global_batch_size=batch,
                            seed=config.train.seed, workers=workers)
    digest = hashlib.sha256()
    try:
        for _ in range(4):
            b = next(batches)
            digest.update(b["image"].tobytes())
            digest.update(b["label"].tobytes())
        startup = time.perf_counter() - t0
        t1 = time.perf_counter()
        for _ in range(steps):
            next(batches)
        seconds = time.perf_counter() - t1
    finally:
        batches.close()
    return {"crops_per_s": steps * batch / seconds, "workers": workers, "batch": batch,
            "steps": steps, "batch_sha256": digest.hexdigest(), "startup_s": startup,
            "cpu_cores": os.cpu_count(), "dataset": config.data.name,
            "source": records_dir or "config"}


def _report(name: str, result: dict[str, Any], json_path: str) -> None:
    shown = ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                      for k, v in result.items())
    print(f"{name}: {shown}")
    if json_path:
        path = Path(json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1) + "\n")


def _size(text: str) -> tuple[int, int] | None:
    """--image_size "H,W" (or HxW) as (H, W); None when empty; an InputError unless both sides
    are positive and the image is no larger than predict accepts (images.MAX_PIXELS)."""
    from unet_jax.io.images import MAX_PIXELS

    if not text:
        return None
    try:
        h, w = (int(v) for v in text.replace("x", ",").split(","))
    except ValueError as err:
        raise InputError(f"--image_size {text!r}: expected H,W, e.g. 584,565") from err
    if h < 1 or w < 1:
        raise InputError(f"--image_size {text!r}: expected positive sides")
    if h * w > MAX_PIXELS:
        raise InputError(f"--image_size {text!r}: {h * w} pixels; at most {MAX_PIXELS} "
                         "(unet_jax.io.images.MAX_PIXELS, as predict)")
    return h, w


def main(config: Any, argv: list[str]) -> None:
    """Run the subcommand named in `argv`."""
    from absl import flags

    f = flags.FLAGS
    if len(argv) != 2 or argv[1] not in COMMANDS:
        raise InputError("usage: python -m unet_jax.benchmark step|infer|input --config "
                         f"configs/<dataset>.py; found arguments {argv[1:]}")
    what = argv[1]
    if what == "step":
        result = measure_step(config, batch_size=f.batch_size, steps=f.steps)
    elif what == "infer":
        result = measure_infer(config, image_size=_size(f.image_size), reps=f.reps)
    else:
        workers = config.data.workers if f.workers is None else f.workers
        result = measure_input(config, workers=workers, steps=f.steps or 100,
                               batch_size=f.batch_size, records_dir=f.records or None)
    _report(what, result, f.json)


def _define_flags() -> None:
    from absl import flags

    flags.DEFINE_integer("batch_size", 0, "global batch (0: config.train.batch_size)",
                         lower_bound=0)
    flags.DEFINE_integer("steps", 0, "timed steps (step: at least 5; input: default 100)",
                         lower_bound=0)
    flags.DEFINE_integer("reps", 3, "infer: timed runs after the first", lower_bound=1)
    flags.DEFINE_string("image_size", "", "infer: H,W of the random image (default "
                        "data.image_size)")
    flags.register_validator("image_size", _valid_size)
    flags.DEFINE_integer("workers", None, "input: augmentation processes (default: "
                         "data.workers)", lower_bound=0)
    flags.DEFINE_string("records", "", "input: read the train records of this prepared "
                        "records folder instead of config.data's")
    flags.DEFINE_string("json", "", "also write the figures as JSON here")


def _valid_size(text: str) -> bool:
    """absl validator of --image_size: its error names the flag (`_size` says what is wrong)."""
    from absl import flags
    try:
        _size(text)
    except InputError as err:
        raise flags.ValidationError(str(err).split(": ", 1)[-1]) from err
    return True


def run() -> None:
    """`python -m unet_jax.benchmark` / the `unet-jax-benchmark` console entry."""
    common.run(main, prog="unet_jax.benchmark", define_flags=_define_flags,
               positionals=" | ".join(COMMANDS))


if __name__ == "__main__":
    sys.exit(run())
