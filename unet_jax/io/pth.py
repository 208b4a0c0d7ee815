"""Read PyTorch `.pth` checkpoints without torch, without running code from the file, and within
a memory budget.

A `.pth` is a zip holding `data.pkl` plus one raw file per tensor storage. `data.pkl` is
unpickled by the pure-Python unpickler with a strict allowlist: tensors, OrderedDict, plain
numpy scalars/arrays and inert stand-ins for mmengine's logging objects (what mmseg 0.x and 1.x
checkpoints contain). Any other global (os.system, eval, ...) stops the load with
`UnsafeCheckpointError` before it can run.

The file is untrusted input, so nothing in it is believed before it is checked:

* every storage is a plain numeric type, its zip member is read once (tensors sharing it are
  views) and its declared size is charged to the budget before it is decompressed;
* every tensor's offset, size and stride are checked against its storage before any view is
  made; a tensor that is not a plain contiguous slice is copied, and the copy is charged too;
* `data.pkl` is limited in size, in opcodes and in tuple nesting (hashing a deep tuple
  overflows the C stack); `BUILD` may only set the state of stubs, OrderedDict attributes and
  numpy's own array/dtype states (a crafted dtype state makes numpy read bytes as pointers);
* the loaded data may not contain reference cycles, nest deeper than `MAX_DEPTH`, or use shared
  references to expand far beyond its own size (a "billion laughs" that `str()` would blow up).

A malformed file ends in one `CheckpointError` line naming the file and what is wrong.
"""
from __future__ import annotations

import collections
import io
import itertools
import math
import pickle
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from unet_jax.errors import CheckpointError, UnsafeCheckpointError, one_line

DEFAULT_MAX_BYTES = 2 << 30
"""Default `load_pth(max_bytes=...)`: bytes one load may allocate for data.pkl, the storages and
copies of non-contiguous tensors."""
MAX_PICKLE_BYTES = 64 << 20
"""Largest `data.pkl` accepted (mmseg checkpoints have well under 1 MiB)."""
MAX_PICKLE_OPS = 1_000_000
"""Most pickle opcodes executed (mmseg 1.x checkpoints run about 55 per tensor)."""
MAX_DEPTH = 100
"""Deepest nesting of containers in the loaded data."""
MAX_SHARING = 8
EXPANSION_FLOOR = 64 << 20
"""Shared references may expand the data (as `str()` would print it) at most `MAX_SHARING`-fold,
or to `EXPANSION_FLOOR` characters, whichever is more."""

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
    "BFloat16Storage": "bfloat16",
}
_NUMPY_KINDS = "biufcSU"  # bool, integers, floats, complex, fixed-size strings: no objects
_NUMPY_DTYPE_CLASSES = {type(np.dtype(c)).__name__ for c in "?bhilqBHILQefdgFDGSU"}
_NESTING_OPS = {op[0] for op in (pickle.TUPLE, pickle.TUPLE1, pickle.TUPLE2, pickle.TUPLE3,
                                 pickle.FROZENSET)}
_CHUNK = 1 << 20


def max_bytes_for(weight_bytes: int) -> int:
    """A `max_bytes` for a checkpoint expected to hold about `weight_bytes` of weights.

    4x leaves room for an optimizer state (momentum, Adam moments) beside the weights, 64 MiB for
    metadata and small tensors. E.g. `load_pth(path, max_bytes=max_bytes_for(4 * num_params))`.
    """
    return 4 * int(weight_bytes) + (64 << 20)


class CheckpointFormatError(CheckpointError):
    """The file is not a readable torch zip checkpoint."""


