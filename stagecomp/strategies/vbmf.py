"""VBMF ranks: each layer keeps the rank EVBMF finds above its noise floor.

The first stage runs EVBMF on the dense weight's matrices (the matrix for SVD,
the mode-0 and mode-1 unfoldings for Tucker2, the bond unfoldings for TT).
Later stages run it on the decomposed layer's small core (its factors
orthonormalised first, so the core carries the layer's whole spectrum), as
MUSCO does: the core's weakest directions are then judged as noise afresh,
which is what lets every stage shrink the layer further.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from stagecomp.errors import RankError
from stagecomp.layers.base import DecomposedLayer
from stagecomp.layers.svd_conv2d import SVDConv2d
from stagecomp.layers.svd_linear import SVDLinear
from stagecomp.layers.tt_base import TTLayer
from stagecomp.layers.tucker2_conv2d import Tucker2Conv2d
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
        matrices = _spectral_matrices(request)
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


def _orthonormal_fold(factor: torch.Tensor) -> torch.Tensor:
    """The R of a thin QR: what remains of a factor once its orthonormal part is removed."""
    return torch.linalg.qr(factor, mode="r")[1]


def _spectral_matrices(request: RankRequest) -> list[list[torch.Tensor]]:
    """For each rank of the method, the matrices (one per group) EVBMF looks at."""
    shape, module, method = request.shape, request.module, request.cls.method
    with torch.no_grad():
        if isinstance(module, (SVDLinear, SVDConv2d)) and method == "svd":
            return [_svd_cores(module)]
        if isinstance(module, Tucker2Conv2d) and method == "tucker2":
            return _tucker2_core_unfoldings(module)
        weight = module.dense_weight() if isinstance(module, DecomposedLayer) else module.weight
        if not isinstance(weight, torch.Tensor):
            raise RankError(f"layer {request.name!r} has no weight tensor")
        grouped = shape.grouped_weight(weight.detach().double())
        if method in ("svd", "svd_id"):
            return [[g.reshape(shape.out_per_group, -1) for g in grouped]]
        outs = [g.reshape(shape.out_per_group, -1) for g in grouped]
        ins = [g.transpose(0, 1).reshape(shape.in_per_group, -1) for g in grouped]
        if method == "tucker2":
            return [outs, ins]
        if method in ("cp3", "cp4"):
            # One CP rank: the largest EVBMF rank of the two channel unfoldings.
            return [outs + ins]
        if issubclass(request.cls, TTLayer):
            return _tt_bond_unfoldings(request.cls, request, grouped)
    raise RankError(f"layer {request.name!r}: VBMF has no rule for method {method!r}")


def _svd_cores(module: SVDLinear | SVDConv2d) -> list[torch.Tensor]:
    """Per group, the ``r x r`` middle of ``B A`` once both factors are orthonormalised."""
    groups = module.shape.groups
    (rank,) = module.ranks
    first = module.first.weight.detach().double().reshape(groups, rank, -1)
    second = module.second.weight.detach().double().reshape(groups, -1, rank)
    return [_orthonormal_fold(second[g]) @ _orthonormal_fold(first[g].T).T for g in range(groups)]


def _tucker2_core_unfoldings(module: Tucker2Conv2d) -> list[list[torch.Tensor]]:
    """Per group, the mode-0 and mode-1 unfoldings of the core with the factors' R folded in."""
    groups = module.shape.groups
    r_out, r_in = module.ranks
    first = module.first.weight.detach().double().reshape(groups, r_in, -1)
    core = module.core.weight.detach().double().reshape(groups, r_out, r_in, -1)
    last = module.last.weight.detach().double().reshape(groups, -1, r_out)
    outs, ins = [], []
    for g in range(groups):
        folded = torch.einsum(
            "ab,bcs,dc->ads", _orthonormal_fold(last[g]), core[g], _orthonormal_fold(first[g].T)
        )
        outs.append(folded.reshape(r_out, -1))
        ins.append(folded.transpose(0, 1).reshape(r_in, -1))
    return [outs, ins]


def _tt_bond_unfoldings(
    cls: type[TTLayer], request: RankRequest, grouped: torch.Tensor
) -> list[list[torch.Tensor]]:
    """Per TT bond, the dense weight unfolded at that bond (one matrix per group)."""
    sizes = cls.bond_mode_sizes(request.shape, request.options)
    matrices: list[list[torch.Tensor]] = []
    for left in range(1, len(sizes)):
        rows = math.prod(sizes[:left])
        matrices.append(
            [
                cls.tt_ordered_weight(g, request.shape, request.options).reshape(rows, -1)
                for g in grouped
            ]
        )
    return matrices
