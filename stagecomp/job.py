"""One layer's job: ranks, then factors, then the new module.

The same function serves the Compressor's local loop, the distributed step (each rank
runs it for its share of a step's layers) and the latency-aware choice (it proposes each
candidate method's ranks, asked of the strategy once, and the chooser times them).
Nothing here touches the model: the caller swaps the returned module in.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from stagecomp.calibration import LayerStatistics
from stagecomp.changes import LayerChange
from stagecomp.data_aware import decompose_data_aware
from stagecomp.errors import UnsupportedLayerError
from stagecomp.latency_aware import LatencyChooser
from stagecomp.layer_kinds import plain_weight
from stagecomp.layer_shape import LayerShape
from stagecomp.layers.base import DecomposedLayer
from stagecomp.methods import get_method, layer_class
from stagecomp.options import DecomposeOptions
from stagecomp.plain_layers import fixed_code
from stagecomp.plan import WEIGHT, PlannedLayer
from stagecomp.strategies import RankRequest, allows_growth, method_pick

_ERROR_ROWS = 256


@dataclass(frozen=True)
class JobContext:
    """What every job of a run shares.

    Attributes:
        stages: Number of global passes planned.
        options: Decomposition options.
        latency: The latency chooser of a latency-aware run, else ``None``.
    """

    stages: int
    options: DecomposeOptions
    latency: LatencyChooser | None = None


def run_layer_job(
    module: nn.Module,
    target: PlannedLayer,
    step: int,
    stage: int,
    context: JobContext,
    statistics: LayerStatistics | None = None,
) -> tuple[LayerChange, DecomposedLayer | None]:
    """Compress ``module`` (the layer as it is now; left untouched) for one step.

    Returns:
        The record of what was done, and the new module (``None`` when the layer
        stays as it is: ``change.skipped`` says why).
    """
    name = target.name
    shape = LayerShape.from_module(module, name)
    params_before = sum(p.numel() for p in module.parameters())
    change = LayerChange(step, stage, name, target.method, None, params_before, params_before)
    obstacle = fixed_code(module)  # a parametrization or state-dict hook added since the plan
    if obstacle is not None:
        change.skipped = obstacle
        return change, None
    grow = allows_growth(target.strategy)
    picked = method_pick(target.strategy, name, stage)  # a whole-model strategy picks the method
    if picked is not None and picked.method is None:
        change.skipped = picked.reason
        return change, None
    if context.latency is None:
        method = picked.method if picked is not None and picked.method else target.method
        ranks = _ranks(module, shape, method, target, stage, context, statistics)
    else:
        proposals = []
        pinned = picked.method if picked is not None else target.method if target.pinned else None
        for candidate in context.latency.candidate_methods(shape, pinned):
            try:
                proposals.append(
                    (
                        candidate,
                        _ranks(module, shape, candidate, target, stage, context, statistics),
                    )
                )
            except (UnsupportedLayerError, ValueError) as error:
                change.skipped = str(error)  # kept only if no method can be proposed
        choice = context.latency.choose(name, module, proposals, context.options, grow)
        change.latency_before, change.latency_after = choice.current_s, choice.chosen_s
        if choice.method is None or choice.ranks is None:
            change.skipped = choice.reason
            return change, None
        change.skipped = None
        method, ranks = choice.method, choice.ranks
    change.method, change.ranks = method, ranks
    cls = layer_class(method, shape, name)
    if isinstance(module, cls) and module.ranks == ranks:
        change.skipped = f"already at ranks {ranks}"
        return change, None
    new_params = cls.param_count(shape, ranks, context.options)
    if new_params >= params_before and not grow:
        change.skipped = (
            f"ranks {ranks} would not reduce parameters ({new_params} >= {params_before})"
        )
        hint = getattr(target.strategy, "full_rank_hint", None)
        if hint and ranks == cls.full_rank(shape, context.options):
            change.skipped = hint
        return change, None
    new, change.factors = _build(module, shape, method, ranks, target, context, statistics)
    change.params_after = sum(p.numel() for p in new.parameters())
    change.weight_error = weight_error(module, new)
    return change, new


def _ranks(
    module: nn.Module,
    shape: LayerShape,
    method: str,
    target: PlannedLayer,
    stage: int,
    context: JobContext,
    statistics: LayerStatistics | None,
) -> tuple[int, ...]:
    cls = layer_class(method, shape, target.name)
    cls.check_supported(shape, context.options, target.name)
    request = RankRequest(
        target.name, cls, shape, module, stage, context.stages, context.options, statistics
    )
    return target.strategy.choose_ranks(request)


def _build(
    module: nn.Module,
    shape: LayerShape,
    method: str,
    ranks: tuple[int, ...],
    target: PlannedLayer,
    context: JobContext,
    statistics: LayerStatistics | None,
) -> tuple[DecomposedLayer, str]:
    """The new layer and how its factors were fitted."""
    variant = target.factors
    if (
        variant != WEIGHT
        and statistics is not None
        and get_method(method).supports_data_aware(shape)
    ):
        layer = decompose_data_aware(
            module,
            method,
            ranks,
            statistics,
            variant=variant,
            options=context.options,
            name=target.name,
        )
        return layer, variant
    cls = layer_class(method, shape, target.name)
    if isinstance(module, cls):
        return module.recompressed(ranks, name=target.name), WEIGHT
    return cls.from_module(module, ranks, context.options, target.name), WEIGHT


def weight_error(old: nn.Module, new: DecomposedLayer) -> float:
    """Relative Frobenius error of the new layer's weight against the old one's.

    Accumulated over row blocks in float64 so a 4096 x 25088 weight costs one
    dense copy of the approximation, not two double-precision copies.
    """
    with torch.no_grad():
        if not isinstance(old, DecomposedLayer) and not isinstance(old.weight, torch.Tensor):
            return float("nan")
        weight = old.dense_weight() if isinstance(old, DecomposedLayer) else plain_weight(old)
        reference = weight.detach().reshape(weight.shape[0], -1)
        approx = new.dense_weight().detach().reshape(reference.shape)
        error = norm = 0.0
        for start in range(0, reference.shape[0], _ERROR_ROWS):
            ref_block = reference[start : start + _ERROR_ROWS].double()
            diff = approx[start : start + _ERROR_ROWS].double() - ref_block
            error += float(diff.square().sum())
            norm += float(ref_block.square().sum())
        return (error / norm) ** 0.5 if norm > 0 else 0.0


__all__ = ["JobContext", "run_layer_job", "weight_error"]
