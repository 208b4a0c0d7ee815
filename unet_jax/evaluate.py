"""Dataset evaluation (mmseg's test loop + IoUMetric) and the overlay images used to show it.

`evaluate` runs the test pipeline of `unet_jax.inference.segment` on every sample (slide, whole or
TTA per `config.eval`), takes the argmax at the original resolution and sums mmseg's four
per-class pixel counts over the dataset (computed on device, accumulated on the host in int64).
Samples with a field-of-view mask (`fov`: the retinal sets) also give the vessel metrics papers
report inside the FOV (`unet_jax.fov_metrics`: Se, Sp, Acc, AUC, F1), counted the same way.
With an `eval.isbi` section (the original U-Net's recipe) the summary also holds the ISBI 2012
challenge's scores of P(cell) (`unet_jax.isbi_metrics`).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from unet_jax import fov_metrics, isbi_metrics, metrics
from unet_jax.errors import ConfigError
from unet_jax.inference import ApplyFn, make_apply_fn, segment


_counts = jax.jit(metrics.intersect_and_union_jnp, static_argnums=(2, 3))


def _map_2d(value: Any, image_hw: tuple[int, int], name: str, what: str) -> np.ndarray:
    value = np.asarray(value)
    if value.ndim == 3 and value.shape[-1] == 1:
        value = value[..., 0]
    if value.shape != image_hw:
        raise ValueError(f"sample {name!r}: {what} shape expected {image_hw} (the image's), "
                         f"found {value.shape}")
    return value


def _name(sample: dict[str, Any], index: int) -> str:
    name = sample.get("name", "")
    if isinstance(name, np.ndarray):
        name = name.item() if name.ndim == 0 else name.tolist()
    if isinstance(name, bytes):
        name = name.decode()
    return str(name) or str(index)


def _own_samples(dataset: Iterable[dict[str, Any]], process: int, processes: int,
                 max_images: int) -> Iterable[tuple[int, dict[str, Any]]]:
    """(index, sample) of this process's samples (every `processes`-th of the first
    `max_images`; 0: all). A random-access source (`unet_jax.data.records.RecordSource`) reads
    only those; another iterable is read whole and the others' samples skipped."""
    if hasattr(dataset, "__getitem__") and hasattr(dataset, "__len__"):
        count = min(len(dataset), max_images) if max_images else len(dataset)
        for index in range(process, count, processes):
            yield index, dataset[index]
        return
    for index, sample in enumerate(dataset):
        if max_images and index >= max_images:
            break
        if index % processes == process:
            yield index, sample


@dataclasses.dataclass(frozen=True)
class EvalResult:
    """What `evaluate` returns: the `metrics.summarize` dict (aAcc, mIoU, mDice, mAcc, per-class
    IoU/Dice/Acc, `fov`) and the first samples as dicts {name, image, label, pred (uint8)}."""
    summary: dict[str, Any]
    examples: list[dict[str, Any]]


