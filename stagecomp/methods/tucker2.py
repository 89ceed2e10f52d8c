"""``tucker2``: a kxk convolution as 1x1 -> small kxk -> 1x1 (Kim et al., MUSCO)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from stagecomp.decompositions.data_aware import data_aware_tucker2
from stagecomp.errors import StagecompError
from stagecomp.layer_shape import LayerShape
from stagecomp.layers.base import DecomposedLayer, describe
from stagecomp.layers.tucker2_conv2d import Tucker2Conv2d
from stagecomp.methods.base import DATA_AWARE_VARIANTS, MethodHandler
from stagecomp.methods.registry import register_method
from stagecomp.methods.unfoldings import (
    finite_weights,
    grouped_float64,
    input_unfoldings,
    orthonormal_fold,
    output_unfoldings,
)
from stagecomp.options import DecomposeOptions

if TYPE_CHECKING:
    from stagecomp.calibration import LayerStatistics


def core_unfoldings(module: Tucker2Conv2d) -> list[list[torch.Tensor]]:
    """Per group, the mode-0 and mode-1 unfoldings of the core with the factors' R folded in."""
    groups = module.shape.groups
    r_out, r_in = module.ranks
    first = module.first.weight.detach().double().reshape(groups, r_in, -1)
    core = module.core.weight.detach().double().reshape(groups, r_out, r_in, -1)
    last = module.last.weight.detach().double().reshape(groups, -1, r_out)
    outs, ins = [], []
    for g in range(groups):
        folded = torch.einsum(
            "ab,bcs,dc->ads", orthonormal_fold(last[g]), core[g], orthonormal_fold(first[g].T)
        )
        outs.append(folded.reshape(r_out, -1))
        ins.append(folded.transpose(0, 1).reshape(r_in, -1))
    return [outs, ins]


def energy_rank(moment: torch.Tensor, groups: int, tolerance: float) -> int:
    """Smallest rank keeping ``1 - tolerance^2`` of every group's channel energy."""
    size = moment.shape[0] // groups
    best = 1
    for g in range(groups):
        block = moment[g * size : (g + 1) * size, g * size : (g + 1) * size]
        values = torch.linalg.eigvalsh((block + block.T) / 2).flip(0).clamp_min(0)
        total = float(values.sum())
        if total <= 0:
            continue
        tail = 1 - values.cumsum(0) / total
        best = max(best, int((tail <= tolerance**2).nonzero()[0]) + 1)
    return best


@register_method
class Tucker2Handler(MethodHandler):
    """Tucker2 of each group's kernel over its two channel modes; the default for kxk
    convolutions. Its data-aware factors come from the input and output channel
    moments, the same for every variant."""

    name = "tucker2"
    layer_classes = (Tucker2Conv2d,)
    summary = "Tucker2: 1x1, small kxk, 1x1 convolutions (conv)"
    data_aware_variants = DATA_AWARE_VARIANTS

    def is_default_for(self, shape: LayerShape) -> bool:
        return not shape.is_pointwise

    def spectral_matrices(
        self, module: nn.Module, shape: LayerShape, options: DecomposeOptions, name: str | None
    ) -> list[list[torch.Tensor]]:
        with torch.no_grad():
            if isinstance(module, Tucker2Conv2d):
                return core_unfoldings(module)
            grouped = grouped_float64(module, shape, name)
            return [output_unfoldings(shape, grouped), input_unfoldings(shape, grouped)]

    def supports_data_aware(self, shape: LayerShape) -> bool:
        return shape.kind == "conv2d"

    def needs_outputs(self, shape: LayerShape) -> bool:
        # The output channel factor is fitted to the output covariance.
        return shape.kind == "conv2d"

    def data_aware_layer(
        self,
        module: nn.Module,
        shape: LayerShape,
        ranks: tuple[int, ...],
        statistics: LayerStatistics,
        variant: str,
        options: DecomposeOptions,
        name: str | None,
        damping: float,
        correction_damping: float,
    ) -> DecomposedLayer:
        w, b = finite_weights(module, shape, name)
        covariance = statistics.output_covariance()
        if covariance is None or statistics.output_mean is None:
            raise StagecompError(
                f"{describe(shape, name)}: data-aware Tucker2 needs output statistics; "
                "collect them with collect_statistics(..., outputs=True)"
            )
        grouped = shape.grouped_weight(w)
        ipg, opg = shape.in_per_group, shape.out_per_group
        shift = torch.zeros(shape.out_channels, dtype=torch.float64, device=w.device)
        out_mean = statistics.output_mean - (b if b is not None else 0.0)
        factors = []
        for g in range(shape.groups):
            inb, outb = slice(g * ipg, (g + 1) * ipg), slice(g * opg, (g + 1) * opg)
            core, u_out, u_in, mean_shift = data_aware_tucker2(
                grouped[g],
                (ranks[0], ranks[1]),
                statistics.input_moment[inb, inb],
                covariance[outb, outb],
                out_mean[outb] if b is not None else None,
            )
            if mean_shift is not None:
                shift[outb] = mean_shift
            factors.append((core, u_out, u_in))
        return Tucker2Conv2d.from_factors(shape, factors, None if b is None else b + shift, options)

    def data_aware_ranks(
        self,
        module: nn.Module,
        shape: LayerShape,
        statistics: LayerStatistics,
        tolerance: float,
        name: str | None,
    ) -> tuple[int, ...]:
        covariance = statistics.output_covariance()
        if covariance is None:
            raise StagecompError(f"layer {name!r}: DataAware Tucker2 ranks need output statistics")
        return (
            energy_rank(covariance, shape.groups, tolerance),
            energy_rank(statistics.input_moment, shape.groups, tolerance),
        )

    def fold_target(self, layer: nn.Module) -> nn.Conv2d | None:
        return layer.last if isinstance(layer, Tucker2Conv2d) else None
