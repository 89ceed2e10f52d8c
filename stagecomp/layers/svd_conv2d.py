"""SVD Conv2d: a kxk conv ``in -> r`` then a 1x1 conv ``r -> out`` (per group).

For 1x1 convolutions this is MUSCO's SVD; for kxk kernels it is the SVD of the
weight unfolded as ``(out, in * kh * kw)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from stagecomp.decompositions.svd import svd_recompress, truncated_svd
from stagecomp.layer_shape import LayerShape
from stagecomp.layers.base import DecomposedLayer, Rank
from stagecomp.layers.init import init_bias_, init_factor_chain_
from stagecomp.options import DecomposeOptions

Triplet = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


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


class SVDConv2d(DecomposedLayer):
    """A Conv2d factorised by truncated SVD of each group's unfolded kernel."""

    method = "svd"
    kinds = ("conv2d",)

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
        groups = shape.groups
        self.first = nn.Conv2d(
            shape.in_channels,
            groups * rank,
            shape.kernel_size,
            groups=groups,
            bias=False,
            device=device,
            dtype=dtype,
            **shape.conv_kwargs(),
        )
        self.second = nn.Conv2d(
            groups * rank,
            shape.out_channels,
            1,
            groups=groups,
            bias=shape.bias,
            device=device,
            dtype=dtype,
        )
        fan_in = shape.in_per_group * shape.kernel_numel
        init_factor_chain_([self.first.weight, self.second.weight], fan_in, [rank])
        init_bias_(self.second.bias, fan_in)

    @classmethod
    def full_rank(cls, shape: LayerShape, options: DecomposeOptions) -> tuple[int, ...]:
        return (min(shape.out_per_group, shape.in_per_group * shape.kernel_numel),)

    @classmethod
    def param_count(cls, shape: LayerShape, ranks: Sequence[int], options: DecomposeOptions) -> int:
        (rank,) = ranks
        per_group = rank * (shape.in_per_group * shape.kernel_numel + shape.out_per_group)
        return shape.groups * per_group + (shape.out_channels if shape.bias else 0)

    @classmethod
    def from_weights(
        cls,
        shape: LayerShape,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        ranks: tuple[int, ...],
        options: DecomposeOptions,
    ) -> SVDConv2d:
        return cls.from_svd(shape, grouped_svd(shape, weight, ranks[0], options), bias, options)

    @classmethod
    def from_svd(
        cls,
        shape: LayerShape,
        triplets: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
        bias: torch.Tensor | None,
        options: DecomposeOptions | None = None,
    ) -> SVDConv2d:
        """A layer from one ``(u, s, vh)`` per group (``vh`` over ``in_per_group * kh * kw``).

        Data-aware factorisations (``stagecomp.data_aware``) use it, so their layers
        are ordinary ``SVDConv2d`` layers that save, load and recompress as usual.
        """
        u = triplets[0][0]
        layer = cls(shape, (triplets[0][1].numel(),), options, device=u.device, dtype=u.dtype)
        layer._assign(triplets, bias)
        return layer

    def recompressed(
        self, rank: Rank, options: DecomposeOptions | None = None, name: str | None = None
    ) -> SVDConv2d:
        """Smaller ranks straight from each group's two factors (exactly their SVD)."""
        options = options or self.options
        ranks = self.normalize_rank(self.shape, rank, options, name)
        shape, (old,) = self.shape, self.ranks
        with torch.no_grad():
            dtype = torch.float64
            first = self.first.weight.to(dtype).reshape(shape.groups, old, -1)
            second = self.second.weight.to(dtype).reshape(shape.groups, -1, old)
            triplets = [svd_recompress(second[g], first[g], ranks[0]) for g in range(shape.groups)]
            layer = type(self)(shape, ranks, options, device=first.device, dtype=dtype)
            layer._assign(
                triplets, None if self.second.bias is None else self.second.bias.to(dtype)
            )
        return layer.matched_to(self.first.weight, self.training)

    @torch.no_grad()
    def _assign(
        self,
        triplets: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
        bias: torch.Tensor | None,
    ) -> None:
        shape, (rank,) = self.shape, self.ranks
        firsts = [s.sqrt()[:, None] * vh for _, s, vh in triplets]
        seconds = [u * s.sqrt()[None, :] for u, s, _ in triplets]
        self.first.weight.copy_(
            torch.cat(firsts).reshape(shape.groups * rank, shape.in_per_group, *shape.kernel_size)
        )
        self.second.weight.copy_(torch.cat(seconds).reshape(shape.out_channels, rank, 1, 1))
        if bias is not None and self.second.bias is not None:
            self.second.bias.copy_(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))

    def dense_weight(self) -> torch.Tensor:
        shape = self.shape
        (rank,) = self.ranks
        first = self.first.weight.reshape(shape.groups, rank, -1)
        second = self.second.weight.reshape(shape.groups, shape.out_per_group, rank)
        return shape.module_weight(torch.bmm(second, first))

    def dense_bias(self) -> torch.Tensor | None:
        return self.second.bias
