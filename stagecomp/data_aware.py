"""Decompose one layer with factors chosen from calibration statistics.

The math lives in ``stagecomp.decompositions.data_aware``; this module reads a
layer's weights, picks the per-group blocks of the statistics, and builds the
ordinary decomposed layer classes (``SVDLinear``, ``SVDConv2d``,
``InterpolativeLayer``, ``Tucker2Conv2d``) from the factors, so save, load, recipes and later stages
treat the result like any other decomposed layer.
"""

from __future__ import annotations

import torch
from torch import nn

from stagecomp.calibration import LayerStatistics
from stagecomp.decompositions.data_aware import (
    CORRECTION_DAMPING,
    DEFAULT_DAMPING,
    data_aware_tucker2,
    drift_corrected,
    gradient_weighted_svd,
    output_covariance_svd,
    whitened_spectrum,
    whitened_svd,
)
from stagecomp.errors import NonFiniteWeightError, StagecompError, UnsupportedLayerError
from stagecomp.layer_shape import LayerShape
from stagecomp.layers.base import DecomposedLayer, Rank, describe
from stagecomp.layers.interpolative import InterpolativeLayer
from stagecomp.layers.svd_conv2d import SVDConv2d
from stagecomp.layers.svd_linear import SVDLinear
from stagecomp.layers.tucker2_conv2d import Tucker2Conv2d
from stagecomp.options import DecomposeOptions
from stagecomp.registry import layer_class

VARIANTS = ("whiten", "output", "gradient")
"""``"whiten"``: SVD-LLM's whitened SVD (input second moment); ``"output"``: falor's
centred output covariance with the mean moved into the bias; ``"gradient"``: the
whitened SVD also weighted on the output side by the moment of the final output's
gradients (needs ``LayerStatistics.gradient_moment``). Tucker2 uses the input and
output channel moments for all of them."""


def check_variant(variant: str, name: str | None = None) -> str:
    """Return ``variant`` if known, else raise naming the layer and the allowed values."""
    if variant not in VARIANTS:
        where = f"layer {name!r}: " if name else ""
        raise StagecompError(
            f"{where}data-aware variant {variant!r} is not allowed; expected one of {VARIANTS}"
        )
    return variant


SVD_METHODS = ("svd", "svd_id")
"""Methods whose layers are a truncated SVD (stored as two factors, or in interpolative form)."""


def supports_data_aware(method: str, shape: LayerShape) -> bool:
    """True where data-aware factors exist: SVD of Linear and 1x1 conv, Tucker2 of conv."""
    if method in SVD_METHODS:
        return shape.kind == "linear" or shape.is_pointwise
    return method == "tucker2" and shape.kind == "conv2d"


def needs_outputs(method: str, shape: LayerShape) -> bool:
    """Whether the calibration pass must record this layer's outputs (Tucker2 only)."""
    return method == "tucker2" and shape.kind == "conv2d"