def evaluate(model: nnx.Module | ApplyFn, dataset: Iterable[dict[str, Any]], config: Any, *,
             progress: bool = True, num_examples: int = 0) -> EvalResult:
    """Evaluate `model` over `dataset` -> `EvalResult(summary, examples)`.

    `model`: an NNX segmentor (evaluated in eval mode; the module itself is not changed) or an
    apply function as made by `inference.make_apply_fn`. `dataset` yields dicts with `image`
    (uint8 H x W x 3 RGB, original size; trusted, as the readers check it), `label` (uint8
    H x W, 255 = ignore), optionally `name` and `fov` (H x W, nonzero inside the field of view;
    every sample or none). Each image goes through `segment` (`preprocess.test_image`, then
    slide/whole or TTA inference). On several processes each takes every
    `process_count`-th sample and the counts are summed over the processes, so the metrics are
    exactly those of one process. With `fov` the summary also has `fov`: {Se, Sp, Acc,
    AUC, F1} of the vessel class (class 1 of 2) pooled over the FOV pixels that are not
    ignored, in percent (`fov_metrics.FovAccumulator.summary`); AUC ranks the vessel
    probability (softmax of the logits, or the TTA-averaged probability). At most
    `config.eval.max_images` samples are used (0 = all). `examples` holds this process's first
    `num_examples` samples, e.g. for `save_comparison_png`.
    """
    apply_fn = make_apply_fn(model) if isinstance(model, nnx.Module) else model
    process, processes = jax.process_index(), jax.process_count()
    num_classes = config.model.num_classes
    ignore_index = config.loss.ignore_index
    max_images = config.eval.max_images
    total = max_images or None
    if hasattr(dataset, "__len__"):
        n = len(dataset)  # type: ignore[arg-type]
        total = min(n, max_images) if max_images else n
    if total is not None:
        total = len(range(process, total, processes))
    acc = metrics.ConfusionAccumulator(num_classes, ignore_index)
    fov_acc: fov_metrics.FovAccumulator | None = None
    # per-image counts still on device (keeps dispatch async): (counts, FOV counts or None)
    pending: list[tuple[jax.Array, Any]] = []
    examples: list[dict[str, Any]] = []
    isbi = config.eval.get("isbi")
    isbi_stats = np.zeros((len(isbi_metrics.THINNED_THRESHOLDS), len(isbi_metrics.COLUMNS)))

    def add(counts: jax.Array, fov_counts: Any) -> None:
        acc.add_counts(np.asarray(counts))
        if fov_counts is not None:
            fov_acc.add_counts(*(np.asarray(c) for c in fov_counts))

    bar = tqdm(total=total, desc="eval", unit="img", disable=not progress, leave=False)
    seen = 0
    try:
        for index, sample in _own_samples(dataset, process, processes, max_images):
            image = np.asarray(sample["image"])
            name = _name(sample, index)
            label = _map_2d(sample["label"], image.shape[:2], name, "label")
            has_fov = sample.get("fov") is not None
            if seen == 0 and has_fov:
                if num_classes != 2:
                    raise ConfigError(f"model.num_classes: FOV metrics (sample {name!r} has a "
                                      "fov mask) expected 2 classes (background, vessel), "
                                      f"found {num_classes}")
                fov_acc = fov_metrics.FovAccumulator(ignore_index)
            if has_fov != (fov_acc is not None):
                raise ValueError(f"sample {name!r}: expected a fov mask on every sample or on "
                                 f"none; the first sample had {'one' if fov_acc else 'none'}")
            scores, pred = segment(apply_fn, image, config)
            counts = _counts(pred, jnp.asarray(label), num_classes, ignore_index)
            fov_counts = None
            if fov_acc is not None:
                fov = _map_2d(sample["fov"], image.shape[:2], name, "fov")
                fov_counts = fov_metrics.scores_fov_counts(
                    scores, jnp.asarray(label), jnp.asarray(fov),
                    probabilities=bool(config.eval.tta), ignore_index=ignore_index,
                    threshold=float(config.eval.threshold))
            if isbi is not None:
                cell = int(isbi.cell_class)
                probs = scores if config.eval.tta else jax.nn.softmax(scores, axis=-1)
                isbi_stats += isbi_metrics.slice_stats(np.asarray(probs[..., cell]),
                                                       label == cell)
            pending.append((counts, fov_counts))
            if len(pending) > 1:
                add(*pending.pop(0))
            if seen < num_examples:
                examples.append({"name": name, "image": image, "label": label,
                                 "pred": np.asarray(pred).astype(np.uint8)})
            seen += 1
            bar.update(1)
    finally:
        bar.close()
    for counts, fov_counts in pending:
        add(counts, fov_counts)
    if processes > 1:
        acc, fov_acc = _summed_over_processes(acc, fov_acc)
        if isbi is not None:  # float64 sums sent bit for bit as int64
            isbi_stats = _allgather_int64(isbi_stats.view(np.int64)).view(np.float64).sum(0)
    if acc.num_images == 0:
        raise ValueError("evaluate: the dataset yielded no samples")
    summary = metrics.summarize(acc, list(config.data.classes))
    if fov_acc is not None:
        summary["fov"] = fov_acc.summary()
    if isbi is not None:
        summary["isbi"] = isbi_metrics.scores(isbi_stats, acc.num_images)
        summary["v_rand"] = summary["isbi"]["v_rand"]  # the challenge's ranking (eval.metric)
    return EvalResult(summary, examples)


