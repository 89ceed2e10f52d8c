"""The calibration a step needs, and nothing more.

Only the layers that use statistics are measured: those with data-aware factors and
those whose strategy reads them. Output moments are recorded only where a method's
data-aware factors or ranks need them, and gradient moments only for layers fitted
with ``"gradient"``. With ``Calibration(blocks=...)`` the statistics come block by block
from cached block inputs (``stagecomp.sequential``), in bounded memory: the same input
and output moments; gradient moments exact for the first block and the last two, and
from output gradients kept since the first step for the blocks in between.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from stagecomp.calibration import LayerStatistics, collect_gradient_moments, collect_statistics
from stagecomp.config import Calibration
from stagecomp.layer_shape import LayerShape
from stagecomp.methods import get_method
from stagecomp.plan import WEIGHT, PlannedLayer
from stagecomp.sequential import SequentialStatistics
from stagecomp.strategies import needs_calibration
from stagecomp.surgery import get_module


def uses_statistics(target: PlannedLayer) -> bool:
    """Whether a layer's factors or ranks read calibration statistics."""
    return target.factors != WEIGHT or needs_calibration(target.strategy)


def step_statistics(
    model: nn.Module,
    calibration: Calibration | None,
    targets: Sequence[PlannedLayer],
    *,
    reference: nn.Module | None = None,
    progress: bool = True,
    sequential: SequentialStatistics | None = None,
) -> dict[str, LayerStatistics]:
    """Statistics of the step's layers that use them, on the model as it is now.

    A layer fitted with ``"gradient"`` that no gradient of the output reaches gets no
    ``gradient_moment`` (its job then skips it with ``NO_GRADIENT``).
    """
    if calibration is None:
        return {}
    users = list({t.name: t for t in targets if uses_statistics(t)}.values())
    if not users:
        return {}
    names = [t.name for t in users]
    outputs = [
        t.name
        for t in users
        if get_method(t.method).needs_outputs(
            LayerShape.from_module(get_module(model, t.name), t.name)
        )
    ]
    weighted = [t.name for t in users if t.factors == "gradient"]
    if sequential is not None:
        return sequential.collect(names, outputs, weighted, progress=progress)
    statistics = collect_statistics(
        model,
        calibration.batches,
        names,
        outputs=outputs,
        forward=calibration.forward,
        progress=progress,
        reference=reference,
        mask=calibration.mask,
    )
    if weighted:
        gradients = collect_gradient_moments(
            model,
            calibration.batches,
            weighted,
            forward=calibration.forward,
            output=calibration.output,
            progress=progress,
            mask=calibration.mask,
        )
        for name, moment in gradients.items():
            statistics[name].gradient_moment = moment
    return statistics


__all__ = ["step_statistics", "uses_statistics"]
