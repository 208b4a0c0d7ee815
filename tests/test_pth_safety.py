"""Malformed and malicious .pth files, written with the stdlib only (zipfile + pickle opcodes).

Each is refused by `load_pth` with one `CheckpointError` line naming the file; one subprocess
loads the whole corpus and checks that memory stays bounded and the process exits normally.
"""
from __future__ import annotations

import json
import os
import pickle
import struct
import subprocess
import sys
import textwrap
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest

from conftest import FIXTURES, REPO
from unet_jax.errors import CheckpointError, UnsafeCheckpointError
from unet_jax.io.pth import load_pth

# ----------------------------------------------------------------------------------------------
# A tiny pickle writer: the opcodes torch.save uses, with globals named freely.


class G:
    """A global reference `module.name` (GLOBAL opcode), importable or not."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name


class Call:
    """`func(*args)` (REDUCE)."""

    def __init__(self, func, *args):
        self.func, self.args = func, args


class Build:
    """`obj` with `state` set by BUILD."""

    def __init__(self, obj, state):
        self.obj, self.state = obj, state


class Pid:
    """A persistent id (BINPERSID): how torch refers to a storage."""

    def __init__(self, value):
        self.value = value


def dumps(obj) -> bytes:
    """Protocol-2 pickle of `obj`; lists, dicts and tuples referenced twice are memoised."""
    out, memo = [b"\x80\x02"], {}

    def put(x):
        memo[id(x)] = len(memo)
        out.append(b"r" + struct.pack("<I", memo[id(x)]))

    def emit(x):
        if id(x) in memo:
            out.append(b"j" + struct.pack("<I", memo[id(x)]))
        elif x is None or isinstance(x, bool):
            out.append({None: b"N", True: b"\x88", False: b"\x89"}[x])
        elif isinstance(x, int):
            if -2**31 <= x < 2**31:
                out.append(b"J" + struct.pack("<i", x))
            else:
                raw = x.to_bytes((x.bit_length() + 8) // 8, "little", signed=True)
                out.append(b"\x8a" + bytes([len(raw)]) + raw)
        elif isinstance(x, float):
            out.append(b"G" + struct.pack(">d", x))
        elif isinstance(x, str):
            raw = x.encode()
            out.append(b"X" + struct.pack("<I", len(raw)) + raw)
        elif isinstance(x, bytes):
            out.append(b"B" + struct.pack("<I", len(x)) + x)
        elif isinstance(x, tuple):
            out.append(b"(")
            for item in x:
                emit(item)
            out.append(b"t")
            put(x)
        elif isinstance(x, list):
            out.append(b"]")
            put(x)
            if x:
                out.append(b"(")
                for item in x:
                    emit(item)
                out.append(b"e")
        elif isinstance(x, dict):
            out.append(b"}")
            put(x)
            if x:
                out.append(b"(")
                for k, v in x.items():
                    emit(k)
                    emit(v)
                out.append(b"u")
        elif isinstance(x, G):
            out.append(f"c{x.module}\n{x.name}\n".encode())
        elif isinstance(x, Call):
            emit(x.func)
            emit(tuple(x.args))
            out.append(b"R")
        elif isinstance(x, Build):
            emit(x.obj)
            emit(x.state)
            out.append(b"b")
        elif isinstance(x, Pid):
            emit(x.value)
            out.append(b"Q")
        else:
            raise TypeError(type(x))

    emit(obj)
    return b"".join(out) + b"."


def tensor(key, size, stride, offset=0, storage="FloatStorage", numel=4):
    """A tensor over storage `archive/data/<key>` as torch pickles it."""
    pid = Pid(("storage", G("torch", storage), key, "cpu", numel))
    return Call(G("torch._utils", "_rebuild_tensor_v2"), pid, offset, size, stride, False,
                Call(G("collections", "OrderedDict")))


def np_array(values: np.ndarray, dtype_state=None):
    """A numpy array as numpy pickles it (_reconstruct, then BUILD with dtype and bytes)."""
    dtype = Call(G("numpy", "dtype"), values.dtype.str[1:], False, True)
    dtype = Build(dtype, dtype_state or (3, "<", None, None, None, -1, -1, 0))
    array = Call(G("numpy.core.multiarray", "_reconstruct"), G("numpy", "ndarray"), (0,), b"b")
    return Build(array, (1, values.shape, dtype, False, values.tobytes()))


FOUR_FLOATS = np.arange(4, dtype=np.float32).tobytes()


def write_pth(path: Path, obj, storages=None, pickled: bytes | None = None) -> Path:
    """A torch-style zip: archive/data.pkl, archive/byteorder and one member per storage."""
    storages = {"0": FOUR_FLOATS} if storages is None else storages
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", dumps(obj) if pickled is None else pickled)
        zf.writestr("archive/byteorder", "little")
        for key, raw in storages.items():
            zf.writestr(f"archive/data/{key}", raw)
        zf.writestr("archive/version", "3\n")
    return path


def raw_zip(path: Path, entries) -> Path:
    """A zip written byte by byte: (name, method, crc, declared size, payload) per member."""
    out, central = bytearray(), bytearray()
    for name, method, crc, size, payload in entries:
        name, offset = name.encode(), len(out)
        out += struct.pack("<4s5H3L2H", b"PK\x03\x04", 20, 0, method, 0, 0x21, crc,
                           len(payload), size, len(name), 0) + name + payload
        central += struct.pack("<4s6H3L5H2L", b"PK\x01\x02", 20, 20, 0, method, 0, 0x21, crc,
                               len(payload), size, len(name), 0, 0, 0, 0, 0, offset) + name
    out += central + struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, len(entries), len(entries),
                                 len(central), len(out), 0)
    path.write_bytes(bytes(out))
    return path


def zeros_deflated(mib: int) -> bytes:
    """A raw deflate stream of `mib` MiB of zeros, made in milliseconds (~1 KB per MiB)."""
    co = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = co.compress(bytes(1 << 20)) + co.flush(zlib.Z_FULL_FLUSH)  # independent block
    return block * mib + b"\x03\x00"  # + an empty final block


def stored(name: str, data: bytes):
    return (name, zipfile.ZIP_STORED, zlib.crc32(data), len(data), data)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ----------------------------------------------------------------------------------------------
# The corpus: name -> (what the error must say, how to write the file).

CASES: dict[str, tuple[str, object]] = {}


def case(name: str, fragment: str, obj=None, **kw) -> None:
    """A corpus file holding `obj` (or `pickled` bytes) with `write_pth`."""
    CASES[name] = (fragment, lambda path: write_pth(path, obj, **kw))


def raw_case(name: str, fragment: str):
    """A corpus file written by the decorated function."""
    def register(write):
        CASES[name] = (fragment, write)
        return write
    return register


def _valid(path: Path) -> bytes:
    return write_pth(path, {"state_dict": {"w": tensor("0", (2, 2), (2, 1))}}).read_bytes()


GOOD_PKL = dumps({"state_dict": {"w": tensor("0", (2, 2), (2, 1))}})
raw_case("not_a_zip", "not a torch zip checkpoint")(
    lambda path: path.write_bytes(b"this is not a zip file\n" * 20))
raw_case("empty_file", "not a torch zip checkpoint")(lambda path: path.write_bytes(b""))
raw_case("truncated_zip", "not a torch zip checkpoint")(
    lambda path: path.write_bytes(_valid(path)[:200]))


@raw_case("corrupt_member", "archive/data/0 cannot be read from the zip (BadZipFile: Bad CRC")
def _corrupt_member(path):
    data = bytearray(_valid(path))
    at = data.index(FOUR_FLOATS)
    data[at:at + 4] = b"XXXX"
    path.write_bytes(bytes(data))


raw_case("missing_data_pkl", "expected exactly one data.pkl in the zip, found 0")(
    lambda path: raw_zip(path, [stored("archive/version", b"3\n")]))
raw_case("two_data_pkl", "expected exactly one data.pkl in the zip, found 2")(
    lambda path: raw_zip(path, [stored("a/data.pkl", GOOD_PKL), stored("b/data.pkl", GOOD_PKL)]))
case("truncated_pickle", "archive/data.pkl is truncated: the pickle ends before its STOP",
     pickled=GOOD_PKL[:-1])
case("truncated_pickle_midway", "archive/data.pkl is truncated",
     pickled=GOOD_PKL[:len(GOOD_PKL) // 2])
case("invalid_opcode", "archive/data.pkl is not a valid checkpoint pickle (UnpicklingError: "
     "invalid pickle opcode 0xff)", pickled=b"\x80\x02\xff.")
case("missing_storage", "storage archive/data/7 is missing from the zip",
     {"w": tensor("7", (2,), (1,))})
case("wrong_persistent_id", "unexpected persistent id", {"w": Pid(("nope", 1))})
case("storage_type_not_a_storage", "is not one of torch's numeric storages",
     {"w": Call(G("torch._utils", "_rebuild_tensor_v2"),
                Pid(("storage", G("collections", "OrderedDict"), "0", "cpu", 4)), 0, (4,), (1,))})
case("disallowed_storage_type", "refused as unsafe: the checkpoint references torch.QInt8Storage",
     {"w": tensor("0", (4,), (1,), storage="QInt8Storage")})
case("storage_size_mismatch", "holds 16 bytes, but the checkpoint declares 1000 elements",
     {"w": tensor("0", (4,), (1,), numel=1000)})
case("storage_not_from_zip", "tensor #1 'w': its storage is not a storage from the zip",
     {"w": Call(G("torch._utils", "_rebuild_tensor_v2"), [1.0, 2.0], 0, (2,), (1,))})
case("offset_out_of_range", "tensor #1 'w' (storage archive/data/0): size (2,) with stride (1,) "
     "from offset 100 reaches element 101, beyond the storage's 4 elements",
     {"state_dict": {"w": tensor("0", (2,), (1,), offset=100)}})
case("size_beyond_storage", "reaches element 1001, beyond the storage's 4 elements",
     {"w": tensor("0", (1000,), (1,), offset=2)})
case("negative_offset", "negative offset, size or stride",
     {"w": tensor("0", (2,), (1,), offset=-8)})
case("negative_stride", "negative offset, size or stride (offset 3, size (2, 2), stride (2, -1))",
     {"w": tensor("0", (2, 2), (2, -1), offset=3)})
case("negative_size", "negative offset, size or stride", {"w": tensor("0", (-1,), (1,))})
case("overflowing_size_stride", "beyond the storage's 4 elements",
     {"w": tensor("0", (2**62, 2**62), (2**62, 1))})
case("overflowing_int64", "beyond the storage's 4 elements",
     {"w": tensor("0", (2, 2), (2**63 - 1, 2**63 - 1))})
case("non_integer_size", "offset, size and stride must be integers",
     {"w": tensor("0", (2.5,), (1,))})
case("stride0_2_4_gb", "a copy of size (600000000,), stride (0,) needs 2400000000 bytes",
     {"w": tensor("0", (600_000_000,), (0,), numel=1)}, storages={"0": bytes(4)})
case("stride0_4_tb", "needs 4000000000000 bytes, which would bring this load over max_bytes",
     {"w": tensor("0", (10**6, 10**6), (0, 0), numel=1)}, storages={"0": bytes(4)})
BOMB = (2300 << 20) // 4  # float32 elements
raw_case("deflate_bomb", f"archive/data/0 (declared size) needs {2300 << 20} bytes")(
    lambda path: raw_zip(path, [  # 2.3 MB that would inflate to 2.3 GiB (CRC never reached)
        stored("archive/data.pkl", dumps({"w": tensor("0", (BOMB,), (1,), numel=BOMB)})),
        ("archive/data/0", zipfile.ZIP_DEFLATED, 0, 2300 << 20, zeros_deflated(2300))]))
raw_case("inflates_beyond_header", "archive/data/0 cannot be read from the zip (BadZipFile")(
    lambda path: raw_zip(path, [  # declares 16 bytes, inflates to 10 MiB: reading stops at 16
        stored("archive/data.pkl", dumps({"w": tensor("0", (4,), (1,))})),
        ("archive/data/0", zipfile.ZIP_DEFLATED, zlib.crc32(bytes(10 << 20)), 16,
         zeros_deflated(10))]))
raw_case("pickle_bomb", "archive/data.pkl declares 3221225472 bytes, more than the")(
    lambda path: raw_zip(path, [
        ("archive/data.pkl", zipfile.ZIP_DEFLATED, 0, 3 << 30, zeros_deflated(3072))]))
raw_case("bzip2_member", "compression method 12 is not supported")(
    lambda path: raw_zip(path, [("archive/data.pkl", 12, 0, 10, b"BZh9")]))
raw_case("big_endian", "only little-endian checkpoints are supported")(
    lambda path: raw_zip(path, [stored("archive/data.pkl", GOOD_PKL),
                                stored("archive/byteorder", b"big"),
                                stored("archive/data/0", FOUR_FLOATS)]))
LAUGHS = ["lol"] * 10
for _ in range(8):
    LAUGHS = [LAUGHS] * 10  # 10**9 strings when expanded; 600 bytes pickled
case("billion_laughs", "a 'billion laughs' structure", {"meta": {"classes": LAUGHS}})
case("deep_nesting", "the checkpoint's data nests more than 100 deep",  # 10000 nested lists
     pickled=b"\x80\x02}X\x04\x00\x00\x00meta" + b"]" * 10_000 + b"a" * 9_999 + b"s.")
case("deep_tuple_as_key", "data.pkl nests tuples more than 100 deep",  # hash() would segfault
     pickled=b"\x80\x02}" + b")" + b"\x85" * 300_000 + b"Ns.")
CYCLE: list = []
CYCLE.append(CYCLE)
case("reference_cycle", "the checkpoint's data contains a reference cycle", {"meta": CYCLE})
case("too_many_opcodes", "data.pkl runs more than 1000000 opcodes",
     pickled=b"\x80\x02" + b"N0" * 600_000 + b"N.")
raw_case("os_system_payload", "refused as unsafe: the checkpoint references posix.system")(
    lambda path: write_pth(path, None, pickled=pickle.dumps(
        {"state_dict": {}, "x": _Payload(path.with_suffix(".pwned"))}, protocol=2)))
case("numpy_dtype_tampering", "refused as unsafe: the pickle sets the state of a Float64DType",
     {"meta": np_array(np.zeros(1), dtype_state=(3, "<", None, None, None, -1, -1, 0x3F))})
case("numpy_object_dtype", "numpy dtype 'O' is not a plain numeric or string dtype",
     {"meta": Call(G("numpy", "dtype"), "O", False, True)})
case("numpy_reconstruct_huge", "a numpy array pickled with unexpected arguments",
     {"meta": Call(G("numpy.core.multiarray", "_reconstruct"), G("numpy", "ndarray"),
                   (10**12,), b"b")})
case("set_of_a_tensor", "set() of a ndarray",
     {"meta": Call(G("builtins", "set"), tensor("0", (4,), (1,)))})
case("build_on_a_function", "refused as unsafe: the pickle sets the state of a method",
     {"meta": Build(G("torch._utils", "_rebuild_tensor_v2"), {"__defaults__": (1,)})})


def _one_storage_5000_tensors(path: Path) -> None:
    """Odd but harmless: 5000 views of one 1 MiB storage (~70 KB on disk). It loads."""
    views = {f"w{i}": tensor("0", (512, 512), (512, 1), numel=512 * 512) for i in range(5000)}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("archive/data.pkl", dumps({"state_dict": views}))
        zf.writestr("archive/data/0", bytes(1 << 20))


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("pth_corpus")
    for name, (_, write) in CASES.items():
        write(root / f"{name}.pth")
    return {name: root / f"{name}.pth" for name in CASES}


@pytest.fixture(scope="session")
def shared_storage(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("pth_shared") / "one_storage_5000_tensors.pth"
    _one_storage_5000_tensors(path)
    return path


# ----------------------------------------------------------------------------------------------
# Tests.


def test_stdlib_written_checkpoint_loads_exactly(tmp_path):
    longs = np.array([7, -1], np.int64).tobytes()
    bf16 = np.array([1.5, -2.0], np.float32).view(np.uint32) >> 16
    meta_list = [1, 2]
    obj = {
        "state_dict": {
            "plain": tensor("0", (2, 2), (2, 1)),
            "transposed": tensor("0", (2, 2), (1, 2)),
            "tail": tensor("0", (2,), (1,), offset=2),
            "scalar": tensor("0", (), (), offset=3),
            "empty": tensor("0", (0, 3), (3, 1)),
            "long": tensor("1", (2,), (1,), storage="LongStorage", numel=2),
            "bf16": tensor("2", (2,), (1,), storage="BFloat16Storage", numel=2),
        },
        "meta": {"a": meta_list, "b": meta_list, "hist": np_array(np.arange(3.0))},
    }
    path = write_pth(tmp_path / "ok.pth", obj,
                     {"0": FOUR_FLOATS, "1": longs, "2": bf16.astype(np.uint16).tobytes()})
    out = load_pth(path)
    sd, floats = out["state_dict"], np.arange(4, dtype=np.float32)
    np.testing.assert_array_equal(sd["plain"], floats.reshape(2, 2))
    np.testing.assert_array_equal(sd["transposed"], floats.reshape(2, 2).T)
    np.testing.assert_array_equal(sd["tail"], floats[2:])
    assert sd["scalar"].shape == () and sd["scalar"] == 3
    assert sd["empty"].shape == (0, 3) and sd["empty"].dtype == np.float32
    assert sd["long"].tolist() == [7, -1] and sd["long"].dtype == np.int64
    assert sd["bf16"].tolist() == [1.5, -2.0] and sd["bf16"].dtype == np.float32
    assert np.shares_memory(sd["plain"], sd["tail"])  # one storage, read once
    assert out["meta"]["a"] is out["meta"]["b"] == [1, 2]
    np.testing.assert_array_equal(out["meta"]["hist"], np.arange(3.0))


def test_max_bytes_bounds_copies_and_storages(tmp_path):
    many = {f"w{i}": tensor("0", (512, 512), (1, 512), numel=512 * 512) for i in range(100)}
    path = write_pth(tmp_path / "copies.pth", many, {"0": bytes(1 << 20)})
    assert len(load_pth(path, max_bytes=128 << 20)) == 100  # 1 MiB storage + 100 MiB of copies
    with pytest.raises(CheckpointError, match=r"copies\.pth: tensor #8 'w7' .* a copy of size "
                       r"\(512, 512\), stride \(1, 512\) needs 1048576 bytes.*max_bytes=9437184"):
        load_pth(path, max_bytes=9 << 20)
    with pytest.raises(CheckpointError, match=r"archive/data/0 \(declared size\) needs 1048576"):
        load_pth(path, max_bytes=1 << 20)


@pytest.mark.parametrize("name", sorted(CASES))
def test_malformed_file_is_one_checkpoint_error_line(corpus, name):
    path, fragment = corpus[name], CASES[name][0]
    with pytest.raises(CheckpointError) as err:
        load_pth(path)
    message = str(err.value)
    assert message.startswith(f"{path}: ") and "\n" not in message, message
    assert fragment in message, message
    if name == "os_system_payload":
        assert isinstance(err.value, UnsafeCheckpointError)
        assert not path.with_suffix(".pwned").exists()


def test_shared_storage_is_read_once(shared_storage):
    sd = load_pth(shared_storage)["state_dict"]
    assert len(sd) == 5000 and all(np.shares_memory(sd["w0"], v) for v in sd.values())


_PROBE = textwrap.dedent("""
    import json, sys
    from unet_jax.errors import CheckpointError
    from unet_jax.io.pth import load_pth

    def peak_mb():
        # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the forking parent (pytest).
        with open("/proc/self/status") as f:
            hwm = next(line for line in f if line.startswith("VmHWM:"))
        return int(hwm.split()[1]) / 1024

    fixture, files = sys.argv[1], json.loads(sys.argv[2])
    if fixture:
        load_pth(fixture)
    base, results = peak_mb(), {}
    for name, path in files.items():
        try:
            load_pth(path)
            results[name] = "loaded"
        except CheckpointError as err:
            results[name] = str(err)
    print(json.dumps({"base_mb": base, "peak_mb": peak_mb(), "results": results}))
