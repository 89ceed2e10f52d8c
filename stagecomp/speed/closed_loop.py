"""Allocate, measure the whole model, adjust, until the measured speed-up is the target.

The per-layer table says how much layer time each allocation saves; the whole model
saves a different amount, and not in proportion (memory-bound glue keeps its cost, kernels
change when factors get thin, the first cuts fall on layers that save little). So the loop
treats the model's time as an unknown, monotone function of the allocation's summed layer
time, measures it, and finds where it crosses the goal by regula falsi: the first budget
assumes the whole model scales with its layers; later ones interpolate between the
nearest measurements on either side of the goal (extrapolate from the two nearest while
all are too slow), and bisect when that gives an allocation already measured. It stops
within ``tolerance`` of the goal, when no new allocation is left between the nearest
measurements on either side, when every layer at its fastest is still too slow, or after
``max_rounds`` measurements.

A goal out of reach is not answered with every layer at its fastest: that allocation cuts
each layer to its smallest rank for the last few percent of speed (measured on resnet18
at 3x: 20x fewer MACs, weight error 0.95, for 2.59x). The loop aims again, just under the
ceiling it measured, and keeps the least-error allocation within ``tolerance`` of it.

With a MAC budget as well (``Speedup(macs=...)``) every allocation sums to at most that
many MACs, and as near it as its latency budget allows (see ``allocation``), and the
speed-up asked becomes a floor: the loop first
measures the least-error allocation at the MAC budget alone, keeps it when it is fast
enough (faster is then no fault: the MAC cut is what was asked), and otherwise trades
error for speed at the same MAC cut as above; the ceiling is then the quickest
allocation at that cut.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from stagecomp.speed.allocation import (
    Allocation,
    allocate,
    as_it_is,
    fastest,
    total_error,
    total_macs,
    total_seconds,
)
from stagecomp.speed.layer_table import LayerOption, LayerTable

logger = logging.getLogger(__name__)

Measure = Callable[[Allocation], tuple[float, float]]
"""Seconds of the dense reference model and of the model with an allocation, timed together."""


@dataclass(frozen=True)
class Trial:
    """One measured allocation.

    Attributes:
        budget_s: The summed layer latency it was allocated for.
        layer_s: Its summed layer latency (from the table).
        error: Its summed predicted error.
        speedup: Measured: the dense reference's seconds over its seconds.
    """

    budget_s: float
    layer_s: float
    error: float
    speedup: float


@dataclass
class LoopResult:
    """What the loop settled on.

    Attributes:
        allocation: The chosen choice of every layer.
        goal: The speed-up aimed at.
        speedup: Its measured speed-up.
        reached: Whether that is within the tolerance of the goal.
        reason: Why not, when it is not.
        start_speedup: Measured speed-up of the model as it was (1 at the first stage).
        trials: Every measurement of an allocation, in order.
        measurements: Whole-model measurements in all (the trials, and each measurement
            of the model as it was).
    """

    allocation: Allocation
    goal: float
    speedup: float
    reached: bool
    reason: str | None
    start_speedup: float
    trials: list[Trial] = field(default_factory=list)
    measurements: int = 1


def search(
    tables: Sequence[LayerTable],
    measure: Measure,
    goal: float,
    tolerance: float = 0.05,
    max_rounds: int = 8,
    budget_macs: float | None = None,
) -> LoopResult:
    """The least-error allocation whose measured speed-up is within ``tolerance`` of ``goal``.

    Args:
        tables: Every target layer's choices.
        measure: Times the dense reference and an allocation (see ``Measure``).
        goal: Whole-model speed-up over the dense reference to reach (> 1).
        tolerance: Relative distance from ``goal`` that counts as reached.
        max_rounds: Most allocations measured.
        budget_macs: Most MACs the layers may sum to (the tables' ``macs``); the goal is
            then a floor (see the module's docstring).
    """
    start = as_it_is(tables)
    reference_s, start_s = measure(start)
    start_speedup = reference_s / start_s
    result = LoopResult(start, goal, start_speedup, False, None, start_speedup)
    best: tuple[Allocation, Trial] | None = None
    measured: list[tuple[Allocation, Trial]] = []
    first, first_speedup = start, start_speedup
    if budget_macs is not None and total_macs(start) > budget_macs:
        # The model as it is breaks the MAC budget: start from the least error that meets it.
        first = allocate(tables, math.inf, budget_macs)
        reference_s, seconds = measure(first)
        first_speedup = reference_s / seconds
        trial = Trial(math.inf, total_seconds(first), total_error(first), first_speedup)
        logger.info("goal %.3gx: the MAC budget alone measures %.3gx", goal, first_speedup)
        result.trials.append(trial)
        result.measurements += 1
        result.allocation, result.speedup = first, first_speedup
        best = (first, trial)
        measured.append(best)
        result.reached = _reaches(first_speedup, goal, tolerance, floor=True)
        if result.reached or max_rounds <= 1:
            if not result.reached:
                result.reason = f"the MAC budget alone measures {first_speedup:.3g}x"
            return result
    elif abs(start_speedup / goal - 1) <= tolerance:
        result.reached = True
        return result
    elif start_speedup > goal:
        result.reason = (
            f"the model as it is already measures {start_speedup:.3g}x, faster than asked; "
            "every choice left would only make it faster"
        )
        return result
    start_layer_s = total_seconds(first)
    quickest = fastest(tables) if budget_macs is None else allocate(tables, 0.0, budget_macs)
    floor_s = total_seconds(quickest)
    dense_layer_s = sum(t.reference_s for t in tables) or start_layer_s
    # (summed layer seconds, model seconds / reference seconds) of every measurement.
    points = [(start_layer_s, 1 / first_speedup)]
    tried = {_key(tables, first)}
    # First guess: the whole model's time scales with its layers' time.
    budget = start_layer_s - (1 / first_speedup - 1 / goal) * dense_layer_s
    at_floor = False
    for _ in range(max_rounds - len(measured)):  # the MAC-only trial counts as one
        slow = min((p for p in points if p[1] > 1 / goal), key=lambda p: p[0])
        fast = max((p for p in points if p[1] <= 1 / goal), key=lambda p: p[0], default=None)
        low = fast[0] if fast is not None else floor_s
        if budget < low and fast is None:
            budget = low  # every layer at its fastest: shows at once whether the goal is in reach
        elif not low <= budget < slow[0] or (fast is not None and budget == low):
            budget = (low + slow[0]) / 2
        allocation = allocate(tables, budget, budget_macs)
        key = _key(tables, allocation)
        if key in tried:
            budget = (low + slow[0]) / 2
            allocation = allocate(tables, budget, budget_macs)
            key = _key(tables, allocation)
            if key in tried:
                break  # no allocation left between the nearest measurements
        reference_s, seconds = measure(allocation)
        trial = Trial(
            budget, total_seconds(allocation), total_error(allocation), reference_s / seconds
        )
        tried.add(key)
        points.append((trial.layer_s, 1 / trial.speedup))
        result.trials.append(trial)
        result.measurements += 1
        measured.append((allocation, trial))
        logger.info(
            "goal %.3gx: layer budget %.4g s -> measured %.3gx (predicted error %.3g)",
            goal,
            budget,
            trial.speedup,
            trial.error,
        )
        if best is None or _closer(trial, best[1], goal, tolerance):
            best = (allocation, trial)
        if abs(trial.speedup / goal - 1) <= tolerance:
            break
        if trial.speedup < goal and trial.layer_s <= floor_s:
            at_floor = True
            break  # every layer at its fastest already
        budget = _next_budget(points, 1 / goal, floor_s)
    if best is None:
        result.reason = "no layer has a choice faster than it is now"
        return result
    allocation, trial = best
    result.allocation, result.speedup = allocation, trial.speedup
    result.reached = _reaches(trial.speedup, goal, tolerance, budget_macs is not None)
    if not result.reached:
        result.reason = _why_not(tables, result, reference_s, floor_s, budget_macs is not None)
        if at_floor and trial.speedup < goal:
            _under_the_ceiling(
                tables, measure, result, measured, tolerance, max_rounds, budget_macs
            )
    return result


def _reaches(speedup: float, goal: float, tolerance: float, floor: bool) -> bool:
    """Within ``tolerance`` of ``goal``; or, with a MAC budget (``floor``), at least that."""
    if floor:
        return speedup >= goal * (1 - tolerance)
    return abs(speedup / goal - 1) <= tolerance


def _under_the_ceiling(
    tables: Sequence[LayerTable],
    measure: Measure,
    result: LoopResult,
    measured: list[tuple[Allocation, Trial]],
    tolerance: float,
    max_rounds: int,
    budget_macs: float | None,
) -> None:
    """Replace the fastest allocation in ``result`` by the least-error one measured within
    ``tolerance`` of the ceiling (the fastest allocation's speed-up)."""
    ceiling = max(trial.speedup for _, trial in measured)
    rounds = max_rounds - len(measured) - 1  # the new search measures the start again
    if rounds > 0:
        again = search(
            tables, measure, ceiling * (1 - tolerance / 2), tolerance / 2, rounds, budget_macs
        )
        result.trials.extend(again.trials)
        result.measurements += again.measurements
        measured = [*measured, (again.allocation, _as_trial(again))]
    near = [(a, t) for a, t in measured if t.speedup >= ceiling * (1 - tolerance)]
    allocation, trial = min(near, key=lambda pair: pair[1].error)
    result.allocation, result.speedup = allocation, trial.speedup
    if _key(tables, allocation) == _key(tables, as_it_is(tables)):
        result.reason = (
            f"{result.reason}; that is within {tolerance:.0%} of the model as it is, so "
            "every layer is left as it is"
        )
        return
    result.reason = (
        f"{result.reason}; kept the allocation with the least error within "
        f"{tolerance:.0%} of that ceiling: {trial.speedup:.3g}x"
    )


def _as_trial(result: LoopResult) -> Trial:
    """The trial ``result`` settled on (its allocation's own numbers)."""
    return Trial(
        total_seconds(result.allocation),
        total_seconds(result.allocation),
        total_error(result.allocation),
        result.speedup,
    )


def _next_budget(points: list[tuple[float, float]], aim: float, floor_s: float) -> float:
    """Where the model's time fraction should cross ``aim``: interpolated between the
    nearest points on either side, or extrapolated from the two nearest slow ones."""
    slow = sorted((p for p in points if p[1] > aim), key=lambda p: p[0])
    fast = max((p for p in points if p[1] <= aim), key=lambda p: p[0], default=None)
    near = slow[0]
    other = fast if fast is not None else (slow[1] if len(slow) > 1 else None)
    if other is None or other[0] == near[0] or (other[1] - near[1]) * (other[0] - near[0]) <= 0:
        return floor_s if fast is None else (near[0] + fast[0]) / 2
    slope = (other[1] - near[1]) / (other[0] - near[0])
    return max(floor_s, near[0] + (aim - near[1]) / slope)


def _key(tables: Sequence[LayerTable], allocation: Mapping[str, LayerOption]) -> tuple[int, ...]:
    return tuple(t.options.index(allocation[t.name]) for t in tables)


def _closer(trial: Trial, other: Trial, goal: float, tolerance: float) -> bool:
    """Whether ``trial`` is the better answer: reaching the goal first, then nearer it."""
    reach, other_reach = (
        trial.speedup >= goal * (1 - tolerance),
        other.speedup >= goal * (1 - tolerance),
    )
    if reach != other_reach:
        return reach
    return abs(math.log(trial.speedup / goal)) < abs(math.log(other.speedup / goal))


def _why_not(
    tables: Sequence[LayerTable],
    result: LoopResult,
    reference_s: float,
    floor_s: float,
    macs: bool = False,
) -> str:
    share = sum(t.reference_s for t in tables) / reference_s if reference_s > 0 else 0.0
    if result.speedup < result.goal and result.trials and result.trials[-1].layer_s <= floor_s:
        quickest = (
            "the quickest allocation near the MAC budget"
            if macs
            else "every layer at its fastest choice"
        )
        return (
            f"{result.goal:.3g}x is out of reach: with {quickest} the "
            f"model measures {result.speedup:.3g}x; the layers that can be decomposed take "
            f"{share:.0%} of its time alone, the rest (activations, additions, pooling, layers "
            "left out) keeps its cost"
        )
    tried = ", ".join(f"{t.speedup:.3g}x" for t in result.trials)
    return (
        f"no allocation measured within the tolerance of {result.goal:.3g}x (tried {tried}); "
        f"the closest, {result.speedup:.3g}x, is kept"
    )


__all__ = ["LoopResult", "Measure", "Trial", "search"]
