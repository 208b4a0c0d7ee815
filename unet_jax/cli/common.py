"""What every command line shares: `--config FILE[:ARG]` with `--config.a.b=VALUE` overrides
(ml_collections.config_flags), `check_config` before anything else runs, `--help`, the CPU
compiler flags, the persistent compilation cache (`--nocompilation_cache` turns it off), quiet
libraries, and user mistakes printed as one line (exit code 2).

    unet_jax.cli.common.run(main, prog="unet_jax.predict", define_flags=_define_flags)

calls `main(config, argv)` after absl has parsed the flags. `--verbose` (or UNET_JAX_VERBOSE=1)
shows tracebacks for user errors and the libraries' start-up logs too.
"""
from __future__ import annotations

import logging
import os
import sys
import textwrap
from collections.abc import Callable, Mapping, MutableMapping, Sequence
from typing import Any

from unet_jax.errors import ConfigError, UserError, one_line

EXIT_USER_ERROR = 2
CONFIG_HELP = (
    "configs/<dataset>.py[:<head>,<loss>] with dataset drive | stare | chase_db1 | hrf | "
    "cityscapes, head fcn | pspnet | deeplabv3, loss ce | ce_dice; e.g. "
    "configs/drive.py:pspnet,ce_dice. Override any field with --config.<section>.<field>=VALUE "
    "(unet_jax/recipe.py lists them): --config.train.num_steps=100, "
    "--config.data.crop_size=\"(64,64)\", --config.eval.tta (or --noconfig.eval.tta).")
HELP_ARGS = ("--help", "-help", "-h", "-?", "--helpshort", "-helpshort")
# XLA:CPU runs matmuls and reductions through YNNPACK with this flag: against jaxlib's defaults
# the UNet's train step ran 1.4-1.7x and DRIVE slide inference 1.5x as fast on a 2-core CPU
# (experiments/cpu_flags.py, results/cpu_flags.md); other platforms ignore it. XLA reads
# XLA_FLAGS once, when JAX starts its CPU backend, so the command lines set it before that;
# importing the library changes no process-wide setting.
CPU_XLA_FLAGS = "--xla_cpu_experimental_ynn_fusion_type=dot,reduce"
# The CLIs keep XLA's compiled programs in this folder under the user cache ($XDG_CACHE_HOME or
# ~/.cache), so a second run skips compilation (predict on a folder of mixed sizes: the slide
# programs of every size); every program is kept, however fast it compiled (JAX's default keeps
# only those over 1 s, which leaves out the per-size slide programs). `--nocompilation_cache` or
# UNET_JAX_COMPILATION_CACHE=0 turns it off; with JAX_COMPILATION_CACHE_DIR set, JAX's own
# setting applies (the test suite's shared cache).
CACHE_SUBDIR = ("unet_jax", "jax")
# Log lines that say nothing about the user's run (shown with --verbose): orbax reads every
# checkpoint's optional metadata file and warns when it is absent; TFDS warns that a builder
# config with options (the synthetic set's) is "custom", that a folder it is about to fill has no
# metadata yet, and about its own deprecated attribute.
_NOISE = ("Metadata file does not exist", "Using custom data configuration",
          "has no dataset_info.json", "`FeatureConnector.dtype` is deprecated",
          # orbax on a damaged checkpoint, which the CLI reports (and sets aside) in one line
          "Failed to get item metadata from directory")


def use_cpu_xla_flags(environ: MutableMapping[str, str] = os.environ) -> None:
    """Add CPU_XLA_FLAGS to XLA_FLAGS (before JAX starts its backend) unless
    UNET_JAX_XLA_DEFAULTS=0 or XLA_FLAGS already gives the flag a value."""
    flags = environ.get("XLA_FLAGS", "")
    if (environ.get("UNET_JAX_XLA_DEFAULTS", "1") != "0"
            and "xla_cpu_experimental_ynn_fusion_type" not in flags):
        environ["XLA_FLAGS"] = f"{flags} {CPU_XLA_FLAGS}".strip()


