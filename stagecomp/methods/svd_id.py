"""``svd_id``: the truncated SVD in interpolative form (``r^2`` fewer parameters)."""

from __future__ import annotations

import torch

from stagecomp.layer_shape import LayerShape
from stagecomp.layers.base import DecomposedLayer
from stagecomp.layers.interpolative import InterpolativeLayer
from stagecomp.methods.registry import register_method
from stagecomp.methods.svd_family import SVDFamilyHandler, Triplet
from stagecomp.options import DecomposeOptions


@register_method
class InterpolativeHandler(SVDFamilyHandler):
    """The same rank-r SVD as ``svd``, stored with r of its output rows kept as they are.

    VBMF reads the dense weight's matrix at every stage (the interpolative factors
    are not folded into a small core as ``svd``'s are).
    """

    name = "svd_id"
    layer_classes = (InterpolativeLayer,)
    summary = "truncated SVD in interpolative form: r^2 fewer parameters (Linear, any conv)"

    def from_triplets(
        self,
        shape: LayerShape,
        triplets: list[Triplet],
        bias: torch.Tensor | None,
        options: DecomposeOptions,
    ) -> DecomposedLayer:
        return InterpolativeLayer.from_svd(shape, triplets, bias, options)
