"""Shared test helpers: where ../shared lives and how tests that need it skip or fail."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("UNET_JAX_SHARED", REPO.parent / "shared"))
FIXTURES = SHARED / "fixtures" / "mmseg"
DATA = SHARED / "data"


def require_shared(path: Path) -> Path:
    """Return `path` if it exists; otherwise skip, or fail when UNET_JAX_REQUIRE_SHARED_DATA=1 (CI)."""
    if path.exists():
        return path
    msg = f"{path} is absent: the shared data/fixtures folder must sit beside the repository"
    if os.environ.get("UNET_JAX_REQUIRE_SHARED_DATA") == "1":
        pytest.fail(msg + " (UNET_JAX_REQUIRE_SHARED_DATA=1)")
    pytest.skip(msg)


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
def run_env(tmp_path_factory, request) -> dict[str, str]:
    """Environment for CLI subprocesses: prepared tiny data and a shared compilation cache."""
    root = tmp_path_factory.mktemp("train_env")
    # XLA compilations are cached across sessions in .pytest_cache (first session: cold).
    cache = getattr(request.config, "cache", None)
    jax_cache = cache.mkdir("unet_jax_jax_cache") if cache is not None else root / "jax_cache"
    from train_helpers import tiny_config
    from unet_jax import data

    data.prepare(tiny_config(root / "tfds").data)
    env = dict(os.environ)
    env.update(UNET_JAX_TEST_TFDS=str(root / "tfds"),
               JAX_COMPILATION_CACHE_DIR=str(jax_cache),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    env.pop("XLA_FLAGS", None)
    env.pop("UNET_JAX_TEST_SIGNAL_AT", None)
    return env
