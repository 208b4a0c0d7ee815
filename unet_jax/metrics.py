"""mmseg `IoUMetric` semantics: global per-class pixel counts, then IoU / Dice / Acc
(mmseg/evaluation/metrics/iou_metric.py: IoUMetric.intersect_and_union, total_area_to_metrics).

Counts are exact int64 (mmseg accumulates float32 `torch.histc` counts, which stop being exact
above 2**24 pixels per class, e.g. over the Cityscapes val split); ratios are computed in float64.
NaN (0/0, a class absent from both prediction and ground truth) is kept as `nan` in the arrays of
`per_class_metrics` and written as `None` in the JSON-friendly dicts of `summarize`.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

COUNT_NAMES = ("intersect", "union", "pred_area", "label_area")


def _bincount(values: np.ndarray, num_classes: int) -> np.ndarray:
    # torch.histc(bins=C, min=0, max=C-1) drops values outside [0, C-1]; so do we.
    values = values[(values >= 0) & (values < num_classes)]
    return np.bincount(values, minlength=num_classes).astype(np.int64)


def intersect_and_union(pred: Any, gt: Any, num_classes: int, ignore_index: int = 255
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-class (intersect, union, pred_area, label_area) int64 counts of one or more label maps.

    `pred` and `gt` are integer arrays of the same shape ((H, W) or batched); pixels where gt is
    `ignore_index` are dropped, as are values outside [0, num_classes) (like torch.histc).
    """
    pred = np.asarray(pred)
    gt = np.asarray(gt)
    if pred.shape != gt.shape:
        raise ValueError(f"pred and gt must have the same shape; found {pred.shape} and {gt.shape}")
    pred = pred.astype(np.int64).ravel()
    gt = gt.astype(np.int64).ravel()
    keep = gt != ignore_index
    pred, gt = pred[keep], gt[keep]
    intersect = _bincount(pred[pred == gt], num_classes)
    pred_area = _bincount(pred, num_classes)
    label_area = _bincount(gt, num_classes)
    union = pred_area + label_area - intersect
    return intersect, union, pred_area, label_area


def intersect_and_union_jnp(pred: jax.Array, gt: jax.Array, num_classes: int,
                            ignore_index: int = 255) -> jax.Array:
    """Jit-able variant of `intersect_and_union` returning int32 counts stacked as (4, C).

    Rows follow `COUNT_NAMES`. int32 is exact up to 2**31 pixels per call; accumulate the results
    on the host in int64 (`ConfusionAccumulator.add_counts`).
    """
    pred = pred.astype(jnp.int32).ravel()
    gt = gt.astype(jnp.int32).ravel()
    valid = gt != ignore_index
    classes = jnp.arange(num_classes, dtype=jnp.int32)
    pred_oh = (pred[:, None] == classes) & valid[:, None]
    gt_oh = (gt[:, None] == classes) & valid[:, None]
    pred_area = jnp.sum(pred_oh, axis=0, dtype=jnp.int32)
    label_area = jnp.sum(gt_oh, axis=0, dtype=jnp.int32)
    intersect = jnp.sum(pred_oh & gt_oh, axis=0, dtype=jnp.int32)
    return jnp.stack([intersect, pred_area + label_area - intersect, pred_area, label_area])


@dataclasses.dataclass(eq=False)
class ConfusionAccumulator:
    """Running int64 sums of the four per-class count vectors over a dataset (mmseg's results list)."""

    num_classes: int
    ignore_index: int = 255
    intersect: np.ndarray = dataclasses.field(default=None)  # type: ignore[assignment]
    union: np.ndarray = dataclasses.field(default=None)  # type: ignore[assignment]
    pred_area: np.ndarray = dataclasses.field(default=None)  # type: ignore[assignment]
    label_area: np.ndarray = dataclasses.field(default=None)  # type: ignore[assignment]
    num_images: int = 0

    def __post_init__(self) -> None:
        for name in COUNT_NAMES:
            value = getattr(self, name)
            if value is None:
                value = np.zeros(self.num_classes, np.int64)
            value = np.asarray(value, dtype=np.int64)
            if value.shape != (self.num_classes,):
                raise ValueError(
                    f"{name} must have shape ({self.num_classes},); found {value.shape}")
            setattr(self, name, value.copy())

    def add(self, pred: Any, gt: Any) -> None:
        """Add one image (H, W) or a batch (N, H, W) of predictions and ground truth."""
        counts = intersect_and_union(pred, gt, self.num_classes, self.ignore_index)
        self.add_counts(counts, num_images=1 if np.ndim(gt) == 2 else int(np.shape(gt)[0]))

    def add_counts(self, counts: Any, num_images: int = 1) -> None:
        """Add precomputed counts: a 4-tuple or a (4, C) array in `COUNT_NAMES` order."""
        counts = np.asarray(counts, dtype=np.int64)
        if counts.shape != (4, self.num_classes):
            raise ValueError(
                f"counts must have shape (4, {self.num_classes}); found {counts.shape}")
        for name, row in zip(COUNT_NAMES, counts):
            setattr(self, name, getattr(self, name) + row)
        self.num_images += int(num_images)

    def merge(self, other: "ConfusionAccumulator") -> "ConfusionAccumulator":
        """A new accumulator holding the sums of `self` and `other` (e.g. across hosts)."""
        if (other.num_classes, other.ignore_index) != (self.num_classes, self.ignore_index):
            raise ValueError(
                f"cannot merge accumulators with (num_classes, ignore_index) "
                f"{(self.num_classes, self.ignore_index)} and "
                f"{(other.num_classes, other.ignore_index)}")
        return ConfusionAccumulator(
            self.num_classes, self.ignore_index,
            *(getattr(self, n) + getattr(other, n) for n in COUNT_NAMES),
            num_images=self.num_images + other.num_images)

    def as_arrays(self) -> dict[str, np.ndarray]:
        """The four total count vectors (int64 copies), keyed by `COUNT_NAMES`."""
        return {name: getattr(self, name).copy() for name in COUNT_NAMES}


