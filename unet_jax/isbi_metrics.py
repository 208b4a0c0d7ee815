"""The ISBI 2012 EM challenge's metrics, as Fiji computes them (fiji/Trainable_Segmentation,
trainableSegmentation/metrics: PixelError, RandError, VariationOfInformation; Arganda-Carreras et
al. 2015, Front. Neuroanat. 9:142).

The proposal is P(cell) per pixel (label polarity: 1 = cell, 0 = membrane), binarised at each
threshold ("> th"); the ground truth is the cell mask. For every threshold:
* pixel error: 1 - the pixel F-score (positive = cell), counts summed over slices;
* Rand error: 1 - the F-score of the foreground-restricted Rand index with N^2 normalisation
  (`rand_stats`) between the 4-connected components of the ground truth and of the binarised
  proposal, no thinning; true/false positives summed over slices (Fiji's micro average);
* V_rand: the same F-score after thinning the proposal's membranes to 1-px watershed lines
  (`thin`, a port of Fiji's WatershedTransform2D on the inverted binary proposal), averaged
  per slice (the challenge script passes perSliceAverage = true);
* V_info: the information-theoretic analogue (`info_fscore`) after the same thinning, averaged
  per slice.
Each is reported at its best threshold. Ground-truth background rows are dropped and proposal
label-0 pixels inside the ground-truth foreground count as singletons, as in Fiji.
Warping error (Jain et al. 2010) is not computed. Pure numpy/scipy; the watershed is a Python
port because scipy has no watershed with watershed lines.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import numpy as np
from scipy import ndimage

WSHED, MASK, INQUEUE, OUTSIDE = 0, -2, -3, -4  # Fiji's WSHED, MASK, INQUEUE; ours


def fiji_thresholds(low: float, high: float, step: float) -> list[float]:
    """Fiji's `for (th = low; th <= high; th += step)` in doubles (0.1 steps accumulate:
    with high = 1.0 the last one is 0.9999999999999999)."""
    out, th = [], low
    while th <= high:
        out.append(th)
        th += step
    return out


PIXEL_THRESHOLDS = fiji_thresholds(0.0, 0.9, 0.1)   # the 0.0..0.9 (Table 1 metrics)
THINNED_THRESHOLDS = fiji_thresholds(0.0, 1.0, 0.1)  # the challenge script's 0.0..1.0


def _fscore(tp: float, fp: float, fn: float) -> float:
    """Fiji's ClassificationStatistics F-score (no FP: precision 1; no FN: recall 1)."""
    precision = 1.0 if fp == 0 else tp / (tp + fp)
    recall = 1.0 if fn == 0 else tp / (tp + fn)
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


def components(mask: np.ndarray) -> np.ndarray:
    """4-connected components of a boolean mask (0 outside), int32."""
    return ndimage.label(mask)[0].astype(np.int32)


def _contingency(gt: np.ndarray, proposal: np.ndarray) -> tuple[np.ndarray, float]:
    """The joint distribution p_ij over ground-truth foreground pixels, (gt labels + 1,
    proposal labels + 1), and n (those pixels' count)."""
    fg = gt != 0
    n = float(fg.sum())
    table = np.zeros((int(gt.max()) + 1, int(proposal.max()) + 1))
    np.add.at(table, (gt[fg], proposal[fg]), 1.0)
    return table / max(n, 1.0), n


def rand_stats(gt: np.ndarray, proposal: np.ndarray) -> tuple[float, float, float]:
    """Fiji's getForegroundRestrictedRandIndexStatsN2 of two label images: (tp, fp, fn)."""
    p, n = _contingency(gt, proposal)
    a = p[1:].sum(axis=1)
    b = p[1:, 1:].sum(axis=0)
    aux = p[1:, 0].sum()
    sum_a2 = float(np.sum(a * a))
    sum_b2 = float(np.sum(b * b) + aux / n) if n else 0.0
    sum_ab2 = float(np.sum(p[1:, 1:] ** 2) + aux / n) if n else 0.0
    n2 = n * n
    tp = n2 * sum_ab2
    return tp, n2 * sum_b2 - tp, n2 * sum_a2 - tp


def _plogp(x: np.ndarray) -> float:
    x = x[x != 0]
    return float(np.sum(x * np.log(x)))


def info_fscore(gt: np.ndarray, proposal: np.ndarray) -> float:
    """Fiji's VariationOfInformation.foregroundRestrictedFscore: 2 P R / (P + R) with
    P = I / H(gt), R = I / H(proposal) (natural logs, proposal-0 pixels as singletons)."""
    p, n = _contingency(gt, proposal)
    if n == 0:
        return 0.0
    aux = p[1:, 0].sum()
    sum_a = _plogp(p[1:].sum(axis=1))
    sum_b = _plogp(p[1:, 1:].sum(axis=0)) - aux * np.log(n)
    sum_ab = _plogp(p[1:, 1:]) - aux * np.log(n)
    ha, hb = -sum_a, -sum_b
    prec = (ha - (sum_b - sum_ab)) / ha if ha else 0.0
    rec = (hb - (sum_a - sum_ab)) / hb if hb else 0.0
    if ha == 0:
        prec, rec = 0.0, 1.0
    if hb == 0:
        prec, rec = 1.0, 0.0
    return 2 * prec * rec / (prec + rec) if prec + rec > 0 else 0.0


