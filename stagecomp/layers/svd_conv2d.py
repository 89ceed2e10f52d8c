"""SVD Conv2d: a kxk conv ``in -> r`` then a 1x1 conv ``r -> out`` (per group).

For 1x1 convolutions this is MUSCO's SVD; for kxk kernels it is the SVD of the
weight unfolded as ``(out, in * kh * kw)``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from stagecomp.layer_shape import LayerShape
from stagecomp.layers.factory import Factory
from stagecomp.layers.init import init_bias_, init_factor_chain_
from stagecomp.layers.svd_base import GroupedSVDLayer, Triplet
from stagecomp.options import DecomposeOptions


class SVDConv2d(GroupedSVDLayer):
    """A Conv2d factorised by truncated SVD of each group's unfolded kernel."""

    method = "svd"
    kinds = ("conv2d", "conv1d")

    def _build(self, new: Factory) -> None:
        shape, (rank,) = self.shape, self.ranks
        width = shape.groups * rank
        self.first = new.conv(
            shape.in_channels, width, shape.kernel_size, shape.groups, **shape.conv_kwargs()
        )
        self.second = new.conv(width, shape.out_channels, 1, shape.groups, bias=shape.bias)
        fan_in = shape.in_per_group * shape.kernel_numel
        init_factor_chain_([self.first.weight, self.second.weight], fan_in, [rank])
        init_bias_(self.second.bias, fan_in)

    @classmethod
    def param_count(cls, shape: LayerShape, ranks: Sequence[int], options: DecomposeOptions) -> int:
        (rank,) = ranks
        per_group = rank * (shape.in_per_group * shape.kernel_numel + shape.out_per_group)
        return shape.groups * per_group + (shape.out_channels if shape.bias else 0)

    def _group_factors(self, dtype: torch.dtype) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        shape, (rank,) = self.shape, self.ranks
        first = self.first.weight.to(dtype).reshape(shape.groups, rank, -1)
        second = self.second.weight.to(dtype).reshape(shape.groups, -1, rank)
        return list(second), list(first)

    def _assign(self, factors: list[Triplet], bias: torch.Tensor | None) -> None:
        shape, (rank,) = self.shape, self.ranks
        firsts = [s.sqrt()[:, None] * vh for _, s, vh in factors]
        seconds = [u * s.sqrt()[None, :] for u, s, _ in factors]
        self.first.weight.copy_(
            torch.cat(firsts).reshape(shape.groups * rank, shape.in_per_group, *shape.kernel_size)
        )
        self.second.weight.copy_(torch.cat(seconds).reshape(shape.out_channels, rank, 1, 1))
        if bias is not None and self.second.bias is not None:
            self.second.bias.copy_(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.from_2d(self.second(self.first(self.as_2d(x))))

    def dense_weight(self) -> torch.Tensor:
        shape = self.shape
        (rank,) = self.ranks
        first = self.first.weight.reshape(shape.groups, rank, -1)
        second = self.second.weight.reshape(shape.groups, shape.out_per_group, rank)
        return shape.module_weight(torch.bmm(second, first))

    def dense_bias(self) -> torch.Tensor | None:
        return self.second.bias
