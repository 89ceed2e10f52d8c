"""Speedup: a whole-model latency budget, allocated by a Lagrangian and checked by a loop.

Every test here injects its timings (a table per layer structure, and a synthetic whole
model), so the choices are reproducible and nothing asserts on a real time.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import stagecomp as sc
from stagecomp.latency_aware import CURRENT, Candidate
from stagecomp.speed.allocation import allocate, fastest, total_macs, total_seconds
from stagecomp.speed.closed_loop import search
from stagecomp.speed.layer_table import LayerOption, LayerTable, Structure
from stagecomp.speed.rank_grid import rank_grid
from stagecomp.strategies import strategy_from_dict


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 64, 3, padding=1)
        self.conv4 = nn.Conv2d(64, 96, 3, padding=1, stride=2)
        self.conv5 = nn.Conv2d(96, 96, 3, padding=1)
        self.fc = nn.Linear(96, 40)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4, self.conv5):
            x = torch.relu(conv(x))
        return self.fc(x.mean((2, 3)))


def _layer_ms(candidate: Candidate) -> float:
    """A cost model: 1 ms per thousand weights, plus 0.5 ms per factor of a decomposed layer."""
    shape = candidate.shape
    if candidate.method == CURRENT:
        return 1e-3 * shape.weight_numel / 1000
    layer = sc.empty_layer(shape, candidate.method, candidate.ranks or ())
    weights = sum(p.numel() for p in layer.parameters())
    return 1e-3 * (weights / 1000 + 0.5 * len(list(layer.children())))


def _structure_ms(name: str, structure: Structure | None, model: nn.Module) -> float:
    shape = sc.LayerShape.from_module(getattr(model, name), name)
    if structure is None:
        return 1e-3 * shape.weight_numel / 1000
    method, ranks = structure
    return _layer_ms(Candidate(name, method, ranks, shape, (1,), 0))


def _synthetic_model_timer(model: nn.Module) -> sc.strategies.speedup.ModelTimer:
    """Whole-model seconds that differ from the layer table: 2 ms of glue, and every
    decomposed layer costs 40% more in the model than alone (extra memory passes)."""

    def timer(layout: dict[str, Structure | None]) -> float:
        total = 2e-3
        for name, structure in layout.items():
            seconds = _structure_ms(name, structure, model)
            total += seconds * (1.4 if structure is not None else 1.0)
        return total

    return timer


def _compress(strategy: sc.Speedup, stages: int = 1, **kwargs: object) -> sc.Compressor:
    torch.manual_seed(0)
    model = Net().eval()
    compressor = sc.Compressor(
        model,
        strategy,
        torch.randn(2, 3, 16, 16),
        layers_per_step=6,
        stages=stages,
        progress=False,
        **kwargs,  # type: ignore[arg-type]
    )
    while not compressor.done:
        compressor.compression_step()
    return compressor


def test_allocation_spends_the_budget_where_the_error_is_cheapest() -> None:
    def table(name: str, options: list[tuple[float, float]]) -> LayerTable:
        found = [LayerOption(None, None, 100, 10.0, 0.0)]
        found += [LayerOption("svd", (r,), 50, s, e) for r, (s, e) in enumerate(options, 1)]
        return LayerTable(name, None, 10.0, tuple(found))

    # a: saves 6 s for an error of 0.1; b: saves 6 s for 0.5 or 3 s for 0.09.
    tables = [table("a", [(4.0, 0.1)]), table("b", [(4.0, 0.5), (7.0, 0.09)])]
    picks = allocate(tables, budget_s=14.0)  # 6 s to save: a alone is the cheapest way
    assert (picks["a"].ranks, picks["b"].ranks) == ((1,), None)
    picks = allocate(tables, budget_s=11.0)  # 9 s: a, and b's cheap 3 s
    assert (picks["a"].ranks, picks["b"].ranks) == ((1,), (2,))
    assert total_seconds(picks) <= 11.0
    picks = allocate(tables, budget_s=1.0)  # out of reach: everything at its fastest
    assert picks == fastest(tables) and total_seconds(picks) == 8.0


def test_rank_grid_is_multiples_of_the_vector_width() -> None:
    grid = rank_grid((64, 32), 8)
    assert grid[0] == (8, 8) and grid[-1] == (64, 32)
    assert all(r % 8 == 0 for ranks in grid for r in ranks)
    assert [r[0] for r in rank_grid((512,), 16)][:6] == [16, 32, 48, 64, 80, 112]
    assert rank_grid((5,), 8) == [(1,), (2,), (3,), (4,), (5,)]


def test_choice_follows_the_injected_table_and_repeats() -> None:
    first_strategy = sc.Speedup(2.0, timer=_layer_ms)
    first = _compress(first_strategy)
    second_strategy = sc.Speedup(2.0, timer=_layer_ms)
    second = _compress(second_strategy)
    outcome = first_strategy.outcome(0)
    assert outcome.picks == second_strategy.outcome(0).picks
    assert outcome.reached and abs(outcome.measured / 2.0 - 1) <= 0.05
    changes = {c.name: c for c in first.history[0].changes}
    # conv1 (3 input channels) has no decomposition faster than it is.
    assert changes["conv1"].skipped is not None and "no decomposition is faster" in str(
        changes["conv1"].skipped
    )
    assert isinstance(first.model.conv1, nn.Conv2d)
    for name, pick in outcome.picks.items():
        module = getattr(first.model, name)
        if pick.method is None:
            assert changes[name].skipped is not None
            assert type(module) is type(getattr(Net(), name))
        else:
            assert (module.method, module.ranks) == (pick.method, pick.ranks)
            assert changes[name].params_after < changes[name].params_before
    assert [c.ranks for c in first.history[0].changes] == [
        c.ranks for c in second.history[0].changes
    ]
    # The table's own prediction of the model: the sum of its layers.
    dense = sum(_structure_ms(n, None, Net()) for n in outcome.picks)
    chosen = sum(p.seconds for p in outcome.picks.values())
    assert dense / chosen == pytest.approx(outcome.measured)


def test_closed_loop_converges_on_a_synthetic_model_timer() -> None:
    torch.manual_seed(0)
    strategy = sc.Speedup(
        1.6, tolerance=0.02, timer=_layer_ms, model_timer=_synthetic_model_timer(Net())
    )
    compressor = _compress(strategy)
    outcome = strategy.outcome(0)
    assert outcome.reached
    assert abs(outcome.measured / 1.6 - 1) <= 0.02
    # The first allocation trusts the table, the model disagrees: the loop had to adjust.
    assert outcome.rounds >= 3
    layout = {
        n: (p.method, p.ranks) if p.method is not None and p.ranks is not None else None
        for n, p in outcome.picks.items()
    }
    timer = _synthetic_model_timer(Net())
    assert timer(dict.fromkeys(layout)) / timer(layout) == pytest.approx(outcome.measured)
    assert compressor.history[0].params_after < compressor.history[0].params_before


def test_loop_on_tables_alone_brackets_and_stops_within_tolerance() -> None:
    # One layer with a fine grid, a whole model whose glue the table cannot see.
    options = [LayerOption(None, None, 1000, 100.0, 0.0)]
    options += [LayerOption("svd", (r,), r, float(r), (100 - r) / 100) for r in range(1, 100)]
    tables = [LayerTable("layer", None, 100.0, tuple(options))]

    def measure(allocation: dict[str, LayerOption]) -> tuple[float, float]:
        return 150.0, 50.0 + allocation["layer"].seconds ** 1.1

    result = search(tables, measure, goal=2.0, tolerance=0.02)
    assert result.reached and abs(result.speedup / 2.0 - 1) <= 0.02
    assert len(result.trials) >= 2
    result = search(tables, measure, goal=10.0)  # 150 / 51 = 2.94x at most
    assert not result.reached and result.reason is not None
    assert "out of reach" in result.reason and "2.94x" in result.reason
    # Not every layer at its fastest (rank 1): the least error within 5% of the ceiling.
    ceiling = 150 / 51
    assert ceiling * 0.95 <= result.speedup < ceiling
    assert result.allocation["layer"].ranks is not None
    assert 1 < result.allocation["layer"].ranks[0] <= 3  # 150 / (50 + 3**1.1) = 0.955 ceiling


def test_stage_targets_grow_geometrically() -> None:
    strategy = sc.Speedup(2.0, timer=_layer_ms)
    compressor = _compress(strategy, stages=2)
    goals = [o.goal for o in strategy.outcomes]
    assert goals == pytest.approx([math.sqrt(2.0), 2.0])
    assert all(o.reached for o in strategy.outcomes)
    first, second = strategy.outcomes
    # The second stage starts from the first's layers and goes further.
    assert second.measured > first.measured
    assert len(compressor.history) == 2


def test_pinned_method_is_the_only_one_tried() -> None:
    strategy = sc.Speedup(2.0, timer=_layer_ms)
    _compress(strategy, methods={"conv3": "svd", "conv2": "svd"})
    picks = strategy.outcome(0).picks
    assert picks["conv3"].method in (None, "svd") and picks["conv2"].method in (None, "svd")


def test_unreachable_target_keeps_the_least_error_near_the_ceiling_and_says_why() -> None:
    strategy = sc.Speedup(50.0, timer=_layer_ms)
    _compress(strategy)
    outcome = strategy.outcome(0)
    assert not outcome.reached and outcome.reason is not None
    assert "out of reach" in outcome.reason and "least error" in outcome.reason
    assert "not reached" in str(outcome)
    ceiling = float(outcome.reason.split("model measures ")[1].split("x")[0])
    assert ceiling * 0.95 <= outcome.measured <= ceiling * 1.01


def test_out_of_reach_gives_up_a_little_speed_for_much_less_error() -> None:
    # Two layers; each one's last bit of speed costs most of its error.
    def table(name: str) -> LayerTable:
        options = [LayerOption(None, None, 100, 10.0, 0.0)]
        options += [
            LayerOption("svd", (r,), r, 2.0 + 0.1 * r, 0.9 if r == 1 else 0.02 * r)
            for r in range(1, 11)
        ]
        return LayerTable(name, None, 10.0, tuple(options))

    tables = [table("a"), table("b")]

    def measure(allocation: dict[str, LayerOption]) -> tuple[float, float]:
        return 25.0, 5.0 + sum(option.seconds for option in allocation.values())

    calls = []

    def counted(allocation: dict[str, LayerOption]) -> tuple[float, float]:
        calls.append(allocation)
        return measure(allocation)

    result = search(tables, counted, goal=5.0, max_rounds=8)  # at most 25 / 9.2 = 2.72x
    assert result.measurements == len(calls) <= 8 + 1  # the rounds, and the start
    ceiling = 25 / 9.2
    assert not result.reached and result.reason is not None and "2.72x" in result.reason
    assert ceiling * 0.95 <= result.speedup < ceiling
    errors = [result.allocation[n].error for n in ("a", "b")]
    assert sum(errors) <= 0.3  # the fastest allocation's error is 1.8


def test_a_ceiling_within_the_tolerance_of_the_model_leaves_it_as_it_is() -> None:
    options = [LayerOption(None, None, 100, 10.0, 0.0)]
    options += [LayerOption("svd", (r,), r, 9.0 + 0.1 * r, 0.1 * r) for r in range(1, 6)]
    tables = [LayerTable("layer", None, 10.0, tuple(options))]

    def measure(allocation: dict[str, LayerOption]) -> tuple[float, float]:
        return 100.0, 90.0 + allocation["layer"].seconds  # at most 100 / 99.1: 1.009x

    result = search(tables, measure, goal=2.0)
    assert not result.reached and result.reason is not None
    assert result.allocation["layer"].method is None and result.speedup == 1.0
    assert "left as it is" in result.reason


def test_calibration_prices_choices_by_output_error() -> None:
    torch.manual_seed(0)
    batches = [torch.randn(4, 3, 16, 16) for _ in range(2)]
    weight = sc.Speedup(2.0, timer=_layer_ms)
    output = sc.Speedup(2.0, timer=_layer_ms)
    _compress(weight)
    _compress(output, calibration=sc.Calibration(batches))
    assert output.outcome(0).reached
    assert output.outcome(0).error != pytest.approx(weight.outcome(0).error)
    gradient = sc.Speedup(2.0, timer=_layer_ms, error="gradient")
    _compress(gradient, calibration=sc.Calibration(batches))
    assert gradient.outcome(0).reached


def test_measured_run_completes() -> None:
    strategy = sc.Speedup(1.5, warmup=0, repeats=1, model_rounds=1, max_rounds=2)
    _compress(strategy)
    outcome = strategy.outcome(0)
    assert outcome.measured > 0 and outcome.rounds >= 1 and outcome.seconds > 0


def test_bad_settings_are_refused() -> None:
    for target in (1.0, 0.5, float("inf"), True, "2"):
        with pytest.raises(sc.RankError, match="Speedup target"):
            sc.Speedup(target)  # type: ignore[arg-type]
    with pytest.raises(sc.StagecompError, match="tolerance=0"):
        sc.Speedup(2.0, tolerance=0)
    with pytest.raises(sc.StagecompError, match="batch_size=0"):
        sc.Speedup(2.0, batch_size=0)
    with pytest.raises(sc.StagecompError, match="error='loss'"):
        sc.Speedup(2.0, error="loss")
    with pytest.raises(sc.UnknownMethodError, match="tuker2"):
        sc.Speedup(2.0, methods=("tuker2",))
    with pytest.raises(sc.StagecompError, match="example_input"):
        sc.Compressor(Net(), sc.Speedup(2.0), progress=False)
    with pytest.raises(sc.StagecompError, match="needs calibration"):
        _compress(sc.Speedup(2.0, timer=_layer_ms, error="output"))
    with pytest.raises(sc.StagecompError, match="not prepared"):
        sc.Speedup(2.0).outcome(0)


def test_settings_round_trip_through_json() -> None:
    strategy = sc.Speedup(3.0, batch_size=16, methods=("svd",), tolerance=0.1)
    assert strategy_from_dict(strategy.to_dict()) == strategy


def test_a_step_that_starts_a_stage_prepares_it_first() -> None:
    torch.manual_seed(0)
    strategy = sc.Speedup(2.0, timer=_layer_ms)
    x = torch.randn(2, 3, 16, 16)
    compressor = sc.Compressor(
        Net().eval(), strategy, x, layers_per_step=4, stages=2, progress=False
    )
    first = compressor.compression_step()  # stage 1 only
    assert [o.stage for o in strategy.outcomes] == [0]
    second = compressor.compression_step()  # the rest of stage 1, the start of stage 2
    assert [o.stage for o in strategy.outcomes] == [0, 1]
    assert {c.stage for c in first.changes} == {0} and {c.stage for c in second.changes} == {0, 1}
    while not compressor.done:
        compressor.compression_step()
    assert strategy.outcome(1).goal == pytest.approx(2.0)


def test_a_saved_run_resumes_with_the_same_settings() -> None:
    torch.manual_seed(0)
    strategy = sc.Speedup(2.0, timer=_layer_ms, model_rounds=1, warmup=0, repeats=1)
    x = torch.randn(2, 3, 16, 16)
    model = Net().eval()
    compressor = sc.Compressor(model, strategy, x, layers_per_step=6, stages=2, progress=False)
    compressor.compression_step()
    state = compressor.state_dict()
    fresh = Net().eval()
    resumed = sc.Compressor.from_state(fresh, state, example_input=x, progress=False)
    assert resumed.strategy == strategy  # settings equal; injected timers are not saved
    assert resumed.step_index == 1
    resumed.compression_step()  # stage 2 prepared afresh on the resumed model (measured)
    assert resumed.done and resumed.strategy.outcome(1).goal == pytest.approx(2.0)


# ---------------------------------------------------------------------- a MAC budget too
def _mac_table(name: str, width: int) -> LayerTable:
    """A layer of 100 MACs whose choices save time fast and MACs faster: rank r costs r
    MACs and ``3 + r / 20`` seconds (a memory-bound floor of 3), error ``(100 - r) / 100``."""
    options = [LayerOption(None, None, 100, 10.0, 0.0, 100)]
    options += [
        LayerOption("svd", (r,), r, 3.0 + r / 20, (100 - r) / 100, r)
        for r in range(width, 100, width)
    ]
    return LayerTable(name, None, 10.0, tuple(options))


def test_a_mac_budget_is_met_and_filled_one_layer_at_a_time() -> None:
    # Four layers of one geometry: one multiplier moves them all at once, from 4 x 100
    # MACs to 4 x 40, so without filling the cut would be far past the 230 asked.
    tables = [_mac_table(f"l{i}", 40) for i in range(4)]
    picks = allocate(tables, budget_s=math.inf, budget_macs=230.0)
    assert 200 <= total_macs(picks) <= 230
    assert len({p.ranks for p in picks.values()}) > 1


def test_a_tight_latency_budget_does_not_cut_more_macs_than_it_needs() -> None:
    # Tables of different lengths (padding). Out of reach of the latency budget, the
    # answer is the quickest allocation near the MAC budget, not the fewest MACs: the MAC
    # multiplier turns negative and pulls the cut back towards what was asked.
    tables = [_mac_table("a", 10), _mac_table("b", 20), _mac_table("c", 5)]
    assert total_macs(fastest(tables)) == 10 + 20 + 5
    picks = allocate(tables, budget_s=0.0, budget_macs=150.0)
    assert 100 <= total_macs(picks) <= 150
    assert total_seconds(picks) < total_seconds(allocate(tables, math.inf, 150.0))


def test_the_loop_keeps_the_mac_budget_alone_when_it_is_fast_enough() -> None:
    tables = [_mac_table(f"l{i}", 10) for i in range(3)]

    def measure(allocation: dict[str, LayerOption]) -> tuple[float, float]:
        return 32.0, 2.0 + total_seconds(allocation)

    result = search(tables, measure, goal=1.3, budget_macs=150.0)
    # The least error at 150 MACs (one layer dense) measures 32 / (2 + 18.5) = 1.56x:
    # faster than asked, and no fault, since the MAC cut is what binds.
    assert result.reached and result.speedup == pytest.approx(32 / 20.5)
    assert total_macs(result.allocation) == 150 and result.measurements == 2
    result = search(tables, measure, goal=1.8, budget_macs=150.0)
    # Faster than the MAC budget alone: error traded for time (32 / 18.5 = 1.73x at the
    # same 150 MACs, more by cutting a little further).
    assert result.reached and result.speedup >= 1.8 * 0.95
    assert 120 <= total_macs(result.allocation) <= 150
    result = search(tables, measure, goal=5.0, budget_macs=150.0)
    assert not result.reached and result.reason is not None
    assert "the quickest allocation near the MAC budget" in result.reason
    assert total_macs(result.allocation) <= 150


def test_speedup_with_macs_cuts_the_model_macs_as_asked() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    before = sc.model_stats(Net(), x).macs
    strategy = sc.Speedup(1.2, macs=2.0, timer=_layer_ms)
    compressor = _compress(strategy)
    outcome = strategy.outcome(0)
    after = sc.model_stats(compressor.model, x).macs
    assert outcome.mac_cut is not None
    assert outcome.mac_cut == pytest.approx(before / after)
    assert 2.0 <= outcome.mac_cut <= 2.3
    assert outcome.reached and outcome.measured >= 1.2 * 0.95
    assert "fewer MACs" in str(outcome)
    # Without the MAC budget the same speed-up is bought with a different cut.
    free = sc.Speedup(1.2, timer=_layer_ms)
    _compress(free)
    assert free.outcome(0).mac_cut is None


def test_mac_budgets_grow_by_stage_against_the_dense_model() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    before = sc.model_stats(Net(), x).macs
    strategy = sc.Speedup(1.2, macs=2.0, timer=_layer_ms)
    compressor = _compress(strategy, stages=2)
    first, second = strategy.outcomes
    assert first.mac_cut is not None and second.mac_cut is not None
    assert math.sqrt(2.0) <= first.mac_cut < 2.0 <= second.mac_cut <= 2.3
    assert second.mac_cut == pytest.approx(before / sc.model_stats(compressor.model, x).macs)


def test_a_mac_budget_out_of_reach_is_reported_not_hidden() -> None:
    strategy = sc.Speedup(1.2, macs=200.0, timer=_layer_ms)
    _compress(strategy)
    outcome = strategy.outcome(0)
    assert not outcome.reached and outcome.reason is not None
    assert "macs=200 is out of reach" in outcome.reason and "fewest MACs" in outcome.reason
    assert outcome.mac_cut is not None and 1.0 < outcome.mac_cut < 200


def test_bad_mac_budgets_are_refused() -> None:
    for macs in (1.0, 0.5, float("nan"), True, "2"):
        with pytest.raises(sc.StagecompError, match="Speedup macs="):
            sc.Speedup(2.0, macs=macs)  # type: ignore[arg-type]
    strategy = sc.Speedup(2.0, macs=3.0)
    assert strategy_from_dict(strategy.to_dict()) == strategy
