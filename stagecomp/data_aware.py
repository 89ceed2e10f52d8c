"""Decompose one layer with factors chosen from calibration statistics.

The math lives in ``stagecomp.decompositions.data_aware`` and each method's handler
(``stagecomp.methods``) says whether it has such factors and fits them; this module
checks what the user asked and returns the handler's layer (an ordinary decomposed
layer, so save, load, recipes and later stages treat it like any other) on the
module's device and dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from stagecomp.calibration import LayerStatistics
from stagecomp.decompositions.data_aware import CORRECTION_DAMPING, DEFAULT_DAMPING
from stagecomp.errors import StagecompError, UnsupportedLayerError
from stagecomp.layer_shape import LayerShape
from stagecomp.layers.base import DecomposedLayer, Rank, describe, factorisation_failed
from stagecomp.methods import METHODS, get_method
from stagecomp.methods.svd_family import output_error_curve
from stagecomp.options import DecomposeOptions

VARIANTS: tuple[str, ...] = tuple(
    dict.fromkeys(v for method in METHODS for v in get_method(method).data_aware_variants)
)
"""Every data-aware variant some method has (see ``stagecomp.methods.DATA_AWARE_VARIANTS``):
``"whiten"``, ``"output"``, ``"gradient"``. Tucker2 uses the input and output channel
moments for all of them."""


def check_variant(variant: str, name: str | None = None) -> str:
    """Return ``variant`` if known, else raise naming the layer and the allowed values."""
    if variant not in VARIANTS:
        where = f"layer {name!r}: " if name else ""
        raise StagecompError(
            f"{where}data-aware variant {variant!r} is not allowed; expected one of {VARIANTS}"
        )
    return variant


SVD_METHODS: tuple[str, ...] = tuple(m for m in METHODS if get_method(m).truncated_svd)
"""Methods whose layers are a truncated SVD (stored as two factors, or in interpolative form)."""


def supports_data_aware(method: str, shape: LayerShape) -> bool:
    """True where ``method`` has data-aware factors for ``shape`` (its handler says)."""
    return get_method(method).supports_data_aware(shape)


def needs_outputs(method: str, shape: LayerShape) -> bool:
    """Whether the calibration pass must record this layer's outputs (its handler says)."""
    return get_method(method).needs_outputs(shape)


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
        method: A method whose handler has data-aware factors for this layer
            (``supports_data_aware``).
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
        A new layer of the method's usual class, on the module's device and dtype.
    """
    options = options or DecomposeOptions()
    check_variant(variant, name)
    shape = LayerShape.from_module(module, name)
    handler = get_method(method)
    cls = handler.layer_class(shape, name)
    if not handler.supports_data_aware(shape):
        here = [m for m in METHODS if get_method(m).supports_data_aware(shape)]
        raise UnsupportedLayerError(
            f"{describe(shape, name)}: method {method!r} has no data-aware factors for this "
            f"layer; methods that have: {', '.join(here) or 'none'}"
        )
    if variant not in handler.data_aware_variants:
        raise StagecompError(
            f"{describe(shape, name)}: method {method!r} has no data-aware variant "
            f"{variant!r}; expected one of {handler.data_aware_variants}"
        )
    ranks = cls.normalize_rank(shape, rank, options, name)
    reference = _reference(module)
    try:
        layer = handler.data_aware_layer(
            module, shape, ranks, statistics, variant, options, name, damping, correction_damping
        )
    except torch.linalg.LinAlgError as error:
        raise factorisation_failed(shape, name, reference, error) from None
    return layer.matched_to(module, name)


__all__ = [
    "SVD_METHODS",
    "VARIANTS",
    "check_variant",
    "decompose_data_aware",
    "needs_outputs",
    "output_error_curve",
    "supports_data_aware",
]
