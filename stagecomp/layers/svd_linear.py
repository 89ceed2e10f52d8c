"""SVD Linear: ``W ~ B A`` as two Linear layers, ``in -> r -> out``."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from stagecomp.decompositions.svd import svd_recompress, truncated_svd
from stagecomp.layer_shape import LayerShape
from stagecomp.layers.base import DecomposedLayer
from stagecomp.layers.factory import Factory
from stagecomp.layers.init import init_bias_, init_factor_chain_
from stagecomp.options import DecomposeOptions

Triplet = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class SVDLinear(DecomposedLayer):
    """A Linear layer factorised by truncated SVD.

    The singular values are split evenly (``sqrt(S)`` on each side) so both
    factors have the same scale, which keeps fine-tuning well conditioned.
    """

    method = "svd"
    kinds = ("linear",)

    def _build(self, new: Factory) -> None:
        shape, (rank,) = self.shape, self.ranks
        self.first = new.linear(shape.in_channels, rank)
        self.second = new.linear(rank, shape.out_channels, bias=shape.bias)
        init_factor_chain_([self.first.weight, self.second.weight], shape.in_channels, [rank])
        init_bias_(self.second.bias, shape.in_channels)

    @classmethod
    def full_rank(cls, shape: LayerShape, options: DecomposeOptions) -> tuple[int, ...]:
        return (min(shape.in_channels, shape.out_channels),)

    @classmethod
    def param_count(cls, shape: LayerShape, ranks: Sequence[int], options: DecomposeOptions) -> int:
        (rank,) = ranks
        bias = shape.out_channels if shape.bias else 0
        return rank * (shape.in_channels + shape.out_channels) + bias

    @classmethod
    def from_svd(
        cls,
        shape: LayerShape,
        u: torch.Tensor,
        s: torch.Tensor,
        vh: torch.Tensor,
        bias: torch.Tensor | None,
        options: DecomposeOptions | None = None,
    ) -> SVDLinear:
        """A layer computing ``u diag(s) vh x + bias``, from factors computed elsewhere.

        Data-aware factorisations (``stagecomp.data_aware``) use it, so their layers
        are ordinary ``SVDLinear`` layers that save, load and recompress as usual.
        """
        return cls._with_factors(shape, (s.numel(),), options, (u, s, vh), bias, like=u)

    def _refactored(self, ranks: tuple[int, ...], options: DecomposeOptions) -> SVDLinear:
        """Straight from the two factors, in float64: exactly the SVD of their product."""
        u, s, vh = svd_recompress(self.second.weight.double(), self.first.weight.double(), ranks[0])
        return self.from_svd(self.shape, u, s, vh, self.dense_bias(), options)

    def _decompose(self, weight: torch.Tensor) -> Triplet:
        options = self.options
        return truncated_svd(weight, self.ranks[0], solver=options.svd_solver, seed=options.seed)

    def _assign(self, factors: Triplet, bias: torch.Tensor | None) -> None:
        u, s, vh = factors
        root = s.sqrt()
        self.first.weight.copy_(root[:, None] * vh)
        self.second.weight.copy_(u * root[None, :])
        if bias is not None and self.second.bias is not None:
            self.second.bias.copy_(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))

    def dense_weight(self) -> torch.Tensor:
        return self.second.weight @ self.first.weight

    def dense_bias(self) -> torch.Tensor | None:
        return self.second.bias
