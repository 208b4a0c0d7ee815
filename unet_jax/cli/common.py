"""What every command line shares: `--config FILE[:ARG]` with `--config.a.b=VALUE` overrides,
`check_config` before anything else runs, and user mistakes printed as one line (exit code 2).

    unet_jax.cli.common.run(main, prog="unet_jax.predict", define_flags=_define_flags)

calls `main(config, argv)` after absl has parsed the remaining flags. `--verbose` (or
UNET_JAX_VERBOSE=1) shows tracebacks for user errors too.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

from unet_jax.errors import ConfigError, UserError, one_line

EXIT_USER_ERROR = 2
CONFIG_HELP = ("config file and argument, e.g. configs/drive.py:pspnet,ce_dice; override any "
               "field with --config.<section>.<field>=VALUE")


def split_config_args(argv: Sequence[str]) -> tuple[str | None, dict[str, str], list[str]]:
    """(config spec, {dotted field: raw value}, the other arguments) of a command line."""
    spec: str | None = None
    overrides: dict[str, str] = {}
    rest: list[str] = [argv[0]] if argv else []
    args = list(argv[1:])
    i = 0
    while i < len(args):
        arg = args[i]
        name, eq, value = arg.partition("=")
        if name in ("--config", "-config") or name.startswith(("--config.", "-config.")):
            if not eq:
                if i + 1 < len(args) and not args[i + 1].startswith("--"):
                    value = args[i + 1]
                    i += 1
                elif name.startswith(("--config.", "-config.")):
                    value = "True"  # a bare boolean field: --config.eval.tta
                else:
                    raise ConfigError(f"{name}: expected a config file, e.g. --config "
                                      "configs/drive.py:fcn,ce")
            if name in ("--config", "-config"):
                spec = value
            else:
                overrides[name.split(".", 1)[1]] = value
        else:
            rest.append(arg)
        i += 1
    return spec, overrides, rest


def _verbose(argv: Sequence[str]) -> bool:
    return os.environ.get("UNET_JAX_VERBOSE") == "1" or any(
        a in ("--verbose", "--verbose=true", "--verbose=True", "--verbose=1") for a in argv)


def _without_library_tracebacks(record: Any) -> bool:
    """A logging filter: orbax's background threads log each failed write with its traceback
    (a full disk gives five) before the error reaches the CLI, which names it in one line; the
    log lines stay, their tracebacks only with --verbose."""
    if f"{os.sep}orbax{os.sep}" in record.pathname:
        record.exc_info = record.exc_text = record.stack_info = None
    return True


def report(prog: str, err: BaseException) -> None:
    """Print a user error as one line and exit with code 2."""
    if isinstance(err, OSError) and getattr(err, "strerror", None):
        where = f"{err.filename}: " if err.filename else ""
        message = f"{where}{err.strerror}"
    else:
        message = one_line(err)
    print(f"{prog}: error: {message}", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)


def run(main: Callable[[Any, list[str]], int | None], *, prog: str,
        define_flags: Callable[[], None] | None = None, default_config: str | None = None,
        argv: Sequence[str] | None = None) -> None:
    """Load and check the config from the command line, parse the other flags, call `main`."""
    from absl import app, flags

    from unet_jax.config import check_config, load_config

    argv = list(sys.argv if argv is None else argv)
    verbose = _verbose(argv)
    flags.DEFINE_string("config", default_config, CONFIG_HELP)
    flags.DEFINE_bool("verbose", False, "show tracebacks for user errors too")
    if define_flags is not None:
        define_flags()
    try:
        spec, overrides, rest = split_config_args(argv)
        spec = spec or default_config
        if not spec:
            raise ConfigError("--config is required, e.g. --config configs/drive.py:fcn,ce")
        config = check_config(load_config(spec, overrides))
    except UserError as err:
        if verbose:
            raise
        report(prog, err)

    def absl_main(args: list[str]) -> None:
        try:
            code = main(config, args)
        except (UserError, OSError) as err:
            user_os_error = isinstance(err, OSError) and getattr(err, "strerror", None)
            if verbose or not (isinstance(err, UserError) or user_os_error):
                raise
            report(prog, err)
        sys.exit(int(code or 0))

    if not verbose:
        import logging
        logging.getLogger("absl").addFilter(_without_library_tracebacks)
    app.run(absl_main, argv=rest)
