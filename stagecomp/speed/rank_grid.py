"""The ranks worth timing: multiples of the vector width, about a quarter apart.

Latency moves in steps of the vector width (a rank of 45 costs what 48 costs in a kernel
that works on 8 or 16 channels at a time), so only multiples of it are worth a measurement;
neighbouring grid points are about a quarter apart, which keeps a 512-channel layer to 16
measurements per method, and a whole model has enough layers for the allocation to meet a
budget much finer than that. Multi-rank methods (Tucker2, TT) follow the
same path as ``Reduction``: every rank scaled with the largest one.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def round_up(value: int, multiple: int) -> int:
    """``value`` rounded up to a multiple of ``multiple``."""
    return math.ceil(value / multiple) * multiple


def leading_ranks(top: int, multiple: int) -> list[int]:
    """Grid values of the largest rank: ``multiple, 2 * multiple, ...``, then steps of about
    a quarter of the rank (still multiples of ``multiple``), ending at ``top``."""
    if top <= multiple:
        return list(range(1, top + 1))
    values: list[int] = []
    k = multiple
    while k < top:
        values.append(k)
        k += max(multiple, round_up(k // 4, multiple))
    values.append(top)
    return values


def rank_grid(full: Sequence[int], multiple: int) -> list[tuple[int, ...]]:
    """Ranks from small to full along one monotone path, each a multiple of ``multiple``
    (or its full rank), without repeats.

    Args:
        full: The method's full ranks for the layer.
        multiple: The vector width to round to (8 or 16 on most CPUs and GPUs).
    """
    top = max(full)
    grid: list[tuple[int, ...]] = []
    for k in leading_ranks(top, multiple):
        ranks = tuple(
            min(f, round_up(max(1, math.ceil(k * f / top)), multiple if k >= multiple else 1))
            for f in full
        )
        if not grid or grid[-1] != ranks:
            grid.append(ranks)
    return grid


__all__ = ["leading_ranks", "rank_grid", "round_up"]
