"""unet_jax against the real mmsegmentation on this CPU: the same cases, one run, as ratios.

    bash ../shared/tools/mmseg_ref/setup.sh /tmp/mmseg-ref-venv      # once, the mmseg python
    python experiments/bench_vs_mmseg.py [--quick] [--force]
      [--mmseg_python /tmp/mmseg-ref-venv/bin/python] [--out experiments/results/cpu_vs_mmseg.md]

Each section runs mmseg's own code first (`../shared/tools/mmseg_ref/bench_torch.py`: train step
`model.loss -> parse_losses -> OptimWrapper.update_params`, eval forward `encode_decode`,
`EncoderDecoder.inference`; 2 threads, median of 5 after 2 warm-ups) and then ours
(`python -m unet_jax.benchmark step|infer`, one process per case, median after warm-up), so the
two sides of a row are measured minutes apart. The ratio is mmseg's time / ours: above 1 we are
faster. `--quick` leaves out the slow rows (HRF slide, ~2 min a side; batch 16 step; predict).
The predict rows (`predict_case`, `--only_predict` alone) time whole processes on a generated
folder of 20 images of 20 sizes: mmseg's `init_model` + `inference_model` loop, and
`python -m unet_jax.predict` twice, cold (an empty compilation cache) and warm (the cache the
cold run filled); the target is ratio >= 1, compilation included. Our infer
cases set `data.img_scale` to the image's own size, as mmseg's bench feeds the tensor straight to
`inference` without the test resize. The load average is read before and after: measure on a
quiet machine (load well under 1 on these 2 cores) or the ratios mean little.
Writes the table as markdown (`--out`) and every figure as JSON beside it.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO.parent / "shared" / "tools" / "mmseg_ref"

# (section, row label, mmseg JSON path, our benchmark arguments, target ratio, quick?)
CASES = (
    ("train", "train step, FCN, 4x64x64 (DRIVE crop)", ("train_step", "4x3x64x64"),
     ["step", "--config", "configs/drive.py:fcn", "--batch_size", "4"], 1.25, True),
    ("train", "train step, FCN, 4x128x128 (STARE crop)", ("train_step", "4x3x128x128"),
     ["step", "--config", "configs/stare.py:fcn", "--batch_size", "4"], 1.25, True),
    ("train", "train step, FCN, 4x256x256 (HRF crop)", ("train_step", "4x3x256x256"),
     ["step", "--config", "configs/hrf.py:fcn", "--batch_size", "4"], 1.25, True),
    ("train16", "train step, FCN, 16x64x64 (DRIVE, the zoo's batch)", ("train_step16", "16x3x64x64"),
     ["step", "--config", "configs/drive.py:fcn", "--batch_size", "16"], 1.25, False),
    ("fwd", "eval forward, 1x64x64", ("forward_eval", "1x3x64x64"),
     ["infer", "--config", "configs/drive.py:fcn", "--image_size", "64,64",
      "--config.data.img_scale=(64,64)"], None, True),
    ("fwd", "eval forward, 1x256x256", ("forward_eval", "1x3x256x256"),
     ["infer", "--config", "configs/hrf.py:fcn", "--image_size", "256,256",
      "--config.data.img_scale=(256,256)"], None, True),
    ("infer", "slide inference, DRIVE 584x565 (182 windows)", ("inference", "slide_584x565"),
     ["infer", "--config", "configs/drive.py:fcn"], 2.0, True),
    ("infer", "whole inference, 512x1024, 19 classes", ("inference", "whole_512x1024"),
     ["infer", "--config", "configs/cityscapes.py:fcn", "--image_size", "512,1024",
      "--config.data.img_scale=(1024,512)"], 1.25, True),
    ("infer", "slide inference, HRF 2336x3504 (294 windows)", ("inference", "slide_2336x3504"),
     ["infer", "--config", "configs/hrf.py:fcn", "--reps", "1"], 2.0, False),
)

# mmseg's train step at the zoo's DRIVE batch; bench_torch.py times batch 4 for all three crops,
# so this reuses its model builder and timer for the one batch-16 row.
MMSEG_TRAIN16 = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import bench_torch as bt
import torch
from mmengine.optim import build_optim_wrapper
from mmengine.structures import PixelData
from mmseg.structures import SegDataSample
torch.set_num_threads(2)
torch.manual_seed(0)
cfg, model = bt.build("fcn_unet_s5-d16_drive", train=True)
ow = build_optim_wrapper(model, cfg.optim_wrapper)
g = torch.Generator().manual_seed(0)
x = torch.randn(16, 3, 64, 64, generator=g)
samples = []
for _ in range(16):
    d = SegDataSample()
    d.gt_sem_seg = PixelData(data=torch.randint(0, 2, (1, 64, 64), generator=g))
    d.set_metainfo(dict(img_shape=(64, 64), pad_shape=(64, 64)))
    samples.append(d)
def step():
    parsed, _ = model.parse_losses(model.loss(x, samples))
    ow.update_params(parsed)
t = bt.timeit(step, 5, 2)
print("train 16x3x64x64: %.1f ms/step" % (t["median_s"] * 1e3), flush=True)
json.dump({"train_step16": {"16x3x64x64": t}}, open(sys.argv[2], "w"))
"""