def compilation_cache_dir(enabled: bool = True,
                          environ: Mapping[str, str] = os.environ) -> str | None:
    """The folder the CLIs keep compiled programs in: `CACHE_SUBDIR` under $XDG_CACHE_HOME
    (default ~/.cache); None when turned off (`enabled` False, from --nocompilation_cache, or
    UNET_JAX_COMPILATION_CACHE=0) or when JAX_COMPILATION_CACHE_DIR sets JAX's own."""
    if (not enabled or environ.get("UNET_JAX_COMPILATION_CACHE", "1") == "0"
            or environ.get("JAX_COMPILATION_CACHE_DIR")):
        return None
    root = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, *CACHE_SUBDIR)


def use_compilation_cache(folder: str | None,
                          environ: Mapping[str, str] = os.environ) -> None:
    """Keep every compiled program in `folder` (None: leave JAX's settings as they are), unless
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS says otherwise."""
    if folder is None:
        return
    import jax

    jax.config.update("jax_compilation_cache_dir", folder)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in environ:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


def _verbose(argv: Sequence[str]) -> bool:
    return os.environ.get("UNET_JAX_VERBOSE") == "1" or any(
        a in ("--verbose", "--verbose=true", "--verbose=True", "--verbose=1") for a in argv)


def _config_first(argv: Sequence[str]) -> tuple[list[str], str | None]:
    """(argv with `--config FILE` moved to the front, FILE or None): config_flags refuses an
    override given before the file it overrides; the order never mattered here."""
    args = list(argv[1:])
    for i, arg in enumerate(args):
        name, eq, value = arg.partition("=")
        if name not in ("--config", "-config"):
            continue
        if eq:
            return [*argv[:1], arg, *args[:i], *args[i + 1:]], value
        if i + 1 < len(args):
            return [*argv[:1], arg, args[i + 1], *args[:i], *args[i + 2:]], args[i + 1]
        raise ConfigError(f"{name}: expected a config file, e.g. --config configs/drive.py:fcn,ce")
    return list(argv), None


def _without_library_tracebacks(record: logging.LogRecord) -> bool:
    """A logging filter: orbax's background threads log each failed write with its traceback
    (a full disk gives five) before the error reaches the CLI, which names it in one line; the
    log lines stay, their tracebacks only with --verbose."""
    if f"{os.sep}orbax{os.sep}" in record.pathname:
        record.exc_info = record.exc_text = record.stack_info = None
    return True


def _without_noise(record: logging.LogRecord) -> bool:
    """A logging filter that drops the `_NOISE` lines."""
    message = record.getMessage()
    return not any(text in message for text in _NOISE)


def _without_closed_loop_reports(unraisable: Any, default: Callable[[Any], None]) -> None:
    """An unraisable hook: when orbax gives up reading a damaged checkpoint it closes its event
    loop while tensorstore still delivers callbacks to it, and CPython prints each as an ignored
    "RuntimeError: Event loop is closed" traceback (dozens); the damaged checkpoint itself is
    reported in one line. Every other unraisable exception is printed as before."""
    err = unraisable.exc_value
    if not (isinstance(err, RuntimeError) and str(err) == "Event loop is closed"):
        default(unraisable)


def _quiet_libraries() -> None:
    """No start-up chatter from TensorFlow's C++ logging, no `_NOISE` and no closed-event-loop
    reports (all kept with --verbose)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    for quiet in (_without_library_tracebacks, _without_noise):
        logging.getLogger("absl").addFilter(quiet)
    default = sys.unraisablehook
    sys.unraisablehook = lambda unraisable: _without_closed_loop_reports(unraisable, default)


def report(prog: str, err: BaseException) -> None:
    """Print a user error as one line and exit with code 2."""
    if isinstance(err, OSError) and getattr(err, "strerror", None):
        where = f"{err.filename}: " if err.filename else ""
        message = f"{where}{err.strerror}"
    else:
        message = one_line(err)
    for line in getattr(err, "problems", None) or (message,):  # DataProblems: one line each
        print(f"{prog}: error: {line}", file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)


def _flag_line(name: str, text: str) -> str:
    return textwrap.fill(f"{name}: {text}", 100, initial_indent="  ", subsequent_indent="      ")


def _flag_help(flag: Any) -> str:
    name = f"--[no]{flag.name}" if flag.boolean else f"--{flag.name}"
    default = "" if flag.default is None else f" (default: {flag.default_as_str})"
    return _flag_line(name, f"{flag.help}{default}")


def _help(doc: str, own: Sequence[Any], default_config: str | None, positionals: str) -> str:
    """The command's docstring (its usage), how to pick a config, and its own flags."""
    config = CONFIG_HELP + (f" (default: {default_config})" if default_config else
                            " (required)")
    lines = [doc.strip(), "", "flags:", _flag_line("--config", config),
             *(_flag_help(f) for f in own),
             _flag_line("--[no]verbose", "tracebacks for user errors and the libraries' logs"),
             _flag_line("--[no]compilation_cache", "keep compiled programs for later runs in "
                        "$XDG_CACHE_HOME/unet_jax/jax (default ~/.cache/unet_jax/jax; "
                        "UNET_JAX_COMPILATION_CACHE=0 also turns it off)"),
             _flag_line("--helpfull", "every flag, including absl's")]
    if positionals:
        lines[2:2] = [f"arguments: {positionals}", ""]
    return "\n".join(lines) + "\n"


