"""Shared test helpers: where ../shared lives, the one tiny-config builder, the one fixture-model
loader, and running the training CLI in a subprocess (for the tests where that is the point)."""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("UNET_JAX_SHARED", REPO.parent / "shared"))
FIXTURES = SHARED / "fixtures" / "mmseg"
DATA = SHARED / "data"
# How the suite compiles (most of its time is XLA:CPU compilation): LLVM at -O1 instead of -O2
# (the same bits: XLA:CPU keeps IEEE semantics without fast-math at every level; the tiny train
# step's state after 13 steps and a forward pass were bit-identical) and XLA's classic loop
# emitters instead of its newer MLIR fusion emitters (reductions may round in another order,
# which every bound here allows: they are derived from float32 error, not from one build's
# bits). Together about a third less compile time. In-process tests and every CLI subprocess
# get the same flags, so the exact comparisons between them stay exact.
# UNET_JAX_TEST_XLA_FLAGS="" runs the suite as users compile (XLA's defaults).
TEST_XLA_FLAGS = os.environ.get(
    "UNET_JAX_TEST_XLA_FLAGS",
    "--xla_backend_optimization_level=1 --xla_cpu_use_fusion_emitters=false")
TINY = REPO / "tests" / "tiny_config.py"
RUN_MAIN = REPO / "tests" / "run_main.py"
# The mmseg fixture models (../shared/fixtures/mmseg/models): name -> (dataset, head).
FIXTURE_MODELS = {"fcn_drive": ("drive", "fcn"), "pspnet_drive": ("drive", "pspnet"),
                  "deeplabv3_drive": ("drive", "deeplabv3"),
                  "fcn_cityscapes": ("cityscapes", "fcn")}


def require_shared(path: Path) -> Path:
    """Return `path` if it exists; otherwise skip, or fail when UNET_JAX_REQUIRE_SHARED_DATA=1 (CI)."""
    if path.exists():
        return path
    msg = f"{path} is absent: the shared data/fixtures folder must sit beside the repository"
    if os.environ.get("UNET_JAX_REQUIRE_SHARED_DATA") == "1":
        pytest.fail(msg + " (UNET_JAX_REQUIRE_SHARED_DATA=1)")
    pytest.skip(msg)


def pytest_configure(config: pytest.Config) -> None:
    """One XLA compilation cache for the session (in-process tests and CLI subprocesses), so a
    program compiled by one test is not compiled again by the next (CI: cold at the start), and
    the suite's XLA flags (TEST_XLA_FLAGS)."""
    cache = getattr(config, "cache", None)
    folder = (cache.mkdir("unet_jax_jax_cache") if cache is not None
              else Path(tempfile.mkdtemp(prefix="unet_jax_jax_cache_")))
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(folder))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    flags = os.environ.get("XLA_FLAGS", "")
    if TEST_XLA_FLAGS not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {TEST_XLA_FLAGS}".strip()
    from unet_jax.cli.common import use_cpu_xla_flags
    use_cpu_xla_flags()  # as the command lines compile, in-process and in every subprocess


# The slowest files, slowest first (a cold run's --durations summed per file). pytest-xdist hands
# whole files (--dist loadfile) to the two workers in collection order, one as each finishes, so
# a long file collected last would run alone at the end while the other worker idles; started
# first, the short files fill in around it.
SLOW_FIRST = ("test_models.py", "test_parallel.py", "test_reliability.py", "test_buckets.py",
              "test_train.py", "test_pipeline.py", "test_train_step_float32.py",
              "test_export.py", "test_data_builders.py", "test_train_step.py",
              "test_gpu_report.py", "test_cli.py", "test_inference.py", "test_predict.py",
              "test_folder_dataset.py", "test_losses.py", "test_unet2015.py",
              "test_loss_options.py", "test_evaluate.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Collect the SLOW_FIRST files first, in that order (the rest, and each file's own tests,
    keep pytest's order)."""
    rank = {name: k for k, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FIRST)))


# ------------------------------------------------------------------------------ configs
def tiny_config(spec: str | Path = TINY, overrides: dict[str, Any] | None = None):
    """The one tiny-config builder.

    `tests/tiny_config.py` (default): synthetic 64 x 64 images, base_channels 4, 6 steps of
    batch 2 (the training tests). A zoo config `configs/<dataset>.py[:arg]`: the model at the
    mmseg fixtures' widths (base 8; decode head 8 for FCN, 4 for PSP and ASPP). `overrides` map
    dotted fields to values, applied last.
    """
    from unet_jax.config import load_config, override

    spec = str(spec)
    config = load_config(spec if spec.startswith("/") else str(REPO / spec))
    if spec.startswith("configs/"):
        config.model.base_channels = 8
        config.model.head_channels = 8 if config.model.head == "fcn" else 4
    return override(config, overrides or {})