# The predict case (issue 19 item 4): a folder of PREDICT_IMAGES images of as many sizes, segmented
# by mmseg's `init_model` + `inference_model` loop and by `python -m unet_jax.predict`, each timed
# as a whole process (imports, model build, checkpoint read, compilation, every image, the PNGs).
# Both sides read one checkpoint: the full-width DRIVE FCN with mmseg's own random init, saved
# by mmseg (no published weights are needed to time).
PREDICT_IMAGES, PREDICT_SIZES, PREDICT_SEED = 20, (300, 700), 0
PREDICT_CONFIG = "fcn_unet_s5-d16_drive"
MMSEG_CHECKPOINT = r"""
import sys
sys.path.insert(0, sys.argv[1])
import bench_torch as bt
import torch
torch.manual_seed(0)
cfg, model = bt.build(sys.argv[2])
torch.save({"state_dict": model.state_dict(), "meta": {}}, sys.argv[3])
"""
MMSEG_PREDICT = r"""
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import refcommon as rc
import cv2, torch
from mmseg.apis import inference_model, init_model
torch.set_num_threads(2)
model = init_model(rc.load_cfg(sys.argv[2]), sys.argv[3], device="cpu")
out = Path(sys.argv[5])
out.mkdir(parents=True, exist_ok=True)
for f in sorted(Path(sys.argv[4]).glob("*.png")):
    result = inference_model(model, str(f))
    cv2.imwrite(str(out / f.name), result.pred_sem_seg.data[0].numpy().astype("uint8"))
"""


def predict_folder(folder: Path, seed: int = PREDICT_SEED) -> list[tuple[int, int]]:
    """Write PREDICT_IMAGES random RGB PNGs of distinct sizes (H, W each in PREDICT_SIZES) to
    `folder`; their sizes. Pixel values do not change the time of either side."""
    import cv2
    import numpy as np

    rng = np.random.default_rng(seed)
    sizes: list[tuple[int, int]] = []
    while len(sizes) < PREDICT_IMAGES:
        hw = tuple(int(v) for v in rng.integers(PREDICT_SIZES[0], PREDICT_SIZES[1] + 1, 2))
        if hw not in sizes:
            sizes.append(hw)
    folder.mkdir(parents=True, exist_ok=True)
    for k, (h, w) in enumerate(sizes):
        image = cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (5, 5), 0)
        cv2.imwrite(str(folder / f"{k:02d}_{h}x{w}.png"), image)
    return sizes


