"""Read PyTorch `.pth` checkpoints without torch and without running code from the file.

A `.pth` is a zip holding `data.pkl` plus one raw file per tensor storage. We unpickle
`data.pkl` with a strict allowlist: tensors, OrderedDict, numpy scalars/arrays and inert
stand-ins for mmengine's logging objects (what mmseg 0.x and 1.x checkpoints contain).
Any other global (os.system, eval, ...) stops the load with `UnsafeCheckpointError`
before it can run.
"""
from __future__ import annotations

import collections
import io
import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from unet_jax.errors import CheckpointError, UnsafeCheckpointError

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
    "BFloat16Storage": "bfloat16",
}


class CheckpointFormatError(CheckpointError):
    """The file is not a readable torch zip checkpoint."""


class _Stub:
    """Inert stand-in for an allowlisted non-tensor class (e.g. mmengine HistoryBuffer)."""

    _qualname = "stub"

    def __init__(self, *args: Any, **kwargs: Any):
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<{self._qualname} (not loaded)>"


def _stub_class(module: str, name: str) -> type:
    return type(name, (_Stub,), {"_qualname": f"{module}.{name}"})


_STUBBED = {
    ("mmengine.logging.history_buffer", "HistoryBuffer"),
    ("mmengine.logging.message_hub", "MessageHub"),
    ("mmengine.config.config", "ConfigDict"),
}


def _safe_getattr(obj: Any, name: str) -> Any:
    """`getattr` limited to stub classes (mmengine pickles `HistoryBuffer.min` this way)."""
    if isinstance(obj, type) and issubclass(obj, _Stub):
        return f"{obj._qualname}.{name}"
    raise UnsafeCheckpointError(
        f"refused as unsafe: getattr on {type(obj).__name__!r} is not allowed")


def _safe_encode(text: str, encoding: str = "utf-8") -> bytes:
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8"):
        raise UnsafeCheckpointError(f"refused as unsafe: _codecs.encode({encoding!r})")
    return text.encode(encoding)


def _rebuild_tensor(storage: np.ndarray, offset: int, size: tuple, stride: tuple,
                    *_: Any) -> np.ndarray:
    """Rebuild a (possibly strided) tensor view over a flat storage as a numpy array."""
    if len(size) == 0:
        return np.array(storage[offset])
    itemsize = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage[offset:], shape=tuple(size), strides=tuple(s * itemsize for s in stride))
    return np.array(view)


class _StorageType:
    def __init__(self, name: str):
        self.name = name


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, zf: zipfile.ZipFile, prefix: str, path: Path):
        super().__init__(io.BytesIO(data))
        self._zf, self._prefix, self._path = zf, prefix, path
        self._stubs: dict[tuple[str, str], type] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return lambda data, requires_grad=False, hooks=None: data
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name in (
                "_reconstruct", "scalar"):
            return getattr(np._core.multiarray, name) if hasattr(np, "_core") else getattr(
                np.core.multiarray, name)
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        if module == "numpy.dtypes" and name.endswith("DType"):
            return getattr(np.dtypes, name)
        if (module, name) in (("__builtin__", "getattr"), ("builtins", "getattr")):
            return _safe_getattr
        if (module, name) in (("__builtin__", "set"), ("builtins", "set")):
            return set
        if (module, name) == ("_codecs", "encode"):
            return _safe_encode
        if (module, name) in _STUBBED:
            return self._stubs.setdefault((module, name), _stub_class(module, name))
        raise UnsafeCheckpointError(
            f"{self._path}: refused as unsafe: the checkpoint references {module}.{name}, "
            f"which is not on the allowlist of tensor/numpy/mmengine-logging types; "
            f"nothing from the file was executed")

    def persistent_load(self, pid: Any) -> np.ndarray:
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise UnsafeCheckpointError(f"{self._path}: refused as unsafe: persistent id {pid!r}")
        storage_type, key = pid[1], str(pid[2])
        name = storage_type.name if isinstance(storage_type, _StorageType) else None
        if name not in _STORAGE_DTYPES:
            raise CheckpointFormatError(f"{self._path}: unsupported storage type {storage_type!r}")
        raw = self._zf.read(f"{self._prefix}data/{key}")
        dtype = _STORAGE_DTYPES[name]
        if dtype == "bfloat16":
            u16 = np.frombuffer(raw, np.uint16).astype(np.uint32) << 16
            return u16.view(np.float32)
        return np.frombuffer(raw, dtype)


def load_pth(path: str | Path) -> Any:
    """Load a torch zip checkpoint into Python objects with numpy arrays in place of tensors."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile as err:
        raise CheckpointFormatError(
            f"{path}: not a torch zip checkpoint (expected a zip with <name>/data.pkl, as "
            f"torch.save writes since torch 1.6): {err}") from err
    with zf:
        pkls = [n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pkls) != 1:
            raise CheckpointFormatError(
                f"{path}: expected exactly one data.pkl in the zip, found {pkls}")
        prefix = pkls[0][: -len("data.pkl")]
        return _RestrictedUnpickler(zf.read(pkls[0]), zf, prefix, path).load()
