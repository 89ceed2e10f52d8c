"""VBMF ranks: each layer keeps the rank EVBMF finds above its noise floor.

Each method's handler says which matrices EVBMF reads for each of its ranks
(``MethodHandler.spectral_matrices``): at the first stage the dense weight's
(the matrix for SVD, the mode-0 and mode-1 unfoldings for Tucker2, the bond
unfoldings for TT); at later stages the decomposed layer's small core where the
method has one (its factors orthonormalised first, so the core carries the
layer's whole spectrum), as MUSCO does: the core's weakest directions are then
judged as noise afresh, which is what lets every stage shrink the layer further.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from stagecomp.errors import RankError
from stagecomp.layers.base import DecomposedLayer
from stagecomp.methods import get_method
from stagecomp.strategies.base import RankRequest
from stagecomp.strategies.evbmf import evbmf_rank, weakened_rank


@dataclass(frozen=True)
class VBMF:
    """Ranks from analytic empirical variational Bayesian matrix factorisation.

    Attributes:
        weakening: ``w`` in [0, 1]; the rank is ``full - w * (full - vbmf_rank)``, so
            1 keeps the EVBMF rank and 0 keeps the full (current) rank.
        min_rank: No rank goes below this (nor above the full rank).
        scale_free: Make EVBMF's noise search relative to the weight's scale, so ranks
            do not change when a layer is scaled; off by default to give the same ranks
            as MUSCO's reference implementation.
    """

    weakening: float = 1.0
    min_rank: int = 1
    scale_free: bool = False

    full_rank_hint: ClassVar[str] = (
        "VBMF found no low-rank structure above the noise (it keeps the full rank): the "
        "weights look untrained; for untrained weights use strategy='reduction' or 'manual'"
    )
    """Why a layer VBMF keeps at full rank is left alone, for the report."""

    def __post_init__(self) -> None:
        w = self.weakening
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0.0 <= w <= 1.0:
            raise RankError(f"VBMF weakening {w!r} is not allowed; expected a number in [0, 1]")
        if (
            isinstance(self.min_rank, bool)
            or not isinstance(self.min_rank, int)
            or self.min_rank < 1
        ):
            raise RankError(
                f"VBMF min_rank {self.min_rank!r} is not allowed; expected an integer >= 1"
            )

    def choose_ranks(self, request: RankRequest) -> tuple[int, ...]:
        full = request.cls.full_rank(request.shape, request.options)
        current = _current_ranks(request.module, request.cls, full)
        matrices = get_method(request.cls.method).spectral_matrices(
            request.module, request.shape, request.options, request.name
        )
        ranks = []
        for k, group_matrices in enumerate(matrices):
            found = max(evbmf_rank(m, scale_free=self.scale_free).rank for m in group_matrices)
            found = min(found, current[k])
            ranks.append(weakened_rank(current[k], found, self.weakening, self.min_rank))
        return request.cls.normalize_rank(
            request.shape,
            tuple(min(r, f) for r, f in zip(ranks, full, strict=True)),
            request.options,
            request.name,
        )

    def to_dict(self) -> dict[str, object]:
        return {
            "strategy": "vbmf",
            "weakening": self.weakening,
            "min_rank": self.min_rank,
            "scale_free": self.scale_free,
        }


def _current_ranks(
    module: nn.Module, cls: type[DecomposedLayer], full: tuple[int, ...]
) -> tuple[int, ...]:
    if isinstance(module, cls):
        return module.ranks
    return full