def _timed(cmd: list[str], what: str, env: dict[str, str] | None = None) -> float:
    """Wall seconds of one process, start to end."""
    t0 = time.perf_counter()
    print(f"$ {' '.join(cmd)}", flush=True)
    done = subprocess.run(cmd, cwd=REPO, check=False, env=env)
    if done.returncode != 0:
        raise SystemExit(f"bench_vs_mmseg: {what} failed (exit {done.returncode})")
    return time.perf_counter() - t0


def predict_case(python: str, tmp: Path) -> list[dict[str, Any]]:
    """The predict rows: mmseg's loop, then our predict cold (an empty compilation cache) and
    warm (the cache the cold run filled), each a whole process on the same folder."""
    folder, ckpt = tmp / "predict_in", tmp / "fcn_drive_random.pth"
    sizes = predict_folder(folder)
    made = subprocess.run([python, "-c", MMSEG_CHECKPOINT, str(TOOL), PREDICT_CONFIG, str(ckpt)],
                          cwd=REPO, capture_output=True, text=True, check=False)
    if made.returncode != 0:  # mmengine logs every initialised weight: shown only on failure
        raise SystemExit(f"bench_vs_mmseg: mmseg checkpoint failed:\n{made.stderr[-3000:]}")
    mmseg_s = _timed([python, "-c", MMSEG_PREDICT, str(TOOL), PREDICT_CONFIG, str(ckpt),
                      str(folder), str(tmp / "predict_mmseg")], "mmseg inference_model loop")
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp / "xdg_cache"))
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    ours_s = [_timed([sys.executable, "-m", "unet_jax.predict", "--config",
                      "configs/drive.py:fcn", "--checkpoint", str(ckpt), "--input", str(folder),
                      "--output", str(tmp / f"predict_ours_{run}")], f"unet_jax.predict {run}",
                     env) for run in ("cold", "warm")]
    print(f"predict: mmseg {mmseg_s:.1f} s, unet_jax cold {ours_s[0]:.1f} s, warm "
          f"{ours_s[1]:.1f} s", flush=True)
    what = f"predict, {PREDICT_IMAGES} images of {PREDICT_IMAGES} sizes {PREDICT_SIZES[0]}-" \
           f"{PREDICT_SIZES[1]} px, DRIVE FCN, whole process"
    return [{"case": f"{what}, {run}", "mmseg_s": mmseg_s, "ours_s": s, "ratio": mmseg_s / s,
             "target": 1.0, "ours": {"s_total": s, "sizes": sizes},
             "mmseg": {"s_total": mmseg_s}}
            for run, s in zip(("cold compile cache", "warm compile cache"), ours_s)]


def _load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def _run(cmd: list[str], what: str) -> None:
    print(f"$ {' '.join(cmd)}", flush=True)
    done = subprocess.run(cmd, cwd=REPO, check=False)
    if done.returncode != 0:
        raise SystemExit(f"bench_vs_mmseg: {what} failed (exit {done.returncode}): "
                         f"{' '.join(cmd)}")


def mmseg_section(python: str, section: str, quick: bool, tmp: Path) -> dict[str, Any]:
    """mmseg's figures for one section, from its own bench script (or the batch-16 step)."""
    out = tmp / f"mmseg_{section}.json"
    if section == "train16":
        _run([python, "-c", MMSEG_TRAIN16, str(TOOL), str(out)], "mmseg train 16")
    else:
        _run([python, str(TOOL / "bench_torch.py"), "--sections", section, "--out", str(out),
              *(["--quick"] if quick or section != "infer" else [])], f"mmseg {section}")
    return json.loads(out.read_text())


def ours(args: list[str], tmp: Path, index: int) -> dict[str, Any]:
    """One `unet_jax.benchmark` case in its own process."""
    out = tmp / f"ours_{index}.json"
    _run([sys.executable, "-m", "unet_jax.benchmark", *args, "--json", str(out)],
         f"unet_jax {args[0]}")
    return json.loads(out.read_text())


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _seconds(ours_result: dict[str, Any]) -> float:
    if "ms_per_step" in ours_result:
        return ours_result["ms_per_step"] / 1e3
    return ours_result["s_per_image"]


