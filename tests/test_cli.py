"""The command lines' parsing, without compiling anything: `--help` on every CLI, one-line
errors for stray arguments, non-Python configs and out-of-range flags, `--config` overrides
through ml_collections.config_flags, and `import unet_jax` leaving XLA_FLAGS alone."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

CLIS = {"main": ("--workdir", "--mode", "--num_processes"),
        "predict": ("--checkpoint", "--input", "--output", "--save_logits"),
        "convert": ("--checkpoint", "--output", "--to_mmseg"),
        "export": ("--checkpoint", "--output", "--platforms"),
        "browse": ("--output", "--num"),
        "benchmark": ("--batch_size", "--steps", "--reps", "--image_size", "--workers")}


def _env(env: dict[str, str] | None = None) -> dict[str, str]:
    full = {**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})}
    full.pop("UNET_JAX_VERBOSE", None)
    return full


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, env=_env(env), capture_output=True,
                          text=True, timeout=300)


def _one_line_error(done: subprocess.CompletedProcess, prog: str, *parts: str) -> str:
    """The single stderr line of a refused command (exit code 2), checked to name `parts`."""
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"unet_jax.{prog}: error: "), done.stderr
    for part in parts:
        assert part in lines[0], lines[0]
    return lines[0]


STRAY = [
    ("browse", ["--config", "configs/drive.py", "--output", "out", "[--num", "2]"]),
    ("main", ["--config", "configs/drive.py", "stray"]),
    ("convert", ["--config", "configs/drive.py", "--checkpoint", "a.pth", "--output", "o", "x"]),
]
BENCHMARK = [
    (["step", "--steps=-1"], ["--steps=-1"]),
    (["input", "--workers=-5"], ["--workers=-5"]),
    (["infer", "--reps=0"], ["--reps=0"]),
    (["infer", "--image_size=100000,100000"], ["--image_size", "at most"]),
    (["infer", "--image_size=5x"], ["--image_size", "expected H,W"]),
    (["infer", "--batch_size=-2"], ["--batch_size=-2"]),
]
MISTAKES = [
    (["--config.train.num_stepz=3"], ["--config.train.num_stepz", "num_steps"]),
    (["--config", "configs/drive.py:unet"], ["unknown part 'unet'"]),
    (["--config", "configs/nowhere.py"], ["configs/nowhere.py does not exist"]),
    (["--config", "configs/drive.py", "--config.model.base_channels=wide"],
     ["--config.model.base_channels=wide"]),
    (["--workdr=x"], ["workdr", "workdir"]),
]
PRINT_CONFIG = """
import sys
from unet_jax.cli import common
def show(config, argv):
    print(config.data.palette, config.eval.tta, config.data.crop_size, config.train.lr,
          repr(config.data.manual_dir), argv[1:])
