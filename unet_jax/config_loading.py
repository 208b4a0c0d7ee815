"""Load `configs/<name>.py[:arg]` files outside absl (tests, scripts) with dotted overrides."""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import ml_collections


def load_config(spec: str, overrides: dict[str, Any] | None = None) -> ml_collections.ConfigDict:
    """`spec` is "path/to/config.py[:arg]"; overrides map dotted names to values."""
    path, _, arg = spec.partition(":")
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"config file {file} does not exist (expected e.g. configs/drive.py)")
    module_spec = importlib.util.spec_from_file_location(f"unet_jax_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise AttributeError(f"{file} defines no get_config(arg)")
    config = module.get_config(arg) if arg else module.get_config()
    for dotted, value in (overrides or {}).items():
        node = config
        *parents, leaf = dotted.split(".")
        for name in parents:
            node = node[name]
        node[leaf] = value
    return config
