"""One layer's choices: the layer as it is, and each method at each grid rank, with the
measured latency and the predicted error of each.

Latencies come from the latency-aware timer (``LatencyChooser.time``: timed at the input
shape, dtype, memory format and device the layer really sees, cached per geometry, so the
repeated blocks of a ResNet are timed once); errors from ``error_curves``. Choices that
are not faster than the layer as it is, or that would not shrink it, are dropped: no
latency budget is ever better spent on them (a MAC budget may be: with one, the slower
choices stay).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from torch import nn

from stagecomp.errors import UnsupportedLayerError
from stagecomp.latency_aware import CURRENT, Candidate, LatencyChooser, LayerInput
from stagecomp.layer_shape import LayerShape
from stagecomp.layers.base import DecomposedLayer
from stagecomp.methods import get_method
from stagecomp.options import DecomposeOptions
from stagecomp.speed.error_curves import error_curve
from stagecomp.speed.rank_grid import rank_grid

Structure = tuple[str, tuple[int, ...]]
"""A decomposed layer's structure: ``(method, ranks)``."""


@dataclass(frozen=True)
class LayerOption:
    """One choice for one layer.

    Attributes:
        method: The method, or ``None`` for the layer as it is.
        ranks: The ranks (``None`` with ``method``).
        params: Parameters of the layer with this choice.
        seconds: Measured (or injected) latency of the layer with this choice.
        error: Predicted squared error of this choice (0 for the layer as it is).
        macs: Multiply-accumulates of the layer with this choice on the example input
            (counted only when a MAC budget asks for them; 0 otherwise).
    """

    method: str | None
    ranks: tuple[int, ...] | None
    params: int
    seconds: float
    error: float
    macs: int = 0


@dataclass(frozen=True)
class LayerTable:
    """Every choice for one layer; ``options[0]`` is the layer as it is.

    Attributes:
        name: Qualified name of the layer.
        current: The structure of the layer as it is (``None``: dense).
        reference_s: Latency of the layer dense: what a speed-up is measured against.
        options: The choices, the layer as it is first.
        note: Why there is nothing but the layer as it is, when that is so.
    """

    name: str
    current: Structure | None
    reference_s: float
    options: tuple[LayerOption, ...]
    note: str | None = None

    def structure(self, option: LayerOption) -> Structure | None:
        """The structure the layer has with ``option`` (``None``: dense)."""
        if option.method is None or option.ranks is None:
            return self.current
        return (option.method, option.ranks)


def current_structure(module: nn.Module) -> Structure | None:
    """``(method, ranks)`` of a decomposed layer, ``None`` for a dense one."""
    return (module.method, module.ranks) if isinstance(module, DecomposedLayer) else None


def build_layer_table(
    name: str,
    module: nn.Module,
    timed: nn.Module,
    layer_input: LayerInput | None,
    chooser: LatencyChooser,
    methods: Sequence[str],
    options: DecomposeOptions,
    multiple: int,
    priced: nn.Module | None = None,
    relative: bool = True,
    count_macs: Callable[[Structure | None], int] | None = None,
) -> LayerTable:
    """The choices of one layer.

    Args:
        name: The layer's qualified name.
        module: The layer as it is in the user's model (its weights price the choices).
        timed: The same layer in the copy that is timed (BatchNorm folded, laid out and
            placed as it will run): it lends its geometry, device and dtype.
        layer_input: The input the layer receives there (``None``: the input never
            reaches it, so it stays as it is).
        chooser: The latency-aware timer (per-geometry cache, or an injected table).
        methods: Candidate methods (those that do not apply to the layer are passed over).
        options: Decomposition options.
        multiple: Ranks are timed at multiples of this (see ``rank_grid``).
        priced: The layer whose spectra price the choices (``weight_seen_by_data``);
            default ``module``.
        relative: Errors relative to the layer's energy (``False``: absolute).
        count_macs: MACs of the layer with a structure (``None``: dense), for a MAC
            budget; without it every choice records 0. With it, choices slower than the
            layer as it is are kept too: the MAC budget may need them.
    """
    shape = LayerShape.from_module(module, name)
    timed_shape = LayerShape.from_module(timed, name)
    current = current_structure(module)
    params = sum(p.numel() for p in module.parameters())

    def macs(structure: Structure | None) -> int:
        return count_macs(structure) if count_macs is not None else 0

    if layer_input is None:
        reason = "the example input never reaches this layer, so its latency cannot be measured"
        kept = LayerOption(None, None, params, 0.0, 0.0, macs(current))
        return LayerTable(name, current, 0.0, (kept,), reason)
    input_shape, channels_last = layer_input

    def candidate(structure: Structure | None, count: int) -> Candidate:
        method, ranks = structure if structure is not None else (CURRENT, None)
        return Candidate(name, method, ranks, timed_shape, input_shape, count, channels_last)

    if current is None:
        reference_s = current_s = chooser.time(candidate(None, params), timed, options)
    else:
        place = next(timed.parameters())
        dense = timed_shape.build_dense(device=place.device, dtype=place.dtype)
        reference_s = chooser.time(candidate(None, shape.dense_params), dense, options)
        current_s = chooser.time(candidate(current, params), timed, options)
    found = [LayerOption(None, None, params, current_s, 0.0, macs(current))]
    for method in methods:
        handler = get_method(method)
        if not handler.applies_to(shape, options):
            continue
        try:
            cls = handler.layer_class(shape, name)
            cls.check_supported(shape, options, name)
        except UnsupportedLayerError:
            continue
        grid = [
            ranks
            for ranks in rank_grid(cls.full_rank(shape, options), multiple)
            if cls.param_count(shape, ranks, options) < params and (method, ranks) != current
        ]
        if not grid:
            continue
        errors = error_curve(
            priced if priced is not None else module,
            shape,
            method,
            grid,
            options,
            relative=relative,
            name=name,
        )
        for ranks, error in zip(grid, errors, strict=True):
            count = cls.param_count(shape, ranks, options)
            seconds = chooser.time(candidate((method, ranks), count), timed, options)
            if seconds < current_s or count_macs is not None:
                found.append(
                    LayerOption(method, ranks, count, seconds, error, macs((method, ranks)))
                )
    note = None if len(found) > 1 else "no decomposition is faster than the layer as it is"
    return LayerTable(name, current, reference_s, tuple(found), note)


__all__ = [
    "LayerOption",
    "LayerTable",
    "Structure",
    "build_layer_table",
    "current_structure",
]
