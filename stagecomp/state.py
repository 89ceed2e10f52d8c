"""A run's saved state as plain JSON: its configuration, plan, progress and history.

The Compressor writes and reads it (``state_dict``, ``from_state``, ``load_state_dict``);
the encoding of each value lives here so the state machine stays small.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from stagecomp.changes import LayerChange, StepResult
from stagecomp.config import Calibration, latency_from_dict
from stagecomp.errors import RecipeError, StagecompError
from stagecomp.latency_aware import LatencyAware
from stagecomp.layers.base import DecomposedLayer
from stagecomp.options import DecomposeOptions
from stagecomp.plan import LayerRank
from stagecomp.recipe import get_submodule_or_none, same_entry
from stagecomp.strategies import RankStrategy, strategy_from_dict

STATE_FORMAT = 2
"""Format 2 holds the configuration with the plan; format 1 (progress only) still loads."""


def step_to_dict(result: StepResult) -> dict[str, Any]:
    """One step of the history (the new modules are in the recipe, not here)."""
    return {
        "step": result.step,
        "changes": [c.to_dict() for c in result.changes],
        "macs_before": result.macs_before,
        "macs_after": result.macs_after,
        "params_before": result.params_before,
        "params_after": result.params_after,
    }


def encode_rank(value: LayerRank) -> Any:
    """A ``ranks=`` value as JSON: ints, lists, a strategy's ``to_dict`` or null."""
    if value is None or isinstance(value, int):
        return value
    if hasattr(value, "to_dict"):
        return value.to_dict()
    if hasattr(value, "__index__"):  # a numpy or 0-d tensor integer
        return operator.index(value)
    return [operator.index(v) for v in value]


def decode_rank(value: Any) -> LayerRank:
    """The ``ranks=`` value ``encode_rank`` wrote."""
    if isinstance(value, dict):
        return strategy_from_dict(value)
    if isinstance(value, list):
        return tuple(_integer(v) for v in value)
    if value is None:
        return None
    return _integer(value)


def compressor_arguments(
    config: Mapping[str, Any],
    *,
    example_input: Any,
    calibration: Calibration | Iterable[Any] | None,
    latency_aware: LatencyAware | None,
    strategy: RankStrategy | None = None,
) -> dict[str, Any]:
    """The Compressor's arguments (all but the model) from a saved configuration and the
    data given again; ``StagecompError`` names what the saved run used and is missing,
    ``RecipeError`` any damaged value."""
    try:
        saved_calibration = config["calibration"]
        uses_example = config["example_input"]
        saved_latency = config["latency_aware"]
    except Exception as error:
        raise RecipeError(f"the saved compressor configuration is damaged: {error!r}") from None
    if saved_calibration is not None and calibration is None:
        raise StagecompError("the saved run used calibration data; pass calibration=batches again")
    if uses_example is True and example_input is None:
        raise StagecompError(
            "the saved run counted MACs on an example input; pass example_input again"
        )
    if saved_calibration is not None and not isinstance(calibration, Calibration):
        if not isinstance(saved_calibration, Mapping):
            raise RecipeError(f"the saved calibration settings {saved_calibration!r} are damaged")
        custom = [k for k in ("forward", "output") if saved_calibration.get(k) == "custom"]
        if custom:
            raise StagecompError(
                f"the saved calibration used custom {' and '.join(custom)}= code; pass "
                "calibration=stagecomp.Calibration(batches, ...) with it again (code is not saved)"
            )
    try:
        if saved_calibration is not None and not isinstance(calibration, Calibration):
            calibration = Calibration.from_dict(saved_calibration, calibration)  # type: ignore[arg-type]
        if latency_aware is None and saved_latency is not None:
            latency_aware = latency_from_dict(saved_latency)
        ranks, exclude, methods = config["ranks"], config["exclude"], config["methods"]
        if not isinstance(ranks, Mapping) or not isinstance(methods, Mapping):
            raise TypeError("ranks and methods are tables")
        if not isinstance(exclude, list) or not all(isinstance(e, str) for e in exclude):
            raise TypeError(f"exclude {exclude!r} is not a list of names")
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in methods.items()):
            raise TypeError(f"methods {methods!r} is not a table of method names")
        if config["distributed"] not in (None, True, False):
            raise TypeError(f"distributed {config['distributed']!r} is not true, false or null")
        if not isinstance(config["order"], str):
            raise TypeError(f"order {config['order']!r} is not a name")
        if not isinstance(config["options"], Mapping):
            raise TypeError(f"options {config['options']!r} is not a table")
        return {
            "strategy": strategy or strategy_from_dict(config["strategy"]),
            "example_input": example_input,
            "ranks": {str(k): decode_rank(v) for k, v in ranks.items()},
            "exclude": list(exclude),
            "methods": dict(methods),
            "layers_per_step": _integer(config["layers_per_step"]),
            "stages": _integer(config["stages"]),
            "order": config["order"],
            "calibration": calibration,
            "latency_aware": latency_aware,
            "options": DecomposeOptions.from_dict(dict(config["options"])),
            "distributed": config["distributed"],
        }
    except Exception as error:  # any damage: a wrong type, a missing key, a bad value
        raise RecipeError(f"the saved compressor configuration is damaged: {error!r}") from None


