"""Latency-aware choice: deterministic with an injected timing table, dense kept when faster."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import stagecomp as sc
from stagecomp.latency_aware import (
    CURRENT,
    Candidate,
    LatencyAware,
    LayerInput,
    layer_inputs,
    round_up_ranks,
)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1, stride=2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, 40)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.fc(self.pool(x).flatten(1))


def _table(candidate: Candidate) -> float:
    """A fixed cost model: dense conv1 is fastest; rounded ranks win elsewhere."""
    if candidate.method == CURRENT:
        return {"conv1": 1.0, "conv2": 10.0, "fc": 2.0}[candidate.name]
    if candidate.name == "conv1":
        return 1.5
    assert candidate.ranks is not None
    rounded = all(r % 8 == 0 for r in candidate.ranks)
    base = {"svd": 6.0, "svd_id": 6.5, "tucker2": 5.0, "cp3": 7.0, "cp4": 8.0, "tt": 9.0, "ht": 9.5}
    return base[candidate.method] - (1.0 if rounded else 0.0)


def _run(config: LatencyAware) -> sc.Compressor:
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(2, 3, 16, 16)
    compressor = sc.Compressor(
        model,
        sc.Reduction(3.0),
        x,
        layers_per_step=3,
        latency_aware=config,
        progress=False,
    )
    compressor.compression_step()
    return compressor


def test_choice_follows_the_injected_table_and_repeats() -> None:
    config = LatencyAware(methods=("svd", "tucker2"), timer=_table)
    first, second = _run(config), _run(config)
    changes = {c.name: c for c in first.history[0].changes}
    again = {c.name: c for c in second.history[0].changes}
    assert [(c.method, c.ranks, c.skipped) for c in changes.values()] == [
        (c.method, c.ranks, c.skipped) for c in again.values()
    ]
    # conv1: dense takes 1.0, every candidate 1.5 -> left dense, reason gives both times.
    assert changes["conv1"].skipped is not None
    assert "1e+03 ms" in changes["conv1"].skipped and "1.5e+03 ms" in changes["conv1"].skipped
    assert changes["conv1"].params_after == changes["conv1"].params_before
    assert isinstance(first.model.conv1, nn.Conv2d)
    # conv2: tucker2 at ranks rounded up to multiples of 8 costs 4.0 < 10.0.
    assert changes["conv2"].method == "tucker2"
    assert changes["conv2"].ranks is not None
    assert all(r % 8 == 0 for r in changes["conv2"].ranks)
    assert changes["conv2"].latency_before == 10.0 and changes["conv2"].latency_after == 4.0
    assert isinstance(first.model.conv2, sc.Tucker2Conv2d)
    assert first.model.conv2.ranks == changes["conv2"].ranks
    assert changes["conv2"].params_after < changes["conv2"].params_before
    # fc: only svd applies to Linear among the candidates; 5.0 < 2.0 is false -> dense.
    assert changes["fc"].skipped is not None
    assert isinstance(first.model.fc, nn.Linear)
    report = first.report()
    assert "latency 1e+04 -> 4e+03 ms" in report  # conv2, the table is in seconds
    assert "no candidate is faster than the layer as it is" in report


def test_min_speedup_margin_keeps_the_layer() -> None:
    config = LatencyAware(methods=("tucker2",), timer=_table, min_speedup=3.0)
    changes = {c.name: c for c in _run(config).history[0].changes}
    assert changes["conv2"].skipped is not None  # 10 / 4 = 2.5 < 3
    assert "no candidate is 3x faster" in changes["conv2"].skipped
    assert changes["conv2"].params_after == changes["conv2"].params_before


def test_without_rounding_the_strategy_ranks_are_used() -> None:
    config = LatencyAware(methods=("tucker2",), timer=_table, round_to=None)
    changes = {c.name: c for c in _run(config).history[0].changes}
    plain = _plain_ranks()
    assert changes["conv2"].ranks == plain["conv2"]
    assert changes["conv2"].latency_after == 5.0


def _plain_ranks() -> dict[str, tuple[int, ...] | None]:
    torch.manual_seed(0)
    model = Net().eval()
    compressor = sc.Compressor(
        model, sc.Reduction(3.0), torch.randn(2, 3, 16, 16), layers_per_step=3, progress=False
    )
    return {c.name: c.ranks for c in compressor.compression_step().changes}


def test_measured_choice_records_real_times() -> None:
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(2, 3, 16, 16)
    config = LatencyAware(methods=("svd", "tucker2"), repeats=2, warmup=1, min_speedup=1e-6)
    compressor = sc.Compressor(
        model, sc.Reduction(2.0), x, layers_per_step=3, latency_aware=config, progress=False
    )
    result = compressor.compression_step()
    for change in result.changes:
        assert change.latency_before is not None and change.latency_before > 0
        assert change.latency_after is not None and change.latency_after > 0
    # a tiny min_speedup takes the fastest candidate whatever the dense time.
    assert sum(c.skipped is None for c in result.changes) == 3


def test_input_shapes_and_layouts_are_recorded_per_layer() -> None:
    x = torch.randn(2, 3, 16, 16)
    inputs = layer_inputs(Net(), x, ["conv1", "conv2", "fc"])
    assert inputs == {
        "conv1": LayerInput((2, 3, 16, 16), False),
        "conv2": LayerInput((2, 32, 16, 16), False),
        "fc": LayerInput((2, 64), False),
    }
    model = sc.to_channels_last(Net())
    inputs = layer_inputs(model, x.to(memory_format=torch.channels_last), ["conv2"])
    assert inputs["conv2"] == LayerInput((2, 32, 16, 16), True)


def test_round_up_ranks() -> None:
    assert round_up_ranks((13, 30), (64, 27), 8) == (16, 27)
    assert round_up_ranks((16, 8), (64, 64), 8) is None


def test_settings_are_checked() -> None:
    with pytest.raises(sc.StagecompError, match="round_to=0"):
        LatencyAware(round_to=0)
    with pytest.raises(sc.UnknownMethodError, match="tuker2"):
        LatencyAware(methods=("tuker2",))
    with pytest.raises(sc.StagecompError, match="example_input"):
        sc.Compressor(Net(), "reduction", latency_aware=LatencyAware())
    assert LatencyAware(timer=_table).to_dict()["timer"] == "injected"


def test_layer_the_input_never_reaches_is_left_alone() -> None:
    class Unused(Net):
        def __init__(self) -> None:
            super().__init__()
            self.spare = nn.Conv2d(32, 32, 3)

    model = Unused().eval()
    compressor = sc.Compressor(
        model,
        "reduction",
        torch.randn(1, 3, 8, 8),
        layers_per_step=4,
        latency_aware=LatencyAware(timer=_table),
        progress=False,
    )
    changes = {c.name: c for c in compressor.compression_step().changes}
    assert changes["spare"].skipped is not None and "never reaches" in changes["spare"].skipped
    assert isinstance(model.spare, nn.Conv2d)
    assert changes["spare"].latency_before is None


def test_ranks_are_also_tried_rounded_to_twice_the_vector_width() -> None:
    tried: list[tuple[int, ...]] = []

    def table(candidate: Candidate) -> float:
        if candidate.method == CURRENT:
            return 10.0
        assert candidate.ranks is not None
        if candidate.name == "conv2":
            tried.append(candidate.ranks)
        return 1.0 if all(r % 16 == 0 for r in candidate.ranks) else 2.0

    compressor = sc.Compressor(
        Net().eval(),
        sc.Reduction(6.0),
        torch.randn(2, 3, 16, 16),
        layers_per_step=3,
        latency_aware=LatencyAware(methods=("tucker2",), timer=table),
        progress=False,
    )
    changes = {c.name: c for c in compressor.compression_step().changes}
    plain, eights, sixteens = tried
    assert all(r % 8 == 0 for r in eights) and eights != plain
    assert all(r % 16 == 0 for r in sixteens) and sixteens != eights
    assert changes["conv2"].ranks == sixteens
