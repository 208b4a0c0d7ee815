"""experiments/gpu_report.py runs where the GPU machines stand: TensorFlow, TFDS, PIL, torch and
matplotlib absent, ml_collections and tqdm only from the bundle's zips, DRIVE from the bundle's
prepared records (the smoke run, on CPU)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import DATA, REPO, require_shared

SCRIPT = REPO / "experiments" / "gpu_report.py"
# What a bare GPU machine lacks; `ml_collections` and `tqdm` must then come from the bundle.
ABSENT = ("tensorflow", "tensorflow_datasets", "PIL", "matplotlib", "torch", "tensorboardX")
BUNDLED = ("ml_collections", "tqdm")

BLOCKER = f'''
import sys
for name in {ABSENT!r}:
    sys.modules[name] = None  # "import name" now raises ImportError, as where it is absent


class _OnlyFromZips:
    """Find the bundled packages only on .zip entries of sys.path, as on the bare machine."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] not in {BUNDLED!r} or path is not None:
            return None
        import importlib.machinery
        zips = [p for p in sys.path if p.endswith(".zip")]
        spec = importlib.machinery.PathFinder.find_spec(name, zips) if zips else None
        if spec is None:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return spec


sys.meta_path.insert(0, _OnlyFromZips())
'''


def test_smoke_report_runs_without_tensorflow_or_installed_ml_collections(tmp_path: Path):
    drive = require_shared(DATA / "DRIVE")
    bundle = tmp_path / "bundle"
    made = subprocess.run([sys.executable, str(SCRIPT), "--bundle", str(bundle),
                           "--data", str(drive)], capture_output=True, text=True, check=False,
                          timeout=400)
    assert made.returncode == 0, made.stderr[-3000:]
    assert sorted(p.name for p in (bundle / "pylib").iterdir()) == ["ml_collections.zip",
                                                                     "tqdm.zip"]
    assert sorted(p.name for p in (bundle / "DRIVE").iterdir()) == [
        "train.array_record", "validation.array_record"]
    size = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())
    assert size < 64 * 2**20, f"the bundle ({size} bytes) must travel in 64 MiB"

    block = tmp_path / "block"
    block.mkdir()
    (block / "sitecustomize.py").write_text(BLOCKER)
    env = {**os.environ, "PYTHONPATH": str(block), "JAX_PLATFORMS": "cpu"}
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--data", str(bundle / "DRIVE"),
                          "--pylib", str(bundle / "pylib"), "--out", str(out)],
                         capture_output=True, text=True, env=env, cwd=tmp_path, check=False,
                         timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-4000:]
    report = json.loads((out / "gpu_report.json").read_text())
    header, sections = report["header"], report["sections"]
    assert header["smoke"] and not header["tensorflow"]
    for name in BUNDLED:  # imported from the zips, not from this Python's site-packages
        assert ".zip" in header["packages"][name], header["packages"]

    step = {(r["dataset"], r["dtype"]): r for r in sections["step"]}
    assert len(step) == 8
    row = step[("DRIVE", "float32")]
    assert "note" not in row, row
    assert row["ms_per_step"] > 0 and row["xla_gib"] > 0 and row["crop"] == [32, 32]
    skipped = [r for key, r in step.items() if key != ("DRIVE", "float32")]
    assert all(r["note"].startswith("skipped: smoke") for r in skipped), skipped
    assert [r["dataset"] for r in sections["infer"]] == ["DRIVE", "STARE", "HRF", "Cityscapes"]
    infer = {r["dataset"]: r for r in sections["infer"]}
    for name, mode in (("DRIVE", "slide"), ("Cityscapes", "whole")):
        row = infer[name]
        assert "note" not in row and row["s_per_image"] > 0 and row["mode"] == mode, row
    for name in ("STARE", "HRF"):  # the smoke skips them (the same slide code as DRIVE)
        assert infer[name]["note"].startswith("skipped: smoke"), infer[name]
    shas = {r["sha"] for r in sections["input"]}
    assert len(shas) == 1 and all(r["crops_per_s"] > 0 for r in sections["input"]), shas
    (train,) = sections["train"]
    assert "note" not in train, train
    assert train["steps"] == 4 and train["loss"] > 0
    assert 0 <= train["vessel_dice"] <= 100 and 0 < train["mDice"] <= 100
    assert 0 <= train["fov_auc"] <= 100

    markdown = (out / "gpu_report.md").read_text()
    assert markdown.count("\n## ") == 4 and "SMOKE" in markdown
    table = markdown[markdown.index("## Train step"):]
    assert table in run.stdout  # the same table printed and written


def test_a_bad_data_folder_is_one_line(tmp_path: Path):
    done = subprocess.run([sys.executable, str(SCRIPT), "--data", str(tmp_path / "absent"),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True,
                          check=False, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    last = done.stderr.strip().splitlines()[-1]  # after any TensorFlow start-up log lines
    assert last.startswith("gpu_report: error: ") and "absent/train.array_record" in last, last
