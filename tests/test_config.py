"""Settings objects, the plan, cross-option rules, resume from state, and the old signature."""

from __future__ import annotations

import inspect
import json

import pytest
import torch
from torch import nn

import stagecomp as sc
from stagecomp.plan import WEIGHT


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.point = nn.Conv2d(16, 16, 1)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.point(torch.relu(self.bn(self.conv(x))))
        return self.fc(self.pool(x).flatten(1))


def _net() -> Net:
    torch.manual_seed(0)
    return Net()


X = torch.randn(2, 3, 8, 8)
BATCHES = [torch.randn(4, 3, 8, 8) for _ in range(2)]


def test_constructor_has_at_most_14_parameters() -> None:
    parameters = inspect.signature(sc.Compressor).parameters
    assert len(parameters) <= 14
    assert "model" in parameters and "conv_method" not in parameters


def test_calibration_validates_itself() -> None:
    with pytest.raises(sc.StagecompError, match="variant 'pca'"):
        sc.Calibration(BATCHES, factors="pca")
    with pytest.raises(sc.StagecompError, match="one tensor"):
        sc.Calibration(torch.randn(4, 3))
    with pytest.raises(sc.StagecompError, match="correct_drift"):
        sc.Calibration(BATCHES, factors=None, correct_drift=True)
    with pytest.raises(sc.StagecompError, match="output="):
        sc.Calibration(BATCHES, factors="whiten", output=lambda out: out)
    with pytest.raises(sc.StagecompError, match="'nope'"):
        sc.Calibration(BATCHES, factors={"fc": "nope"})


@pytest.mark.parametrize(
    "settings",
    [
        sc.Calibration(BATCHES),
        sc.Calibration(BATCHES, factors={"fc": "gradient", "conv": None}, correct_drift=True),
        sc.Calibration(BATCHES, factors=None),
    ],
)
def test_calibration_round_trips_through_json(settings: sc.Calibration) -> None:
    data = json.loads(json.dumps(settings.to_dict()))
    assert sc.Calibration.from_dict(data, BATCHES) == settings


def test_custom_code_must_be_given_again() -> None:
    settings = sc.Calibration(BATCHES, forward=lambda m, b: m(b))
    data = json.loads(json.dumps(settings.to_dict()))
    with pytest.raises(sc.StagecompError, match="forward="):
        sc.Calibration.from_dict(data, BATCHES)


def test_strategy_that_needs_calibration_fails_at_construction() -> None:
    with pytest.raises(sc.StagecompError, match="calibration"):
        sc.Compressor(_net(), sc.DataAware(), progress=False)


def test_calibration_nothing_uses_is_refused() -> None:
    with pytest.raises(sc.StagecompError, match="no layer uses it"):
        sc.Compressor(_net(), "reduction", calibration=sc.Calibration(BATCHES, factors=None))
    with pytest.raises(sc.StagecompError, match="no layer uses it"):
        sc.Compressor(
            _net(),
            "reduction",
            methods={"conv": "cp3"},
            exclude=["point", "fc"],
            calibration=sc.Calibration(BATCHES),
        )


def test_plan_is_computed_once_and_printable_before_any_step() -> None:
    c = sc.Compressor(
        _net(),
        "reduction",
        methods={"*": "cp3"},
        calibration=sc.Calibration(BATCHES, factors="whiten"),
        layers_per_step=2,
        stages=2,
        progress=False,
    )
    by_name = {t.name: t for t in c.plan.targets}
    # A pattern gives cp3 to the convolutions it can decompose; the Linear layer keeps SVD.
    assert by_name["conv"].method == "cp3" and by_name["fc"].method == "svd"
    # cp3 has no data-aware factors: planned weight-only, and the plan says why.
    assert by_name["conv"].factors == WEIGHT and "no data-aware" in (by_name["conv"].note or "")
    assert by_name["fc"].factors == "whiten"
    assert len(c.plan.steps) == 3 == c.total_steps
    text = str(c.plan)
    assert "step 1" in text and "conv (cp3" in text and "no data-aware" in text


def test_layer_change_records_the_factors_really_used() -> None:
    c = sc.Compressor(
        _net(),
        sc.Manual(rank=2),
        ranks={"point": None},
        methods={"conv": "cp3"},
        calibration=sc.Calibration(BATCHES, factors="whiten"),
        layers_per_step=2,
        progress=False,
    )
    result = c.compression_step()
    assert {ch.name: ch.factors for ch in result.changes} == {"conv": "weight", "fc": "whiten"}


