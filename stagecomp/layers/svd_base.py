"""What SVDConv2d and InterpolativeLayer share: each group's weight as its truncated SVD.

Both layers store, per group, a rank-``r`` factorisation ``left @ right`` of the
weight unfolded as ``(out/g, in/g * kh * kw)``, made from its truncated SVD: the
SVD form spreads the singular values over both factors, the interpolative form
keeps ``r`` rows exactly. Which rank is exact, the decomposition, building a
layer from SVDs computed elsewhere and recompressing through the factors' exact
SVD follow from that alone, so they live here once.
"""

from __future__ import annotations

from typing import TypeVar

import torch

from stagecomp.decompositions.svd import svd_recompress, truncated_svd
from stagecomp.layer_shape import LayerShape
from stagecomp.layers.base import DecomposedLayer
from stagecomp.options import DecomposeOptions

Triplet = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""A truncated SVD ``(u, s, vh)``."""

_SVDLayerT = TypeVar("_SVDLayerT", bound="GroupedSVDLayer")


def grouped_svd(
    shape: LayerShape, weight: torch.Tensor, rank: int, options: DecomposeOptions
) -> list[Triplet]:
    """The truncated SVD ``(u, s, vh)`` of each group's weight unfolded as ``(out/g, in/g * k)``."""
    grouped = shape.grouped_weight(weight)
    return [
        truncated_svd(
            grouped[g].reshape(shape.out_per_group, -1),
            rank,
            solver=options.svd_solver,
            seed=options.seed,
        )
        for g in range(shape.groups)
    ]


class GroupedSVDLayer(DecomposedLayer):
    """Base of the layers holding each group's truncated SVD; ``_assign`` takes one per group."""

    def _group_factors(self, dtype: torch.dtype) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per group, ``left`` (``out/g x r``) and ``right`` (``r x in/g * k``) in ``dtype``."""
        raise NotImplementedError

    @classmethod
    def full_rank(cls, shape: LayerShape, options: DecomposeOptions) -> tuple[int, ...]:
        return (min(shape.out_per_group, shape.in_per_group * shape.kernel_numel),)

    @classmethod
    def from_svd(
        cls: type[_SVDLayerT],
        shape: LayerShape,
        triplets: list[Triplet],
        bias: torch.Tensor | None,
        options: DecomposeOptions | None = None,
    ) -> _SVDLayerT:
        """A layer from one ``(u, s, vh)`` per group (``vh`` over ``in_per_group * kh * kw``).

        Data-aware factorisations (``stagecomp.data_aware``) use it, so their layers
        are ordinary layers that save, load and recompress as usual.
        """
        u, s, _ = triplets[0]
        return cls._with_factors(shape, (s.numel(),), options, triplets, bias, like=u)

    def _decompose(self, weight: torch.Tensor) -> list[Triplet]:
        return grouped_svd(self.shape, weight, self.ranks[0], self.options)

    def _refactored(
        self: _SVDLayerT, ranks: tuple[int, ...], options: DecomposeOptions
    ) -> _SVDLayerT:
        """Straight from each group's two factors, in float64: exactly their product's SVD."""
        lefts, rights = self._group_factors(torch.float64)
        triplets = [
            svd_recompress(left, right, ranks[0]) for left, right in zip(lefts, rights, strict=True)
        ]
        return self.from_svd(self.shape, triplets, self.dense_bias(), options)
