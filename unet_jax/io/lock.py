"""One run per workdir, on a local disk or in a bucket: a lock object held by a lease.

Two runs writing one workdir interleave `metrics.jsonl` and race in orbax's checkpoint folders,
so the second refuses at once. The lock is `<workdir>/.unet_jax.lock`, created by process 0 of a
run with the store's own create-if-absent primitive (a local file: `O_CREAT|O_EXCL`; a GCS
object: an upload with the precondition `ifGenerationMatch=0`) and removed when the run ends,
however it ends short of SIGKILL.

Staleness is a lease, not a process id: while the run lives, a thread rewrites the lock every
quarter lease, and a lock whose last write (the store's own modification time) is older than
the lease (`UNET_JAX_LOCK_LEASE_S`, 300 s by default) belongs to a run that is gone and is
taken over with a note. A pid cannot say that across hosts, nor in containers where every run
is pid 1. One shortcut is kept because it is certain: a lock written on this very machine and
pid namespace (same boot id and namespace) by a pid that no longer exists is stale at once.
Taking over replaces exactly the lock that was read (GCS: `ifGenerationMatch=<its
generation>`; local: under `flock`, content unchanged), so of two runs taking over one, one wins.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from types import TracebackType

from unet_jax.errors import WorkdirError, one_line, warn
from unet_jax.io import paths

LOCK_FILE = ".unet_jax.lock"
LEASE_ENV = "UNET_JAX_LOCK_LEASE_S"
DEFAULT_LEASE_S = 300.0


def lease_seconds() -> float:
    """The lease: `$UNET_JAX_LOCK_LEASE_S` (seconds, > 0) or `DEFAULT_LEASE_S`."""
    text = os.environ.get(LEASE_ENV)
    if not text:
        return DEFAULT_LEASE_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise WorkdirError(f"{LEASE_ENV}={text!r}: expected a number of seconds > 0")
    return value


def _machine() -> dict[str, str]:
    """What identifies this boot and pid namespace (empty where /proc does not say)."""
    out = {}
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            out["boot"] = f.read().strip()
        out["pid_ns"] = os.readlink("/proc/self/ns/pid")
    except OSError:
        pass
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


@dataclass
class _Found:
    text: str
    version: str   # what a conditional replace must match
    age_s: float   # since the store last saw the lock written


class _LocalStore:
    """The lock as a local file; a conditional replace is made under `flock`."""

    def __init__(self, path: paths.Path):
        self.path = os.fspath(path)

    def create(self, text: str) -> str | None:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return None
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return text

    def read(self) -> _Found | None:
        try:
            with open(self.path) as f:
                text = f.read()
                age = time.time() - os.fstat(f.fileno()).st_mtime
        except FileNotFoundError:
            return None
        return _Found(text, text, age)

    def replace(self, version: str, text: str) -> str | None:
        try:
            fd = os.open(self.path, os.O_RDWR)
        except FileNotFoundError:
            return None
        with os.fdopen(fd, "r+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            if f.read() != version:
                return None
            f.seek(0)
            f.truncate()
            f.write(text)
            f.flush()
        return text

    def delete(self, version: str) -> None:
        found = self.read()
        if found is not None and found.version == version:
            os.unlink(self.path)


class _GcsStore:
    """The lock as a GCS object; every write is conditional on the object's generation.

    gcsfs's `pipe_file(mode="create")` is the create-if-absent upload; the conditional replace
    and delete go through gcsfs's authenticated JSON API call, since fsspec has no
    compare-and-swap of its own. (fake-gcs-server ignores the precondition of a delete; GCS
    honours it.)
    """

    def __init__(self, path: paths.Path):
        import fsspec
        self.fs, inner = fsspec.core.url_to_fs(os.fspath(path))
        self.bucket, _, self.key = inner.partition("/")

    def _precondition_failed(self, err: Exception) -> bool:
        return getattr(err, "code", None) in (404, 412) or isinstance(err, FileNotFoundError)

    def create(self, text: str) -> str | None:
        try:
            self.fs.pipe_file(f"{self.bucket}/{self.key}", text.encode(), mode="create")
        except FileExistsError:
            return None
        return str(self.fs.info(f"{self.bucket}/{self.key}")["generation"])

    def read(self) -> _Found | None:
        # The JSON API directly (gcsfs's listing cache may hold an older generation), and the
        # content of exactly the generation whose time is judged.
        try:
            info = self.fs.call("GET", "b/{}/o/{}", self.bucket, self.key, json_out=True)
            _, data = self.fs.call("GET", "b/{}/o/{}", self.bucket, self.key, alt="media",
                                   generation=info["generation"])
        except Exception as err:  # gone meanwhile: 404
            if self._precondition_failed(err):
                return None
            raise
        age = time.time() - _timestamp(info["updated"])
        return _Found(data.decode(), str(info["generation"]), age)

    def replace(self, version: str, text: str) -> str | None:
        # A multipart upload (metadata + content), as gcsfs's own uploads: fake-gcs-server
        # checks the precondition of those only, GCS of every upload.
        body = (f'--==0==\nContent-Type: application/json; charset=UTF-8\n\n'
                f'{json.dumps({"name": self.key})}\n--==0==\n'
                f'Content-Type: application/json\n\n{text}\n--==0==--').encode()
        try:
            out = self.fs.call("POST", f"{self.fs._location}/upload/storage/v1/b/{self.bucket}/o",
                               uploadType="multipart", ifGenerationMatch=version, data=body,
                               headers={"Content-Type": 'multipart/related; boundary="==0=="'},
                               json_out=True)
        except Exception as err:  # gcsfs raises its HttpError (code 412) for a failed match
            if self._precondition_failed(err):
                return None
            raise
        return str(out["generation"])

    def delete(self, version: str) -> None:
        try:
            self.fs.call("DELETE", "b/{}/o/{}", self.bucket, self.key, ifGenerationMatch=version)
        except Exception as err:
            if not self._precondition_failed(err):
                raise


def _timestamp(value: object) -> float:
    """Seconds since the epoch of a store's modification time (RFC 3339 text or a datetime)."""
    import datetime
    if isinstance(value, datetime.datetime):
        return value.timestamp()
    if isinstance(value, (int, float)):
        return float(value)
    return datetime.datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()