def test_statistics_are_collected_only_for_layers_that_use_them(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    import stagecomp.step_statistics as module

    seen: list[list[str]] = []
    real = module.collect_statistics

    def spy(model, batches, names, **kwargs):  # type: ignore[no-untyped-def]
        seen.append(list(names))
        return real(model, batches, names, **kwargs)

    monkeypatch.setattr(module, "collect_statistics", spy)
    c = sc.Compressor(
        _net(),
        sc.Manual(rank=2),
        ranks={"point": None},
        calibration=sc.Calibration(BATCHES, factors={"fc": "whiten"}),
        progress=False,
    )
    while not c.done:
        c.compression_step()
    assert seen == [["fc"]]


def test_state_holds_the_configuration_and_from_state_resumes_exactly() -> None:
    model = _net()
    c = sc.Compressor(
        model,
        sc.Reduction(2.0),
        X,
        ranks={"fc": (3,), "point": sc.Manual(rank=4)},
        exclude=["conv"],
        calibration=sc.Calibration(BATCHES, factors={"fc": "gradient"}),
        options=sc.DecomposeOptions(seed=3),
        progress=False,
    )
    c.compression_step()
    state = json.loads(json.dumps(c.state_dict()))
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    fresh = _net()
    resumed = sc.Compressor.from_state(fresh, state, example_input=X, calibration=BATCHES)
    fresh.load_state_dict(weights)
    assert resumed.step_index == 1 and resumed.plan.signature() == c.plan.signature()
    assert resumed.config() == c.config()
    c.compression_step()
    resumed.compression_step()
    with torch.no_grad():
        assert torch.equal(model(X), fresh(X))
    assert c.done and resumed.done


def test_from_state_asks_for_what_cannot_be_saved() -> None:
    c = sc.Compressor(_net(), "reduction", X, calibration=sc.Calibration(BATCHES), progress=False)
    state = c.state_dict()
    with pytest.raises(sc.StagecompError, match="calibration"):
        sc.Compressor.from_state(_net(), state, example_input=X)
    with pytest.raises(sc.StagecompError, match="example_input"):
        sc.Compressor.from_state(_net(), state, calibration=BATCHES)


def test_load_state_dict_refuses_a_compressor_that_has_run() -> None:
    c = sc.Compressor(_net(), "reduction", progress=False)
    c.compression_step()
    with pytest.raises(sc.RecipeError, match="has not run"):
        c.load_state_dict(c.state_dict())


def test_old_signature_still_works_with_a_deprecation_warning() -> None:
    new = _net()
    old = _net()
    with pytest.warns(DeprecationWarning, match="deprecated"):
        legacy = sc.Compressor(
            old,
            sc.Manual(rank=2),
            conv_method="cp3",
            calibration=BATCHES,
            data_aware="whiten",
            progress=False,
            layers_per_step=3,
        )
    current = sc.Compressor(
        new,
        sc.Manual(rank=2),
        methods={"conv": "cp3"},
        calibration=sc.Calibration(BATCHES, factors="whiten"),
        progress=False,
        layers_per_step=3,
    )
    assert legacy.plan.signature() == current.plan.signature()
    legacy.compression_step()
    current.compression_step()
    with torch.no_grad():
        assert torch.equal(old(X), new(X))
    # Old calibration settings without the batches they need are refused, as before.
    with (
        pytest.warns(DeprecationWarning, match="deprecated"),
        pytest.raises(sc.StagecompError, match="need calibration batches"),
    ):
        sc.Compressor(_net(), data_aware="whiten", progress=False)


@pytest.mark.parametrize(
    "value",
    [2.5, float("nan"), "64", sc.Reduction],
)
def test_bad_rank_values_fail_at_construction(value: object) -> None:
    with pytest.raises(sc.StagecompError, match="fc"):
        sc.Compressor(_net(), "reduction", ranks={"fc": value}, progress=False)  # type: ignore[dict-item]


def test_integer_like_ranks_are_accepted() -> None:
    import numpy as np

    c = sc.Compressor(
        _net(),
        "manual",
        ranks={"fc": np.int64(3), "point": torch.tensor(4)},
        progress=False,
        layers_per_step=2,
    )
    result = c.compression_step()
    assert {ch.name: ch.ranks for ch in result.changes} == {"point": (4,), "fc": (3,)}
