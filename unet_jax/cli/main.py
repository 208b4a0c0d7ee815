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
from typing import Any

from absl import flags, logging

from unet_jax.cli import common

_DEMO = Path(__file__).resolve().parents[2] / "configs" / "demo.py"
EXIT_PREEMPTED = 143  # 128 + SIGTERM: stopped on purpose, resumable


def _define_flags() -> None:
    flags.DEFINE_string(
        "workdir", None, "Run folder (checkpoints, metrics.jsonl, TensorBoard, overlays). "
        "Default: runs/<dataset>_<head>_<YYYYmmdd-HHMMSS>.")
    flags.DEFINE_enum("mode", "train", ["train", "eval"],
                      "train (resumes from --workdir) or eval (latest checkpoint in --workdir, "
                      "else --config.init_from).")
    flags.DEFINE_string("coordinator_address", None,
                        "Multi-host: HOST:PORT of process 0's coordinator.")
    flags.DEFINE_integer("num_processes", None, "Multi-host: number of processes.",
                         lower_bound=1)
    flags.DEFINE_integer("process_id", None, "Multi-host: index of this process.",
                         lower_bound=0)
    flags.DEFINE_string(
        "jax_cache_dir", os.path.join(os.path.expanduser("~"), ".cache", "unet_jax", "jax"),
        "Persistent XLA compilation cache (repeat runs start much faster); '' disables it. "
        "JAX_COMPILATION_CACHE_DIR, if set, wins.")


def _setup_cache(path: str) -> None:
    import jax
    if os.environ.get("JAX_COMPILATION_CACHE_DIR") or not path:
        return
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def main(config: Any, argv: list[str]) -> int:
    """Entry point after flag parsing: train (default) or evaluate `config`."""
    del argv  # common.run refuses positional arguments
    f = flags.FLAGS
    from unet_jax import parallel
    parallel.initialize(f.coordinator_address, f.num_processes, f.process_id)
    _setup_cache(f.jax_cache_dir)
    logging.set_verbosity(logging.WARNING)
    from unet_jax import train

    workdir = f.workdir
    if f.mode == "eval":
        from ml_collections import config_flags
        train.evaluate_checkpoint(config, workdir,
                                  overridden=config_flags.get_override_values(f["config"]))
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
    return 0


def run() -> None:
    """`python -m unet_jax.main` / the `unet-jax-train` console entry."""
    common.run(main, prog="unet_jax.main", define_flags=_define_flags,
               default_config=str(_DEMO) if _DEMO.is_file() else None)


if __name__ == "__main__":
    run()