def _store(path: paths.Path) -> _LocalStore | _GcsStore:
    if not paths.is_url(path):
        return _LocalStore(path)
    if os.fspath(path).startswith("gs://"):
        return _GcsStore(path)
    raise WorkdirError(f"{path}: a run lock needs a local folder or gs://; this store has no "
                       "create-if-absent write known here")


class WorkdirLock:
    """`with WorkdirLock(workdir):` holds the workdir for this run (call on process 0 only)."""

    def __init__(self, workdir: paths.PathLike, lease_s: float | None = None):
        self.path = paths.to_path(workdir) / LOCK_FILE
        self.lease_s = lease_seconds() if lease_s is None else lease_s
        self.held = False
        self._version = ""
        self._me: dict = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _text(self) -> str:
        self._me["refreshed"] = time.strftime("%Y-%m-%d %H:%M:%S")
        return json.dumps(self._me)

    def acquire(self) -> None:
        """Take the lock, or raise `WorkdirError` naming the run that holds it."""
        try:
            self._acquire()
        except WorkdirError:
            raise
        except Exception as err:  # a missing bucket, no permission, a read-only disk
            raise WorkdirError(f"{self.path.parent}: cannot write there "
                               f"({type(err).__name__}: {one_line(err)}); check that it exists "
                               "and that this account may write to it") from err

    def _acquire(self) -> None:
        if not paths.is_url(self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
        store = _store(self.path)
        self._me = {"host": socket.gethostname(), "pid": os.getpid(), "run": uuid.uuid4().hex,
                    "since": time.strftime("%Y-%m-%d %H:%M:%S"), **_machine()}
        for _ in range(3):
            version = store.create(self._text())
            if version is None:
                found = store.read()
                if found is None:
                    continue  # released meanwhile
                if not self._stale(found):
                    raise WorkdirError(self._refusal(found))
                version = store.replace(found.version, self._text())
                if version is None:
                    continue  # another run took it over first
                warn(f"{self.path}: took over the lock of a run that is gone "
                     f"({self._who(found)}; not refreshed for {found.age_s:.0f} s)")
            self._version, self.held = version, True
            self._start_refresh(store)
            return
        raise WorkdirError(f"{self.path}: could not take the lock (it changed hands 3 times)")

    def _holder(self, found: _Found) -> dict:
        try:
            holder = json.loads(found.text)
        except ValueError:
            return {}
        return holder if isinstance(holder, dict) else {}

    def _stale(self, found: _Found) -> bool:
        if found.age_s > self.lease_s:
            return True
        holder, here = self._holder(found), _machine()
        pid = holder.get("pid")
        if holder.get("host") != socket.gethostname() or not isinstance(pid, int):
            return False
        # Locks written before the lease had no boot/namespace fields: same host was the rule.
        same = all(holder.get(k, v) == v for k, v in here.items())
        return same and not _alive(pid)

    def _who(self, found: _Found) -> str:
        holder = self._holder(found)
        if not holder:
            return "an unreadable lock"
        return f"pid {holder.get('pid')} on {holder.get('host')} since {holder.get('since')}"

    def _refusal(self, found: _Found) -> str:
        return (f"{self.path.parent} is in use by another run ({self._who(found)}, its lease "
                f"renewed {found.age_s:.0f} s ago); wait for it to finish (a run that is gone "
                f"is taken over once its lease of {self.lease_s:.0f} s lapses), or choose "
                "another --workdir")

    def _start_refresh(self, store: _LocalStore | _GcsStore) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._refresh, args=(store,), daemon=True,
                                        name="unet_jax-lock-lease")
        self._thread.start()
        self._store = store

    def _refresh(self, store: _LocalStore | _GcsStore) -> None:
        """Rewrite the lock every quarter lease while the run holds it."""
        while not self._stop.wait(self.lease_s / 4):
            try:
                version = store.replace(self._version, self._text())
            except Exception as err:  # a transient store error: try again next time
                warn(f"{self.path}: could not renew the lease ({one_line(err)})")
                continue
            if version is None:
                warn(f"{self.path}: the lock was taken over by another run; this run no "
                     "longer holds the workdir")
                self.held = False
                return
            self._version = version

    def release(self) -> None:
        """Stop renewing and remove the lock if this run holds it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self.held:
            self.held = False
            try:
                self._store.delete(self._version)
            except Exception as err:  # the run's result matters more than a lock left over
                warn(f"{self.path}: could not remove the lock ({one_line(err)})")

    def __enter__(self) -> "WorkdirLock":
        self.acquire()
        return self

    def __exit__(self, kind: type | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()
