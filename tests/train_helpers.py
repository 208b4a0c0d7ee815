"""Helpers for the CLI-level training tests: the tiny config and running `unet_jax.main`."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "tiny_config.py"
RUN_MAIN = REPO / "tests" / "run_main.py"


def tiny_config(tfds_dir: Path, **train):
    """tests/tiny_config.py's config with its data in `tfds_dir` and train.* overrides."""
    spec = importlib.util.spec_from_file_location("unet_jax_tiny_config", TINY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.data.tfds_data_dir = str(tfds_dir)
    for key, value in train.items():
        config.train[key] = value
    return config


def run_cli(env: dict[str, str], workdir: Path, *flags: str, signal_at: str = "",
            timeout: float = 300) -> subprocess.CompletedProcess:
    """`python tests/run_main.py --config tests/tiny_config.py --workdir W FLAGS...`."""
    env = dict(env)
    if signal_at:
        env["UNET_JAX_TEST_SIGNAL_AT"] = signal_at
    cmd = [sys.executable, str(RUN_MAIN), f"--config={TINY}", f"--workdir={workdir}",
           "--jax_cache_dir=", *flags]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def read_metrics(workdir: Path) -> list[dict]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]
