"""Spend a latency budget where it costs least accuracy: a Lagrangian over the layers.

Each layer has a few choices, each with a latency and an error. Minimising the total
error under a bound on the total latency is a multiple-choice knapsack; its Lagrangian
relaxation lets every layer choose alone, ``argmin error + lambda * seconds``, and a
bisection on ``lambda`` finds the least error whose total latency meets the budget (as
``allocate_ranks`` does for parameters). Its answers lie on the lower convex hull of
each layer's choices, which is where the efficient ones are, but with a few layers the
hull has wide gaps; so the slack it leaves under the budget is then spent greedily, each
time on the move that removes the most error and still fits. The closed loop corrects the
rest by measurement.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from stagecomp.speed.layer_table import LayerOption, LayerTable

Allocation = dict[str, LayerOption]
"""The choice of every layer, by name."""


def _pick(tables: Sequence[LayerTable], lam: float, err_scale: float, s_scale: float) -> Allocation:
    """Each layer's best choice for the multiplier ``lam`` (ties: the earlier choice)."""
    chosen: Allocation = {}
    for table in tables:
        best = table.options[0]
        best_cost = math.inf
        for option in table.options:
            cost = option.error / err_scale + lam * option.seconds / s_scale
            if cost < best_cost:
                best, best_cost = option, cost
        chosen[table.name] = best
    return chosen


def fastest(tables: Sequence[LayerTable]) -> Allocation:
    """Every layer at its fastest choice (on a tie, the one with the least error)."""
    return {t.name: min(t.options, key=lambda o: (o.seconds, o.error)) for t in tables}


def as_it_is(tables: Sequence[LayerTable]) -> Allocation:
    """Every layer as it is."""
    return {t.name: t.options[0] for t in tables}


def total_seconds(allocation: Mapping[str, LayerOption]) -> float:
    """Summed layer latency of an allocation."""
    return sum(option.seconds for option in allocation.values())


def total_error(allocation: Mapping[str, LayerOption]) -> float:
    """Summed predicted error of an allocation."""
    return sum(option.error for option in allocation.values())


def allocate(tables: Sequence[LayerTable], budget_s: float) -> Allocation:
    """The least-error allocation (on the Lagrangian hull) whose summed latency meets
    ``budget_s``; every layer at its fastest when even that does not."""
    if total_seconds(as_it_is(tables)) <= budget_s:
        return as_it_is(tables)
    quickest = fastest(tables)
    if total_seconds(quickest) >= budget_s:
        return quickest
    # Both sides scale-free, so one bracket of multipliers serves every model and unit.
    err_scale = max((o.error for t in tables for o in t.options), default=0.0) or 1.0
    s_scale = max((o.seconds for t in tables for o in t.options), default=0.0) or 1.0
    lo, hi = -12.0, 12.0  # log10 of the multiplier
    if total_seconds(_pick(tables, 10.0**hi, err_scale, s_scale)) > budget_s:
        return quickest
    for _ in range(80):
        mid = (lo + hi) / 2
        if total_seconds(_pick(tables, 10.0**mid, err_scale, s_scale)) <= budget_s:
            hi = mid
        else:
            lo = mid
    return _spend_slack(tables, _pick(tables, 10.0**hi, err_scale, s_scale), budget_s)


def _spend_slack(tables: Sequence[LayerTable], chosen: Allocation, budget_s: float) -> Allocation:
    """Move layers to choices with less error while the total stays within the budget."""
    chosen = dict(chosen)
    while True:
        slack = budget_s - total_seconds(chosen)
        best: tuple[float, str, LayerOption] | None = None
        for table in tables:
            now = chosen[table.name]
            for option in table.options:
                gain = now.error - option.error
                fits = option.seconds - now.seconds <= slack
                if gain > 0 and fits and (best is None or gain > best[0]):
                    best = (gain, table.name, option)
        if best is None:
            return chosen
        chosen[best[1]] = best[2]


__all__ = ["Allocation", "allocate", "as_it_is", "fastest", "total_error", "total_seconds"]