def saved_config(state: Mapping[str, Any]) -> Mapping[str, Any]:
    """The configuration of a format-2 state, or ``RecipeError``."""
    if not isinstance(state, Mapping) or state.get("format") != STATE_FORMAT:
        found = state.get("format") if isinstance(state, Mapping) else type(state).__name__
        raise RecipeError(
            f"Compressor.from_state needs a state of format {STATE_FORMAT} (it holds the "
            f"configuration); got format {found!r}: build the Compressor with the run's "
            "arguments and call load_state_dict instead"
        )
    config = state.get("config")
    if not isinstance(config, Mapping):
        raise RecipeError("the saved compressor state has no configuration")
    return config


def step_from_dict(data: Mapping[str, Any]) -> StepResult:
    """One step of the history, as ``step_to_dict`` wrote it; ``RecipeError`` when damaged."""
    try:
        if not isinstance(data, Mapping) or not isinstance(data.get("changes"), list):
            raise TypeError("a step is a table with a 'changes' list")
        result = StepResult(
            step=_integer(data["step"]),
            changes=[_change(c) for c in data["changes"]],
            macs_before=_optional(data.get("macs_before"), int),
            macs_after=_optional(data.get("macs_after"), int),
            params_before=_integer(data.get("params_before", 0)),
            params_after=_integer(data.get("params_after", 0)),
        )
    except RecipeError:
        raise
    except Exception as error:  # any damage: a wrong type, a missing key, a huge number
        raise RecipeError(f"a step of the saved history is damaged: {error!r}") from None
    return result


