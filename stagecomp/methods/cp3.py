"""``cp3``: a kxk convolution as 1x1 -> depthwise kxk -> 1x1 (Lebedev et al. 2015)."""

from __future__ import annotations

import torch
from torch import nn

from stagecomp.layer_shape import LayerShape
from stagecomp.layers.cp3_conv2d import CP3Conv2d
from stagecomp.methods.base import MethodHandler
from stagecomp.methods.registry import register_method
from stagecomp.methods.unfoldings import both_channel_unfoldings
from stagecomp.options import DecomposeOptions


@register_method
class CP3Handler(MethodHandler):
    """Rank-R CP of each group's ``(out, in, kh * kw)`` kernel."""

    name = "cp3"
    layer_classes = (CP3Conv2d,)
    summary = "CP of (out, in, kh*kw): 1x1, depthwise kxk, 1x1 convolutions (conv)"

    def spectral_matrices(
        self, module: nn.Module, shape: LayerShape, options: DecomposeOptions, name: str | None
    ) -> list[list[torch.Tensor]]:
        return both_channel_unfoldings(module, shape, name)

    def fold_target(self, layer: nn.Module) -> nn.Conv2d | None:
        return layer.last if isinstance(layer, CP3Conv2d) else None
