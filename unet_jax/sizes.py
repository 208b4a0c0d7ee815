"""mmcv's keep-ratio size rule, shared by the training transforms and test-time inference.

Kept in a module of its own so that inference does not import the data package (TensorFlow).
"""
from __future__ import annotations

from collections.abc import Sequence


def rescale_size(height: int, width: int, scale: Sequence[float]) -> tuple[int, int]:
    """mmcv.imrescale's keep-ratio output size (new_h, new_w) for a (long, short)-style `scale`.

    sf = min(max(scale) / max(h, w), min(scale) / min(h, w)); size = int(x * sf + 0.5).
    """
    long_edge, short_edge = max(scale), min(scale)
    sf = min(long_edge / max(height, width), short_edge / min(height, width))
    return int(height * float(sf) + 0.5), int(width * float(sf) + 0.5)