def _integer(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected an integer, got {value!r}")
    return value


def _optional(value: Any, kind: type) -> Any:
    if value is None:
        return None
    if kind is int:
        return _integer(value)
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is str and isinstance(value, str):
        return value
    raise TypeError(f"expected {kind.__name__} or null, got {value!r}")


def _change(data: Any) -> LayerChange:
    if not isinstance(data, Mapping):
        raise TypeError(f"a layer change is a table, got {data!r}")
    ranks = data.get("ranks")
    if ranks is not None:
        if not isinstance(ranks, list):
            raise TypeError(f"ranks {ranks!r} is not a list")
        ranks = [_integer(r) for r in ranks]
    change = LayerChange.from_dict({**data, "ranks": ranks})
    for label in ("name", "method"):
        if not isinstance(getattr(change, label), str):
            raise TypeError(f"{label} {getattr(change, label)!r} is not a string")
    for label in ("step", "stage", "params_before", "params_after"):
        _integer(getattr(change, label))
    for label in ("macs_before", "macs_after"):
        _optional(getattr(change, label), int)
    for label in ("weight_error", "latency_before", "latency_after"):
        _optional(getattr(change, label), float)
    for label in ("skipped", "factors"):
        _optional(getattr(change, label), str)
    return change


@dataclass(frozen=True)
class Progress:
    """The progress a saved state records, checked against the plan and against itself.

    Attributes:
        step_index: Steps finished.
        history: One record per finished step.
        recipe: The recipe entries of the layers the finished steps decomposed (what
            ``load_state_dict`` rebuilds), by name.
        untouched: Recipe entries of layers no finished step decomposed: layers the model
            held decomposed before the run, which the fresh model must hold as they are.
        params_before: Per decomposed layer, its parameters before the run's first change.
    """

    step_index: int
    history: list[StepResult]
    recipe: dict[str, dict[str, Any]]
    untouched: dict[str, Any]
    params_before: dict[str, int]


def read_progress(state: Mapping[str, Any], steps: Sequence[Sequence[tuple[int, str]]]) -> Progress:
    """The progress of ``state``, for a plan of ``steps`` (``(stage, name)`` per step).

    Raises:
        RecipeError: a value is damaged, or the step index, the history and the recipe
            contradict each other or the plan (a history step that is not the plan's,
            a layer the history decomposed that the recipe lacks or records otherwise,
            a recipe layer no finished step made).
    """
    step_index = state.get("step_index")
    if isinstance(step_index, bool) or not isinstance(step_index, int):
        raise RecipeError(f"saved step_index {step_index!r} is not an integer")
    if not 0 <= step_index <= len(steps):
        raise RecipeError(f"saved step_index {step_index} is outside 0..{len(steps)}")
    recipe = state.get("recipe")
    if not isinstance(recipe, Mapping) or not all(
        isinstance(k, str) and isinstance(v, Mapping) for k, v in recipe.items()
    ):
        raise RecipeError("the saved recipe is not a table of layer entries by name")
    records = state.get("history", [])
    if not isinstance(records, list):
        raise RecipeError(f"the saved history is a {type(records).__name__}, not a list")
    if len(records) != step_index:
        raise RecipeError(
            f"the saved state has {len(records)} steps of history for step_index "
            f"{step_index}; expected one per finished step"
        )
    history = [step_from_dict(r) for r in records]
    final: dict[str, tuple[str, tuple[int, ...]]] = {}
    params_before: dict[str, int] = {}
    for number, (result, planned) in enumerate(zip(history, steps, strict=False), start=1):
        done = [(c.stage, c.name) for c in result.changes]
        if result.step != number or done != [tuple(p) for p in planned]:
            raise RecipeError(
                f"step {number} of the saved history ({result.step}: {done}) is not the "
                f"plan's step {number} ({list(planned)})"
            )
        for change in result.changes:
            params_before.setdefault(change.name, change.params_before)
            if change.skipped is None and change.ranks is not None:
                final[change.name] = (change.method, tuple(change.ranks))
    for name, (method, ranks) in final.items():
        entry = recipe.get(name)
        found = None if entry is None else (entry.get("method"), entry.get("ranks"))
        if found is None or found[0] != method or found[1] != list(ranks):
            raise RecipeError(
                f"the saved history decomposed layer {name!r} with {method} at ranks "
                f"{list(ranks)}, but the recipe records "
                f"{'nothing' if found is None else f'{found[0]!r} at ranks {found[1]!r}'}"
            )
    return Progress(
        step_index,
        history,
        {name: dict(recipe[name]) for name in final},
        {name: entry for name, entry in recipe.items() if name not in final},
        {name: params_before[name] for name in final},
    )


def check_fresh(model: nn.Module, progress: Progress) -> None:
    """Refuse a model that is not the one the saved run started from.

    Each layer the run decomposed must hold the parameters it had before the run's
    first change (a model already compressed would be silently re-initialised); a recipe
    layer no finished step made must already be in the model as recorded.

    Raises:
        RecipeError: naming the layer.
    """
    for name, before in progress.params_before.items():
        module = get_submodule_or_none(model, name)
        count = None if module is None else sum(p.numel() for p in module.parameters())
        if count != before:
            raise RecipeError(
                f"layer {name!r} holds {count} parameters, but the saved run found "
                f"{before} there before compressing it: load_state_dict rebuilds the "
                "run's layers on a freshly built model, not on one already compressed"
            )
    for name, entry in progress.untouched.items():
        module = get_submodule_or_none(model, name)
        if not isinstance(module, DecomposedLayer) or not same_entry(module, entry):
            raise RecipeError(
                f"the saved recipe records layer {name!r} as {entry.get('method')!r} at "
                f"ranks {entry.get('ranks')!r}, but no finished step decomposed it and the "
                "model does not hold it so: the state is damaged or from another run"
            )


__all__ = [
    "STATE_FORMAT",
    "Progress",
    "check_fresh",
    "compressor_arguments",
    "decode_rank",
    "encode_rank",
    "read_progress",
    "saved_config",
    "step_from_dict",
    "step_to_dict",
]
