"""``tt``: the weight as a tensor train of small cores (TT-matrix, Novikov et al. 2015)."""

from __future__ import annotations

import math
from typing import cast

import torch
from torch import nn

from stagecomp.layer_shape import LayerShape
from stagecomp.layers.tt_base import TTLayer
from stagecomp.layers.tt_conv2d import TTConv2d
from stagecomp.layers.tt_linear import TTLinear
from stagecomp.methods.base import MethodHandler
from stagecomp.methods.registry import register_method
from stagecomp.methods.unfoldings import grouped_float64
from stagecomp.options import DecomposeOptions


def bond_unfoldings(
    cls: type[TTLayer], shape: LayerShape, options: DecomposeOptions, grouped: torch.Tensor
) -> list[list[torch.Tensor]]:
    """Per TT bond, the dense weight unfolded at that bond (one matrix per group): its
    matrix rank is the exact TT rank of the bond."""
    sizes = cls.mode_sizes(shape, options)
    matrices: list[list[torch.Tensor]] = []
    for left in range(1, len(sizes)):
        rows = math.prod(sizes[:left])
        matrices.append(
            [cls.mode_ordered_weight(g, shape, options).reshape(rows, -1) for g in grouped]
        )
    return matrices


@register_method
class TTHandler(MethodHandler):
    """Tensor train of each group's weight over the factored channel modes (and the kernel).

    A TT layer's output channels are spread over several cores, so no BatchNorm folds
    into it.
    """

    name = "tt"
    layer_classes = (TTLinear, TTConv2d)
    summary = "tensor train of small cores (Linear, conv)"

    def spectral_matrices(
        self, module: nn.Module, shape: LayerShape, options: DecomposeOptions, name: str | None
    ) -> list[list[torch.Tensor]]:
        cls = cast(type[TTLayer], self.layer_class(shape, name))  # both classes are TTLayers
        with torch.no_grad():
            return bond_unfoldings(cls, shape, options, grouped_float64(module, shape, name))
