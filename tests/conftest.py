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