""")


def test_whole_corpus_in_one_process_with_bounded_memory(corpus, shared_storage):
    fixture = FIXTURES / "models" / "fcn_drive.pth"
    files = {name: str(path) for name, path in corpus.items()}
    files["shared_storage"] = str(shared_storage)
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, str(fixture) if fixture.is_file() else "",
         json.dumps(files)], cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 0, done.stderr[-3000:]  # no segfault, no MemoryError
    report = json.loads(done.stdout.splitlines()[-1])
    for name, path in corpus.items():
        result = report["results"][name]
        assert result.startswith(str(path)) and CASES[name][0] in result, (name, result)
    assert report["results"]["shared_storage"] == "loaded"
    # Importing unet_jax.models and loading a fixture peaks near 250 MB; the corpus adds ~nothing.
    assert report["peak_mb"] < min(1024, report["base_mb"] + 256), report


def test_convert_cli_refuses_a_bad_file_in_one_line(corpus, tmp_path):
    path, fragment = corpus["offset_out_of_range"], CASES["offset_out_of_range"][0]
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "unet_jax.convert", "--config", "configs/drive.py:fcn",
         "--config.model.base_channels=8", "--checkpoint", str(path), "--output", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 2, done.stderr[-3000:]
    errors = [line for line in done.stderr.splitlines() if str(path) in line]
    assert len(errors) == 1 and fragment in errors[0], done.stderr[-3000:]
    assert "Traceback" not in done.stderr and not out.exists()
