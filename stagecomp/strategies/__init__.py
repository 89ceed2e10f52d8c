"""Rank selection strategies: by name, as objects, and back from JSON.

A strategy says what it needs through attributes, so nothing above it tests its
type: ``needs_calibration`` (it reads ``RankRequest.statistics``), ``allows_growth``
(its ranks are taken as given even when the layer would grow) and
``unavailable_reason()`` (why it cannot size any layer, e.g. ``Manual()`` without a
rank) and ``needs_model`` (it sizes the layers together: ``prepare(ModelRequest)`` once
per stage, then ``pick_method(name, stage)`` for each layer's method). A strategy that
lacks one gets the default of the helper here that reads it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from stagecomp.errors import StagecompError
from stagecomp.strategies.base import MethodPick, ModelRequest, RankRequest, RankStrategy
from stagecomp.strategies.data_aware import DataAware
from stagecomp.strategies.manual import Manual
from stagecomp.strategies.reduction import Reduction
from stagecomp.strategies.speedup import Speedup
from stagecomp.strategies.vbmf import VBMF

StrategyLike = str | RankStrategy
"""A strategy name (``"vbmf"``, ``"reduction"``, ``"manual"``) or a strategy object."""

STRATEGIES: dict[str, Callable[..., RankStrategy]] = {
    "vbmf": VBMF,
    "reduction": Reduction,
    "manual": Manual,
    "data_aware": DataAware,
    "speedup": Speedup,
}
"""Strategy classes by the name their ``to_dict`` records."""

_BY_NAME = ("vbmf", "reduction", "manual")


def resolve_strategy(strategy: StrategyLike) -> RankStrategy:
    """A strategy object from a name ("vbmf", "reduction", "manual") or an object."""
    if isinstance(strategy, str):
        if strategy not in _BY_NAME:
            raise StagecompError(
                f"unknown strategy {strategy!r}; allowed: {', '.join(_BY_NAME)} "
                "(or an object such as stagecomp.VBMF(weakening=0.5))"
            )
        return STRATEGIES[strategy]()
    if isinstance(strategy, type) or not hasattr(strategy, "choose_ranks"):
        shown = strategy.__name__ + "()" if isinstance(strategy, type) else repr(strategy)
        hint = f" (a class; pass an instance such as {shown})" if isinstance(strategy, type) else ""
        raise StagecompError(
            f"strategy {strategy!r} is not a strategy{hint}; allowed: {', '.join(_BY_NAME)}, "
            "stagecomp.VBMF(...), stagecomp.Reduction(...), stagecomp.Manual(...), "
            "stagecomp.Speedup(...)"
        )
    return strategy


def needs_calibration(strategy: RankStrategy) -> bool:
    """Whether ``strategy`` reads calibration statistics."""
    return bool(getattr(strategy, "needs_calibration", False))


def allows_growth(strategy: RankStrategy) -> bool:
    """Whether ``strategy``'s ranks are kept even when the layer would get larger."""
    return bool(getattr(strategy, "allows_growth", False))


def needs_model(strategy: RankStrategy) -> bool:
    """Whether ``strategy`` sizes the layers together and must be prepared on the whole model."""
    return bool(getattr(strategy, "needs_model", False))


def method_pick(strategy: RankStrategy, name: str, stage: int) -> MethodPick | None:
    """The method ``strategy`` picks for layer ``name`` at ``stage`` (``None``: it picks none,
    the plan's method stands)."""
    pick = getattr(strategy, "pick_method", None)
    return pick(name, stage) if callable(pick) else None


def unavailable_reason(strategy: RankStrategy) -> str | None:
    """Why ``strategy`` cannot size any layer (``None`` when it can)."""
    reason = getattr(strategy, "unavailable_reason", None)
    return reason() if callable(reason) else None


def strategy_from_dict(data: Mapping[str, Any]) -> RankStrategy:
    """The strategy that wrote ``data`` with its ``to_dict``."""
    values = dict(data)
    name = values.pop("strategy", None)
    if name not in STRATEGIES:
        raise StagecompError(
            f"saved strategy {name!r} is not one stagecomp knows; allowed: "
            f"{', '.join(STRATEGIES)} (pass a custom strategy again: "
            "Compressor.from_state(..., strategy=MyStrategy(...)))"
        )
    for key, value in values.items():
        if isinstance(value, list):
            values[key] = tuple(value)
    return STRATEGIES[name](**values)


__all__ = [
    "STRATEGIES",
    "VBMF",
    "DataAware",
    "Manual",
    "MethodPick",
    "ModelRequest",
    "RankRequest",
    "RankStrategy",
    "Reduction",
    "Speedup",
    "StrategyLike",
    "allows_growth",
    "method_pick",
    "needs_calibration",
    "needs_model",
    "resolve_strategy",
    "strategy_from_dict",
    "unavailable_reason",
]
