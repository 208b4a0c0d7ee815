"""What the XLA:CPU flag that unet_jax's command lines set buys: the same cases with and without.

    python experiments/cpu_flags.py [--force] [--out experiments/results/cpu_flags.md]

The command lines (`unet_jax.cli.common.use_cpu_xla_flags`, before JAX starts) add
`--xla_cpu_experimental_ynn_fusion_type=dot,reduce` to XLA_FLAGS (YNNPACK for matmuls and
reductions) unless UNET_JAX_XLA_DEFAULTS=0; jaxlib's own default and
the flag emptied (no YNNPACK fusion) are the other two variants. Each variant below runs
`python -m unet_jax.benchmark step|infer` in a fresh process (the flag only acts when the CPU
backend starts), with the variants interleaved case by case so that drift hits all of them alike.
Ratio: the time without any flag (XLA's own defaults, the baseline of this run) / the variant's.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VARIANTS = (
    ("XLA defaults (UNET_JAX_XLA_DEFAULTS=0)", {"UNET_JAX_XLA_DEFAULTS": "0"}),
    ("unet_jax default: ynn fusion dot,reduce", {}),
    ("no ynn fusion at all", {"UNET_JAX_XLA_DEFAULTS": "0",
                              "XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type="}),
)
CASES = (
    ("train step 4x64x64 (DRIVE)", ["step", "--config", "configs/drive.py:fcn",
                                    "--batch_size", "4"]),
    ("train step 4x128x128 (STARE)", ["step", "--config", "configs/stare.py:fcn",
                                      "--batch_size", "4"]),
    ("slide inference DRIVE 584x565", ["infer", "--config", "configs/drive.py:fcn"]),
)


def _time(args: list[str], env: dict[str, str], out: Path) -> float | str:
    full = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",)}
    full.update(env)
    done = subprocess.run([sys.executable, "-m", "unet_jax.benchmark", *args, "--json",
                           str(out)], cwd=REPO, env=full, capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        return "failed: " + " ".join(done.stderr.strip().splitlines()[-1:])[:120]
    result = json.loads(out.read_text())
    return result["ms_per_step"] / 1e3 if "ms_per_step" in result else result["s_per_image"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path,
                        default=REPO / "experiments" / "results" / "cpu_flags.md")
    parser.add_argument("--force", action="store_true", help="overwrite --out")
    args = parser.parse_args()
    if args.out.exists() and not args.force:
        raise SystemExit(f"cpu_flags: {args.out} exists; pass --force to overwrite it")
    load_before = [round(v, 2) for v in os.getloadavg()]
    table: dict[str, dict[str, float | str]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for case, case_args in CASES:
            for i, (variant, env) in enumerate(VARIANTS):
                seconds = _time(case_args, env, Path(tmp) / f"{i}.json")
                table.setdefault(case, {})[variant] = seconds
                print(f"{case} | {variant}: {seconds}", flush=True)
    load_after = [round(v, 2) for v in os.getloadavg()]
    lines = [f"# XLA:CPU flags on the UNet ({datetime.datetime.now():%Y-%m-%d %H:%M})", "",
             f"{os.cpu_count()} cores; load average {load_before} before, {load_after} after; "
             "`python experiments/cpu_flags.py`. Time per step / image, and in brackets the "
             "speed-up over XLA's defaults measured in this run.", "",
             "| case | " + " | ".join(v for v, _ in VARIANTS) + " |",
             "|---|" + "---|" * len(VARIANTS)]
    for case, row in table.items():
        base = row[VARIANTS[0][0]]
        cells = []
        for variant, _ in VARIANTS:
            value = row[variant]
            if isinstance(value, str) or isinstance(base, str):
                cells.append(str(value) if isinstance(value, str) else f"{value:.3f} s")
            else:
                cells.append(f"{value:.3f} s ({base / value:.2f}x)")
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
