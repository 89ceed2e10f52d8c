"""factorize: fresh factorised layers from shapes, chosen by the Compressor's name rule."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import stagecomp as sc
from stagecomp.factorize import factorize
from stagecomp.layers.init import dense_weight_variance


def build() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),  # one input channel: nothing to factorise
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 32, 3, stride=2, padding=1, groups=2, bias=False),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(128, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


X = torch.randn(4, 1, 8, 8)
OPTIONS = sc.DecomposeOptions()


def _expected_params(model: nn.Module, replaced: dict[str, sc.DecomposedLayer]) -> int:
    total = sum(p.numel() for p in model.parameters())
    for layer in replaced.values():
        assert type(layer).param_count(layer.shape, layer.ranks, layer.options) == sum(
            p.numel() for p in layer.parameters()
        )
    return total


@pytest.mark.parametrize(
    ("method", "rank", "expected"),
    [
        ("tucker2", 8, ["2", "4"]),
        ("cp3", 8, ["2", "4"]),
        ("cp4", 8, ["2", "4"]),
        ("svd", 8, ["2", "4", "7", "9"]),
        ("tt", 4, ["2", "4", "7", "9"]),
    ],
)
def test_default_targets_parameter_counts_and_shapes(
    method: str, rank: int, expected: list[str]
) -> None:
    model = build()
    dense = build()
    replaced = factorize(model, method, rank)
    assert list(replaced) == expected
    assert all(model.get_submodule(n) is layer for n, layer in replaced.items())
    assert isinstance(model[0], nn.Conv2d)  # single input channel left dense
    saved = sum(
        dense.get_submodule(n).weight.numel()
        + (0 if dense.get_submodule(n).bias is None else dense.get_submodule(n).bias.numel())
        - sum(p.numel() for p in layer.parameters())
        for n, layer in replaced.items()
    )
    params = sum(p.numel() for p in model.parameters())
    assert params == sum(p.numel() for p in dense.parameters()) - saved
    assert params == _expected_params(model, replaced)
    assert params < sum(p.numel() for p in dense.parameters())
    assert model(X).shape == (4, 10)


def test_exact_ranks_geometry_and_bias_kept() -> None:
    model = build()
    replaced = factorize(model, "tucker2", (6, 5), targets=["2", "4"])
    assert replaced["2"].ranks == (6, 5)
    assert replaced["4"].ranks == (6, 5)  # per group
    assert replaced["4"].shape.groups == 2 and replaced["4"].shape.stride == (2, 2)
    assert replaced["4"].dense_bias() is None
    assert sc.Tucker2Conv2d.param_count(
        replaced["2"].shape, (6, 5), OPTIONS
    ) == 16 * 5 + 5 * 6 * 9 + (6 * 32 + 32)


def test_rank_mapping_chooses_layers_and_ranks() -> None:
    model = build()
    replaced = factorize(model, "svd", {"7": 12, "re:[24]": 4})
    assert {n: layer.ranks for n, layer in replaced.items()} == {"2": (4,), "4": (4,), "7": (12,)}
    assert isinstance(model[9], nn.Linear)


@pytest.mark.parametrize(
    ("method", "rank"), [("svd", 64), ("tucker2", 48), ("cp3", 96), ("cp4", 96), ("tt", 16)]
)
def test_conv_init_scale_matches_dense_default(method: str, rank: int) -> None:
    layer = factorize(nn.Sequential(nn.Conv2d(96, 96, 3, padding=1)), method, rank)["0"]
    var = float(layer.dense_weight().detach().double().var())
    assert 0.8 < var / dense_weight_variance(96 * 9) < 1.25, var


@pytest.mark.parametrize(("method", "rank"), [("svd", 32), ("tt", 8)])
def test_linear_init_scale_matches_dense_default(method: str, rank: int) -> None:
    layer = factorize(nn.Sequential(nn.Linear(512, 256)), method, rank)["0"]
    var = float(layer.dense_weight().detach().double().var())
    assert 0.8 < var / dense_weight_variance(512) < 1.25, var
    bias = layer.dense_bias()
    assert bias is not None and float(bias.detach().abs().max()) <= 512**-0.5


def test_device_dtype_mode_and_requires_grad_kept() -> None:
    model = build().double().eval()
    model[7].weight.requires_grad_(False)
    model[7].bias.requires_grad_(False)
    replaced = factorize(model, "svd", 8, targets=["7"])
    layer = replaced["7"]
    assert all(p.dtype == torch.float64 for p in layer.parameters())
    assert not layer.training
    assert not any(p.requires_grad for p in layer.parameters())
    assert model(X.double()).dtype == torch.float64


def test_exclude_and_pattern_targets() -> None:
    model = build()
    replaced = factorize(model, "tt", 4, targets=["*"], exclude=["9", "re:[02]"])
    assert list(replaced) == ["4", "7"]


def test_typo_names_the_closest_layer_and_leaves_model() -> None:
    model = nn.Sequential()
    model.add_module("conv_one", nn.Conv2d(8, 8, 3))
    model.add_module("fc_out", nn.Linear(8, 4))
    with pytest.raises(sc.NoMatchingLayerError, match="fc_out"):
        factorize(model, "svd", 2, targets=["fc_uot"])
    with pytest.raises(sc.NoMatchingLayerError, match="conv_one"):
        factorize(model, "svd", 2, exclude=["conv_onee"])
    with pytest.raises(sc.NoMatchingLayerError):
        factorize(model, "svd", {"fcout": 2})
    assert isinstance(model.conv_one, nn.Conv2d) and isinstance(model.fc_out, nn.Linear)


def test_errors_leave_the_model_unchanged() -> None:
    model = build()
    with pytest.raises(sc.UnknownMethodError, match="tucker2"):
        factorize(model, "tuker2", 4)
    with pytest.raises(sc.UnsupportedLayerError, match="'7'"):
        factorize(model, "tucker2", 4, targets=["2", "7"])  # named exactly: must fit
    with pytest.raises(sc.RankError):
        factorize(model, "svd", 0, targets=["2", "9"])
    with pytest.raises(sc.RankError, match="'9'"):
        factorize(model, "svd", {"7": 4}, targets=["7", "9"])
    assert not any(isinstance(m, sc.DecomposedLayer) for m in model.modules())


def test_trains_and_round_trips_through_save(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = build()
    factorize(model, "cp3", 6, targets=["2"])
    factorize(model, "tt", 4, targets=["7"])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    target = torch.randint(0, 10, (4,))
    losses = []
    for _ in range(5):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(X), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    model.eval()
    sc.save(model, tmp_path)
    loaded = sc.load(build().eval(), tmp_path)
    assert torch.equal(loaded(X), model(X))


def test_an_integer_rank_above_full_rank_means_full_rank() -> None:
    model = nn.Sequential(nn.Linear(12, 5), nn.ReLU(), nn.Linear(5, 30))
    layers = factorize(model, "svd", 10_000)
    assert {name: layer.ranks for name, layer in layers.items()} == {"0": (5,), "2": (5,)}
