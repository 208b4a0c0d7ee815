"""Every path a user gives may be a bucket URL (`gs://bucket/run`): the one place that knows.

A URL becomes an `etils.epath.Path` (what orbax and TFDS already use, so a workdir or a
checkpoint is one path object from the command line to orbax), read and written through
`fsspec` (`gcsfs` for `gs://`), while orbax writes the arrays of a checkpoint through
tensorstore's own GCS driver. A local path stays a `pathlib.Path` and behaves exactly as it
did. Both have pathlib's API; what a bucket lacks (append, rename, recursive glob, a file for
libraries that open only local files) is here.

Two process-wide defaults are set on import of this module (only if the user has not set them):
- `EPATH_USE_TF=false`: epath would otherwise send `gs://` through TensorFlow's GCS client,
  which ignores `STORAGE_EMULATOR_HOST` and would import TensorFlow into processes that read
  records without it; gcsfs honours the emulator variable and authenticates as every Google
  client does (application default credentials, the TPU VM's service account).
- `GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false` when `STORAGE_EMULATOR_HOST` is set: gcsfs asks the
  storage control API (which emulators do not serve) for each bucket's layout, and logs a
  warning per call when it cannot.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pathlib
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from typing import Union

os.environ.setdefault("EPATH_USE_TF", "false")
if os.environ.get("STORAGE_EMULATOR_HOST"):
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

from etils import epath  # noqa: E402  (after the defaults above, which epath reads)

PathLike = epath.PathLike
# A local path is a `pathlib.Path` (it behaves exactly as before: epath's local paths refuse
# recursive globs and stat without st_dev); a URL is an `epath.Path`. Both have pathlib's API.
AnyPath = Union[pathlib.Path, epath.Path]
CACHE_ENV = "UNET_JAX_CACHE"


def is_url(path: PathLike) -> bool:
    """Whether `path` names an object store (`gs://...`, `s3://...`) rather than a local path."""
    return "://" in os.fspath(path)


def as_path(path: PathLike) -> AnyPath:
    """`path` as given: an `epath.Path` for a URL, a `pathlib.Path` for a local path."""
    text = os.fspath(path)
    return epath.Path(text) if is_url(text) else pathlib.Path(text)


def to_path(path: PathLike) -> AnyPath:
    """`path` for use: a URL as given, a local path absolute with `~` expanded."""
    path = as_path(path)
    return path if is_url(path) else path.expanduser().absolute()


def append_line(path: AnyPath, line: str) -> None:
    """Append `line` (with its newline) to a text file, durably.

    A local file is appended to and synced; an object store has no append, so the object is
    rewritten whole (the files appended to here, `metrics.jsonl`, hold a few hundred lines).
    """
    if not is_url(path):
        with open(path, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        return
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    path.write_text(old + line, encoding="utf-8")


def replace_text(path: AnyPath, text: str) -> None:
    """Write `text` to `path` so that a reader sees the old or the new file, never a part: a
    local file through a temporary file renamed into place, an object in one upload (objects
    are replaced atomically)."""
    if is_url(path):
        path.write_text(text, encoding="utf-8")
        return
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def move(source: AnyPath, target: AnyPath) -> None:
    """Move a file or folder: a local rename (`shutil.move`); with a bucket on either side, a
    copy of every file or object under `source` and their removal (stores have no rename)."""
    if not (is_url(source) or is_url(target)):
        shutil.move(os.fspath(source), os.fspath(target))
        return
    import fsspec
    src_fs, src = fsspec.core.url_to_fs(os.fspath(source))
    dst_fs, dst = fsspec.core.url_to_fs(os.fspath(target))
    if src_fs.protocol == dst_fs.protocol:
        src_fs.mv(src, dst, recursive=True)
    elif not is_url(source):
        dst_fs.put(src, dst, recursive=True)
        src_fs.rm(src, recursive=True)
    else:
        src_fs.get(src, dst, recursive=True)
        src_fs.rm(src, recursive=True)


@contextlib.contextmanager
def staged(path: AnyPath) -> Iterator[pathlib.Path]:
    """A local path through which to write the file or folder `path`, for the writers that
    write only local files (PIL, numpy, torch, ArrayRecord, TFDS): `path` itself when it is
    local; for a URL, a path in a new local temporary folder, uploaded to `path` when the block
    ends without an error (each object whole, so a reader never sees a part of one) and
    removed either way."""
    if not is_url(path):
        yield pathlib.Path(os.fspath(path))
        return
    with tempfile.TemporaryDirectory(prefix="unet_jax_stage_") as tmp:
        local = pathlib.Path(tmp) / path.name
        yield local
        if local.exists():
            move(local, path)


def files_under(folder: AnyPath) -> list[AnyPath]:
    """The files under a bucket folder, recursively, as URLs (one listing of the prefix: epath
    refuses `rglob` there, and its `walk` drops the `gs://`)."""
    import fsspec
    fs, inner = fsspec.core.url_to_fs(os.fspath(folder))
    return [epath.Path(fs.unstrip_protocol(name)) for name in fs.find(inner)]


def cache_root() -> pathlib.Path:
    """Where copies of remote files are kept on this host: `$UNET_JAX_CACHE`, or
    `<temp dir>/unet_jax_cache` (each host its own disk)."""
    root = os.environ.get(CACHE_ENV) or os.path.join(tempfile.gettempdir(), "unet_jax_cache")
    return pathlib.Path(root)


def local_copy(path: AnyPath) -> pathlib.Path:
    """A local file with the content of `path`: `path` itself when it is local, else a copy in
    `cache_root()`, made once and kept while the remote object keeps its size and generation.

    For the libraries that read only local files (ArrayRecord's reader opens paths with its
    own C++ file layer). The copy is written beside its final name and renamed into place, so a
    killed copy is never taken for a complete one.
    """
    if not is_url(path):
        return pathlib.Path(os.fspath(path))
    info = _remote_info(path)
    key = hashlib.sha256(f"{path}|{info}".encode()).hexdigest()[:16]
    target = cache_root() / key / path.name
    if target.is_file() and target.stat().st_size == info[0]:
        return target
    _download(path, target, info[0])
    return target


def local_folder(folder: AnyPath) -> pathlib.Path:
    """A local folder with the files of `folder`: `folder` itself when it is local, else a copy
    in `cache_root()` kept in step with the bucket, for the readers of a folder of local files
    (the folder dataset lists, stats and decodes them).

    One listing of the bucket folder gives every object's size and generation; a file is copied
    again when either changed (a file-versions record beside the copy says which generation
    each file holds), a file gone from the bucket is removed, and each copy keeps its object's
    modification time, so a digest of file sizes and times sees the bucket's objects, not when
    they were copied. Each file is written beside its name and renamed into place.
    """
    if not is_url(folder):
        return pathlib.Path(os.fspath(folder))
    import fsspec
    url = os.fspath(folder).rstrip("/")
    fs, inner = fsspec.core.url_to_fs(url)
    objects = {name[len(inner):].lstrip("/"): info
               for name, info in fs.find(inner, detail=True).items()
               if info.get("type") == "file" and name.startswith(inner + "/")}
    base = cache_root() / "folders" / hashlib.sha256(url.encode()).hexdigest()[:16]
    target = base / pathlib.PurePosixPath(url).name
    record = base / "versions.json"
    held = json.loads(record.read_text()) if record.is_file() else {}
    versions = {}
    for name, info in sorted(objects.items()):
        size, version = int(info["size"]), str(_version(info))
        local = target / name
        if held.get(name) != [size, version] or not local.is_file() or \
                local.stat().st_size != size:
            _download(epath.Path(fs.unstrip_protocol(f"{inner}/{name}")), local, size)
            when = info.get("mtime")
            if when is not None:
                stamp = when.timestamp() if hasattr(when, "timestamp") else float(when)
                os.utime(local, (stamp, stamp))
        versions[name] = [size, version]
    for local in [p for p in target.rglob("*") if p.is_file()] if target.is_dir() else []:
        if local.relative_to(target).as_posix() not in versions:
            local.unlink()
    if versions:  # an empty or missing bucket folder leaves no local folder either
        replace_text(record, json.dumps(versions))
    return target


def _download(path: AnyPath, target: pathlib.Path, size: int) -> None:
    """Copy the object `path` of `size` bytes to the local file `target`, written beside it and
    renamed into place, so that a killed copy is never taken for a complete one."""
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        with path.open("rb") as src, open(partial, "wb") as dst:
            shutil.copyfileobj(src, dst, 16 << 20)
        if partial.stat().st_size != size:
            raise OSError(f"{path}: copied {partial.stat().st_size} bytes of {size}")
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


def _remote_info(path: AnyPath) -> tuple[int, str]:
    """(size, version) of an object, so that a rewritten object is copied again."""
    import fsspec
    fs, inner = fsspec.core.url_to_fs(os.fspath(path))
    info = fs.info(inner)
    return int(info["size"]), str(_version(info))


def _version(info: dict) -> str:
    """An object's version from its listing: its generation (GCS) or etag/mtime, whatever the
    store reports."""
    return str(info.get("generation") or info.get("etag") or info.get("mtime") or "")


__all__ = ["AnyPath", "PathLike", "append_line", "as_path", "cache_root", "files_under",
           "is_url", "local_copy", "local_folder", "move", "replace_text", "staged", "to_path"]
