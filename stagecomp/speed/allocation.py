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

A second budget, on the summed MACs, adds a second multiplier: for each latency
multiplier a bisection finds the MAC multiplier (signed: it may reward MACs) whose
allocation has the most MACs within the budget, and an outer bisection finds the latency
multiplier. That is many more picks, so they are made on padded tensors, all layers at
once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

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


def total_macs(allocation: Mapping[str, LayerOption]) -> int:
    """Summed MACs of an allocation (0 unless the tables counted them)."""
    return sum(option.macs for option in allocation.values())


def total_error(allocation: Mapping[str, LayerOption]) -> float:
    """Summed predicted error of an allocation."""
    return sum(option.error for option in allocation.values())


def allocate(
    tables: Sequence[LayerTable], budget_s: float, budget_macs: float | None = None
) -> Allocation:
    """The least-error allocation (on the Lagrangian hull) whose summed latency meets
    ``budget_s``; every layer at its fastest when even that does not.

    With ``budget_macs`` the summed MACs must meet it too (see ``_allocate_both``).
    """
    if budget_macs is not None:
        return _allocate_both(tables, budget_s, budget_macs)
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


def _spend_slack(
    tables: Sequence[LayerTable],
    chosen: Allocation,
    budget_s: float,
    budget_macs: float = math.inf,
) -> Allocation:
    """Move layers to choices with less error while the totals stay within the budgets."""
    chosen = dict(chosen)
    while True:
        slack = budget_s - total_seconds(chosen)
        mac_slack = budget_macs - total_macs(chosen)
        best: tuple[float, str, LayerOption] | None = None
        for table in tables:
            now = chosen[table.name]
            for option in table.options:
                gain = now.error - option.error
                fits = option.seconds - now.seconds <= slack and option.macs - now.macs <= mac_slack
                if gain > 0 and fits and (best is None or gain > best[0]):
                    best = (gain, table.name, option)
        if best is None:
            return chosen
        chosen[best[1]] = best[2]


class _Padded:
    """Every table's error, seconds and MACs as ``[layers, most choices]`` tensors, scaled
    to 1 at their largest; ``valid`` marks the real choices among the padding."""

    def __init__(self, tables: Sequence[LayerTable]) -> None:
        self.tables = tables
        width = max(len(t.options) for t in tables)

        def grid(field: str) -> tuple[torch.Tensor, float]:
            rows = [[float(getattr(o, field)) for o in t.options] for t in tables]
            values = torch.full((len(tables), width), math.inf, dtype=torch.float64)
            for i, row in enumerate(rows):
                values[i, : len(row)] = torch.tensor(row, dtype=torch.float64)
            top = max((abs(v) for row in rows for v in row), default=0.0) or 1.0
            return values / top, top

        self.valid = torch.zeros((len(tables), width), dtype=torch.bool)
        for i, table in enumerate(tables):
            self.valid[i, : len(table.options)] = True
        self.error, _ = grid("error")
        self.seconds, self.s_unit = grid("seconds")
        self.macs, self.m_unit = grid("macs")

    def pick(self, lam: float, mu: float) -> torch.Tensor:
        """Each layer's choice index for the multipliers (ties: the earlier choice)."""
        cost = self.error + lam * self.seconds + mu * self.macs
        return cost.masked_fill(~self.valid, math.inf).argmin(dim=1)

    def totals(self, picks: torch.Tensor) -> tuple[float, float]:
        rows = torch.arange(len(self.tables))
        return float(self.seconds[rows, picks].sum()), float(self.macs[rows, picks].sum())

    def fill(self, under: torch.Tensor, over: torch.Tensor, budget: float) -> torch.Tensor:
        """``under`` with layers moved to their choice in ``over`` while the scaled MACs
        stay within ``budget``.

        Layers of one geometry have one table, so the multiplier moves them all at once
        and the summed MACs jump past the budget (four 3x3 convolutions of a ResNet stage:
        a third of the model's MACs); moving them one at a time fills the gap.
        """
        picks = under.clone()
        rows = torch.arange(len(self.tables))
        total = float(self.macs[rows, picks].sum())
        for i in (under != over).nonzero().flatten().tolist():
            step = float(self.macs[i, over[i]] - self.macs[i, under[i]])
            if total + step <= budget:
                picks[i], total = over[i], total + step
        return picks

    def allocation(self, picks: torch.Tensor) -> Allocation:
        return {t.name: t.options[int(k)] for t, k in zip(self.tables, picks, strict=True)}


def _signed(x: float) -> float:
    """A multiplier from ``-1e12`` to ``1e12`` (0 near ``x = 0``), monotone in ``x``."""
    return 0.0 if abs(x) < 1 else math.copysign(10.0 ** (abs(x) - 13), x)


def _allocate_both(tables: Sequence[LayerTable], budget_s: float, budget_macs: float) -> Allocation:
    """The least-error allocation meeting a latency budget with summed MACs as near the MAC
    budget as the hull allows, without exceeding it (Lagrangian in both).

    When no allocation meets both, the MAC budget wins: it is a promise about the model,
    the latency budget only a step of the closed loop.
    """
    start = as_it_is(tables)
    if total_seconds(start) <= budget_s and total_macs(start) <= budget_macs:
        return start
    padded = _Padded(tables)
    scaled_s, scaled_m = budget_s / padded.s_unit, budget_macs / padded.m_unit

    def meeting_macs(lam: float) -> torch.Tensor | None:
        """The picks for ``lam`` with the most MACs on the hull that meet the MAC budget:
        the MAC multiplier is signed, so a latency multiplier that would cut more MACs
        than asked is pulled back towards the budget (the MACs a layer keeps cost no
        accuracy, and often little time)."""
        lo, hi = -25.0, 25.0
        if padded.totals(padded.pick(lam, _signed(hi)))[1] > scaled_m:
            return None
        for _ in range(60):
            mid = (lo + hi) / 2
            if padded.totals(padded.pick(lam, _signed(mid)))[1] <= scaled_m:
                hi = mid
            else:
                lo = mid
        return padded.fill(padded.pick(lam, _signed(hi)), padded.pick(lam, _signed(lo)), scaled_m)

    quickest = meeting_macs(10.0**12)
    if quickest is None:  # the MAC budget is out of reach: the fewest MACs, fastest among them
        return {t.name: min(t.options, key=lambda o: (o.macs, o.seconds, o.error)) for t in tables}
    first = meeting_macs(0.0)
    if first is not None and padded.totals(first)[0] <= scaled_s:
        return _spend_slack(tables, padded.allocation(first), budget_s, budget_macs)
    if padded.totals(quickest)[0] > scaled_s:
        return padded.allocation(quickest)  # the quickest that meets the MAC budget
    lo, hi = -12.0, 12.0  # log10 of the latency multiplier
    best = quickest
    for _ in range(50):
        mid = (lo + hi) / 2
        picks = meeting_macs(10.0**mid)
        if picks is not None and padded.totals(picks)[0] <= scaled_s:
            hi, best = mid, picks
        else:
            lo = mid
    return _spend_slack(tables, padded.allocation(best), budget_s, budget_macs)


__all__ = [
    "Allocation",
    "allocate",
    "as_it_is",
    "fastest",
    "total_error",
    "total_macs",
    "total_seconds",
]
