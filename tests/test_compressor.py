"""The Compressor's state machine, strategies, overrides, errors and resume."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import stagecomp as sc
from stagecomp.compressor import Compressor
from stagecomp.layers.base import DecomposedLayer


class SmallNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1, groups=32),  # depthwise: skipped
            nn.Conv2d(32, 32, 1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


X = torch.randn(2, 3, 8, 8)
TARGETS = ["features.0", "features.3", "features.6", "head.1", "head.3"]


def make(**kwargs: object) -> tuple[SmallNet, Compressor]:
    torch.manual_seed(0)
    model = SmallNet()
    kwargs.setdefault("progress", False)
    return model, Compressor(model, example_input=X, **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(("stages", "per_step"), [(1, 1), (2, 2), (2, 3), (3, 5), (1, 7)])
def test_step_count_and_every_layer_compressed_stages_times(stages: int, per_step: int) -> None:
    model, c = make(strategy=sc.Reduction(4.0), stages=stages, layers_per_step=per_step)
    assert [t.name for t in c.targets] == TARGETS
    assert c.total_steps == math.ceil(stages * len(TARGETS) / per_step)
    seen: dict[str, int] = {}
    steps = 0
    while not c.done:
        result = c.compression_step()
        steps += 1
        for change in result.changes:
            seen[change.name] = seen.get(change.name, 0) + 1
    assert steps == c.total_steps
    assert seen == {name: stages for name in TARGETS}
    assert "features.5" in c.skipped and "depthwise" in c.skipped["features.5"]
    with pytest.raises(sc.CompressionFinishedError, match="nothing is left"):
        c.compression_step()
    assert model(X).shape == (2, 10)


def test_reduction_rate_met_per_layer_after_all_stages() -> None:
    model, c = make(strategy=sc.Reduction(3.0), stages=2, layers_per_step=5)
    dense = {n: sum(p.numel() for p in model.get_submodule(n).parameters()) for n in TARGETS}
    while not c.done:
        c.compression_step()
    for name in TARGETS:
        layer = model.get_submodule(name)
        assert isinstance(layer, DecomposedLayer)
        params = sum(p.numel() for p in layer.parameters())
        assert params <= dense[name] / 3.0
        # one rank step more would exceed the budget
        cls, shape, opts = type(layer), layer.shape, layer.options
        full = cls.full_rank(shape, opts)
        bigger = tuple(min(f, r + 1) for f, r in zip(full, layer.ranks, strict=True))
        if bigger != layer.ranks:
            assert cls.param_count(shape, bigger, opts) > dense[name] / 3.0 * 0.999 or any(
                r == 1 for r in layer.ranks
            )


def test_overrides_exclusions_and_methods() -> None:
    model, c = make(
        strategy=sc.Reduction(2.0),
        ranks={"features.3": (8, 4), "head.1": None, "head.3": 3},
        exclude=["features.0"],
        methods={"features.3": "tucker2", "head.3": "svd"},
        layers_per_step=10,
    )
    c.compression_step()
    assert model.features[3].ranks == (8, 4)
    assert isinstance(model.head[1], nn.Linear)
    assert isinstance(model.features[0], nn.Conv2d)
    assert model.head[3].ranks == (3,)
    assert c.skipped["features.0"] == "excluded"
    assert "excluded" in c.skipped["head.1"]


def test_typo_in_any_option_lists_closest_names() -> None:
    for option in ("ranks", "exclude", "methods"):
        value: object = {"head.33": 2} if option != "exclude" else ["head.33"]
        if option == "methods":
            value = {"head.33": "svd"}
        with pytest.raises(sc.NoMatchingLayerError, match=r"head\.3"):
            make(**{option: value})


def test_bad_arguments_are_clear_errors() -> None:
    with pytest.raises(sc.StagecompError, match="allowed: vbmf, reduction, manual"):
        make(strategy="vmbf")
    with pytest.raises(sc.StagecompError, match="stages"):
        make(stages=0)
    with pytest.raises(sc.UnknownMethodError, match="cp3"):
        make(methods={"features.3": "cp5"})
    with pytest.raises(sc.RankError, match=r"features\.3"):
        _, c = make(strategy="manual", ranks={"features.3": (100, 100)})
        c.compression_step()


def test_failed_step_leaves_model_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    model, c = make(strategy="manual", ranks={"features.0": 2, "features.3": 3}, layers_per_step=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    real = sc.Tucker2Conv2d.from_module.__func__  # type: ignore[attr-defined]

    def fail_on_second(cls, module, rank, options=None, name=None):  # type: ignore[no-untyped-def]
        if name == "features.3":
            raise sc.RankError("injected failure")
        return real(cls, module, rank, options, name)

    monkeypatch.setattr(sc.Tucker2Conv2d, "from_module", classmethod(fail_on_second))
    with pytest.raises(sc.RankError, match="injected"):
        c.compression_step()
    assert isinstance(model.features[0], nn.Conv2d)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert c.step_index == 0


def test_full_rank_manual_keeps_outputs_device_dtype_and_mode() -> None:
    torch.manual_seed(0)
    model = SmallNet().double().train()
    x = X.double()
    model.eval()
    expected = model(x)
    model.train()
    full = {}
    for name in TARGETS:
        layer = model.get_submodule(name)
        shape = sc.LayerShape.from_module(layer)
        method = "tucker2" if shape.kind == "conv2d" and not shape.is_pointwise else "svd"
        cls = sc.registry.layer_class(method, shape)
        full[name] = cls.full_rank(shape, sc.DecomposeOptions())
    c = Compressor(model, "manual", x, ranks=full, layers_per_step=10, progress=False)
    result = c.compression_step()
    assert all(ch.weight_error is not None and ch.weight_error < 1e-10 for ch in result.changes)
    assert all(isinstance(model.get_submodule(n), DecomposedLayer) for n in TARGETS)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert model.training and all(m.training for m in model.modules())
    model.eval()
    assert torch.allclose(model(x), expected, atol=1e-10, rtol=1e-9)


def test_step_reports_new_parameters_for_the_optimizer() -> None:
    model, c = make(strategy=sc.Reduction(2.0), layers_per_step=2)
    result = c.compression_step()
    change = next(ch for ch in result.changes if ch.name == "features.0")
    assert change.weight_error is not None and 0 < change.weight_error < 1
    ids = {id(p) for p in result.new_parameters()}
    assert ids and ids <= {id(p) for p in model.parameters()}
    assert result.macs_after is not None and result.macs_before is not None
    assert result.macs_after < result.macs_before
    text = c.report()
    assert "features.0" in text and "step 1 of" in text


def test_order_by_macs() -> None:
    _, c = make(strategy=sc.Reduction(2.0), order="macs")
    macs = c.original_stats.layer_macs  # type: ignore[union-attr]
    order = [macs[t.name] for t in c.targets]
    assert order == sorted(order, reverse=True)


def test_resume_gives_the_same_result() -> None:
    kwargs = {"strategy": sc.Reduction(2.0), "stages": 2, "layers_per_step": 2}
    model, c = make(**kwargs)
    while not c.done:
        c.compression_step()
    reference = model(X)

    model_a, a = make(**kwargs)
    a.compression_step()
    a.compression_step()
    state, weights = a.state_dict(), {k: v.clone() for k, v in model_a.state_dict().items()}

    model_b, b = make(**kwargs)
    b.load_state_dict(state)
    model_b.load_state_dict(weights)
    assert b.step_index == 2 and len(b.history) == 2
    while not b.done:
        b.compression_step()
    assert torch.allclose(model_b(X), reference, atol=1e-6)


def test_resume_with_other_arguments_is_refused() -> None:
    _, a = make(strategy=sc.Reduction(2.0), layers_per_step=2)
    a.compression_step()
    model_b, b = make(strategy=sc.Reduction(2.0), layers_per_step=3)
    with pytest.raises(sc.RecipeError, match="different plan"):
        b.load_state_dict(a.state_dict())
    assert isinstance(model_b.features[0], nn.Conv2d)


def test_reported_weight_error_is_the_svd_tail() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 30), nn.ReLU(), nn.Linear(30, 5))
    s = torch.linalg.svdvals(model[0].weight.detach().double())
    c = Compressor(model, "manual", ranks={"0": 4}, exclude=["2"], progress=False)
    (change,) = c.compression_step().changes
    expected = float(s[4:].square().sum().sqrt() / s.square().sum().sqrt())
    assert change.weight_error == pytest.approx(expected, rel=1e-5)
