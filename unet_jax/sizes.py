"""mmcv's keep-ratio size rule, shared by the training transforms and test-time inference.

Kept in a module of its own so that inference does not import the data package (TensorFlow).
"""
from __future__ import annotations

from collections.abc import Sequence


def rescale_size(height: int, width: int, scale: Sequence[float]) -> tuple[int, int]:
    """mmcv.imrescale's keep-ratio output size (new_h, new_w) for a (long, short)-style `scale`.

    sf = min(max(scale) / max(h, w), min(scale) / min(h, w)); size = int(x * sf + 0.5).

    Deliberate difference: each side is at least 1. For extreme aspect ratios (a 1 x 5000 image
    to (584, 565): sf = 0.1168, height int(0.6168) = 0) mmcv returns a 0 side and the resize that
    follows fails in cv2, in mmseg too; here the side stays 1 pixel. Every other size is mmcv's.
    """
    long_edge, short_edge = max(scale), min(scale)
    sf = min(long_edge / max(height, width), short_edge / min(height, width))
    return max(int(height * float(sf) + 0.5), 1), max(int(width * float(sf) + 0.5), 1)
