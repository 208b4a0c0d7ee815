"""One-shot accelerator report: train step, inference, input pipeline and a short DRIVE training.

Here, once (prepares DRIVE from its official files into the records training reads, and zips
the pure-Python packages the report needs that a bare GPU machine lacks, ml_collections and
tqdm; about 30 MB):
    python experiments/gpu_report.py --bundle .gpu_bundle --data ../shared/data/DRIVE
On the GPU machine (jax with CUDA, flax, optax, orbax, opencv, numpy, and grain + array_record,
which read the records: installed, or carried along as wheels for its Python; no TensorFlow, TFDS
or ml_collections), from the repository root, with .gpu_bundle carried along:
    python experiments/gpu_report.py --data .gpu_bundle/DRIVE --out $OUT
Smoke run of the same code on CPU (tiny widths and sizes; the train step on DRIVE float32 only,
inference on DRIVE (slide) and Cityscapes (whole) only; measured 53 s inside the loaded
test suite; tests/test_gpu_report.py):
    python experiments/gpu_report.py --smoke --data .gpu_bundle/DRIVE --out /tmp/gpu_smoke

Sections, in this order, each case skipped (and said so) when the time budget (`--budget_s`,
default 470 s) cannot hold it, and a failing case (e.g. out of memory) reported as one line:
  1. train step, float32 and bfloat16, at the crops of DRIVE, STARE, HRF and Cityscapes, batch 16
     (`unet_jax.benchmark.measure_step`: median of 5 steps; images/s; what XLA plans for one step,
     arguments + outputs + temporaries; the device allocator's peak so far);
  2. inference per image: DRIVE, STARE and HRF slide, Cityscapes whole (`measure_infer`);
  3. the input pipeline on DRIVE with every host core and with one worker (`measure_input`);
  4. DRIVE FCN trained on the real data with the canonical step and batches (no checkpoints) for
     as many steps as fit in `--train_s` seconds (default 240, less if the budget is short) at
     the zoo's batch 16, the poly schedule spread over those steps, then evaluated on the 20
     test images (slide, as the zoo): mDice, vessel Dice, FOV metrics.
The markdown table is printed and rewritten under `--out` after every case (gpu_report.md and
gpu_report.json), so a run cut short still leaves what it measured.
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import shutil
import sys
import time
import traceback
import zipfile
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Pure-Python packages a bare accelerator machine may lack; the bundle carries them as zips.
BUNDLED = ("ml_collections", "tqdm")
REPORT_MD, REPORT_JSON = "gpu_report.md", "gpu_report.json"
STEP_CASES = (("DRIVE", "configs/drive.py:fcn"), ("STARE", "configs/stare.py:fcn"),
              ("HRF", "configs/hrf.py:fcn"), ("Cityscapes", "configs/cityscapes.py:fcn"))
DTYPES = ("float32", "bfloat16")
# Rough seconds a case needs at least (compile + timing); a case starts only if this is left.
NEED_S = {"step": 25.0, "infer": 15.0, "input": 20.0, "train": 60.0}


# ------------------------------------------------------------------------------ the bundle
def make_bundle(bundle: Path, drive_dir: Path) -> None:
    """Prepare DRIVE's records into `bundle/DRIVE` and zip the `BUNDLED` packages of this
    Python into `bundle/pylib`."""
    import tempfile

    from unet_jax.data import loading, records

    if bundle.exists() and any(bundle.iterdir()):
        raise SystemExit(f"gpu_report: {bundle} exists and is not empty; remove it or choose "
                         "another --bundle")
    with tempfile.TemporaryDirectory(prefix="gpu_report_tfds-") as tfds_dir:
        prepared = loading.prepare({"name": "drive", "manual_dir": str(drive_dir),
                                   "tfds_data_dir": tfds_dir})
        (bundle / "DRIVE").mkdir(parents=True)
        for split in loading.RECORD_SPLITS:
            shutil.copy(records.split_path(prepared, split),
                        records.split_path(bundle / "DRIVE", split))
    pylib = bundle / "pylib"
    pylib.mkdir(parents=True)
    for name in BUNDLED:
        package = Path(importlib.import_module(name).__file__).parent
        with zipfile.ZipFile(pylib / f"{name}.zip", "w", zipfile.ZIP_DEFLATED) as zf:
            for path in sorted(package.rglob("*")):
                if path.is_file() and "__pycache__" not in path.parts:
                    zf.write(path, path.relative_to(package.parent))
    size = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())
    print(f"bundle: {bundle} ({size / 2**20:.1f} MiB): DRIVE's records + {', '.join(BUNDLED)}")


def use_bundled(pylib: Path) -> dict[str, str]:
    """Import each `BUNDLED` package from this Python, else from `pylib/<name>.zip`."""
    where = {}
    for name in BUNDLED:
        try:
            module = importlib.import_module(name)
        except ImportError:
            zipped = pylib / f"{name}.zip"
            if not zipped.is_file():
                raise SystemExit(f"gpu_report: {name} is not installed and {zipped} does not "
                                 "exist; make the bundle with --bundle (see the docstring)")
            sys.path.append(str(zipped))
            module = importlib.import_module(name)
        where[name] = str(Path(module.__file__).parent)
    return where


# ------------------------------------------------------------------------------ the report
class Report:
    """Rows of each section, rendered as markdown and JSON after every change."""

    def __init__(self, out: Path, header: dict[str, Any], budget_s: float):
        self.out, self.header = out, header
        self.t0 = time.monotonic()
        self.budget_s = budget_s
        self.sections: dict[str, list[dict[str, Any]]] = {}

    def left(self) -> float:
        return self.budget_s - (time.monotonic() - self.t0)

    def add(self, section: str, row: dict[str, Any]) -> None:
        self.sections.setdefault(section, []).append(row)
        self.write()

    def run(self, section: str, row: dict[str, Any], fn: Callable[[], dict[str, Any]]) -> dict:
        """`row` updated with what `fn` measures; skipped or failed cases say so."""
        if self.left() < NEED_S[section]:
            row = {**row, "note": f"skipped: {self.left():.0f} s of the budget left"}
        else:
            try:
                row = {**row, **fn()}
            except Exception as err:  # pylint: disable=broad-except  # a report row, not a crash
                text = " ".join(str(err).split())[:160]
                row = {**row, "note": f"failed: {type(err).__name__}: {text}"}
                traceback.print_exc()
        self.add(section, row)
        print(f"[{time.monotonic() - self.t0:6.1f} s] {section}: {_plain(row)}", flush=True)
        return row

    def markdown(self) -> str:
        h = self.header
        lines = [f"# unet_jax accelerator report ({h['date']})", "",
                 f"{h['device_kind']} x {h['devices']} ({h['platform']}), jax {h['jax']}, "
                 f"flax {h['flax']}, {h['cpu_cores']} host cores, python {h['python']}"
                 f"{', SMOKE (tiny widths and sizes)' if h['smoke'] else ''}; "
                 f"report took {time.monotonic() - self.t0:.0f} s.", ""]
        for title, section, columns in TABLES:
            rows = self.sections.get(section)
            if not rows:
                continue
            lines += [f"## {title}", "", "| " + " | ".join(c for c, _ in columns) + " |",
                      "|" + "---|" * len(columns)]
            for row in rows:
                lines.append("| " + " | ".join(_cell(row, key) for _, key in columns) + " |")
            lines.append("")
        return "\n".join(lines)

    def write(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / REPORT_MD).write_text(self.markdown() + "\n")
        (self.out / REPORT_JSON).write_text(json.dumps(
            {"header": self.header, "sections": self.sections}, indent=1, default=str) + "\n")


TABLES = (
    ("Train step (fwd + bwd + SGD, one device)", "step",
     (("dataset", "dataset"), ("crop", "crop"), ("dtype", "dtype"), ("batch", "batch"),
      ("ms/step", "ms_per_step"), ("images/s", "images_per_s"), ("compile s", "compile_s"),
      ("XLA plan GiB", "xla_gib"), ("device peak GiB", "peak_gib"), ("note", "note"))),
    ("Inference per image (mmseg's test pipeline)", "infer",
     (("dataset", "dataset"), ("image", "image_size"), ("mode", "mode"),
      ("windows", "windows"), ("s/image", "s_per_image"), ("first call s", "first_call_s"),
      ("note", "note"))),
    ("Input pipeline (DRIVE, augmentation in worker processes)", "input",
     (("workers", "workers"), ("crops/s", "crops_per_s"), ("startup s", "startup_s"),
      ("batch_sha256", "sha"), ("note", "note"))),
    ("DRIVE FCN training on the real data, then validation (20 test images, slide)", "train",
     (("batch", "batch"), ("steps", "steps"), ("train s", "train_s"), ("steps/s", "steps_per_s"),
      ("last loss", "loss"), ("eval s", "eval_s"), ("mDice", "mDice"),
      ("vessel Dice", "vessel_dice"), ("FOV AUC", "fov_auc"), ("note", "note"))),
)


def _plain(row: dict[str, Any]) -> str:
    return ", ".join(f"{k} {_cell(row, k)}" for k in row)


def _cell(row: dict[str, Any], key: str) -> str:
    value = row.get(key)
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:.0f}"
    if isinstance(value, (list, tuple)):
        return "x".join(str(v) for v in value)
    return str(value)


# ------------------------------------------------------------------------------ the cases
def _config(spec: str, smoke: bool, *, shrink: bool = True) -> Any:
    from unet_jax.config import load_config
    config = load_config(str(REPO / spec.split(":")[0]) + ":" + spec.split(":")[1])
    if smoke:
        config.model.base_channels = 8
        if shrink:  # sizes / 4 (crops at least 32), as the real cases scaled down
            def quarter(size, least=16):
                return tuple(max(least, (int(v) // 4) // 16 * 16) for v in size)
            config.data.crop_size = quarter(config.data.crop_size, 32)
            config.eval.crop_size = quarter(config.eval.crop_size, 32)
            config.eval.stride = tuple(max(8, int(v) // 4) for v in config.eval.stride)
            config.data.image_size = tuple(int(v) // 4 for v in config.data.image_size)
            config.data.img_scale = tuple(int(v) // 4 for v in config.data.img_scale)
    return config


def _gib(value: int | None) -> float | None:
    return None if value is None else value / 2**30


def step_case(spec: str, dtype: str, batch: int, smoke: bool) -> dict[str, Any]:
    from unet_jax.cli.benchmark import measure_step
    config = _config(spec, smoke)
    config.model.dtype = dtype
    r = measure_step(config, batch_size=batch)
    return {"crop": r["crop"], "ms_per_step": r["ms_per_step"], "images_per_s": r["images_per_s"],
            "compile_s": r["compile_s"], "xla_gib": _gib(r["xla_memory_bytes"]),
            "peak_gib": _gib(r["peak_bytes_in_use"])}


def infer_case(spec: str, smoke: bool) -> dict[str, Any]:
    from unet_jax.cli.benchmark import measure_infer
    config = _config(spec, smoke)
    r = measure_infer(config, reps=2)
    return {k: r[k] for k in ("image_size", "mode", "windows", "s_per_image", "first_call_s")}


def input_case(records_dir: Path, workers: int, smoke: bool) -> dict[str, Any]:
    from unet_jax.cli.benchmark import measure_input
    config = _config("configs/drive.py:fcn", smoke, shrink=False)
    r = measure_input(config, workers=workers, steps=5 if smoke else 60,
                      batch_size=2 if smoke else 16, records_dir=str(records_dir))
    return {"crops_per_s": r["crops_per_s"], "startup_s": r["startup_s"],
            "sha": r["batch_sha256"][:16]}


def train_case(records_dir: Path, seconds: float, step_ms: float | None, batch: int, smoke: bool,
               workers: int) -> dict[str, Any]:
    """The canonical step (`unet_jax.step`) on the canonical batches (`data.sampler`) for as
    many steps as `seconds` should hold at `step_ms`, then `unet_jax.evaluate`."""
    import jax
    import numpy as np

    from unet_jax import parallel
    from unet_jax.data.records import RecordSource, samples, split_path
    from unet_jax.data.sampler import train_batches
    from unet_jax.evaluate import evaluate
    from unet_jax.models import build_model
    from unet_jax.step import create_train_state, make_train_step

    config = _config("configs/drive.py:fcn", smoke)  # smoke: the step case's DRIVE program
    t = config.train
    t.batch_size = batch
    steps = 4 if smoke else max(10, int(0.8 * seconds * 1e3 / (step_ms or 100.0)))
    t.num_steps = steps
    mesh = parallel.make_mesh()
    train = create_train_state(build_model(config.model, seed=t.seed), config)
    train.state = parallel.replicate(train.state, mesh)
    step_fn = parallel.jit_step(make_train_step(train, config), train.state, mesh)
    batches = train_batches(RecordSource(split_path(records_dir, "train")), config.data,
                            global_batch_size=batch,
                            seed=t.seed, workers=workers)
    t0 = time.perf_counter()
    done, note = 0, ""
    try:
        for done in range(1, steps + 1):
            train.state = step_fn(train.state, parallel.global_batch(next(batches), mesh))
            if done % 50 == 0 and time.perf_counter() - t0 > 1.25 * seconds:
                jax.block_until_ready(train.state)
                note = f"stopped at {done}/{steps} steps: over the time"
                break
        logs = train.read_logs()
    finally:
        batches.close()
    train_s = time.perf_counter() - t0
    validation = list(samples(RecordSource(split_path(records_dir, "validation")),
                              2 if smoke else 0))
    t1 = time.perf_counter()
    summary = evaluate(train.model(), validation, config, progress=False).summary
    eval_s = time.perf_counter() - t1
    vessel = summary["Dice"]["vessel"]
    fov = summary.get("fov") or {}
    return {"steps": done, "train_s": train_s, "steps_per_s": done / train_s,
            "loss": float(np.asarray(logs["means"]["loss"])), "eval_s": eval_s,
            "mDice": summary["mDice"], "vessel_dice": vessel, "fov_auc": fov.get("AUC"),
            **({"note": note} if note else {})}


# ------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", required=True, type=Path,
                        help="DRIVE's prepared records (the bundle's DRIVE/); with --bundle: "
                             "DRIVE in its official layout (training.zip, test.zip or them "
                             "extracted)")
    parser.add_argument("--out", type=Path, help="where gpu_report.md/json go")
    parser.add_argument("--bundle", type=Path, help="make the bundle here and stop")
    parser.add_argument("--pylib", type=Path, default=REPO / ".gpu_bundle" / "pylib",
                        help="zipped packages for a bare machine (default .gpu_bundle/pylib)")
    parser.add_argument("--smoke", action="store_true", help="tiny widths and sizes (CPU)")
    parser.add_argument("--budget_s", type=float, default=470.0)
    parser.add_argument("--train_s", type=float, default=240.0)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--force", action="store_true", help="overwrite a report in --out")
    args = parser.parse_args(argv)
    if args.bundle:
        make_bundle(args.bundle, args.data)
        return 0
    if args.out is None:
        parser.error("--out is required (or --bundle)")
    if (args.out / REPORT_MD).exists() and not args.force:
        raise SystemExit(f"gpu_report: {args.out / REPORT_MD} exists; pass --force to "
                         "overwrite it or choose another --out")
    where = use_bundled(args.pylib)
    from unet_jax.data.records import RecordSource, split_path
    for split in ("train", "validation"):  # a bad --data fails here, in one line, before any work
        RecordSource(split_path(args.data, split))

    import flax
    import jax
    smoke = args.smoke
    batch = 2 if smoke else args.batch
    cores = os.cpu_count() or 1
    header = {"date": datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
              "platform": jax.devices()[0].platform, "devices": jax.device_count(),
              "device_kind": jax.devices()[0].device_kind, "jax": jax.__version__,
              "flax": flax.__version__, "python": platform.python_version(),
              "cpu_cores": cores, "smoke": smoke, "packages": where,
              "tensorflow": importlib.util.find_spec("tensorflow") is not None}
    print(f"gpu_report: {header}", flush=True)
    report = Report(args.out, header, args.budget_s)
    # the train share of the budget is set aside first; the other sections use the rest
    train_s = 5.0 if smoke else min(args.train_s, max(report.left() - 200.0, 60.0))
    reserve = train_s + 40.0
    step_ms = None
    for name, spec in STEP_CASES:
        for dtype in DTYPES:
            if smoke and (name, dtype) != ("DRIVE", "float32"):  # the same code; CI stays short
                report.add("step", {"dataset": name, "dtype": dtype, "batch": batch,
                                    "note": "skipped: smoke runs DRIVE float32 only"})
                continue
            if report.left() - reserve < NEED_S["step"] and not (name == "DRIVE"
                                                                 and dtype == "float32"):
                report.add("step", {"dataset": name, "dtype": dtype, "batch": batch,
                                    "note": "skipped: the budget is kept for training"})
                continue
            row = report.run("step", {"dataset": name, "dtype": dtype, "batch": batch},
                             lambda spec=spec, dtype=dtype: step_case(spec, dtype, batch, smoke))
            if name == "DRIVE" and dtype == "float32":
                step_ms = row.get("ms_per_step")
    for name, spec in STEP_CASES:
        if smoke and name in ("STARE", "HRF"):  # DRIVE's slide code; smoke keeps CI short
            report.add("infer", {"dataset": name,
                                 "note": "skipped: smoke runs DRIVE (slide) and Cityscapes "
                                         "(whole) only"})
            continue
        if report.left() - reserve < NEED_S["infer"]:
            report.add("infer", {"dataset": name, "note": "skipped: the budget is kept for "
                                 "training"})
            continue
        report.run("infer", {"dataset": name}, lambda spec=spec: infer_case(spec, smoke))
    for workers in sorted({min(cores, 2) if smoke else cores, 1}, reverse=True):
        report.run("input", {"workers": workers},
                   lambda workers=workers: input_case(args.data, workers, smoke))
    train_s = 5.0 if smoke else min(train_s, max(report.left() - 40.0, 0.0))
    report.run("train", {"batch": batch},
               lambda: train_case(args.data, train_s, step_ms, batch, smoke,
                                  min(cores, 2) if smoke else cores))
    print("\n" + report.markdown())
    print(f"written: {args.out / REPORT_MD}, {args.out / REPORT_JSON}")
    return 0


if __name__ == "__main__":
    from unet_jax.errors import UserError, one_line
    try:
        sys.exit(main())
    except UserError as err:  # a bad --data or bundle: one line, as the CLIs do
        sys.exit(f"gpu_report: error: {one_line(err)}")
