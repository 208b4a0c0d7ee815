"""The CPU levers of issue 19, each against the baseline in the same run.

    python experiments/conv_levers.py [--cases drive,stare,hrf,drive16,slide,fwd256]
        [--variants base,wgrad_gemm,+vec512,+ynn_conv] [--rounds 2]
        [--out experiments/results/conv_levers.md]

Every variant is one `python -m unet_jax.benchmark step|infer` process (the train step exactly
as training compiles it, or the inference of bench_vs_mmseg.py; median after warm-up); variants are interleaved round by round so
that a change of the machine's load hits them alike, and each is reported as the ratio
baseline / variant (above 1 the lever helps). Variants:
  base        weight gradients as XLA lowers them (`layers.WGRAD_AS_GEMM = False`), convs on
              Eigen (the CLIs' `dot,reduce` YNN setting)
  wgrad_gemm  the weight gradient of every stride-1 conv on maps > GEMM_MAX_PIXELS as one GEMM
              per kernel tap (`layers.conv2d_wgrad_gemm`; inference has no gradient)
  +vec512     wgrad_gemm with LLVM's preferred vector width 512 (AVX-512 for XLA's own fusions)
  +ynn_conv   wgrad_gemm with forward and input-gradient convs through YNNPACK
The load average is printed before and after: read the ratios only on a quiet machine.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from step_profile import publish  # noqa: E402  (experiments/ is the script's folder)

REPO = Path(__file__).resolve().parents[1]
# case -> the benchmark command's arguments (train steps at batch 4 or 16; inference cases as
# experiments/bench_vs_mmseg.py runs them)
CASES = {
    "drive": ["step", "--config", "configs/drive.py:fcn", "--batch_size", "4"],
    "stare": ["step", "--config", "configs/stare.py:fcn", "--batch_size", "4"],
    "hrf": ["step", "--config", "configs/hrf.py:fcn", "--batch_size", "4"],
    "drive16": ["step", "--config", "configs/drive.py:fcn", "--batch_size", "16"],
    "slide": ["infer", "--config", "configs/drive.py:fcn"],
    "fwd256": ["infer", "--config", "configs/hrf.py:fcn", "--image_size", "256,256",
               "--config.data.img_scale=(256,256)"],
}
BASE_FLAGS = "--xla_cpu_experimental_ynn_fusion_type=dot,reduce"
VARIANTS = {
    "base": (False, BASE_FLAGS),
    "wgrad_gemm": (True, BASE_FLAGS),
    "+vec512": (True, f"{BASE_FLAGS} --xla_cpu_prefer_vector_width=512"),
    "+ynn_conv": (True, "--xla_cpu_experimental_ynn_fusion_type=dot,reduce,individual_convolution"),
}
RUN = """
import sys
from unet_jax.models import layers
layers.WGRAD_AS_GEMM = sys.argv.pop(1) == "True"
from unet_jax.cli.benchmark import run
sys.argv[0] = "unet_jax.benchmark"
run()
"""


def measure(variant: str, case: str) -> float:
    """ms per train step or per inference of one variant, in a fresh process."""
    gemm, flags = VARIANTS[variant]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "step.json"
        env = {**os.environ, "XLA_FLAGS": flags}
        subprocess.run([sys.executable, "-c", RUN, str(gemm), *CASES[case], "--json", str(out)],
                       cwd=REPO, env=env, check=True, capture_output=True)
        result = json.loads(out.read_text())
        return result["ms_per_step"] if "ms_per_step" in result else result["s_per_image"] * 1e3


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", default="drive,stare")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default="")
    a = ap.parse_args()
    variants = a.variants.split(",")
    before = loadavg()
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(a.rounds):
        for case in a.cases.split(","):
            for variant in variants:
                ms = measure(variant, case)
                times.setdefault((case, variant), []).append(ms)
                print(f"{case:<8} {variant:<11} {ms:8.1f} ms", flush=True)
    lines = ["# CPU levers (ms per train step or inference, median of rounds; ratio = base / variant)", "",
             f"`python experiments/conv_levers.py --cases {a.cases} --rounds {a.rounds}`; "
             f"load average {before} before, {loadavg()} after.", "",
             "| case | " + " | ".join(variants) + " |", "|---|" + "---:|" * len(variants)]
    for case in a.cases.split(","):
        base = statistics.median(times[(case, variants[0])])
        cells = []
        for v in variants:
            ms = statistics.median(times[(case, v)])
            cells.append(f"{ms:.0f}" + ("" if v == variants[0] else f" ({base / ms:.2f}x)"))
        lines.append(f"| {case}: `{' '.join(CASES[case])}` | " + " | ".join(cells) + " |")
    publish("\n".join(lines) + "\n", a.out)


if __name__ == "__main__":
    main()
