"""``ht``: the weight as a Hierarchical Tucker tensor over a balanced tree of paired modes."""

from __future__ import annotations

from typing import cast

import torch
from torch import nn

from stagecomp.decompositions.ht import ht_matricization
from stagecomp.layer_shape import LayerShape
from stagecomp.layers.ht_base import HTLayer
from stagecomp.layers.ht_conv2d import HTConv2d
from stagecomp.layers.ht_linear import HTLinear
from stagecomp.methods.base import MethodHandler
from stagecomp.methods.registry import register_method
from stagecomp.methods.unfoldings import grouped_float64
from stagecomp.options import DecomposeOptions


def edge_matricizations(
    cls: type[HTLayer], shape: LayerShape, options: DecomposeOptions, grouped: torch.Tensor
) -> list[list[torch.Tensor]]:
    """Per HT edge (in rank order), the dense weight's matricization at that node, one
    matrix per group: its matrix rank is the exact HT rank of the edge."""
    tree = cls.dimension_tree(shape, options)
    tensors = [cls.mode_ordered_weight(g, shape, options) for g in grouped]
    return [[ht_matricization(t, tree, nodes[0]) for t in tensors] for nodes in tree.edges()]


@register_method
class HTHandler(MethodHandler):
    """Hierarchical Tucker of each group's weight over the paired channel modes (and the
    kernel leaf).

    VBMF reads, for every edge of the dimension tree, the matricization of the dense
    weight at that node, as TT does on its bonds. There are no data-aware factors, and
    a layer's output channels are spread over several leaves, so no BatchNorm folds
    into it.
    """

    name = "ht"
    layer_classes = (HTLinear, HTConv2d)
    summary = "hierarchical Tucker: a balanced tree of small factors (Linear, conv)"

    def spectral_matrices(
        self, module: nn.Module, shape: LayerShape, options: DecomposeOptions, name: str | None
    ) -> list[list[torch.Tensor]]:
        cls = cast(type[HTLayer], self.layer_class(shape, name))  # both classes are HTLayers
        with torch.no_grad():
            return edge_matricizations(cls, shape, options, grouped_float64(module, shape, name))
