"""A run's saved state as plain JSON: its configuration, plan, progress and history.

The Compressor writes and reads it (``state_dict``, ``from_state``, ``load_state_dict``);
the encoding of each value lives here so the state machine stays small.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from stagecomp.changes import LayerChange, StepResult
from stagecomp.config import Calibration, latency_from_dict
from stagecomp.errors import RecipeError, StagecompError
from stagecomp.latency_aware import LatencyAware
from stagecomp.options import DecomposeOptions
from stagecomp.plan import LayerRank
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
    return [int(v) for v in value]


def decode_rank(value: Any) -> LayerRank:
    """The ``ranks=`` value ``encode_rank`` wrote."""
    if isinstance(value, dict):
        return strategy_from_dict(value)
    if isinstance(value, list):
        return tuple(int(v) for v in value)
    return value


def compressor_arguments(
    config: Mapping[str, Any],
    *,
    example_input: Any,
    calibration: Calibration | Iterable[Any] | None,
    latency_aware: LatencyAware | None,
    strategy: RankStrategy | None = None,
) -> dict[str, Any]:
    """The Compressor's arguments (all but the model) from a saved configuration and the
    data given again; ``StagecompError`` names what the saved run used and is missing."""
    try:
        saved_calibration = config["calibration"]
        if saved_calibration is not None and calibration is None:
            raise StagecompError(
                "the saved run used calibration data; pass calibration=batches again"
            )
        if saved_calibration is not None and not isinstance(calibration, Calibration):
            calibration = Calibration.from_dict(saved_calibration, calibration)  # type: ignore[arg-type]
        if config["example_input"] and example_input is None:
            raise StagecompError(
                "the saved run counted MACs on an example input; pass example_input again"
            )
        if latency_aware is None and config["latency_aware"] is not None:
            latency_aware = latency_from_dict(config["latency_aware"])
        return {
            "strategy": strategy or strategy_from_dict(config["strategy"]),
            "example_input": example_input,
            "ranks": {str(k): decode_rank(v) for k, v in config["ranks"].items()},
            "exclude": [str(e) for e in config["exclude"]],
            "methods": {str(k): str(v) for k, v in config["methods"].items()},
            "layers_per_step": int(config["layers_per_step"]),
            "stages": int(config["stages"]),
            "order": str(config["order"]),
            "calibration": calibration,
            "latency_aware": latency_aware,
            "options": DecomposeOptions.from_dict(dict(config["options"])),
            "distributed": config["distributed"],
        }
    except StagecompError:
        raise
    except (KeyError, TypeError, AttributeError, ValueError) as error:
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
    """One step of the history, as ``step_to_dict`` wrote it."""
    return StepResult(
        step=int(data["step"]),
        changes=[LayerChange.from_dict(c) for c in data["changes"]],
        macs_before=data.get("macs_before"),
        macs_after=data.get("macs_after"),
        params_before=int(data.get("params_before", 0)),
        params_after=int(data.get("params_after", 0)),
    )


__all__ = [
    "STATE_FORMAT",
    "compressor_arguments",
    "decode_rank",
    "encode_rank",
    "saved_config",
    "step_from_dict",
    "step_to_dict",
]
