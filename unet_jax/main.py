"""Command line: train or evaluate a config.

    python -m unet_jax.main --config configs/drive.py:pspnet,ce_dice --workdir runs/drive_psp
    python -m unet_jax.main --config configs/drive.py --workdir runs/drive_fcn --mode eval
    python -m unet_jax.main            # the demo: synthetic vessels, a few minutes on a CPU

Any config field can be overridden, e.g. `--config.train.num_steps=100`. On several hosts run the
same command on each with `--coordinator_address HOST:PORT --num_processes N --process_id I`
(TPU pods, SLURM and Open MPI jobs are detected without these flags).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from absl import app, flags, logging
from ml_collections import config_flags

_DEMO = Path(__file__).resolve().parent.parent / "configs" / "demo.py"

_CONFIG = config_flags.DEFINE_config_file(
    "config", str(_DEMO) if _DEMO.is_file() else None,
    "Config file and argument, e.g. configs/drive.py:pspnet,ce_dice (default: the demo).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run folder (checkpoints, metrics.jsonl, TensorBoard, overlays). Default: "
    "runs/<dataset>_<head>_<YYYYmmdd-HHMMSS>.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "eval"],
                          "train (resumes from --workdir) or eval (latest checkpoint in --workdir, "
                          "else --config.init_from).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "Multi-host: HOST:PORT of process 0's coordinator.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-host: index of this process.")
_CACHE = flags.DEFINE_string(
    "jax_cache_dir", os.path.join(os.path.expanduser("~"), ".cache", "unet_jax", "jax"),
    "Persistent XLA compilation cache (repeat runs start much faster); '' disables it. "
    "JAX_COMPILATION_CACHE_DIR, if set, wins.")

EXIT_PREEMPTED = 143  # 128 + SIGTERM: stopped on purpose, resumable


def _setup_cache(path: str) -> None:
    import jax
    if os.environ.get("JAX_COMPILATION_CACHE_DIR") or not path:
        return
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def main(argv: list[str]) -> int:
    """Entry point after flag parsing."""
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments {argv[1:]}; fields are set with "
                             "--config.<section>.<field>=VALUE")
    config = _CONFIG.value
    if config is None:
        raise app.UsageError("--config is required (e.g. --config configs/drive.py:fcn,ce)")

    from unet_jax import parallel
    parallel.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    _setup_cache(_CACHE.value)
    logging.set_verbosity(logging.WARNING)
    from unet_jax import train

    workdir = _WORKDIR.value
    if _MODE.value == "eval":
        train.evaluate_checkpoint(config, workdir)
        return 0
    if not workdir:
        workdir = str(train.default_workdir(config))
        if parallel.is_main_process():
            print(f"no --workdir given: writing to {workdir}")
    try:
        train.train_and_evaluate(config, workdir)
    except train.Preempted as stop:
        print(str(stop), file=sys.stderr)
        return EXIT_PREEMPTED
    except train.NonFiniteLossError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


def run() -> None:
    """`python -m unet_jax.main` / console entry."""
    app.run(lambda argv: sys.exit(main(argv)))


if __name__ == "__main__":
    run()