def _weights(
    module: nn.Module, shape: LayerShape, name: str | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(module, DecomposedLayer):
        weight, bias = module.dense_weight(), module.dense_bias()
    else:
        weight, bias = module.weight, module.bias  # type: ignore[assignment]
    w = weight.detach().to(torch.float64)
    b = None if bias is None else bias.detach().to(torch.float64)
    if not torch.isfinite(w).all() or (b is not None and not torch.isfinite(b).all()):
        raise NonFiniteWeightError(
            f"{describe(shape, name)} has NaN or infinite weights; "
            "only finite weights can be decomposed"
        )
    return w, b


def _reference(module: nn.Module) -> torch.Tensor:
    for param in module.parameters():
        return param
    raise StagecompError("a layer without parameters cannot be decomposed")


@torch.no_grad()
def decompose_data_aware(
    module: nn.Module,
    method: str,
    rank: Rank,
    statistics: LayerStatistics,
    *,
    variant: str = "whiten",
    options: DecomposeOptions | None = None,
    name: str | None = None,
    damping: float = DEFAULT_DAMPING,
    correction_damping: float = CORRECTION_DAMPING,
) -> DecomposedLayer:
    """Like ``stagecomp.decompose``, with factors fitted to the layer's calibration data.

    Args:
        module: An nn.Linear, nn.Conv2d or already decomposed layer (left untouched).
        method: ``"svd"`` or ``"svd_id"`` (Linear or 1x1 conv), or ``"tucker2"`` (conv).
        rank: As for ``stagecomp.decompose``.
        statistics: This layer's ``LayerStatistics`` from ``collect_statistics``
            (with outputs for Tucker2).
        variant: One of ``VARIANTS``.
        options: Decomposition options (kept on the new layer).
        name: The layer's name, for messages.
        damping: Relative ridge on the input moment before its square root.
        correction_damping: Relative ridge of the drift correction (used when the
            statistics have a ``cross_moment``).

    Returns:
        A new ``SVDLinear`` / ``SVDConv2d`` / ``InterpolativeLayer`` / ``Tucker2Conv2d`` on
        the module's device and dtype.
    """
    options = options or DecomposeOptions()
    check_variant(variant, name)
    shape = LayerShape.from_module(module, name)
    cls = layer_class(method, shape, name)
    if not supports_data_aware(method, shape):
        raise UnsupportedLayerError(
            f"{describe(shape, name)}: data-aware factors exist for 'svd' and 'svd_id' on "
            f"Linear and 1x1 conv layers and 'tucker2' on conv layers, not {method!r} here"
        )
    ranks = cls.normalize_rank(shape, rank, options, name)
    w, b = _weights(module, shape, name)
    grouped = shape.grouped_weight(w)  # (groups, out/g, in/g, kh, kw)
    ipg, opg = shape.in_per_group, shape.out_per_group
    shift = torch.zeros(shape.out_channels, dtype=torch.float64, device=w.device)
    layer: DecomposedLayer
    if method in SVD_METHODS:
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
                    matrix, moment, mean, ranks[0], damping=damping
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
                    matrix,
                    moment,
                    statistics.gradient_moment[outb, outb],
                    ranks[0],
                    damping=damping,
                )
            else:
                u, s, vh = whitened_svd(matrix, moment, ranks[0], damping=damping)
            triplets.append((u, s, vh))
        bias = None if b is None else b + shift
        if method == "svd_id":
            layer = InterpolativeLayer.from_svd(shape, triplets, bias, options)
        elif shape.kind == "linear":
            layer = SVDLinear.from_svd(shape, *triplets[0], bias, options)
        else:
            layer = SVDConv2d.from_svd(shape, triplets, bias, options)
    else:
        covariance = statistics.output_covariance()
        if covariance is None or statistics.output_mean is None:
            raise StagecompError(
                f"{describe(shape, name)}: data-aware Tucker2 needs output statistics; "
                "collect them with collect_statistics(..., outputs=True)"
            )
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
        layer = Tucker2Conv2d.from_factors(
            shape, factors, None if b is None else b + shift, options
        )
    reference = _reference(module)
    return layer.matched_to(reference, module.training)


def output_error_curve(
    module: nn.Module, statistics: LayerStatistics, damping: float = DEFAULT_DAMPING
) -> torch.Tensor:
    """Relative output error of the whitened SVD at each rank, for Linear and 1x1 conv layers.

    Entry ``r`` (0 .. full) is ``sqrt(E||(W - W_r) x||^2 / E||W x||^2)``, the error
    the truncation to rank ``r`` makes on the calibration inputs (entry 0 is 1).
    """
    shape = LayerShape.from_module(module)
    w, _ = _weights(module, shape, None)
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


__all__ = [
    "SVD_METHODS",
    "VARIANTS",
    "check_variant",
    "decompose_data_aware",
    "needs_outputs",
    "output_error_curve",
    "supports_data_aware",
]
