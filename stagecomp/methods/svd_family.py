"""What ``svd`` and ``svd_id`` share: both store one truncated SVD per group.

They differ only in how the factors are stored (two factors, or the interpolative
form), so they read the same VBMF matrix from a dense weight and fit the same
data-aware triplets to calibration statistics; each handler only turns the
triplets into its own layer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from stagecomp.decompositions.data_aware import (
    DEFAULT_DAMPING,
    drift_corrected,
    gradient_weighted_svd,
    output_covariance_svd,
    whitened_spectrum,
    whitened_svd,
)
from stagecomp.errors import StagecompError
from stagecomp.layer_shape import LayerShape
from stagecomp.layers.base import DecomposedLayer, describe
from stagecomp.methods.base import DATA_AWARE_VARIANTS, MethodHandler
from stagecomp.methods.unfoldings import finite_weights, grouped_float64, output_unfoldings
from stagecomp.options import DecomposeOptions

if TYPE_CHECKING:
    from stagecomp.calibration import LayerStatistics

Triplet = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def data_aware_triplets(
    module: nn.Module,
    shape: LayerShape,
    rank: int,
    statistics: LayerStatistics,
    variant: str,
    name: str | None,
    damping: float,
    correction_damping: float,
) -> tuple[list[Triplet], torch.Tensor | None]:
    """Per group, the ``(u, s, vh)`` of rank ``rank`` fitted to ``statistics``, and the
    new bias (the old one plus the mean the ``"output"`` variant moves into it)."""
    w, b = finite_weights(module, shape, name)
    grouped = shape.grouped_weight(w)
    ipg, opg = shape.in_per_group, shape.out_per_group
    shift = torch.zeros(shape.out_channels, dtype=torch.float64, device=w.device)
    triplets = []
    for g in range(shape.groups):
        block = slice(g * ipg, (g + 1) * ipg)
        moment = statistics.input_moment[block, block]
        matrix = grouped[g].reshape(opg, ipg)
        if statistics.cross_moment is not None:
            matrix = drift_corrected(
                matrix, moment, statistics.cross_moment[block, block], correction_damping
            )
        if variant == "output" and b is not None:
            mean = statistics.input_mean[block]
            u, s, vh, group_shift = output_covariance_svd(
                matrix, moment, mean, rank, damping=damping
            )
            shift[g * opg : (g + 1) * opg] = group_shift
        elif variant == "gradient":
            if statistics.gradient_moment is None:
                raise StagecompError(
                    f"{describe(shape, name)}: the 'gradient' variant needs "
                    "statistics.gradient_moment (collect_gradient_moments)"
                )
            outb = slice(g * opg, (g + 1) * opg)
            u, s, vh = gradient_weighted_svd(
                matrix, moment, statistics.gradient_moment[outb, outb], rank, damping=damping
            )
        else:
            u, s, vh = whitened_svd(matrix, moment, rank, damping=damping)
        triplets.append((u, s, vh))
    return triplets, None if b is None else b + shift


def output_error_curve(
    module: nn.Module, statistics: LayerStatistics, damping: float = DEFAULT_DAMPING
) -> torch.Tensor:
    """Relative output error of the whitened SVD at each rank, for Linear and 1x1 conv layers.

    Entry ``r`` (0 .. full) is ``sqrt(E||(W - W_r) x||^2 / E||W x||^2)``, the error
    the truncation to rank ``r`` makes on the calibration inputs (entry 0 is 1).
    """
    shape = LayerShape.from_module(module)
    w, _ = finite_weights(module, shape, None)
    grouped = shape.grouped_weight(w)
    ipg, opg = shape.in_per_group, shape.out_per_group
    energies = []
    for g in range(shape.groups):
        block = slice(g * ipg, (g + 1) * ipg)
        values = whitened_spectrum(
            grouped[g].reshape(opg, -1), statistics.input_moment[block, block], damping
        )
        energies.append(values.square())
    energy = torch.stack(energies).sum(dim=0)  # same rank in every group
    total = float(energy.sum())
    tail = torch.cat([energy.flip(0).cumsum(0).flip(0), energy.new_zeros(1)])
    return (tail / total).clamp_min(0).sqrt() if total > 0 else torch.zeros_like(tail)


class SVDFamilyHandler(MethodHandler):
    """Base of the handlers whose layers are one truncated SVD per group (not registered)."""

    data_aware_variants: ClassVar[tuple[str, ...]] = DATA_AWARE_VARIANTS
    truncated_svd: ClassVar[bool] = True

    def from_triplets(
        self,
        shape: LayerShape,
        triplets: list[Triplet],
        bias: torch.Tensor | None,
        options: DecomposeOptions,
    ) -> DecomposedLayer:
        """This method's layer holding one ``(u, s, vh)`` per group."""
        raise NotImplementedError

    def spectral_matrices(
        self, module: nn.Module, shape: LayerShape, options: DecomposeOptions, name: str | None
    ) -> list[list[torch.Tensor]]:
        with torch.no_grad():
            return [output_unfoldings(shape, grouped_float64(module, shape, name))]

    def supports_data_aware(self, shape: LayerShape) -> bool:
        # The statistics are input moments: they whiten a plain matrix, not a kxk kernel.
        return shape.kind == "linear" or shape.is_pointwise

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
        triplets, bias = data_aware_triplets(
            module, shape, ranks[0], statistics, variant, name, damping, correction_damping
        )
        return self.from_triplets(shape, triplets, bias, options)

    def data_aware_ranks(
        self,
        module: nn.Module,
        shape: LayerShape,
        statistics: LayerStatistics,
        tolerance: float,
        name: str | None,
    ) -> tuple[int, ...]:
        curve = output_error_curve(module, statistics)
        return (max(int((curve <= tolerance).nonzero()[0]), 1),)