common.run(show, prog="unet_jax.show", argv=sys.argv, positionals="ANY")
"""
OVERRIDES = [
    ("-c", PRINT_CONFIG, "--config.data.palette=((0,0,0),(200,30,30))", "--config",
     "configs/drive.py:fcn", "--config.eval.tta", "--config.data.crop_size=32,32",
     "--config.train.lr=1", "--config.data.manual_dir=123", "extra"),
    ("-c", PRINT_CONFIG, "--config", "configs/drive.py:fcn", "--config.eval.tta",
     "--noconfig.eval.tta"),
]


def _record_command(record) -> tuple[str, ...]:
    return ("-m", "unet_jax.predict", f"--config={record}", "--checkpoint", "c", "--output", "o",
            "in.png")


@pytest.fixture(scope="module")
def batched(tmp_path_factory):
    """`batched(*args)`: the result of `python ARGS` for every parsing case of this module, all
    run by one tests/cli_batch.py process (each in a forked child: its own exit code and
    output, one interpreter start and one import of the command modules for them all)."""
    record = tmp_path_factory.mktemp("record") / "config.json"
    record.write_text('{"model": {"head": "fcn"}, "eval": {"tta": false}}\n')
    commands = [("-m", f"unet_jax.{cli}", "--help") for cli in sorted(CLIS)]
    commands += [("-m", f"unet_jax.{cli}", *args) for cli, args in STRAY]
    commands += [_record_command(record)]
    commands += [("-m", "unet_jax.benchmark", *args, "--config", "configs/drive.py")
                 for args, _ in BENCHMARK]
    commands += [("-m", "unet_jax.main", *args) for args, _ in MISTAKES]
    commands += OVERRIDES
    done = subprocess.run([sys.executable, str(REPO / "tests" / "cli_batch.py")],
                          input=json.dumps(commands), cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = {tuple(c): subprocess.CompletedProcess(c, **r)
               for c, r in zip(commands, json.loads(done.stdout))}

    def lookup(*args: str) -> subprocess.CompletedProcess:
        return results[args]
    lookup.record = record
    return lookup


@pytest.mark.parametrize("cli", sorted(CLIS))
def test_help_exits_0_with_the_commands_flags_and_how_to_pick_a_config(cli, batched):
    done = batched("-m", f"unet_jax.{cli}", "--help")
    assert done.returncode == 0, done.stderr[-2000:]
    for flag in ("--config", "configs/<dataset>.py", "--config.<section>.<field>=VALUE",
                 *CLIS[cli]):
        assert flag in done.stdout, (flag, done.stdout)


@pytest.mark.parametrize("cli,args", STRAY)
def test_a_stray_positional_argument_is_one_line(cli, args, batched):
    done = batched("-m", f"unet_jax.{cli}", *args)
    _one_line_error(done, cli, "unexpected argument", args[-1])


def test_a_run_record_as_config_is_one_line(batched):
    record = batched.record
    done = batched(*_record_command(record))
    _one_line_error(done, "predict", str(record), "not a Python config file")


@pytest.mark.parametrize("args,parts", BENCHMARK)
def test_benchmark_flags_are_validated_before_anything_runs(args, parts, batched):
    done = batched("-m", "unet_jax.benchmark", *args, "--config", "configs/drive.py")
    _one_line_error(done, "benchmark", *parts)


@pytest.mark.parametrize("args,parts", MISTAKES)
def test_config_and_flag_mistakes_are_one_line(args, parts, batched):
    _one_line_error(batched("-m", "unet_jax.main", *args), "main", *parts)


def test_overrides_parse_as_documented_in_any_order(batched):
    """Tuples of tuples, bare booleans, numbers into float fields, digits into string fields,
    and overrides before `--config` (config_flags needs the file first; run moves it)."""
    done = batched(*OVERRIDES[0])
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[0] == "((0, 0, 0), (200, 30, 30)) True (32, 32) 1.0 '123' " \
                                         "['extra']", done.stdout
    done = batched(*OVERRIDES[1])
    assert done.returncode == 0 and " False " in done.stdout, done.stdout + done.stderr


@pytest.mark.parametrize("env", [{}, {"XLA_FLAGS": "--xla_dump_to=/tmp/x"}])
def test_importing_the_library_leaves_xla_flags_alone(env):
    code = ("import os, unet_jax, unet_jax.config, unet_jax.segmenter, unet_jax.train, "
            "unet_jax.cli.predict, unet_jax.cli.main, unet_jax.cli.common; "
            "print(repr(os.environ.get('XLA_FLAGS')))")
    full = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    full.update(env)
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=full,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == repr(env.get("XLA_FLAGS")), done.stdout


def test_the_command_lines_add_the_cpu_flag_unless_told_not_to():
    from unet_jax.cli.common import CPU_XLA_FLAGS, use_cpu_xla_flags

    env = {"XLA_FLAGS": "--a=1"}
    use_cpu_xla_flags(env)
    assert env["XLA_FLAGS"] == f"--a=1 {CPU_XLA_FLAGS}"
    use_cpu_xla_flags(env)  # once
    assert env["XLA_FLAGS"] == f"--a=1 {CPU_XLA_FLAGS}"
    for env in ({"UNET_JAX_XLA_DEFAULTS": "0"},
                {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type="}):
        before = dict(env)
        use_cpu_xla_flags(env)
        assert env == before


def test_a_run_that_fails_before_training_leaves_no_run_folder(tmp_path):
    run = tmp_path / "run"
    done = _run("-m", "unet_jax.main", "--config", "configs/drive.py", f"--workdir={run}",
                f"--config.data.manual_dir={tmp_path / 'absent'}",
                f"--config.data.tfds_data_dir={tmp_path / 'tfds'}", "--jax_cache_dir=")
    _one_line_error(done, "main", "absent")
    assert not run.exists()


def test_library_noise_is_dropped_and_other_lines_kept():
    import logging

    from unet_jax.cli.common import _without_noise

    def record(msg: str, *args: str) -> logging.LogRecord:
        return logging.LogRecord("absl", logging.WARNING, "x.py", 1, msg, args, None)

    assert not _without_noise(record("Metadata file does not exist: %s", "/r/_METADATA"))
    assert not _without_noise(record("Variant folder %s has no %s", "/d", "dataset_info.json"))
    assert _without_noise(record("No space left on device: %s", "/r"))
