"""Ranks that shrink a layer's parameters by a given rate.

Multi-rank methods (Tucker2's two ranks, TT's bond ranks) move along one
monotone path: step ``k`` scales every full rank by ``k / max(full)``
(rounded up, at least 1). A binary search over the steps finds the largest
ranks whose parameter count meets the budget, so the result is exact to
within one rank step for every method.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from stagecomp.errors import RankError
from stagecomp.layer_shape import LayerShape
from stagecomp.layers.base import DecomposedLayer, describe
from stagecomp.options import DecomposeOptions
from stagecomp.strategies.base import is_factor_above_one

if TYPE_CHECKING:
    from stagecomp.strategies.base import RankRequest


def rank_at_step(full: tuple[int, ...], step: int) -> tuple[int, ...]:
    """The ranks at ``step`` (1 .. max(full)) of the path from rank 1 to full rank."""
    top = max(full)
    return tuple(max(1, min(f, math.ceil(step * f / top))) for f in full)


def ranks_for_reduction(
    cls: type[DecomposedLayer],
    shape: LayerShape,
    rate: float,
    options: DecomposeOptions | None = None,
    name: str | None = None,
) -> tuple[int, ...]:
    """The largest ranks on the path whose layer has at most ``dense / rate`` parameters.

    Args:
        cls: The layer class (decomposition method) to size.
        shape: The layer being replaced.
        rate: How many times fewer parameters the layer should end with (> 1 shrinks;
            exactly 1 keeps the parameter count, which may already be below full rank).
        options: Options that change the structure (TT modes).
        name: The layer's name, for error messages.

    Returns:
        One int per rank of ``cls``. When even rank 1 exceeds the budget, rank 1.
    """
    if not (isinstance(rate, (int, float)) and math.isfinite(rate) and rate > 0):
        raise RankError(
            f"{describe(shape, name)}: reduction rate {rate!r} is not allowed; "
            "expected a finite number > 0 (e.g. 2 for 2x fewer parameters)"
        )
    options = options or DecomposeOptions()
    cls.check_supported(shape, options, name)
    full = cls.full_rank(shape, options)
    budget = shape.dense_params / rate
    lo, hi = 1, max(full)
    if cls.param_count(shape, rank_at_step(full, lo), options) <= budget:
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if cls.param_count(shape, rank_at_step(full, mid), options) <= budget:
                lo = mid
            else:
                hi = mid - 1
    # The layer's own rules last (HT lowers ranks its tree cannot hold; others keep them).
    return cls.normalize_rank(shape, rank_at_step(full, lo), options, name)


@dataclass(frozen=True)
class Reduction:
    """Shrink every target layer's parameters ``rate`` times by the last stage.

    Stage ``s`` of ``S`` aims at ``rate ** ((s + 1) / S)``, so each stage removes
    the same fraction and fine-tuning between stages has equal steps to recover.

    Attributes:
        rate: Parameter reduction factor per layer (2.0 = half the parameters).
    """

    rate: float = 2.0

    def __post_init__(self) -> None:
        if not is_factor_above_one(self.rate):
            raise RankError(
                f"reduction rate {self.rate!r} is not allowed; expected a number > 1 "
                "(e.g. 2 for 2x fewer parameters; 1 would change the layers and save nothing)"
            )

    def choose_ranks(self, request: RankRequest) -> tuple[int, ...]:
        rate = self.rate ** ((request.stage + 1) / request.stages)
        return ranks_for_reduction(request.cls, request.shape, rate, request.options, request.name)

    def to_dict(self) -> dict[str, object]:
        return {"strategy": "reduction", "rate": self.rate}