def _show(seconds: float) -> str:
    return f"{seconds * 1e3:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def markdown(rows: list[dict[str, Any]], header: dict[str, Any]) -> str:
    lines = [f"# unet_jax vs mmsegmentation on CPU ({header['date']})", "",
             f"{header['cpu']}, {header['cores']} cores; load average (1, 5, 15 min) "
             f"{header['load_before']} before, {header['load_after']} after; "
             f"`python experiments/bench_vs_mmseg.py{' --quick' if header['quick'] else ''}"
             f"{' --only_predict' if header['only_predict'] else ''}`. "
             "Ratio: mmseg's time / ours (above 1: we are faster). fp32 throughout.", "",
             "| case | mmseg | unet_jax | ratio | target | met |", "|---|---|---|---|---|---|"]
    for r in rows:
        target = "" if r["target"] is None else f">= {r['target']}x"
        met = "" if r["target"] is None else ("yes" if r["ratio"] >= r["target"] else "no")
        lines.append(f"| {r['case']} | {_show(r['mmseg_s'])} | {_show(r['ours_s'])} | "
                     f"{r['ratio']:.2f}x | {target} | {met} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mmseg_python", default="/tmp/mmseg-ref-venv/bin/python")
    parser.add_argument("--out", type=Path, default=REPO / "experiments" / "results" /
                        "cpu_vs_mmseg.md")
    parser.add_argument("--quick", action="store_true",
                        help="leave out HRF slide and the batch-16 step")
    parser.add_argument("--force", action="store_true", help="overwrite --out")
    parser.add_argument("--only_predict", action="store_true",
                        help="run only the predict case (a folder of mixed sizes, cold and warm)")
    args = parser.parse_args(argv)
    if not Path(args.mmseg_python).is_file():
        raise SystemExit(f"bench_vs_mmseg: {args.mmseg_python} does not exist; build it with "
                         "bash ../shared/tools/mmseg_ref/setup.sh /tmp/mmseg-ref-venv")
    if not (TOOL / "bench_torch.py").is_file():
        raise SystemExit(f"bench_vs_mmseg: {TOOL / 'bench_torch.py'} is missing; ../shared "
                         "must sit beside the repository")
    if args.out.exists() and not args.force:
        raise SystemExit(f"bench_vs_mmseg: {args.out} exists; pass --force to overwrite it")
    cases = [c for c in CASES if (c[5] or not args.quick) and not args.only_predict]
    header = {"date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"), "cpu": _cpu(),
              "cores": os.cpu_count(), "load_before": _load(), "quick": args.quick,
              "only_predict": args.only_predict}
    print(f"bench_vs_mmseg: {header}", flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_vs_mmseg_") as tmp:
        for section in dict.fromkeys(c[0] for c in cases):  # in order, each once
            reference = mmseg_section(args.mmseg_python, section, args.quick, Path(tmp))
            for index, (sec, case, (group, key), our_args, target, _) in enumerate(cases):
                if sec != section:
                    continue
                result = ours(our_args, Path(tmp), index)
                mmseg_s = reference[group][key]["median_s"]
                rows.append({"case": case, "mmseg_s": mmseg_s, "ours_s": _seconds(result),
                             "ratio": mmseg_s / _seconds(result), "target": target,
                             "ours": result, "mmseg": reference[group][key]})
                print(f"{case}: mmseg {_show(mmseg_s)}, unet_jax {_show(rows[-1]['ours_s'])}, "
                      f"ratio {rows[-1]['ratio']:.2f}x", flush=True)
        if not args.quick:
            rows.extend(predict_case(args.mmseg_python, Path(tmp)))
    header["load_after"] = _load()
    text = markdown(rows, header)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps({"header": header, "rows": rows},
                                                        indent=1) + "\n")
    print("\n" + text + f"\nwritten: {args.out} (+ .json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
