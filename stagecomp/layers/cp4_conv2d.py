"""CP4 Conv2d: 1x1 ``in -> R``, depthwise ``kh x 1``, depthwise ``1 x kw``, 1x1 ``R -> out``.

The CP decomposition of each group's kernel as a 4-way tensor ``(out, in, kh, kw)``
(Lebedev et al. 2015): every rank-one term's spatial filter is separable, a vertical
then a horizontal 1-D filter.

Splitting the spatial conv in two is exact for every padding: stride, padding and
dilation act on each axis separately, and padding one axis (zeros, reflect, replicate
or circular) commutes with a filter that only runs along the other axis. ``"same"``
and ``"valid"`` are passed to both 1-D convs; each one then pads only its own axis,
asymmetrically for even kernels exactly as the dense conv does.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from stagecomp.decompositions.cp import cp_als, cp_full_rank
from stagecomp.layer_shape import LayerShape
from stagecomp.layers.base import DecomposedLayer
from stagecomp.layers.init import init_bias_, init_factor_chain_
from stagecomp.options import DecomposeOptions

logger = logging.getLogger(__name__)


class CP4Conv2d(DecomposedLayer):
    """A Conv2d factorised by a rank-R CP of each group's ``(out, in, kh, kw)`` kernel.

    The CP weights are spread evenly over the four factors (``weight ** (1/4)`` per
    column) so that fine-tuning starts from factors of comparable scale.
    """

    method = "cp4"
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
        (kh, kw), (sh, sw), (dh, dw) = shape.kernel_size, shape.stride, shape.dilation
        if isinstance(shape.padding, str):
            pad_v: tuple[int, int] | str = shape.padding
            pad_h: tuple[int, int] | str = shape.padding
        else:
            pad_v, pad_h = (shape.padding[0], 0), (0, shape.padding[1])
        common: dict[str, Any] = {
            "groups": width,
            "bias": False,
            "padding_mode": shape.padding_mode,
            "device": device,
            "dtype": dtype,
        }
        self.first = nn.Conv2d(
            shape.in_channels, width, 1, groups=groups, bias=False, device=device, dtype=dtype
        )
        self.vertical = nn.Conv2d(
            width,
            width,
            (kh, 1),
            stride=(sh, 1),
            padding=pad_v,
            dilation=(dh, 1),
            **common,
        )
        self.horizontal = nn.Conv2d(
            width,
            width,
            (1, kw),
            stride=(1, sw),
            padding=pad_h,
            dilation=(1, dw),
            **common,
        )
        self.last = nn.Conv2d(
            width, shape.out_channels, 1, groups=groups, bias=shape.bias, device=device, dtype=dtype
        )
        fan_in = shape.in_per_group * shape.kernel_numel
        init_factor_chain_(
            [self.first.weight, self.vertical.weight, self.horizontal.weight, self.last.weight],
            fan_in,
            [rank],
        )
        init_bias_(self.last.bias, fan_in)

    @staticmethod
    def _tensor_shape(shape: LayerShape) -> tuple[int, int, int, int]:
        return (shape.out_per_group, shape.in_per_group, *shape.kernel_size)

    @classmethod
    def full_rank(cls, shape: LayerShape, options: DecomposeOptions) -> tuple[int, ...]:
        return (cp_full_rank(cls._tensor_shape(shape)),)

    @classmethod
    def param_count(cls, shape: LayerShape, ranks: Sequence[int], options: DecomposeOptions) -> int:
        (rank,) = ranks
        kh, kw = shape.kernel_size
        per_group = rank * (shape.in_per_group + kh + kw + shape.out_per_group)
        return shape.groups * per_group + (shape.out_channels if shape.bias else 0)

    @classmethod
    def from_weights(
        cls,
        shape: LayerShape,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        ranks: tuple[int, ...],
        options: DecomposeOptions,
    ) -> CP4Conv2d:
        layer = cls(shape, ranks, options, device=weight.device, dtype=weight.dtype)
        (rank,) = ranks
        grouped = shape.grouped_weight(weight)
        outs, ins, verticals, horizontals = [], [], [], []
        for g in range(shape.groups):
            result = cp_als(
                grouped[g],
                rank,
                max_iter=options.cp_max_iter,
                tol=options.cp_tol,
                seed=options.seed,
            )
            logger.debug(
                "cp4 group %d: rank %d, relative error %.4g after %d sweeps",
                g,
                rank,
                result.rel_error,
                result.iterations,
            )
            share = result.weights.pow(0.25)
            out_factor, in_factor, v_factor, h_factor = (f * share for f in result.factors)
            outs.append(out_factor)
            ins.append(in_factor.T)
            verticals.append(v_factor.T)
            horizontals.append(h_factor.T)
        layer.first.weight.copy_(torch.cat(ins).reshape(layer.first.weight.shape))
        layer.vertical.weight.copy_(torch.cat(verticals).reshape(layer.vertical.weight.shape))
        layer.horizontal.weight.copy_(torch.cat(horizontals).reshape(layer.horizontal.weight.shape))
        layer.last.weight.copy_(torch.cat(outs).reshape(layer.last.weight.shape))
        if bias is not None and layer.last.bias is not None:
            layer.last.bias.copy_(bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.last(self.horizontal(self.vertical(self.first(x))))

    def dense_weight(self) -> torch.Tensor:
        shape = self.shape
        (rank,) = self.ranks
        groups = shape.groups
        kh, kw = shape.kernel_size
        in_factor = self.first.weight.reshape(groups, rank, shape.in_per_group)
        vertical = self.vertical.weight.reshape(groups, rank, kh)
        horizontal = self.horizontal.weight.reshape(groups, rank, kw)
        out_factor = self.last.weight.reshape(groups, shape.out_per_group, rank)
        # (g, R, kh * kw): each term's separable spatial filter, then times its input mix.
        spatial = (vertical[:, :, :, None] * horizontal[:, :, None, :]).reshape(groups, rank, -1)
        terms = (in_factor[:, :, :, None] * spatial[:, :, None, :]).reshape(groups, rank, -1)
        return shape.module_weight(torch.bmm(out_factor, terms))

    def dense_bias(self) -> torch.Tensor | None:
        return self.last.bias
