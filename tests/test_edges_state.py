"""Attacks on a saved compressor state: every damage is a ``RecipeError``, the model untouched.

The generated cases take the state of a real run, change one value anywhere in it (or
remove it) and resume from it on a freshly built model. Either the damage is harmless
and the resumed Compressor agrees with its model, or the resume is refused with a
``RecipeError`` (a ``StagecompError`` when data the run used is missing) and the model
is exactly as it was built.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import stagecomp as sc
from stagecomp.layers.base import DecomposedLayer

X = torch.randn(2, 4, 5, 5)


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(4, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 1),
        nn.Flatten(),
        nn.Linear(200, 12),
        nn.ReLU(),
        nn.Linear(12, 5),
    )


def _state(steps: int, counted: bool) -> dict[str, Any]:
    model = _net()
    c = sc.Compressor(
        model,
        sc.Reduction(1.5),
        X if counted else None,
        stages=2,
        layers_per_step=3,
        methods={"0": "tt"},
        progress=False,
    )
    for _ in range(steps):
        c.compression_step()
    return json.loads(json.dumps(c.state_dict()))


STATES = {(steps, counted): _state(steps, counted) for steps in (0, 1, 3) for counted in (0, 1)}

HOSTILE: list[Any] = [
    None,
    -1,
    0,
    1,
    10**30,
    1e308,
    float("nan"),
    2.5,
    True,
    "x",
    "",
    [],
    {},
    [1, 2],
    [[[[[]]]]],
    {"strategy": "manual", "rank": 10**9},
    {"a": 1},
    ["svd"],
]


def _paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, item in value.items():
            found += _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += _paths(item, (*prefix, index))
    return found


def _damaged(state: dict[str, Any], path: tuple[Any, ...], value: Any, remove: bool) -> Any:
    damaged = copy.deepcopy(state)
    parent = damaged
    for key in path[:-1]:
        parent = parent[key]
    if remove and isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent[path[-1]] = copy.deepcopy(value)
    return damaged


def _snapshot(model: nn.Module) -> tuple[list[tuple[str, int]], dict[str, torch.Tensor]]:
    return (
        [(name, id(module)) for name, module in model.named_modules()],
        {k: v.detach().clone() for k, v in model.state_dict().items()},
    )


def _unchanged(model: nn.Module, snapshot: Any) -> bool:
    modules, values = snapshot
    now = model.state_dict()
    return [(n, id(m)) for n, m in model.named_modules()] == modules and all(
        torch.equal(now[k], v) for k, v in values.items()
    )


def _damaged_state(steps: int, counted: int, where: int, value: Any, remove: bool) -> None:
    state = STATES[(steps, counted)]
    paths = _paths(state)
    damaged = _damaged(state, paths[where % len(paths)], value, remove)
    fresh = _net()
    snapshot = _snapshot(fresh)
    try:
        c = sc.Compressor.from_state(
            fresh, damaged, example_input=X if counted else None, progress=False
        )
    except sc.StagecompError as error:
        assert isinstance(error, sc.RecipeError) or "again" in str(error)  # data to give again
        assert _unchanged(fresh, snapshot)
        return
    # Accepted: the damage was harmless, and the Compressor agrees with its model.
    assert c.step_index == len(c.history)
    for result in c.history:
        for change in result.changes:
            if change.skipped is None and change.ranks is not None:
                layer = fresh.get_submodule(change.name)
                assert isinstance(layer, DecomposedLayer)


@given(
    steps=st.sampled_from([0, 1, 3]),
    counted=st.integers(0, 1),
    where=st.integers(0, 10**6),
    value=st.sampled_from(HOSTILE),
    remove=st.booleans(),
)
@settings(max_examples=100)
def test_any_damaged_state_is_refused_with_the_model_untouched(
    steps: int, counted: int, where: int, value: Any, remove: bool
) -> None:
    _damaged_state(steps=steps, counted=counted, where=where, value=value, remove=remove)


@pytest.mark.slow
@given(
    steps=st.sampled_from([0, 1, 3]),
    counted=st.integers(0, 1),
    where=st.integers(0, 10**6),
    value=st.sampled_from(HOSTILE),
    remove=st.booleans(),
)
@settings(max_examples=1000)
def test_any_damaged_state_is_refused_with_the_model_untouched_sweep(
    steps: int, counted: int, where: int, value: Any, remove: bool
) -> None:
    _damaged_state(steps=steps, counted=counted, where=where, value=value, remove=remove)


@pytest.mark.parametrize("steps", [1, 3])
def test_a_step_index_that_contradicts_the_recipe_is_refused(steps: int) -> None:
    state = STATES[(steps, 0)]
    for bad in (
        {**state, "step_index": steps - 1},  # history has one step too many
        {**state, "step_index": steps - 1, "history": state["history"][:-1]},  # recipe too
        {**state, "recipe": {}},  # the history decomposed layers the recipe lacks
    ):
        fresh = _net()
        snapshot = _snapshot(fresh)
        with pytest.raises(sc.RecipeError):
            sc.Compressor.from_state(fresh, bad, progress=False)
        assert _unchanged(fresh, snapshot)


def test_load_state_dict_refuses_a_model_that_is_not_fresh() -> None:
    model = _net()
    c = sc.Compressor(model, sc.Reduction(1.5), stages=2, layers_per_step=3, progress=False)
    c.compression_step()
    state = json.loads(json.dumps(c.state_dict()))
    trained = _snapshot(model)
    # A Compressor built on the compressed model itself plans the same steps; loading the
    # state into it would re-initialise the trained layers.
    again = sc.Compressor(model, sc.Reduction(1.5), stages=2, layers_per_step=3, progress=False)
    with pytest.raises(sc.RecipeError, match="freshly built"):
        again.load_state_dict(state)
    assert _unchanged(model, trained)
    # Called twice on a fresh model: the second call is refused.
    fresh = _net()
    resumed = sc.Compressor.from_state(fresh, state, progress=False)
    loaded = _snapshot(fresh)
    with pytest.raises(sc.RecipeError, match="has not run"):
        resumed.load_state_dict(state)
    assert _unchanged(fresh, loaded)


def test_settings_that_cannot_be_built_are_a_recipe_error() -> None:
    state = STATES[(1, 0)]
    for key, value in [
        ("layers_per_step", -1),
        ("stages", 10**30),  # the plan would list 10**30 stages
        ("methods", {"0": "bogus"}),
        ("strategy", {"strategy": "nope"}),
        ("options", {"tt_cores": "x"}),
        ("options", {"seed": [1]}),
        ("ranks", {"0": 3.5}),
    ]:
        bad = copy.deepcopy(state)
        bad["config"][key] = value
        fresh = _net()
        snapshot = _snapshot(fresh)
        with pytest.raises(sc.RecipeError):
            sc.Compressor.from_state(fresh, bad, progress=False)
        assert _unchanged(fresh, snapshot)
