"""``svd``: a layer as two smaller ones, ``x -> B (A x)``, from its truncated SVD."""

from __future__ import annotations

import torch
from torch import nn

from stagecomp.layer_shape import LayerShape
from stagecomp.layers.base import DecomposedLayer
from stagecomp.layers.svd_conv2d import SVDConv2d
from stagecomp.layers.svd_linear import SVDLinear
from stagecomp.methods.registry import register_method
from stagecomp.methods.svd_family import SVDFamilyHandler, Triplet
from stagecomp.methods.unfoldings import orthonormal_fold
from stagecomp.options import DecomposeOptions


def svd_cores(module: SVDLinear | SVDConv2d) -> list[torch.Tensor]:
    """Per group, the ``r x r`` middle of ``B A`` once both factors are orthonormalised."""
    groups = module.shape.groups
    (rank,) = module.ranks
    first = module.first.weight.detach().double().reshape(groups, rank, -1)
    second = module.second.weight.detach().double().reshape(groups, -1, rank)
    return [orthonormal_fold(second[g]) @ orthonormal_fold(first[g].T).T for g in range(groups)]


@register_method
class SVDHandler(SVDFamilyHandler):
    """Truncated SVD of each group's ``(out, in * kh * kw)`` matrix; the default for
    Linear and 1x1 convolutions, where it is the best rank-r approximation."""

    name = "svd"
    layer_classes = (SVDLinear, SVDConv2d)
    summary = "truncated SVD: two smaller layers (Linear, any conv)"

    def is_default_for(self, shape: LayerShape) -> bool:
        return shape.is_pointwise

    def from_triplets(
        self,
        shape: LayerShape,
        triplets: list[Triplet],
        bias: torch.Tensor | None,
        options: DecomposeOptions,
    ) -> DecomposedLayer:
        if shape.kind == "linear":
            return SVDLinear.from_svd(shape, *triplets[0], bias, options)
        return SVDConv2d.from_svd(shape, triplets, bias, options)

    def spectral_matrices(
        self, module: nn.Module, shape: LayerShape, options: DecomposeOptions, name: str | None
    ) -> list[list[torch.Tensor]]:
        # A later stage reads the small core of its own factors, which holds the whole
        # spectrum (MUSCO), instead of rebuilding the dense weight.
        if isinstance(module, (SVDLinear, SVDConv2d)):
            with torch.no_grad():
                return [svd_cores(module)]
        return super().spectral_matrices(module, shape, options, name)

    def fold_target(self, layer: nn.Module) -> nn.Conv2d | None:
        # The second factor of a conv produces the output channels; a Linear has no BatchNorm2d.
        return layer.second if isinstance(layer, SVDConv2d) else None
