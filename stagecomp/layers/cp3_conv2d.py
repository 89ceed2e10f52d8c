"""CP3 Conv2d: 1x1 ``in -> R``, depthwise ``kh x kw`` on R channels, 1x1 ``R -> out``.

The CP decomposition of each group's kernel seen as a 3-way tensor
``(out, in, kh * kw)`` (Lebedev et al. 2015 with the spatial modes kept together):
every rank-one term is an input mix, one spatial filter and an output mix.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from stagecomp.decompositions.cp import cp_als, cp_full_rank
from stagecomp.layer_shape import LayerShape
from stagecomp.layers.base import DecomposedLayer
from stagecomp.layers.init import init_bias_, init_factor_chain_
from stagecomp.options import DecomposeOptions

logger = logging.getLogger(__name__)


class CP3Conv2d(DecomposedLayer):
    """A Conv2d factorised by a rank-R CP of each group's ``(out, in, kh*kw)`` kernel.

    The CP weights are spread evenly over the three factors (each column gets
    ``weight ** (1/3)``), so no factor is orders of magnitude larger than another
    and fine-tuning stays well conditioned.
    """

    method = "cp3"
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
        width = groups * rank
        self.first = nn.Conv2d(
            shape.in_channels, width, 1, groups=groups, bias=False, device=device, dtype=dtype
        )
        self.spatial = nn.Conv2d(
            width,
            width,
            shape.kernel_size,
            groups=width,
            bias=False,
            device=device,
            dtype=dtype,
            **shape.conv_kwargs(),
        )
        self.last = nn.Conv2d(
            width, shape.out_channels, 1, groups=groups, bias=shape.bias, device=device, dtype=dtype
        )
        fan_in = shape.in_per_group * shape.kernel_numel
        init_factor_chain_(
            [self.first.weight, self.spatial.weight, self.last.weight], fan_in, [rank]
        )
        init_bias_(self.last.bias, fan_in)

    @staticmethod
    def _tensor_shape(shape: LayerShape) -> tuple[int, int, int]:
        return (shape.out_per_group, shape.in_per_group, shape.kernel_numel)

    @classmethod
    def full_rank(cls, shape: LayerShape, options: DecomposeOptions) -> tuple[int, ...]:
        return (cp_full_rank(cls._tensor_shape(shape)),)

    @classmethod
    def param_count(cls, shape: LayerShape, ranks: Sequence[int], options: DecomposeOptions) -> int:
        (rank,) = ranks
        per_group = rank * (shape.in_per_group + shape.kernel_numel + shape.out_per_group)
        return shape.groups * per_group + (shape.out_channels if shape.bias else 0)

    @classmethod
    def from_weights(
        cls,
        shape: LayerShape,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        ranks: tuple[int, ...],
        options: DecomposeOptions,
    ) -> CP3Conv2d:
        layer = cls(shape, ranks, options, device=weight.device, dtype=weight.dtype)
        (rank,) = ranks
        grouped = shape.grouped_weight(weight).reshape(shape.groups, *cls._tensor_shape(shape))
        outs, ins, spatials = [], [], []
        for g in range(shape.groups):
            result = cp_als(
                grouped[g],
                rank,
                max_iter=options.cp_max_iter,
                tol=options.cp_tol,
                seed=options.seed,
            )
            logger.debug(
                "cp3 group %d: rank %d, relative error %.4g after %d sweeps",
                g,
                rank,
                result.rel_error,
                result.iterations,
            )
            share = result.weights.pow(1.0 / 3.0)
            out_factor, in_factor, spatial_factor = (f * share for f in result.factors)
            outs.append(out_factor)
            ins.append(in_factor.T)
            spatials.append(spatial_factor.T)
        layer.first.weight.copy_(torch.cat(ins).reshape(layer.first.weight.shape))
        layer.spatial.weight.copy_(torch.cat(spatials).reshape(layer.spatial.weight.shape))
        layer.last.weight.copy_(torch.cat(outs).reshape(layer.last.weight.shape))
        if bias is not None and layer.last.bias is not None:
            layer.last.bias.copy_(bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.spatial(self.first(x)))

    def dense_weight(self) -> torch.Tensor:
        shape = self.shape
        (rank,) = self.ranks
        groups = shape.groups
        in_factor = self.first.weight.reshape(groups, rank, shape.in_per_group)
        spatial = self.spatial.weight.reshape(groups, rank, shape.kernel_numel)
        out_factor = self.last.weight.reshape(groups, shape.out_per_group, rank)
        # (g, R, in * k): every rank-one term's input mix times its spatial filter.
        terms = (in_factor[:, :, :, None] * spatial[:, :, None, :]).reshape(groups, rank, -1)
        return shape.module_weight(torch.bmm(out_factor, terms))

    def dense_bias(self) -> torch.Tensor | None:
        return self.last.bias
