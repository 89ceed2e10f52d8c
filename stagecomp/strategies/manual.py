"""Manual ranks: the user says the final ranks; stages approach them geometrically."""

from __future__ import annotations

from dataclasses import dataclass

from stagecomp.layer_shape import LayerShape
from stagecomp.layers.base import DecomposedLayer, Rank
from stagecomp.options import DecomposeOptions
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
        allows_growth: Keep these ranks even where the layer would get more parameters
            than it has. The Compressor sets it for ranks given to one layer by its exact
            name in ``ranks=``; elsewhere a layer that would grow is skipped with the reason.
    """

    rank: Rank | None = None

    allows_growth: bool = False

    def unavailable_reason(self) -> str | None:
        """Why this strategy sizes no layer: no rank given for it."""
        if self.rank is None:
            return (
                "no manual rank given: name the layer in ranks={name: rank} or pass "
                "Manual(rank=N) as the strategy"
            )
        return None

    def choose_ranks(self, request: RankRequest) -> tuple[int, ...]:
        if self.rank is None:
            raise ValueError(f"layer {request.name!r} has no manual rank")
        target = self.final_ranks(request.cls, request.shape, request.options, request.name)
        if request.stage + 1 >= request.stages:
            return target
        dense = request.shape.dense_params
        final = request.cls.param_count(request.shape, target, request.options)
        rate = (dense / final) ** ((request.stage + 1) / request.stages)
        path = ranks_for_reduction(request.cls, request.shape, rate, request.options, request.name)
        return tuple(max(p, t) for p, t in zip(path, target, strict=True))

    def final_ranks(
        self,
        cls: type[DecomposedLayer],
        shape: LayerShape,
        options: DecomposeOptions,
        name: str | None = None,
    ) -> tuple[int, ...]:
        """The ranks of the last stage: one integer caps every rank at the layer's full
        rank (so ``Manual(rank=64)`` also serves layers with fewer channels); a tuple is
        taken exactly."""
        if self.rank is None:
            raise ValueError(f"layer {name!r} has no manual rank")
        return cls.normalize_rank(shape, cls.cap_rank(shape, self.rank, options), options, name)

    def to_dict(self) -> dict[str, object]:
        rank = list(self.rank) if isinstance(self.rank, (tuple, list)) else self.rank
        return {"strategy": "manual", "rank": rank, "allows_growth": self.allows_growth}
