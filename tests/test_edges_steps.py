"""Attacks on a compression step: any failure anywhere in it leaves the model as before.

A step is one unit: the statistics, every layer's job, every swap, the count afterwards
and the record. The generated cases inject a failure (of any exception type, Ctrl-C and
MemoryError included) at any of those points, in any step of runs whose steps hold a
layer twice, and check the model, its parameters, the history and the step index are
exactly as before; a retry then gives what an undisturbed run gives.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import stagecomp as sc
import stagecomp.compressor as compressor_module
from stagecomp.strategies.data_aware import allocate_ranks

X = torch.randn(3, 4, 6, 6)


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(4, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 1),
        nn.Flatten(),
        nn.Linear(8 * 36, 16),
        nn.ReLU(),
        nn.Linear(16, 6),
    ).eval()


def _snapshot(model: nn.Module) -> tuple[list[tuple[str, int]], dict[str, torch.Tensor]]:
    modules = [(name, id(module)) for name, module in model.named_modules()]
    return modules, {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(model: nn.Module, snapshot: tuple[list[tuple[str, int]], dict[str, Any]]) -> bool:
    modules, state = snapshot
    now = model.state_dict()
    return [(n, id(m)) for n, m in model.named_modules()] == modules and all(
        torch.equal(now[k], v) for k, v in state.items()
    )


class Injected(Exception):
    """The failure a test injects."""


FAILURES: dict[str, type[BaseException]] = {
    "error": Injected,
    "stagecomp": sc.StagecompError,
    "memory": MemoryError,
    "interrupt": KeyboardInterrupt,
}
POINTS = ("statistics", "job_before", "job_after", "swap", "count", "record")


def _inject(
    monkeypatch: pytest.MonkeyPatch, point: str, nth: int, failure: type[BaseException]
) -> None:
    """Make the ``nth`` call (0-based, capped at the last one) at ``point`` raise ``failure``."""
    calls = {"n": 0}

    def should_fail() -> bool:
        calls["n"] += 1
        return calls["n"] - 1 == nth

    if point == "statistics":
        real_statistics = compressor_module.step_statistics

        def statistics(*args: Any, **kwargs: Any) -> Any:
            raise failure("injected")

        del real_statistics
        monkeypatch.setattr(compressor_module, "step_statistics", statistics)
    elif point in ("job_before", "job_after"):
        real_job = compressor_module.run_layer_job

        def job(*args: Any, **kwargs: Any) -> Any:
            if point == "job_before" and should_fail():
                raise failure("injected")
            result = real_job(*args, **kwargs)
            if point == "job_after" and should_fail():
                raise failure("injected")
            return result

        monkeypatch.setattr(compressor_module, "run_layer_job", job)
    elif point == "swap":
        real_replace = compressor_module.replace_module

        def replace(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
            old = real_replace(model, name, new)
            if should_fail():  # the new module is already in: a failure half-way through
                raise failure("injected")
            return old

        monkeypatch.setattr(compressor_module, "replace_module", replace)
    elif point == "count":
        real_stats = compressor_module.model_stats

        def stats(*args: Any, **kwargs: Any) -> Any:
            raise failure("injected")

        del real_stats
        monkeypatch.setattr(compressor_module, "model_stats", stats)
    else:

        def record(*args: Any, **kwargs: Any) -> Any:
            raise failure("injected")

        monkeypatch.setattr(compressor_module, "StepResult", record)


def _failure_inside_a_step(
    stages: int, per_step: int, steps_before: int, point: str, nth: int, failure: str, method: str
) -> None:
    model = _net()
    counted = point == "count" or nth % 2 == 0  # MAC counting on in half of the runs
    kwargs: dict[str, Any] = {
        "stages": stages,
        "layers_per_step": per_step,
        "methods": {"0": method},
        "options": sc.DecomposeOptions(cp_max_iter=3),  # rollback is the point, not the fit
        "progress": False,
    }
    c = sc.Compressor(model, sc.Reduction(1.5), X if counted else None, **kwargs)
    twin_model = copy.deepcopy(model)
    twin = sc.Compressor(twin_model, sc.Reduction(1.5), X if counted else None, **kwargs)
    for _ in range(min(steps_before, c.total_steps - 1)):
        c.compression_step()
        twin.compression_step()
    snapshot = _snapshot(model)
    step_index, history, stats = c.step_index, list(c.history), c._stats
    chunk = c.plan.steps[c.step_index]
    swaps = sum(1 for _ in chunk)
    with pytest.MonkeyPatch.context() as patch:
        _inject(patch, point, min(nth, swaps - 1), FAILURES[failure])
        try:
            c.compression_step()
        except FAILURES[failure]:
            pass
        except sc.StagecompError as error:  # the count's failure, explained, with its cause
            assert point == "count" and isinstance(error.__cause__, FAILURES[failure])
        else:  # only a swap that never happens (every layer skipped) can miss
            assert point == "swap"
            return
    assert _same(model, snapshot)
    assert (c.step_index, c.history, c._stats) == (step_index, history, stats)
    retried = c.compression_step()  # nothing was half done: the retry is the step itself
    expected = twin.compression_step()
    assert [ch.to_dict() for ch in retried.changes] == [ch.to_dict() for ch in expected.changes]
    with torch.no_grad():
        assert torch.equal(model(X), twin_model(X))


@given(
    stages=st.integers(1, 3),
    per_step=st.integers(1, 9),
    steps_before=st.integers(0, 4),
    point=st.sampled_from(POINTS),
    nth=st.integers(0, 5),
    failure=st.sampled_from(sorted(FAILURES)),
    method=st.sampled_from(["tucker2", "svd_id", "tt"]),
)
@settings(max_examples=40)
def test_any_failure_inside_a_step_leaves_everything_as_before(
    stages: int, per_step: int, steps_before: int, point: str, nth: int, failure: str, method: str
) -> None:
    _failure_inside_a_step(
        stages=stages,
        per_step=per_step,
        steps_before=steps_before,
        point=point,
        nth=nth,
        failure=failure,
        method=method,
    )


@pytest.mark.slow
@given(
    stages=st.integers(1, 3),
    per_step=st.integers(1, 9),
    steps_before=st.integers(0, 4),
    point=st.sampled_from(POINTS),
    nth=st.integers(0, 5),
    failure=st.sampled_from(sorted(FAILURES)),
    method=st.sampled_from(["tucker2", "svd_id", "tt", "cp3", "cp4"]),  # CP: slow ALS
)
@settings(max_examples=300)
def test_any_failure_inside_a_step_leaves_everything_as_before_sweep(
    stages: int, per_step: int, steps_before: int, point: str, nth: int, failure: str, method: str
) -> None:
    _failure_inside_a_step(
        stages=stages,
        per_step=per_step,
        steps_before=steps_before,
        point=point,
        nth=nth,
        failure=failure,
        method=method,
    )


def test_a_step_whose_chunk_holds_a_layer_twice_rolls_back_to_the_original() -> None:
    model = _net()
    c = sc.Compressor(model, sc.Reduction(1.5), stages=2, layers_per_step=8, progress=False)
    assert [t.name for _, t in c.plan.steps[0]].count("0") == 2
    snapshot = _snapshot(model)
    with pytest.MonkeyPatch.context() as patch:
        _inject(patch, "job_before", 7, Injected)  # the last job, after both stages of "0"
        with pytest.raises(Injected):
            c.compression_step()
    assert _same(model, snapshot) and isinstance(model[0], nn.Conv2d)


def test_a_model_cast_between_steps_fails_clearly_and_is_rolled_back() -> None:
    model = _net()
    c = sc.Compressor(model, sc.Reduction(1.5), X, progress=False)
    c.compression_step()
    model.double()
    snapshot = _snapshot(model)
    with pytest.raises(sc.StagecompError, match=r"example_input.*put back"):
        c.compression_step()
    assert _same(model, snapshot) and c.step_index == 1 and len(c.history) == 1
    model.float()
    assert c.compression_step().changes[0].skipped is None  # not "already at ranks"


class _ReadsWeight(nn.Module):
    """A parent that uses its child's weight directly instead of calling it."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(16, 16)
        self.out = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = nn.functional.linear(x, self.inner.weight, self.inner.bias)
        return self.out(hidden.relu())


