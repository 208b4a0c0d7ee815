"""`python -m unet_jax.main` for tests, able to signal itself at a chosen step.

UNET_JAX_TEST_SIGNAL_AT="<signal>:<step>[:<checkpoint>]" (signal TERM, KILL or INT) sends that
signal to this process right after it writes a metrics.jsonl line of <step>; with <checkpoint>,
it first waits (up to 60 s) until that periodic checkpoint is committed. "<signal>@group" sends
it to the whole process group instead, as a terminal's Ctrl-C does (start the process with
`start_new_session=True` so that the group is its own).
"""
import os
import signal
import sys
import time

from unet_jax import run_logs
from unet_jax.cli import main


def _install() -> None:
    spec = os.environ.get("UNET_JAX_TEST_SIGNAL_AT", "")
    if not spec:
        return
    name, step, *wait_for = spec.split(":")
    name, _, target = name.partition("@")
    signum = {"TERM": signal.SIGTERM, "KILL": signal.SIGKILL, "INT": signal.SIGINT}[name]
    write = run_logs.MetricsLog.write

    def write_and_signal(self, record):
        write(self, record)
        if int(record["step"]) != int(step):
            return
        if wait_for:
            committed = self.path.parent / "checkpoints" / wait_for[0]
            deadline = time.monotonic() + 60
            while not committed.is_dir() and time.monotonic() < deadline:
                time.sleep(0.05)
        if target == "group":
            os.killpg(os.getpgrp(), signum)
        else:
            os.kill(os.getpid(), signum)

    run_logs.MetricsLog.write = write_and_signal


if __name__ == "__main__":
    _install()
    sys.argv[0] = "unet_jax.main"
    main.run()