def _totals(totals: Any) -> dict[str, np.ndarray]:
    if isinstance(totals, ConfusionAccumulator):
        return totals.as_arrays()
    if isinstance(totals, Mapping):
        missing = [n for n in COUNT_NAMES if n not in totals]
        if missing:
            raise KeyError(f"totals must have keys {COUNT_NAMES}; missing {missing}")
        return {n: np.asarray(totals[n]) for n in COUNT_NAMES}
    if isinstance(totals, Sequence) or isinstance(totals, np.ndarray):
        if len(totals) != 4:
            raise ValueError(f"totals must hold 4 count vectors {COUNT_NAMES}; found {len(totals)}")
        return {n: np.asarray(v) for n, v in zip(COUNT_NAMES, totals)}
    raise TypeError(
        f"totals must be a ConfusionAccumulator, a mapping or a 4-sequence; found {type(totals)}")


def per_class_metrics(totals: Any) -> dict[str, Any]:
    """mmseg `total_area_to_metrics` as float64 fractions: aAcc (scalar), IoU, Dice, Acc (C,).

    0/0 gives NaN, as in mmseg (nan_to_num=None).
    """
    t = {k: v.astype(np.float64) for k, v in _totals(totals).items()}
    with np.errstate(divide="ignore", invalid="ignore"):
        a_acc = t["intersect"].sum() / t["label_area"].sum()
        iou = t["intersect"] / t["union"]
        dice = 2.0 * t["intersect"] / (t["pred_area"] + t["label_area"])
        acc = t["intersect"] / t["label_area"]
    return {"aAcc": float(a_acc), "IoU": iou, "Dice": dice, "Acc": acc}


def _pct(value: float) -> float | None:
    """round(value * 100, 2) as mmseg prints it; None for NaN (JSON has no NaN)."""
    value = float(value)
    return None if math.isnan(value) else round(value * 100.0, 2)


def _nanmean(values: np.ndarray) -> float:
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else float("nan")


def summarize(totals: Any, class_names: Sequence[str]) -> dict[str, Any]:
    """mmseg's `compute_metrics` summary plus the per-class table, JSON-serialisable.

    Keys aAcc, mIoU, mDice, mAcc: `round(nanmean(per_class) * 100, 2)` (None if every class is
    NaN); `IoU`, `Dice`, `Acc`: {class name: percent rounded to 2 decimals, or None for NaN}.
    """
    m = per_class_metrics(totals)
    num_classes = len(m["IoU"])
    if len(class_names) != num_classes:
        raise ValueError(
            f"class_names must name all {num_classes} classes; found {len(class_names)}")
    out: dict[str, Any] = {
        "aAcc": _pct(m["aAcc"]),
        "mIoU": _pct(_nanmean(m["IoU"])),
        "mDice": _pct(_nanmean(m["Dice"])),
        "mAcc": _pct(_nanmean(m["Acc"])),
    }
    for key in ("IoU", "Dice", "Acc"):
        out[key] = {str(name): _pct(v) for name, v in zip(class_names, m[key])}
    return out


def format_table(summary: Mapping[str, Any], class_names: Sequence[str]) -> str:
    """A per-class text table (Class | IoU | Dice | Acc) like mmseg's log, plus a summary row;
    with a `fov` entry (`unet_jax.fov_metrics`) also the FOV table (Se | Sp | Acc | AUC | F1)."""
    def fmt(v: Any) -> str:
        return "nan" if v is None else f"{float(v):.2f}"

    rows = [("Class", "IoU", "Dice", "Acc")]
    for name in class_names:
        rows.append((str(name), fmt(summary["IoU"].get(str(name))),
                     fmt(summary["Dice"].get(str(name))), fmt(summary["Acc"].get(str(name)))))
    rows.append((f"mean (aAcc {fmt(summary['aAcc'])})", fmt(summary["mIoU"]),
                 fmt(summary["mDice"]), fmt(summary["mAcc"])))
    table = _grid(rows[0], rows[1:-1], rows[-1])
    fov = summary.get("fov")
    if fov is None:
        return table
    names = tuple(fov)
    vessel = (f"{class_names[1]} in FOV", *(fmt(fov[n]) for n in names))
    return table + "\n" + _grid(("FOV metrics", *names), [vessel])


def _grid(header: Sequence[str], body: Sequence[Sequence[str]],
          footer: Sequence[str] | None = None) -> str:
    """Rows boxed in +---+ lines: first column left-aligned, the others right-aligned."""
    rows = [header, *body] + ([footer] if footer is not None else [])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    sep = "+" + "+".join("-" * (w + 2) for w in widths) + "+"

    def line(r: Sequence[str]) -> str:
        cells = [f" {r[0]:<{widths[0]}} "] + [f" {c:>{w}} " for c, w in zip(r[1:], widths[1:])]
        return "|" + "|".join(cells) + "|"

    out = [sep, line(header), sep, *(line(r) for r in body), sep]
    if footer is not None:
        out += [line(footer), sep]
    return "\n".join(out)
