"""Manual ranks: the user says the final ranks; stages approach them geometrically."""

from __future__ import annotations

from dataclasses import dataclass

from stagecomp.layers.base import Rank
from stagecomp.strategies.base import RankRequest
from stagecomp.strategies.reduction import ranks_for_reduction


@dataclass(frozen=True)
class Manual:
    """Decompose to the ranks given.

    With several stages, stage ``s`` of ``S`` keeps the fraction
    ``(target / dense) ** ((s + 1) / S)`` of the dense parameters, so every stage
    shrinks the layer by the same factor and the last one lands exactly on the
    given ranks.

    Attributes:
        rank: Ranks for every layer that has no entry in ``Compressor(ranks=...)``;
            ``None`` compresses only the layers named there.
    """

    rank: Rank | None = None

    def choose_ranks(self, request: RankRequest) -> tuple[int, ...]:
        if self.rank is None:
            raise ValueError(f"layer {request.name!r} has no manual rank")
        target = request.cls.normalize_rank(request.shape, self.rank, request.options, request.name)
        if request.stage + 1 >= request.stages:
            return target
        dense = request.shape.dense_params
        final = request.cls.param_count(request.shape, target, request.options)
        rate = (dense / final) ** ((request.stage + 1) / request.stages)
        path = ranks_for_reduction(request.cls, request.shape, rate, request.options, request.name)
        return tuple(max(p, t) for p, t in zip(path, target, strict=True))

    def to_dict(self) -> dict[str, object]:
        rank = list(self.rank) if isinstance(self.rank, (tuple, list)) else self.rank
        return {"strategy": "manual", "rank": rank}