def thin(cells: np.ndarray) -> np.ndarray:
    """Labels (int32) of a binarised proposal after Fiji's thinning: the Vincent-Soille
    watershed (WatershedTransform2D, 4-connected) of the inverted binary image, so every
    4-connected cell region is a basin, the membranes are flooded from the cells in
    breadth-first order and only 1-px watershed lines (label 0) remain between basins.
    Pixels are visited in Fiji's order (x outer, y inner) and neighbours as Fiji lists them
    (x-1, y-1, x+1, y+1), so ties fall the same way."""
    height, width = cells.shape
    if cells.all():
        return components(cells)
    # x-major grid with a ring of OUTSIDE pixels (they match no flooding rule), so the four
    # neighbours of k are k - stride, k - 1, k + stride, k + 1 in Fiji's order
    grid = np.full((width + 2, height + 2), OUTSIDE, np.int64)
    grid[1:-1, 1:-1] = np.where(cells, components(cells), MASK).T
    stride = height + 2
    flat = grid.ravel()
    border = np.flatnonzero(flat == MASK)
    # phase 1, vectorised: the border pixels with a 4-neighbour in a cell enter the queue (in
    # Fiji's visiting order); no watershed pixel exists yet, so ">= WSHED" means "in a cell"
    touching = ((flat[border - stride] > 0) | (flat[border - 1] > 0)
                | (flat[border + stride] > 0) | (flat[border + 1] > 0))
    queued = border[touching]
    flat[queued] = INQUEUE
    lab = flat.tolist()  # Python ints: the flooding below is scalar code
    fifo: deque[int] = deque(queued.tolist())
    flag = False
    while fifo:  # phase 2: flooding with watershed lines (Fiji's rules, its global flag)
        k = fifo.popleft()
        for c in (k - stride, k - 1, k + stride, k + 1):
            lc = lab[c]
            if lc > 0:
                if lab[k] == INQUEUE or (lab[k] == WSHED and flag):
                    lab[k] = lc
                elif lab[k] > 0 and lab[k] != lc:
                    lab[k] = WSHED
                    flag = False
            elif lc == WSHED:
                if lab[k] == INQUEUE:
                    lab[k] = WSHED
                    flag = True
            elif lc == MASK:
                lab[c] = INQUEUE
                fifo.append(c)
    current = max(lab)
    for k in border.tolist():  # phase 3: membrane regions without a cell: basins of their own
        if lab[k] == MASK:
            current += 1
            lab[k] = current
            fifo.append(k)
            while fifo:
                q = fifo.popleft()
                for c in (q - stride, q - 1, q + stride, q + 1):
                    if lab[c] == MASK:
                        lab[c] = current
                        fifo.append(c)
    lab = np.asarray(lab, np.int64).reshape(width + 2, height + 2)[1:-1, 1:-1].T
    lab[lab < 0] = 0
    return np.ascontiguousarray(lab).astype(np.int32)


COLUMNS = ("pixel_tp", "pixel_fp", "pixel_fn", "rand_tp", "rand_fp", "rand_fn", "v_rand",
           "v_info")


def slice_stats(prob_cell: np.ndarray, gt_cell: np.ndarray) -> np.ndarray:
    """One slice's sums at every threshold of `THINNED_THRESHOLDS`: float64 (11, 8), columns
    `COLUMNS` (counts for the micro-averaged scores, F-scores for the per-slice averaged ones).
    Slices' arrays add up (over hosts too); `scores` turns the sum into the challenge's scores."""
    prob, truth = np.asarray(prob_cell, np.float64), np.asarray(gt_cell, bool)
    gt = components(truth)
    out = np.zeros((len(THINNED_THRESHOLDS), len(COLUMNS)))
    for row, th in enumerate(THINNED_THRESHOLDS):
        pred = prob > th
        if row < len(PIXEL_THRESHOLDS):
            out[row, :3] = (np.sum(pred & truth), np.sum(pred & ~truth), np.sum(~pred & truth))
            out[row, 3:6] = rand_stats(gt, components(pred))
        thinned = thin(pred)
        out[row, 6] = _fscore(*rand_stats(gt, thinned))
        out[row, 7] = info_fscore(gt, thinned)
    return out


def scores(stats: np.ndarray, num_slices: int) -> dict[str, float]:
    """The challenge's scores from the summed `slice_stats` of `num_slices` slices:
    pixel_error, rand_error, v_rand, v_info, each at its best threshold (also returned)."""
    rows = len(PIXEL_THRESHOLDS)
    series = {
        "pixel_error": [_fscore(*r[:3]) for r in stats[:rows]],
        "rand_error": [_fscore(*r[3:6]) for r in stats[:rows]],
        "v_rand": list(stats[:, 6] / num_slices),
        "v_info": list(stats[:, 7] / num_slices)}
    out: dict[str, float] = {}
    for name, values in series.items():
        best = int(np.argmax(values))  # the first of equal maxima, as Fiji's strict ">"
        score = float(values[best])
        out[name] = 1.0 - score if name.endswith("error") else score
        out[f"{name}_threshold"] = float(THINNED_THRESHOLDS[best])
    return out


def isbi_scores(prob_cell: Sequence[np.ndarray], gt_cell: Sequence[np.ndarray]
                ) -> dict[str, float]:
    """The challenge's scores of a stack: P(cell) maps (H, W) in [0, 1] and the ground-truth
    cell masks (H, W) -> {pixel_error, rand_error, v_rand, v_info} (+ the best thresholds)."""
    stats = sum(slice_stats(p, g) for p, g in zip(prob_cell, gt_cell, strict=True))
    return scores(stats, len(prob_cell))