def run(main: Callable[[Any, list[str]], int | None], *, prog: str,
        define_flags: Callable[[], None] | None = None, default_config: str | None = None,
        argv: Sequence[str] | None = None, positionals: str = "") -> None:
    """Parse the command line (config_flags' `--config`, the command's own flags), check the
    config, call `main(config, argv)`; positional arguments are refused unless `positionals`
    describes them."""
    argv = list(sys.argv if argv is None else argv)
    verbose = _verbose(argv)
    if not verbose:
        _quiet_libraries()
    use_cpu_xla_flags()
    from absl import app, flags

    flags.DEFINE_bool("verbose", False, "show tracebacks for user errors too")
    flags.DEFINE_bool("compilation_cache", True, "keep compiled programs in "
                      "$XDG_CACHE_HOME/unet_jax/jax (~/.cache/...) for later runs "
                      "(UNET_JAX_COMPILATION_CACHE=0 also turns it off)")
    before = set(flags.FLAGS)
    if define_flags is not None:
        define_flags()
    own = [flags.FLAGS[name] for name in flags.FLAGS if name not in before]
    doc = sys.modules[main.__module__].__doc__ or prog
    holder: list[Any] = []

    def parse(args: list[str]) -> list[str]:
        if any(a in HELP_ARGS for a in args[1:]):
            print(_help(doc, own, default_config, positionals), end="")
            sys.exit(0)
        if "--helpfull" in args[1:]:
            print(flags.FLAGS.get_help())
            sys.exit(0)
        try:
            rest, config = _parse_config(args, default_config)
        except (UserError, flags.Error, KeyError, AttributeError) as err:
            if verbose:
                raise
            from unet_jax.config import flag_error_message
            report(prog, UserError(flag_error_message(err, args)))
        if len(rest) > 1 and not positionals:
            report(prog, UserError(f"unexpected argument(s) {' '.join(rest[1:])}: flags are "
                                     "given as --name=VALUE (see --help)"))
        holder.append(config)
        return rest

    def absl_main(args: list[str]) -> None:
        use_compilation_cache(compilation_cache_dir(flags.FLAGS.compilation_cache))
        try:
            code = main(holder[0], args)
        except (UserError, OSError) as err:
            user_os_error = isinstance(err, OSError) and getattr(err, "strerror", None)
            if verbose or not (isinstance(err, UserError) or user_os_error):
                raise
            report(prog, err)
        sys.exit(int(code or 0))

    app.run(absl_main, argv=argv, flags_parser=parse)


def _parse_config(argv: list[str], default_config: str | None) -> tuple[list[str], Any]:
    """(the positional arguments, the checked config) of `argv`, the config through
    `ml_collections.config_flags` (`lock_config=False`: library code gets the same unlocked
    ConfigDict as from `unet_jax.config.load_config`)."""
    from absl import flags
    from ml_collections import config_flags

    from unet_jax.config import check_config, check_config_file

    argv, spec = _config_first(argv)
    if spec or default_config:
        check_config_file(spec or default_config)
    holder = config_flags.DEFINE_config_file("config", default_config, CONFIG_HELP,
                                             lock_config=False, sys_argv=argv)
    rest = flags.FLAGS(argv)
    if holder.value is None:
        raise ConfigError("--config is required, e.g. --config configs/drive.py:fcn,ce "
                          "(see --help)")
    return rest, check_config(holder.value)