def test_a_parent_reading_a_layers_weight_is_found_before_any_step() -> None:
    torch.manual_seed(0)
    model = _ReadsWeight()
    x = torch.randn(2, 16)
    # With an example input, the plan watches weight reads: the layer read by its parent
    # is skipped with the reason, so no step can break the model.
    c = sc.Compressor(model, sc.Reduction(2.0), x, progress=False)
    assert "reads its weight directly" in c.plan.skipped["inner"]
    assert [t.name for t in c.plan.targets] == ["out"]


@pytest.mark.parametrize(
    "example",
    [
        torch.randn(2, 5),
        torch.randn(3, 4, 6, 6, dtype=torch.float64),
        torch.randn(3, 4, 6, 6, device="meta"),
        torch.zeros(3, 4, 6, 6, dtype=torch.long),
        "not a tensor",
    ],
    ids=["shape", "dtype", "meta", "integer", "string"],
)
def test_a_bad_example_input_is_named_at_construction(example: Any) -> None:
    model = _net()
    snapshot = _snapshot(model)
    with pytest.raises(sc.StagecompError, match="example_input"):
        sc.Compressor(model, "reduction", example, progress=False)
    assert _same(model, snapshot)


@given(
    batches=st.integers(1, 3),
    bad_batch=st.integers(0, 2),
    value=st.sampled_from([float("nan"), float("inf"), float("-inf")]),
    position=st.integers(0, 3 * 4 * 36 - 1),
)
@settings(max_examples=10)
def test_non_finite_calibration_data_is_named_and_leaves_the_model(
    batches: int, bad_batch: int, value: float, position: int
) -> None:
    data = [torch.randn(3, 4, 6, 6) for _ in range(batches)]
    data[min(bad_batch, batches - 1)].view(-1)[position] = value
    model = _net()
    snapshot = _snapshot(model)
    c = sc.Compressor(
        model, "reduction", calibration=sc.Calibration(data), layers_per_step=3, progress=False
    )
    with pytest.raises(sc.StagecompError, match=r"layer '\d'.*NaN or infinity"):
        c.compression_step()
    assert _same(model, snapshot) and c.step_index == 0


def test_allocate_ranks_with_no_names_names_the_argument() -> None:
    model = _net()
    with pytest.raises(sc.StagecompError, match="names"):
        allocate_ranks(model, [X], [], rate=2.0, progress=False)