def _clip(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


class _Budget:
    """Bytes a load may still allocate for storages and tensor copies."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0

    def take(self, nbytes: int, what: str) -> None:
        if self.used + nbytes > self.limit:
            raise CheckpointFormatError(
                f"{what} needs {nbytes} bytes, which would bring this load over "
                f"max_bytes={self.limit} ({self.used} bytes already used); if the checkpoint is "
                f"genuine, pass a larger max_bytes to load_pth")
        self.used += nbytes


def _read_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, budget: _Budget) -> bytearray:
    """One zip member, its declared size charged before decompression and enforced during it."""
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise CheckpointFormatError(f"{info.filename}: compression method {info.compress_type} is "
                                    "not supported (torch stores members uncompressed)")
    budget.take(info.file_size, f"{info.filename} (declared size)")
    data = bytearray()
    try:
        with zf.open(info) as f:
            while chunk := f.read(_CHUNK):
                data += chunk
                if len(data) > info.file_size:
                    raise CheckpointFormatError(
                        f"{info.filename} inflates beyond its declared {info.file_size} bytes")
    except (zipfile.BadZipFile, EOFError, zlib.error, NotImplementedError, RuntimeError) as err:
        raise CheckpointFormatError(f"{info.filename} cannot be read from the zip "
                                    f"({type(err).__name__}: {_clip(one_line(err))})") from err
    if len(data) != info.file_size:
        raise CheckpointFormatError(f"{info.filename} holds {len(data)} bytes, its zip entry "
                                    f"declares {info.file_size}")
    return data


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
    if isinstance(obj, type) and issubclass(obj, _Stub) and isinstance(name, str):
        return f"{obj._qualname}.{name}"
    raise UnsafeCheckpointError(
        f"refused as unsafe: getattr on {type(obj).__name__!r} is not allowed")


def _safe_encode(text: str, encoding: str = "utf-8") -> bytes:
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1", "utf-8"):
        raise UnsafeCheckpointError(f"refused as unsafe: _codecs.encode({_clip(repr(encoding))})")
    return text.encode(encoding)


def _safe_set(items: Any = ()) -> set:
    """`set(list)` as protocol-2 pickles write it (iterating a huge tensor is not allowed)."""
    if type(items) not in (list, tuple):
        raise CheckpointFormatError(f"set() of a {type(items).__name__}")
    return set(items)


def _rebuild_parameter(data: Any, requires_grad: Any = False, hooks: Any = None) -> Any:
    return data


def _np_scalar(dtype: Any, data: Any = None) -> Any:
    if not (isinstance(dtype, np.dtype) and dtype.kind in _NUMPY_KINDS and type(data) is bytes):
        raise CheckpointFormatError("a numpy scalar that is not of a plain numeric dtype")
    return np.frombuffer(data, dtype, count=1)[0]


def _is_index(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _is_contiguous(size: tuple, stride: tuple) -> bool:
    expected = 1
    for n, s in zip(reversed(size), reversed(stride)):
        if n != 1 and s != expected:
            return False
        expected *= n
    return True


class _StorageType:
    def __init__(self, name: str):
        self.name = name

    def __repr__(self) -> str:
        return f"torch.{self.name}"


_NDARRAY = object()  # what `numpy.ndarray` unpickles to: only `_reconstruct` accepts it


class _Dispatch(dict):
    def __missing__(self, code: int) -> Any:
        raise pickle.UnpicklingError(f"invalid pickle opcode {code:#04x}")


class _Unpickler(pickle._Unpickler):  # the Python unpickler: each opcode can be checked
    def __init__(self, data: bytearray, zf: zipfile.ZipFile, prefix: str, budget: _Budget):
        super().__init__(io.BytesIO(data))
        self._zf, self._prefix, self._budget = zf, prefix, budget
        self._stubs: dict[tuple[str, str], type] = {}
        self._storages: dict[str, tuple[str, np.ndarray]] = {}  # member -> (type, array)
        self._storage_of: dict[int, str] = {}  # id(array) -> member, to recognise our storages
        self._fresh: dict[int, Any] = {}  # numpy objects made here, awaiting their one BUILD
        self._nested: dict[int, tuple[int, Any]] = {}  # id -> (depth, tuple) when depth > 1
        self._ops = self._tensors = 0

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return self._rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if module in ("numpy.core.multiarray", "numpy._core.multiarray"):
            if name == "_reconstruct":
                return self._np_reconstruct
            if name == "scalar":
                return _np_scalar
        if module == "numpy" and name == "ndarray":
            return _NDARRAY
        if module == "numpy" and name == "dtype":
            return self._np_dtype
        if module == "numpy.dtypes" and name in _NUMPY_DTYPE_CLASSES:
            return getattr(np.dtypes, name)
        if (module, name) in (("__builtin__", "getattr"), ("builtins", "getattr")):
            return _safe_getattr
        if (module, name) in (("__builtin__", "set"), ("builtins", "set")):
            return _safe_set
        if (module, name) == ("_codecs", "encode"):
            return _safe_encode
        if (module, name) in _STUBBED:
            return self._stubs.setdefault((module, name), _stub_class(module, name))
        raise UnsafeCheckpointError(
            f"refused as unsafe: the checkpoint references {_clip(f'{module}.{name}')}, "
            f"which is not on the allowlist of tensor/numpy/mmengine-logging types; "
            f"nothing from the file was executed")

    def persistent_load(self, pid: Any) -> np.ndarray:
        """The storage a persistent id names, read from the zip once and shared after that."""
        if not (type(pid) is tuple and len(pid) == 5 and pid[0] == "storage"):
            raise CheckpointFormatError(f"unexpected persistent id {_clip(repr(pid))} (expected "
                                        "('storage', type, key, location, numel))")
        _, storage_type, key, _, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise CheckpointFormatError(f"storage type {_clip(repr(storage_type))} is not one of "
                                        f"torch's numeric storages {sorted(_STORAGE_DTYPES)}")
        if type(key) not in (str, int) or not _is_index(numel) or numel < 0:
            raise CheckpointFormatError(f"malformed storage reference {_clip(repr(pid))}")
        member = f"{self._prefix}data/{key}"
        if member in self._storages:
            name, array = self._storages[member]
            if name != storage_type.name:
                raise CheckpointFormatError(
                    f"storage {member} is referenced both as {name} and as {storage_type.name}")
            return array
        try:
            info = self._zf.getinfo(member)
        except KeyError:
            raise CheckpointFormatError(f"storage {member} is missing from the zip") from None
        dtype = _STORAGE_DTYPES[storage_type.name]
        itemsize = 2 if dtype == "bfloat16" else np.dtype(dtype).itemsize
        if info.file_size != numel * itemsize:
            raise CheckpointFormatError(
                f"storage {member} holds {info.file_size} bytes, but the checkpoint declares "
                f"{numel} elements of {itemsize} bytes")
        raw = _read_member(self._zf, info, self._budget)
        if dtype == "bfloat16":
            self._budget.take(2 * len(raw), f"storage {member} (bfloat16 as float32)")
            array = (np.frombuffer(raw, np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            array = np.frombuffer(raw, dtype)
        self._storages[member] = (storage_type.name, array)
        self._storage_of[id(array)] = member
        return array

    def _rebuild_tensor(self, storage: Any, offset: Any, size: Any, stride: Any,
                        *_: Any) -> np.ndarray:
        """A tensor over a storage: checked against it, then a view (contiguous) or a copy."""
        self._tensors += 1
        what = f"tensor #{self._tensors}{self._nearest_key()}"
        member = self._storage_of.get(id(storage))
        if member is None:
            raise CheckpointFormatError(f"{what}: its storage is not a storage from the zip")
        what += f" (storage {member})"
        if not (_is_index(offset) and type(size) is tuple and type(stride) is tuple
                and len(size) == len(stride) <= 32
                and all(_is_index(v) for v in size + stride)):
            raise CheckpointFormatError(
                f"{what}: offset, size and stride must be integers and tuples of integers of one "
                f"length, found {_clip(repr((offset, size, stride)))}")
        offset, size, stride = int(offset), tuple(map(int, size)), tuple(map(int, stride))
        if offset < 0 or min(size + stride, default=0) < 0:
            raise CheckpointFormatError(f"{what}: negative offset, size or stride "
                                        f"(offset {offset}, size {size}, stride {stride})")
        itemsize, numel = storage.dtype.itemsize, math.prod(size)
        if numel == 0:  # no element to check, but numpy must be able to make the shape
            if offset > storage.size or math.prod(max(n, 1) for n in size) * itemsize >> 62:
                raise CheckpointFormatError(f"{what}: empty tensor of size {_clip(str(size))} "
                                            f"at offset {offset} of {storage.size} elements")
            return np.zeros(size, storage.dtype)
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= storage.size:
            raise CheckpointFormatError(
                f"{what}: size {size} with stride {stride} from offset {offset} reaches element "
                f"{last}, beyond the storage's {storage.size} elements")
        span = storage[offset:last + 1]
        if _is_contiguous(size, stride):
            return span.reshape(size)
        self._budget.take(numel * itemsize, f"{what}: a copy of size {size}, stride {stride}")
        view = np.lib.stride_tricks.as_strided(  # inside `span`: checked above
            span, shape=size, strides=tuple(s * itemsize for s in stride), writeable=False)
        return view.copy()

    def _nearest_key(self) -> str:
        """The dict key the tensor being built will be stored under, when the stack shows it."""
        frames = itertools.chain(itertools.islice(reversed(self.stack), 1, None),
                                 *map(reversed, reversed(self.metastack)))
        for item in itertools.islice(frames, 3):
            if isinstance(item, str):
                return f" {_clip(repr(item), 80)}"
        return ""

    def _np_reconstruct(self, cls: Any, shape: Any, typecode: Any) -> np.ndarray:
        """`numpy.core.multiarray._reconstruct(ndarray, (0,), b'b')`, as numpy pickles arrays."""
        if not (cls is _NDARRAY and type(shape) is tuple and shape == (0,)
                and type(typecode) is bytes and typecode == b"b"):
            raise CheckpointFormatError("a numpy array pickled with unexpected arguments")
        array = np.empty(0, np.int8)
        self._fresh[id(array)] = array
        return array

    def _np_dtype(self, spec: Any, align: Any = False, copy: Any = True) -> np.dtype:
        """A fresh plain numeric or string dtype (never numpy's shared singleton)."""
        dtype = np.dtype(spec, copy=True) if type(spec) is str else None
        if dtype is None or dtype.kind not in _NUMPY_KINDS or dtype.fields or dtype.subdtype:
            raise CheckpointFormatError(f"numpy dtype {_clip(repr(spec))} is not a plain "
                                        "numeric or string dtype")
        self._fresh[id(dtype)] = dtype
        return dtype

    def _load_build(self) -> None:
        """BUILD, limited to stubs, OrderedDict attributes and numpy's own array/dtype states."""
        state, inst = self.stack[-1], self.stack[-2]
        fresh = self._fresh.pop(id(inst), None) is inst
        if not (isinstance(inst, _Stub)
                or (type(inst) is collections.OrderedDict and type(state) is dict)
                or (fresh and _is_numpy_state(inst, state))):
            raise UnsafeCheckpointError(
                f"refused as unsafe: the pickle sets the state of a {type(inst).__name__} "
                f"to a {type(state).__name__}")
        pickle._Unpickler.load_build(self)

    def _count_op(self) -> None:
        self._ops += 1
        if self._ops > MAX_PICKLE_OPS:
            raise CheckpointFormatError(f"data.pkl runs more than {MAX_PICKLE_OPS} opcodes")

    def _note_nesting(self, obj: Any) -> None:
        """Refuse tuples/frozensets nested deeper than MAX_DEPTH: hashing them recurses in C."""
        depth = 1 + max((self._nesting(item) for item in obj), default=0)
        if depth > MAX_DEPTH:
            raise CheckpointFormatError(f"data.pkl nests tuples more than {MAX_DEPTH} deep")
        if depth > 1:
            self._nested[id(obj)] = (depth, obj)

    def _nesting(self, item: Any) -> int:
        # Every tuple on the stack was made by a tuple opcode (and noted) or is flat.
        if type(item) not in (tuple, frozenset):
            return 0
        known = self._nested.get(id(item))
        return known[0] if known is not None and known[1] is item else 1


def _is_numpy_state(inst: Any, state: Any) -> bool:
    """Whether `state` is what numpy itself pickles for the fresh dtype or array `inst`."""
    if isinstance(inst, np.dtype):
        ref = np.dtype(inst.str).__reduce__()[2]
        return (type(state) is tuple and len(state) == len(ref) and state[2:] == ref[2:]
                and (state[1] == ref[1] or {state[1], ref[1]} <= {"<", ">"}))
    return (isinstance(inst, np.ndarray) and type(state) is tuple and len(state) == 5
            and state[0] == 1 and type(state[1]) is tuple and all(map(_is_index, state[1]))
            and isinstance(state[2], np.dtype) and state[2].kind in _NUMPY_KINDS
            and not state[2].hasobject and type(state[4]) is bytes)


def _guarded(code: int, handler: Any) -> Any:
    nests = code in _NESTING_OPS

    def run(self: _Unpickler) -> None:
        self._count_op()
        handler(self)
        if nests:
            self._note_nesting(self.stack[-1])
    return run


_Unpickler.dispatch = _Dispatch(
    {code: _guarded(code, _Unpickler._load_build if code == pickle.BUILD[0] else handler)
     for code, handler in pickle._Unpickler.dispatch.items()})


def _children(obj: Any) -> Any:
    """What `str(obj)` would descend into, or None for a leaf."""
    if isinstance(obj, dict):
        items = itertools.chain.from_iterable(obj.items())
        return itertools.chain(items, vars(obj).values()) if hasattr(obj, "__dict__") else items
    if isinstance(obj, (list, tuple, set, frozenset)):
        return iter(obj)
    if isinstance(obj, _Stub):
        return iter(vars(obj).values())
    return None


def _leaf_size(obj: Any) -> int:
    """About how many characters `str(obj)` prints."""
    if isinstance(obj, (str, bytes, bytearray)):
        return len(obj) + 3
    if isinstance(obj, np.ndarray):
        return 8 * min(obj.size, 1000) + 32
    if isinstance(obj, int):
        return 2 + obj.bit_length() // 3
    return 16


def _check_structure(root: Any) -> None:
    """Refuse reference cycles, nesting deeper than MAX_DEPTH and amplifying shared references.

    One iterative pass over the distinct objects: each finished object's expanded size (as
    `str()` would print it, every shared reference in full) is remembered, so a "billion laughs"
    costs its number of distinct objects here, not its expansion.
    """
    sizes: dict[int, int] = {}  # id -> expanded size of a finished object (all kept alive by root)
    on_path: set[int] = set()  # containers being expanded: meeting one again is a cycle
    distinct = 0  # the same total with every object counted once
    frames: list[list[Any]] = [[None, iter((root,)), 0]]  # [container, children, size so far]
    while True:
        frame = frames[-1]
        child = next(frame[1], frames)  # `frames` marks the end
        if child is frames:
            if len(frames) == 1:
                break
            frames.pop()
            on_path.discard(id(frame[0]))
            sizes[id(frame[0])] = frame[2]
            frames[-1][2] += frame[2]
            continue
        key = id(child)
        if key in sizes:
            frame[2] += 2 + sizes[key]
            distinct += 2
            continue
        if key in on_path:
            raise CheckpointFormatError("the checkpoint's data contains a reference cycle")
        children = _children(child)
        if children is None:
            sizes[key] = _leaf_size(child)
            frame[2] += 2 + sizes[key]
            distinct += 2 + sizes[key]
            continue
        if len(frames) > MAX_DEPTH:
            raise CheckpointFormatError(f"the checkpoint's data nests more than {MAX_DEPTH} deep")
        on_path.add(key)
        distinct += 4
        frames.append([child, children, 2])
    expanded = frames[0][2]
    if expanded > max(EXPANSION_FLOOR, MAX_SHARING * distinct):
        raise CheckpointFormatError(
            f"shared references expand the checkpoint's data about {expanded // distinct}-fold "
            f"(more than {MAX_SHARING}-fold, to about {_clip(str(expanded), 24)} characters): "
            f"a 'billion laughs' structure")


def _load(zf: zipfile.ZipFile, budget: _Budget) -> Any:
    pkls = [n for n in zf.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
    if len(pkls) != 1:
        raise CheckpointFormatError(
            f"expected exactly one data.pkl in the zip, found {len(pkls)} {_clip(str(pkls))}")
    prefix = pkls[0][: -len("data.pkl")]
    info = zf.getinfo(pkls[0])
    if info.file_size > MAX_PICKLE_BYTES:
        raise CheckpointFormatError(f"{info.filename} declares {info.file_size} bytes, more than "
                                    f"the {MAX_PICKLE_BYTES} allowed for checkpoint metadata")
    if f"{prefix}byteorder" in zf.NameToInfo:
        order = zf.getinfo(f"{prefix}byteorder")
        if order.file_size > 16 or bytes(_read_member(zf, order, budget)).strip() != b"little":
            raise CheckpointFormatError("only little-endian checkpoints are supported "
                                        f"(see {order.filename})")
    try:
        return _Unpickler(_read_member(zf, info, budget), zf, prefix, budget).load()
    except CheckpointError:
        raise
    except (EOFError, struct.error):  # an opcode or its argument cut short
        raise CheckpointFormatError(f"{info.filename} is truncated: the pickle ends before its "
                                    "STOP opcode") from None
    except Exception as err:  # noqa: BLE001 - bad opcodes or arguments, whatever the bytes say
        raise CheckpointFormatError(f"{info.filename} is not a valid checkpoint pickle "
                                    f"({type(err).__name__}: {_clip(one_line(err), 200)})") from err


def load_pth(path: str | Path, *, max_bytes: int | None = None) -> Any:
    """Load a torch zip checkpoint into Python objects with numpy arrays in place of tensors.

    `max_bytes` (default `DEFAULT_MAX_BYTES`, 2 GiB) bounds what the load allocates: the
    decompressed storages (each read once) plus copies of non-contiguous tensors; contiguous
    tensors are views of their storage. A well-formed checkpoint needs about its file size. A
    caller that knows the model can pass `max_bytes_for(weight_bytes)`. Everything wrong with the
    file (not a zip, truncated, malformed pickle, tensors outside their storage, a budget
    exceeded) raises one `CheckpointError` naming the file; code references outside the
    allowlist raise `UnsafeCheckpointError` before anything runs.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    budget = _Budget(DEFAULT_MAX_BYTES if max_bytes is None else int(max_bytes))
    try:
        zf = zipfile.ZipFile(path)
    except Exception as err:  # noqa: BLE001 - BadZipFile, OSError, a malformed directory...
        raise CheckpointFormatError(
            f"{path}: not a torch zip checkpoint (expected a zip with <name>/data.pkl, as "
            f"torch.save writes since torch 1.6): {_clip(one_line(err))}") from err
    try:
        with zf:
            obj = _load(zf, budget)
        _check_structure(obj)
    except CheckpointError as err:
        raise type(err)(f"{path}: {one_line(err)}") from None
    except Exception as err:  # noqa: BLE001 - whatever else the file's bytes provoke
        raise CheckpointFormatError(
            f"{path}: malformed checkpoint ({type(err).__name__}: "
            f"{_clip(one_line(err), 200)})") from err
    return obj
