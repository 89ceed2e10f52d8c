"""Contract tests run over every layer class in the registry.

A new decomposition is covered by registering its handler in ``stagecomp.methods``: these
tests then check it is exact at full rank on random geometries, predicts its
own parameter count, keeps dtype/device/mode, and rejects bad ranks.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import stagecomp
from stagecomp.layer_shape import LayerShape
from stagecomp.layers.base import DecomposedLayer
from stagecomp.options import DecomposeOptions
from stagecomp.registry import LAYER_CLASSES

CONV_CLASSES = [c for c in LAYER_CLASSES if "conv2d" in c.kinds]
LINEAR_CLASSES = [c for c in LAYER_CLASSES if "linear" in c.kinds]
OPTIONS = DecomposeOptions()


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-30))


@st.composite
def conv_layers(draw: Any) -> tuple[nn.Conv2d, torch.Tensor]:
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    in_g = draw(st.integers(1, 5))
    out_g = draw(st.integers(1, 5))
    kh, kw = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    kind = draw(st.sampled_from(["ints", "ints", "same", "valid"]))
    if kind == "same":
        stride: tuple[int, int] = (1, 1)
        padding: Any = "same"
    else:
        stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
        padding = "valid" if kind == "valid" else (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
    padding_mode = draw(st.sampled_from(["zeros", "zeros", "reflect", "replicate", "circular"]))
    conv = nn.Conv2d(
        in_g * groups,
        out_g * groups,
        (kh, kw),
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=groups,
        bias=draw(st.booleans()),
        padding_mode=padding_mode,
        dtype=torch.float64,
    )
    seed = draw(st.integers(0, 2**16))
    x = torch.randn(
        2, in_g * groups, 11, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(seed)
    )
    return conv, x


@st.composite
def linear_layers(draw: Any) -> tuple[nn.Linear, torch.Tensor]:
    layer = nn.Linear(
        draw(st.integers(1, 24)),
        draw(st.integers(1, 24)),
        bias=draw(st.booleans()),
        dtype=torch.float64,
    )
    x = torch.randn(3, 2, layer.in_features, dtype=torch.float64)
    return layer, x


def full_rank_layer(cls: type[DecomposedLayer], module: nn.Module) -> DecomposedLayer:
    shape = LayerShape.from_module(module)
    return cls.from_module(module, cls.full_rank(shape, OPTIONS), OPTIONS)


@pytest.mark.parametrize("cls", CONV_CLASSES, ids=lambda c: c.__name__)
@given(case=conv_layers())
def test_conv_full_rank_is_exact(cls: type[DecomposedLayer], case: Any) -> None:
    conv, x = case
    layer = full_rank_layer(cls, conv)
    with torch.no_grad():
        expected = conv(x)
        assert relative_error(layer(x), expected) < 1e-5
        assert relative_error(layer.to_dense()(x), expected) < 1e-5


@pytest.mark.parametrize("cls", LINEAR_CLASSES, ids=lambda c: c.__name__)
@given(case=linear_layers())
def test_linear_full_rank_is_exact(cls: type[DecomposedLayer], case: Any) -> None:
    linear, x = case
    layer = full_rank_layer(cls, linear)
    with torch.no_grad():
        assert relative_error(layer(x), linear(x)) < 1e-5
        assert relative_error(layer.to_dense()(x), linear(x)) < 1e-5


@pytest.mark.parametrize("cls", LAYER_CLASSES, ids=lambda c: c.__name__)
@given(case=conv_layers(), fraction=st.floats(0.1, 1.0))
def test_param_count_matches_module(cls: type[DecomposedLayer], case: Any, fraction: float) -> None:
    conv, _ = case
    module: nn.Module = conv
    if "linear" in cls.kinds:
        module = nn.Linear(
            conv.in_channels * 3, conv.out_channels * 2 + 1, bias=conv.bias is not None
        )
    shape = LayerShape.from_module(module)
    ranks = tuple(max(1, round(f * fraction)) for f in cls.full_rank(shape, OPTIONS))
    layer = cls(shape, ranks, OPTIONS)
    real = sum(p.numel() for p in layer.parameters())
    assert cls.param_count(shape, ranks, OPTIONS) == real
    fast = DecomposeOptions(
        cp_max_iter=2, hooi_iters=0
    )  # counts only; accuracy is tested elsewhere
    decomposed = cls.from_module(module, ranks, fast)
    assert sum(p.numel() for p in decomposed.parameters()) == real


def _example_module(cls: type[DecomposedLayer], dtype: torch.dtype = torch.float32) -> nn.Module:
    if "linear" in cls.kinds:
        return nn.Linear(24, 18, dtype=dtype)
    return nn.Conv2d(12, 16, 3, padding=1, dtype=dtype)


@pytest.mark.parametrize("cls", LAYER_CLASSES, ids=lambda c: c.__name__)
def test_keeps_dtype_mode_and_leaves_original_untouched(cls: type[DecomposedLayer]) -> None:
    module = _example_module(cls)
    module.eval()
    before = copy.deepcopy(module.state_dict())
    layer = stagecomp.decompose(module, cls.method, 4)
    assert not layer.training
    assert all(p.dtype == torch.float32 for p in layer.parameters())
    assert all(p.requires_grad for p in layer.parameters())
    for key, value in module.state_dict().items():
        assert torch.equal(value, before[key])
    dense = layer.to_dense()
    assert type(dense) is type(module)
    assert dense.weight.dtype == torch.float32


@pytest.mark.parametrize("cls", LAYER_CLASSES, ids=lambda c: c.__name__)
def test_constructor_puts_every_part_on_the_device_and_dtype(cls: type[DecomposedLayer]) -> None:
    """Built with ``device`` / ``dtype``, nothing is left on the default device or dtype."""
    shape = LayerShape.from_module(_example_module(cls))
    ranks = cls.normalize_rank(shape, 4, OPTIONS)
    layer = cls(shape, ranks, OPTIONS, device="meta", dtype=torch.float64)
    params = dict(layer.named_parameters())
    assert params, "a decomposed layer has parameters"
    for name, param in params.items():
        assert param.device.type == "meta", name
        assert param.dtype == torch.float64, name
    for name, buffer in layer.named_buffers():
        assert buffer.device.type == "meta", name


@pytest.mark.parametrize("cls", LAYER_CLASSES, ids=lambda c: c.__name__)
def test_empty_layer_starts_like_a_dense_layer(cls: type[DecomposedLayer]) -> None:
    """Built from shapes alone, the effective weight has the default dense init's scale."""
    module = nn.Conv2d(64, 96, 3) if "conv2d" in cls.kinds else nn.Linear(256, 192)
    shape = LayerShape.from_module(module)
    full = cls.full_rank(shape, OPTIONS)
    ranks = tuple(max(1, f // 2) for f in full)
    layer = stagecomp.empty_layer(shape, cls.method, ranks)
    ratio = float(layer.dense_weight().detach().std() / module.weight.detach().std())
    assert 0.5 < ratio < 2.0, ratio
    x = torch.randn(4, *((64, 10, 10) if "conv2d" in cls.kinds else (256,)))
    assert layer(x).shape == module(x).shape


@pytest.mark.parametrize("cls", LAYER_CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("rank", [0, -3, 10_000, (1, 2, 3, 4, 5, 6), 2.5, "4", True, None])
def test_bad_ranks_are_refused(cls: type[DecomposedLayer], rank: Any) -> None:
    module = _example_module(cls)
    before = copy.deepcopy(module.state_dict())
    with pytest.raises(stagecomp.RankError) as info:
        stagecomp.decompose(module, cls.method, rank, name="features.3")
    message = str(info.value)
    assert "features.3" in message and cls.method in message and "expected" in message
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())


@pytest.mark.parametrize("cls", LAYER_CLASSES, ids=lambda c: c.__name__)
def test_non_finite_weights_are_refused(cls: type[DecomposedLayer]) -> None:
    module = _example_module(cls)
    with torch.no_grad():
        module.weight[0, 0] = float("nan")
    with pytest.raises(stagecomp.NonFiniteWeightError, match="NaN or infinite"):
        stagecomp.decompose(module, cls.method, 2, name="head")


@pytest.mark.parametrize(
    "module",
    [nn.Conv3d(4, 4, 3), nn.ConvTranspose2d(4, 4, 3), nn.BatchNorm2d(4), nn.LazyLinear(3)],
    ids=lambda m: type(m).__name__,
)
def test_unsupported_modules_are_refused(module: nn.Module) -> None:
    expected = "lazy module" if isinstance(module, nn.LazyLinear) else "nn.Linear"
    with pytest.raises(stagecomp.UnsupportedLayerError, match=expected) as info:
        stagecomp.decompose(module, "svd", 2, name="odd")
    assert "'odd'" in str(info.value)


def test_unknown_method_suggests_the_closest() -> None:
    with pytest.raises(stagecomp.UnknownMethodError, match="tucker2"):
        stagecomp.decompose(nn.Conv2d(4, 4, 3), "tuker2", 2)


@pytest.mark.parametrize("method", ["tucker2", "cp3", "cp4"])
def test_conv_only_methods_refuse_linear(method: str) -> None:
    with pytest.raises(stagecomp.UnsupportedLayerError, match="conv2d"):
        stagecomp.decompose(nn.Linear(8, 8), method, 2)


def test_decomposed_layer_can_be_decomposed_again() -> None:
    conv = nn.Conv2d(8, 8, 3, padding=1, dtype=torch.float64)
    first = stagecomp.decompose(conv, "tucker2", 8)
    second = stagecomp.decompose(first, "svd", 8)
    x = torch.randn(1, 8, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        assert relative_error(second(x), conv(x)) < 1e-10
