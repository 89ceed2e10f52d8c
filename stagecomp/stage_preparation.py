"""Preparing the strategies that size every layer together, once per stage.

A strategy such as ``Speedup`` cannot size one layer without the others: it spends one
whole-model budget. It says so with ``needs_model = True``; the Compressor then hands it
the whole model through ``prepare(ModelRequest)`` once per stage, before the first step
that compresses a layer of that stage, so it sees the model as the earlier stages left it.
"""

from __future__ import annotations

from collections.abc import MutableSet, Sequence
from typing import Any, cast

from torch import nn

from stagecomp.config import Calibration
from stagecomp.errors import StagecompError
from stagecomp.options import DecomposeOptions
from stagecomp.plan import Plan, PlannedLayer
from stagecomp.strategies import ModelRequest, needs_model
from stagecomp.strategies.base import ModelStrategy


def model_strategies(plan: Plan) -> list[tuple[ModelStrategy, list[PlannedLayer]]]:
    """Each strategy object that needs the whole model, with the targets it sizes."""
    found: dict[int, tuple[ModelStrategy, list[PlannedLayer]]] = {}
    for target in plan.targets:
        if needs_model(target.strategy):
            strategy = cast(ModelStrategy, target.strategy)
            found.setdefault(id(strategy), (strategy, []))[1].append(target)
    return list(found.values())


def check_model_strategies(plan: Plan, example_input: Any) -> None:
    """Refuse, before anything runs, a whole-model strategy without an example input."""
    for strategy, targets in model_strategies(plan):
        if example_input is None:
            names = ", ".join(repr(t.name) for t in targets[:3])
            more = f" and {len(targets) - 3} more" if len(targets) > 3 else ""
            raise StagecompError(
                f"the strategy {type(strategy).__name__} of {names}{more} sizes the layers "
                "from the whole model timed on its input, but no example_input was given; "
                "pass Compressor(model, strategy, example_input)"
            )


def prepare_stages(
    model: nn.Module,
    example_input: Any,
    plan: Plan,
    chunk: Sequence[tuple[int, PlannedLayer]],
    prepared: MutableSet[int],
    *,
    stages: int,
    options: DecomposeOptions,
    calibration: Calibration | None,
) -> None:
    """Prepare every whole-model strategy for the stages ``chunk`` starts (once each)."""
    strategies = model_strategies(plan)
    for stage in sorted({stage for stage, _ in chunk} - set(prepared)):
        for strategy, targets in strategies:
            request = ModelRequest(
                model=model,
                example_input=example_input,
                names=tuple(t.name for t in targets),
                pinned={t.name: t.method for t in targets if t.pinned},
                stage=stage,
                stages=stages,
                options=options,
                batches=calibration.batches if calibration is not None else None,
                forward=calibration.forward if calibration is not None else None,
                output=calibration.output if calibration is not None else None,
            )
            strategy.prepare(request)
        prepared.add(stage)


__all__ = ["check_model_strategies", "model_strategies", "prepare_stages"]
