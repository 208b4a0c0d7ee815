"""What a run writes: metrics.jsonl, TensorBoard scalars, curves, overlays and result tables.

Only process 0 writes; every writer is a no-op elsewhere.
"""
from __future__ import annotations

import io
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from unet_jax import parallel
from unet_jax.io import paths
from unet_jax.io.paths import as_path

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "training_curves.png"
OVERLAYS_DIR = "overlays"
SUMMARY_KEYS = ("aAcc", "mIoU", "mDice", "mAcc")


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


class MetricsLog:
    """`<workdir>/metrics.jsonl` (one JSON object per line); writes only on process 0."""

    def __init__(self, workdir: Path):
        self.path = workdir / METRICS_FILE
        self.enabled = parallel.is_main_process()

    def write(self, record: Mapping[str, Any]) -> None:
        """Append one line (flushed and synced, so a killed run keeps it)."""
        if not self.enabled:
            return
        paths.append_line(self.path, json.dumps(_jsonable(record), allow_nan=False) + "\n")

    def read(self) -> list[dict[str, Any]]:
        """All complete lines (a torn last line of a killed run is skipped)."""
        if not self.path.exists():
            return []
        out = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                logging.warning("%s: skipping an unreadable line %r", self.path, line[:80])
        return out

    def truncate(self, step: int) -> None:
        """Keep only lines with `step <= step` (what the restored checkpoint had logged)."""
        if not self.enabled or not self.path.exists():
            return
        kept = [r for r in self.read() if int(r.get("step", 0)) <= step]
        paths.replace_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))


class TensorBoard:
    """A tensorboardX writer on process 0 (no-op elsewhere).

    In a bucket workdir the events file is written in a local folder and copied whole into the
    workdir at every flush: tensorboardX writes object stores only through S3 and would need
    TensorFlow's GCS client for `gs://` (which ignores `STORAGE_EMULATOR_HOST`); the file of a
    run holds a few kB per logged step.
    """

    def __init__(self, workdir: Path, start_step: int):
        self.writer = None
        self.workdir, self.local = workdir, None
        if parallel.is_main_process():
            from tensorboardX import SummaryWriter
            if paths.is_url(workdir):
                self.local = tempfile.mkdtemp(prefix="unet_jax_tb_")
            # purge_step hides the events a killed run wrote after its last checkpoint.
            self.writer = SummaryWriter(self.local or os.fspath(workdir),
                                        purge_step=start_step or None)

    def scalars(self, prefix: str, values: Mapping[str, Any], step: int) -> None:
        """Write numeric values (nested dicts become prefix/key/subkey)."""
        if self.writer is None:
            return
        for key, value in values.items():
            if isinstance(value, Mapping):
                self.scalars(f"{prefix}/{key}", value, step)
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"{prefix}/{key}", value, step)
        self.writer.flush()
        self._upload()

    def _upload(self) -> None:
        if self.local is None:
            return
        for local in Path(self.local).iterdir():
            (self.workdir / local.name).write_bytes(local.read_bytes())

    def close(self) -> None:
        """Flush and close the event file."""
        if self.writer is not None:
            self.writer.close()
            self._upload()
        if self.local is not None:
            shutil.rmtree(self.local, ignore_errors=True)


def plot_curves(records: list[dict[str, Any]], path: Path) -> Path | None:
    """Training loss and validation metrics over steps -> PNG (matplotlib Agg)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if r.get("split") == "train" and "loss" in r]
    val = [r for r in records if r.get("split") == "validation" and r.get("mode") != "eval"]
    if not train and not val:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    if train:
        # A marker, so that a run with a single logged step still draws its point.
        axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], marker=".")
        axes[0].set_yscale("log")
    axes[0].set(title="training loss", xlabel="step")
    axes[0].grid(alpha=0.3)
    for key in SUMMARY_KEYS:
        points = [(r["step"], r[key]) for r in val if r.get(key) is not None]
        if points:
            axes[1].plot(*zip(*points), marker="o", label=key)
    names = sorted({name for r in val for name in (r.get("Dice") or {})})
    if len(names) == 2:  # binary sets: also the foreground class, the README's "Dice"
        fg = [n for n in names if n != "background"][-1]
        points = [(r["step"], r["Dice"][fg]) for r in val if r["Dice"].get(fg) is not None]
        if points:
            axes[1].plot(*zip(*points), marker="s", linestyle="--", label=f"Dice {fg}")
    axes[1].set(title="validation (%)", xlabel="step")
    axes[1].grid(alpha=0.3)
    if axes[1].get_legend_handles_labels()[0]:
        axes[1].legend()
    fig.tight_layout()
    png = io.BytesIO()
    fig.savefig(png, dpi=100, format="png")
    plt.close(fig)
    as_path(path).write_bytes(png.getvalue())
    return path


def print_table(summary: Mapping[str, Any], config: Any, step: int | None) -> None:
    """mmseg-like per-class table (with the FOV metrics and where the dataset's field of view
    comes from, when the summary has them), plus the published zoo score when there is one."""
    from unet_jax.metrics import format_table
    if not parallel.is_main_process():
        return
    where = f" at step {step}" if step is not None else ""
    print(f"\nper-class results on {config.data.name} validation{where}:")
    print(format_table(summary, list(config.data.classes)))
    if "fov" in summary:
        from unet_jax.data.loading import DATASETS
        print(f"FOV: {DATASETS[config.data.name].fov}")
    if config.published:
        scores = ", ".join(f"{k} {float(v):.2f}" for k, v in config.published.items())
        print(f"mmseg published for {config.model.head},{config.loss.name}: {scores}")


# --------------------------------------------------------------------------- data and model

def save_overlays(examples: list[dict[str, Any]], directory: Path, palette: Any) -> None:
    """image | ground truth | prediction PNGs, one per example (process 0 only)."""
    from unet_jax.evaluate import save_comparison_png
    if not parallel.is_main_process():
        return
    for k, ex in enumerate(examples):
        name = str(ex.get("name") or k).replace("/", "_")
        save_comparison_png(directory / f"{name}.png", ex["image"], ex["label"], ex["pred"],
                            palette)


def tqdm_write(message: str) -> None:
    """Print without breaking the progress bar."""
    from tqdm import tqdm
    tqdm.write(message)
