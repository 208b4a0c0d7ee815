"""One run per workdir: a lock file naming its holder (host, pid), with stale-lock detection.

Two runs writing one workdir interleave `metrics.jsonl` and race in orbax's checkpoint folders,
so the second refuses at once. The lock is `<workdir>/.unet_jax.lock`, created atomically
(O_EXCL) by process 0 of a run and removed when the run ends, however it ends short of SIGKILL.
A lock left by a killed run is stale: on the same host its pid no longer exists, and it is taken
over; a lock of another host cannot be checked from here, so the message says how to remove it.
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from types import TracebackType

from unet_jax.errors import WorkdirError

LOCK_FILE = ".unet_jax.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class WorkdirLock:
    """`with WorkdirLock(workdir):` holds the workdir for this run (call on process 0 only)."""

    def __init__(self, workdir: str | Path):
        self.path = Path(workdir) / LOCK_FILE
        self.held = False

    def _holder(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}

    def acquire(self) -> None:
        """Take the lock, or raise `WorkdirError` naming the run that holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {"host": socket.gethostname(), "pid": os.getpid(),
              "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                same_host = holder.get("host") == me["host"]
                pid = holder.get("pid")
                if same_host and isinstance(pid, int) and not _alive(pid):
                    self.path.unlink(missing_ok=True)  # stale: that run is gone
                    continue
                who = (f"pid {pid} on {holder.get('host')} since {holder.get('since')}"
                       if holder else "an unreadable lock")
                hint = ("wait for it to finish" if same_host else
                        f"wait for it to finish, or delete {self.path} if that run is gone")
                raise WorkdirError(f"{self.path.parent} is in use by another run ({who}); "
                                   f"{hint}, or choose another --workdir") from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return
        raise WorkdirError(f"{self.path}: could not take the lock (it reappeared twice)")

    def release(self) -> None:
        """Remove the lock if this run holds it."""
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False

    def __enter__(self) -> "WorkdirLock":
        self.acquire()
        return self

    def __exit__(self, kind: type | None, value: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()
