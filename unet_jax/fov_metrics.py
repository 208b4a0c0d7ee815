"""Vessel metrics inside the field of view (FOV), as retinal-vessel papers report them.

Se (sensitivity), Sp (specificity), Acc (accuracy), F1 and AUC-ROC of the vessel class, pooled
over every FOV pixel of a split (ground-truth ignore pixels excluded). Se/Sp/Acc/F1 come from the
argmax prediction; AUC from the vessel probability (softmax of the logits, or the TTA-averaged
probability).

Everything is a sum of integer counts, so per-image, per-host and per-split results add up
exactly (`FovAccumulator.merge`): four confusion counts and two histograms of the vessel
probability (FOV pixels whose ground truth is background, and vessel), counted on device per image
and summed on the host in int64.

AUC from histograms. The exact AUC (Mann-Whitney U, ties counted 1/2) is
    AUC = P(s_vessel > s_background) + 1/2 P(s_vessel = s_background)
over all (vessel, background) pixel pairs. Sorting a split's pixels is costly (HRF: 240 M FOV
pixels), so the probabilities are binned and the AUC is the trapezoid rule over the bins:
    AUC_binned = sum_b pos_b (neg_below_b + neg_b / 2) / (P N),
which is exact for pairs in different bins and counts every pair sharing a bin as a tie. So
    |AUC_binned - AUC| <= 1/2 sum_b pos_b neg_b / (P N)      (`FovAccumulator.auc_error_bound`),
the mass of (vessel, background) pairs that share a bin; pairs with equal probabilities (e.g.
probabilities saturated at exactly 0 or 1) share a bin and are ties in both. Uniform bins in p
would not do: a confident model puts most background pixels and its missed thin vessels far below
1e-5, all in the first bin (an error of 1e-2 even with 2**20 uniform bins). The bins here are
uniform in the float32 bits of q = min(p, 1 - p) (both exact in float32), i.e. logarithmic:
2**(23 - BIN_SHIFT) bins per octave of q (relative width 2**-11 = 0.05 %), from the smallest
float32 up to 1/2 and mirrored to 1. The error is then of the order of a bin's width in log-odds
times the overlap of the two log-odds densities, and mostly cancels: measured at 5e-8 or less
against the exact rank AUC on realistic score distributions, with a guaranteed bound under 1e-4
(0.01 AUC points) (tests/test_fov_metrics.py, experiments/studies/fov_auc_bins.py).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

BIN_SHIFT = 12
"""Low bits of float32(q) dropped by the binning: 2**(23 - BIN_SHIFT) bins per octave of q."""
_HALF_BITS = 0x3F000000  # float32 bits of 0.5
_HALF_BINS = (_HALF_BITS >> BIN_SHIFT) + 1
NUM_BINS = 2 * _HALF_BINS
"""Bins of the vessel probability over [0, 1] (516,098 for BIN_SHIFT 12)."""
CONFUSION_NAMES = ("tp", "fp", "fn", "tn")
METRIC_NAMES = ("Se", "Sp", "Acc", "AUC", "F1")


def probability_bins(prob: jax.Array) -> jax.Array:
    """int32 bin index in [0, NUM_BINS) of vessel probabilities in [0, 1]; monotone in `prob`.

    Below 1/2 the bin is float32 bits of p >> BIN_SHIFT; from 1/2 on it is mirrored from the
    bits of 1 - p, which is exact in float32 there. Equal probabilities share a bin. Values
    outside [0, 1] land in the end bins, NaN in the (otherwise empty) bin between the halves.
    """
    p = jnp.asarray(prob, jnp.float32)
    upper = p >= 0.5
    q = jnp.where(upper, 1.0 - p, p)
    k = jax.lax.bitcast_convert_type(q, jnp.int32) >> BIN_SHIFT
    k = jnp.clip(k, 0, _HALF_BINS - 1)
    return jnp.where(upper, NUM_BINS - 1 - k, k).astype(jnp.int32)


def fov_counts_jnp(prob: jax.Array, pred: jax.Array, label: jax.Array, fov: jax.Array,
                   ignore_index: int = 255) -> tuple[jax.Array, jax.Array]:
    """Jit-able counts of one image -> (confusion int32 (4,), histogram int32 (2, NUM_BINS)).

    `prob`: vessel probability (H, W); `pred`: vessel prediction (H, W, nonzero = vessel);
    `label`: ground truth (H, W) with 0 background, 1 vessel, `ignore_index` (or any other
    value) ignored; `fov`: (H, W), nonzero inside the field of view. Confusion rows follow
    `CONFUSION_NAMES`; histogram row 0 counts background pixels, row 1 vessel pixels, per
    `probability_bins` bin. int32 is exact up to 2**31 pixels per image; accumulate in int64
    (`FovAccumulator.add_counts`).
    """
    label = jnp.asarray(label).astype(jnp.int32).ravel()
    vessel_gt = label == 1
    valid = (jnp.asarray(fov).ravel() != 0) & (label != ignore_index) & ((label == 0) | vessel_gt)
    vessel_pred = jnp.asarray(pred).ravel() != 0
    confusion = jnp.stack([
        jnp.sum(valid & vessel_pred & vessel_gt, dtype=jnp.int32),
        jnp.sum(valid & vessel_pred & ~vessel_gt, dtype=jnp.int32),
        jnp.sum(valid & ~vessel_pred & vessel_gt, dtype=jnp.int32),
        jnp.sum(valid & ~vessel_pred & ~vessel_gt, dtype=jnp.int32)])
    segment = probability_bins(jnp.ravel(prob)) + NUM_BINS * vessel_gt.astype(jnp.int32)
    histogram = jax.ops.segment_sum(valid.astype(jnp.int32), segment,
                                    num_segments=2 * NUM_BINS)
    return confusion, histogram.reshape(2, NUM_BINS)


_fov_counts = jax.jit(fov_counts_jnp, static_argnames=("ignore_index",))


def _ratio(num: float, den: float) -> float:
    return num / den if den else float("nan")


def _pct(value: float) -> float | None:
    """round(value * 100, 2) like the other metrics; None for NaN (JSON has no NaN)."""
    return None if math.isnan(value) else round(value * 100.0, 2)


@dataclasses.dataclass(eq=False)
class FovAccumulator:
    """Running int64 sums over a split: FOV confusion counts and vessel-probability histograms.

    A plain pair of count arrays: accumulators of disjoint images (other hosts, other shards)
    add up with `merge` to the accumulator of their union.
    """

    ignore_index: int = 255
    confusion: np.ndarray = dataclasses.field(default=None)  # type: ignore[assignment]
    histogram: np.ndarray = dataclasses.field(default=None)  # type: ignore[assignment]
    num_images: int = 0

    def __post_init__(self) -> None:
        for name, shape in (("confusion", (4,)), ("histogram", (2, NUM_BINS))):
            value = getattr(self, name)
            value = np.zeros(shape, np.int64) if value is None else np.asarray(value, np.int64)
            if value.shape != shape:
                raise ValueError(f"{name} must have shape {shape}; found {value.shape}")
            setattr(self, name, value.copy())

    def add(self, prob: Any, pred: Any, label: Any, fov: Any) -> None:
        """Add one image: vessel probability, vessel prediction, ground truth, FOV (H, W)."""
        self.add_counts(*_fov_counts(prob, pred, label, fov, ignore_index=self.ignore_index))

    def add_counts(self, confusion: Any, histogram: Any, num_images: int = 1) -> None:
        """Add precomputed counts (as returned by `fov_counts_jnp`)."""
        confusion = np.asarray(confusion, np.int64)
        histogram = np.asarray(histogram, np.int64)
        if confusion.shape != (4,) or histogram.shape != (2, NUM_BINS):
            raise ValueError(f"counts must have shapes (4,) and (2, {NUM_BINS}); found "
                             f"{confusion.shape} and {histogram.shape}")
        self.confusion = self.confusion + confusion
        self.histogram = self.histogram + histogram
        self.num_images += int(num_images)

    def merge(self, other: "FovAccumulator") -> "FovAccumulator":
        """A new accumulator holding the sums of `self` and `other` (e.g. across hosts)."""
        if other.ignore_index != self.ignore_index:
            raise ValueError(f"cannot merge accumulators with ignore_index {self.ignore_index} "
                             f"and {other.ignore_index}")
        return FovAccumulator(self.ignore_index, self.confusion + other.confusion,
                              self.histogram + other.histogram,
                              self.num_images + other.num_images)

    def auc(self) -> float:
        """AUC-ROC in [0, 1] by the trapezoid rule over the bins (NaN without both classes)."""
        neg, pos = self.histogram
        num_pos, num_neg = int(pos.sum()), int(neg.sum())
        below = np.cumsum(neg) - neg
        # int64 is exact while 2 * num_pos * num_neg < 2**63 (~2e9 FOV pixels)
        twice_u = int(np.sum(pos * (2 * below + neg)))
        return _ratio(twice_u, 2 * num_pos * num_neg)

    def auc_error_bound(self) -> float:
        """Largest possible |binned - exact| AUC: half the share of (vessel, background) pairs
        that fall into the same bin (where only equal probabilities would be true ties)."""
        neg, pos = self.histogram
        return _ratio(0.5 * float(np.dot(pos.astype(np.float64), neg)),
                      float(pos.sum()) * float(neg.sum()))

    def metrics(self) -> dict[str, float]:
        """Se, Sp, Acc, AUC, F1 as float fractions in [0, 1] (NaN where undefined)."""
        tp, fp, fn, tn = (int(v) for v in self.confusion)
        return {"Se": _ratio(tp, tp + fn), "Sp": _ratio(tn, tn + fp),
                "Acc": _ratio(tp + tn, tp + fp + fn + tn), "AUC": self.auc(),
                "F1": _ratio(2 * tp, 2 * tp + fp + fn)}

    def summary(self) -> dict[str, float | None]:
        """The `fov` dict of an evaluation: Se, Sp, Acc, AUC, F1 in percent, 2 decimals."""
        return {name: _pct(value) for name, value in self.metrics().items()}


@functools.partial(jax.jit, static_argnames=("probabilities", "ignore_index", "threshold"))
def scores_fov_counts(scores: jax.Array, label: jax.Array, fov: jax.Array, *,
                      probabilities: bool, ignore_index: int, threshold: float = 0.3,
                      ) -> tuple[jax.Array, jax.Array]:
    """`fov_counts_jnp` of 2-class scores (H, W, 2): logits, or with `probabilities` already
    probabilities (TTA); vessel = the argmax, probability = softmax(logits)[..., 1]. Scores of
    a binary model (H, W, 1): probability = the sigmoid, vessel where it exceeds `threshold`."""
    if scores.shape[-1] == 1:
        vessel = scores[..., 0] if probabilities else jax.nn.sigmoid(scores[..., 0])
        return fov_counts_jnp(vessel, vessel > threshold, label, fov, ignore_index)
    probs = scores if probabilities else jax.nn.softmax(scores, axis=-1)
    pred = jnp.argmax(scores, axis=-1) == 1
    return fov_counts_jnp(probs[..., 1], pred, label, fov, ignore_index)