def _allgather_int64(values: np.ndarray) -> np.ndarray:
    """Every process's int64 array, stacked (exact: sent as int32 pairs, whatever x64 says)."""
    from jax.experimental import multihost_utils
    halves = np.ascontiguousarray(values, np.int64).view(np.int32)
    gathered = np.asarray(multihost_utils.process_allgather(halves))
    return np.ascontiguousarray(gathered).view(np.int64)


def _summed_over_processes(acc: metrics.ConfusionAccumulator,
                           fov_acc: fov_metrics.FovAccumulator | None):
    """The accumulators' counts summed over all processes (every process gets the sums)."""
    counts = np.concatenate([np.stack([getattr(acc, n) for n in metrics.COUNT_NAMES]).ravel(),
                             [acc.num_images]])
    total = _allgather_int64(counts).sum(axis=0)
    c = acc.num_classes
    summed = metrics.ConfusionAccumulator(c, acc.ignore_index)
    summed.add_counts(total[:-1].reshape(4, c), num_images=int(total[-1]))
    has_fov = int(_allgather_int64(np.array([fov_acc is not None], np.int64)).max())
    if not has_fov:
        return summed, None
    fov_acc = fov_acc or fov_metrics.FovAccumulator(acc.ignore_index)
    confusion = _allgather_int64(fov_acc.confusion).sum(axis=0)
    histogram = _allgather_int64(fov_acc.histogram).sum(axis=0)
    images = int(_allgather_int64(np.array([fov_acc.num_images], np.int64)).sum())
    fov_summed = fov_metrics.FovAccumulator(acc.ignore_index)
    fov_summed.add_counts(confusion, histogram, num_images=images)
    return summed, fov_summed


# ------------------------------------------------------------------------------ overlays
def colorize(label_map: np.ndarray, palette: Sequence[Sequence[int]],
             ignore_color: Sequence[int] = (0, 0, 0)) -> np.ndarray:
    """uint8 (H, W, 3) colour image of a label map; ids outside the palette get `ignore_color`."""
    label_map = np.asarray(label_map)
    table = np.zeros((256, 3), np.uint8)
    table[:] = ignore_color
    table[:len(palette)] = np.asarray(palette, np.uint8)
    return table[np.clip(label_map.astype(np.int64), 0, 255)]


def overlay_image(image_rgb: np.ndarray, label_map: np.ndarray,
                  palette: Sequence[Sequence[int]], alpha: float = 0.5) -> np.ndarray:
    """Blend the palette colours of `label_map` over `image_rgb`: (1 - alpha) img + alpha colour.

    Pixels whose id is outside the palette (e.g. 255 = ignore) keep the image's colour.
    """
    image_rgb = np.asarray(image_rgb)
    label_map = np.asarray(label_map)
    if image_rgb.shape[:2] != label_map.shape[:2]:
        raise ValueError(f"overlay: label map shape expected {image_rgb.shape[:2]} (the "
                         f"image's), found {label_map.shape}")
    colours = colorize(label_map, palette).astype(np.float32)
    blended = (1.0 - alpha) * image_rgb.astype(np.float32) + alpha * colours
    known = (label_map >= 0) & (label_map < len(palette))
    out = np.where(known[..., None], blended, image_rgb.astype(np.float32))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def save_comparison_png(path: str | Path, image: np.ndarray, gt: np.ndarray, pred: np.ndarray,
                        palette: Sequence[Sequence[int]], gap: int = 4) -> Path:
    """Write image | ground truth | prediction side by side (colours from `palette`) as PNG."""
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"{path}: image expected H x W x 3, found shape {image.shape}")
    height, width = image.shape[:2]
    for what, arr in (("gt", gt), ("pred", pred)):
        if np.shape(arr) != (height, width):
            raise ValueError(f"{path}: {what} shape expected {(height, width)}, found "
                             f"{np.shape(arr)}")
    canvas = np.full((height, 3 * width + 2 * gap, 3), 255, np.uint8)
    canvas[:, :width] = image.astype(np.uint8)
    canvas[:, width + gap:2 * width + gap] = colorize(gt, palette)
    canvas[:, 2 * (width + gap):] = colorize(pred, palette)
    from unet_jax.io.paths import as_path  # a local path or a bucket URL
    path = as_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    from PIL import Image  # here only: evaluation itself runs without Pillow (GPU report)
    with path.open("wb") as f:
        Image.fromarray(canvas).save(f, format="PNG")
    return path
