"""SVD Linear: ``W ~ B A`` as two Linear layers, ``in -> r -> out``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from stagecomp.decompositions.svd import svd_recompress, truncated_svd
from stagecomp.layer_shape import LayerShape
from stagecomp.layers.base import DecomposedLayer, Rank
from stagecomp.layers.init import init_bias_, init_factor_chain_
from stagecomp.options import DecomposeOptions


class SVDLinear(DecomposedLayer):
    """A Linear layer factorised by truncated SVD.

    The singular values are split evenly (``sqrt(S)`` on each side) so both
    factors have the same scale, which keeps fine-tuning well conditioned.
    """

    method = "svd"
    kinds = ("linear",)

    def __init__(
        self,
        shape: LayerShape,
        ranks: Sequence[int],
        options: DecomposeOptions | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(shape, ranks, options)
        (rank,) = self.ranks
        self.first = nn.Linear(shape.in_channels, rank, bias=False, device=device, dtype=dtype)
        self.second = nn.Linear(
            rank, shape.out_channels, bias=shape.bias, device=device, dtype=dtype
        )
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
    def from_weights(
        cls,
        shape: LayerShape,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        ranks: tuple[int, ...],
        options: DecomposeOptions,
    ) -> SVDLinear:
        u, s, vh = truncated_svd(weight, ranks[0], solver=options.svd_solver, seed=options.seed)
        return cls.from_svd(shape, u, s, vh, bias, options)

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
        layer = cls(shape, (s.numel(),), options, device=u.device, dtype=u.dtype)
        layer._assign(u, s, vh, bias)
        return layer

    def recompressed(
        self, rank: Rank, options: DecomposeOptions | None = None, name: str | None = None
    ) -> SVDLinear:
        """Smaller ranks straight from the two factors (exactly the SVD of their product)."""
        options = options or self.options
        ranks = self.normalize_rank(self.shape, rank, options, name)
        with torch.no_grad():
            dtype = torch.float64
            u, s, vh = svd_recompress(
                self.second.weight.to(dtype), self.first.weight.to(dtype), ranks[0]
            )
            layer = type(self)(self.shape, ranks, options, device=u.device, dtype=dtype)
            bias = None if self.second.bias is None else self.second.bias.to(dtype)
            layer._assign(u, s, vh, bias)
        return layer.matched_to(self.first.weight, self.training)

    @torch.no_grad()
    def _assign(
        self, u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, bias: torch.Tensor | None
    ) -> None:
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
