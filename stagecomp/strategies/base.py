"""What a rank strategy is asked, and the protocol it answers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from torch import nn

from stagecomp.calibration import LayerStatistics
from stagecomp.layer_shape import LayerShape
from stagecomp.layers.base import DecomposedLayer
from stagecomp.options import DecomposeOptions


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