def fixture_model(name: str, *, pth_suffix: str = "", arg_suffix: str = "",
                  dtype: str = "float32"):
    """The one fixture-model loader: (config, eval-mode model) of models/<name><pth_suffix>.pth.

    `dtype` is the model's compute dtype ("float64" needs jax_enable_x64).
    """
    from unet_jax.models import build_model
    from unet_jax.models.mmseg import extract_state_dict, load_state_dict
    from unet_jax.io.pth import load_pth

    dataset, head = FIXTURE_MODELS[name]
    config = tiny_config(f"configs/{dataset}.py:{head}{arg_suffix}", {"model.dtype": dtype})
    model = build_model(config.model)
    path = require_shared(FIXTURES / "models" / f"{name}{pth_suffix}.pth")
    load_state_dict(model, extract_state_dict(load_pth(path), path), source=str(path))
    model.eval()
    return config, model


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture
def fixtures_dir() -> Path:
    """../shared/fixtures/mmseg, or skip/fail."""
    return require_shared(FIXTURES)


@pytest.fixture
def data_dir() -> Path:
    """../shared/data, or skip/fail."""
    return require_shared(DATA)


@pytest.fixture
def x64():
    """64-bit JAX for one test (float64 models); the previous setting is restored afterwards."""
    import jax

    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", previous)


@pytest.fixture(scope="session")
def run_env(tmp_path_factory) -> dict[str, str]:
    """Environment for CLI subprocesses, with the tiny synthetic data prepared once."""
    from unet_jax import data

    root = tmp_path_factory.mktemp("train_env")
    data.prepare(tiny_config(TINY, {"data.tfds_data_dir": str(root / "tfds")}).data)
    env = dict(os.environ)
    env.update(UNET_JAX_TEST_TFDS=str(root / "tfds"), JAX_PLATFORMS="cpu",
               TF_CPP_MIN_LOG_LEVEL="3")
    env["XLA_FLAGS"] = TEST_XLA_FLAGS
    from unet_jax.cli.common import use_cpu_xla_flags
    use_cpu_xla_flags(env)
    env.pop("UNET_JAX_TEST_SIGNAL_AT", None)
    return env


@pytest.fixture
def train_config(run_env):
    """`make(**train)`: the tiny training config on the prepared data, train.* overridden."""
    def make(**train: Any):
        overrides = {"data.tfds_data_dir": run_env["UNET_JAX_TEST_TFDS"]}
        overrides.update({f"train.{k}": v for k, v in train.items()})
        return tiny_config(TINY, overrides)
    return make


# ------------------------------------------------------------------------------ the CLI
def run_cli(env: dict[str, str], workdir: Path, *flags: str, signal_at: str = "",
            timeout: float = 300) -> subprocess.CompletedProcess:
    """`python tests/run_main.py --config tests/tiny_config.py --workdir W FLAGS...`, in a
    process group of its own (as a terminal starts a command; `signal_at` may signal the group)."""
    env = dict(env)
    if signal_at:
        env["UNET_JAX_TEST_SIGNAL_AT"] = signal_at
    cmd = [sys.executable, str(RUN_MAIN), f"--config={TINY}", f"--workdir={workdir}",
           "--jax_cache_dir=", *flags]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout, start_new_session=True)


@contextlib.contextmanager
def small_disk(tmp_path: Path, options: str = "size=64k"):
    """A tmpfs mounted at `tmp_path/disk` for the block (root only; skips where mounting is not
    allowed), unmounted afterwards: full-disk and read-only tests."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def read_metrics(workdir: Path) -> list[dict]:
    """The records of `<workdir>/metrics.jsonl`."""
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def checkpoint_steps(workdir: Path) -> list[int]:
    """The committed periodic checkpoint steps of `workdir`, ascending."""
    return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def check_argmax(pred, ref_logits_chw, ref_pred, atol):
    """Argmax equal to mmseg's wherever mmseg's two top logits are more than 2 x `atol` apart:
    within the logits' error bound a pixel may legitimately flip; elsewhere it may not."""
    import numpy as np

    top2 = np.sort(ref_logits_chw, axis=0)[-2:]
    near_tie = (top2[1] - top2[0]) <= 2 * atol
    flipped = np.asarray(pred) != ref_pred
    assert not (flipped & ~near_tie).any(), (
        f"{int((flipped & ~near_tie).sum())} argmax flips away from near-ties")


# ------------------------------------------------------------------------------ processes
def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (for a JAX coordinator)."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_together(jobs: list[tuple[list[str], dict[str, str], Path]], timeout: float = 300
                 ) -> list[str]:
    """Start every (command, env, cwd) at once (the processes of one multi-process run), wait
    for all, kill what is left on a timeout; asserts each exited 0; their stdouts."""
    procs = [subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for cmd, env, cwd in jobs]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=timeout))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    return [out for out, _ in outputs]
