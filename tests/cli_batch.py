"""Many command lines for the price of one interpreter start: `python tests/cli_batch.py` reads a
JSON list of commands from stdin, each `["-m", MODULE, ARGS...]` or `["-c", CODE, ARGS...]` as
`python` takes them, imports the command modules once, then runs each command in a forked child
of its own and prints a JSON list of {"returncode", "stdout", "stderr"}.

Each child is a real process (its own exit code, stdout and stderr, flags parsed from scratch by
a fresh absl), started from an interpreter that already holds the command modules: a CLI test of
parsing and one-line errors then costs a fork, not the 3-7 s that importing JAX and TensorFlow
take in each `python -m`. Every command of a batch shares the batch process's environment and
working folder; a `-c` command's sys.argv[0] is the path of a temporary file holding CODE
(`python -c` says "-c"). Tests about importing itself (what `import unet_jax` changes) start their own
interpreter instead.
"""
from __future__ import annotations

import importlib
import json
import os
import runpy
import sys
import tempfile
import traceback


def _child(command: list[str], out_fd: int, err_fd: int) -> None:
    """Run `command` as `python COMMAND` would, in this (forked) process; never returns."""
    os.dup2(out_fd, 1)
    os.dup2(err_fd, 2)
    code = 0
    try:
        flag, target, *args = command
        if flag == "-m":
            sys.path.insert(0, os.getcwd())  # as `python -m` does
            sys.argv = [target, *args]
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        else:
            with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as script:
                script.write(target)
            sys.argv = ["-c", *args]
            runpy.run_path(script.name, run_name="__main__")
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 1)
        if not isinstance(stop.code, (int, type(None))):
            print(stop.code, file=sys.stderr)
    except BaseException:  # pylint: disable=broad-except
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run_one(command: list[str]) -> dict:
    """{"returncode", "stdout", "stderr"} of `command` run in a forked child."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(command, out.fileno(), err.fileno())
        _, status = os.waitpid(pid, 0)
        texts = []
        for f in (out, err):
            f.seek(0)
            texts.append(f.read().decode(errors="replace"))
    return {"returncode": os.waitstatus_to_exitcode(status), "stdout": texts[0],
            "stderr": texts[1]}


def main() -> None:
    commands = json.loads(sys.stdin.read())
    # What each command imports, imported once: `unet_jax.<name>`'s `unet_jax.cli.<name>` (the
    # two-line module itself is left to runpy, which warns about a target imported before it).
    for flag, target, *_ in commands:
        if flag == "-m" and target.startswith("unet_jax."):
            importlib.import_module("unet_jax.cli." + target.rsplit(".", 1)[1])
    results = [run_one(c) for c in commands]
    sys.stdout.write(json.dumps(results))


if __name__ == "__main__":
    main()
