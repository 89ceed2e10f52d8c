"""What a rank strategy is asked, and the protocol it answers.

Most strategies size one layer at a time from ``RankRequest``. A strategy that sizes
the layers together (``Speedup`` spends one latency budget over the whole model) says
so with ``needs_model = True``: the Compressor then calls its ``prepare(ModelRequest)``
once per stage, before that stage's first step, and asks ``pick_method(name, stage)``
which method each layer gets (or why it stays as it is) before asking its ranks.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from torch import nn

from stagecomp.calibration import LayerStatistics
from stagecomp.layer_shape import LayerShape
from stagecomp.layers.base import DecomposedLayer
from stagecomp.options import DecomposeOptions


def is_factor_above_one(value: object) -> bool:
    """Whether ``value`` is a finite number > 1 (a bool is not): a rate, a speed-up or a
    MAC cut, each of which must shrink or speed up the model to mean anything."""
    return (
        not isinstance(value, bool)
        and isinstance(value, (int, float))
        and math.isfinite(value)
        and value > 1
    )


@dataclass(frozen=True)
class RankRequest:
    """One layer at one stage, as a strategy sees it.

    Attributes:
        name: Qualified name of the layer in the model.
        cls: The layer class (method) the layer is decomposed with.
        shape: Geometry of the original layer.
        module: The layer as it is now: dense, or decomposed by an earlier stage.
        stage: 0-based index of the global pass.
        stages: Number of global passes planned.
        options: Decomposition options for this layer.
        statistics: The layer's calibration statistics, when the Compressor has
            calibration data (data-aware strategies need them).
    """

    name: str
    cls: type[DecomposedLayer]
    shape: LayerShape
    module: nn.Module
    stage: int
    stages: int
    options: DecomposeOptions
    statistics: LayerStatistics | None = None


class RankStrategy(Protocol):
    """Chooses the ranks of one layer for one stage."""

    def choose_ranks(self, request: RankRequest) -> tuple[int, ...]:
        """Valid ranks for ``request.cls`` on ``request.shape`` (already normalized)."""
        ...

    def to_dict(self) -> dict[str, object]:
        """JSON description, so a run's configuration can be recorded and compared."""
        ...


@dataclass(frozen=True)
class ModelRequest:
    """The whole model at the start of a stage, for a strategy that sizes layers together.

    Attributes:
        model: The model as it is now (dense, or decomposed by earlier stages); a
            strategy reads it and must leave it as it is.
        example_input: The Compressor's example input (the shape the model serves).
        names: The target layers this strategy sizes, in plan order.
        pinned: Methods named for a layer in ``methods=`` (only those may be used there).
        stage: 0-based index of the stage about to start.
        stages: Number of stages planned.
        options: Decomposition options.
        batches: The calibration batches, when the Compressor has calibration.
        forward: How a calibration batch is fed (``Calibration.forward``).
        output: Picks the tensor gradients are taken of (``Calibration.output``).
    """

    model: nn.Module
    example_input: Any
    names: tuple[str, ...]
    pinned: Mapping[str, str]
    stage: int
    stages: int
    options: DecomposeOptions
    batches: Iterable[Any] | None = field(default=None, repr=False)
    forward: Any = field(default=None, repr=False)
    output: Any = field(default=None, repr=False)


@dataclass(frozen=True)
class MethodPick:
    """A whole-model strategy's choice for one layer at one stage.

    Attributes:
        method: The method to decompose with, or ``None`` to leave the layer as it is.
        reason: Why the layer is left as it is (with ``method=None``).
    """

    method: str | None
    reason: str | None = None


class ModelStrategy(RankStrategy, Protocol):
    """A strategy that sizes the layers together (``needs_model = True``)."""

    def prepare(self, request: ModelRequest) -> None:
        """Decide every layer of ``request.names`` for ``request.stage`` (before its first step)."""
        ...

    def pick_method(self, name: str, stage: int) -> MethodPick:
        """The method of layer ``name`` at ``stage``, or why it stays as it is."""
        ...
