"""CP-ALS and the CP3 / CP4 convolution layers."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from stagecomp.decompositions.cp import (
    cp_als,
    cp_exact,
    cp_full_rank,
    cp_to_tensor,
)
from stagecomp.layer_shape import LayerShape
from stagecomp.layers.cp3_conv2d import CP3Conv2d
from stagecomp.layers.cp4_conv2d import CP4Conv2d
from stagecomp.options import DecomposeOptions

# PyTorch warns that even kernels under 'same' pad a copy of the input; that is expected.
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")

CLASSES = [CP3Conv2d, CP4Conv2d]
OPTIONS = DecomposeOptions()

# (in, out, kernel, extra Conv2d keyword arguments)
GEOMETRIES: list[tuple[int, int, Any, dict[str, Any]]] = [
    (3, 4, 3, {"padding": 1}),
    (4, 6, 3, {"groups": 2, "stride": (2, 1), "padding": (1, 0)}),
    (3, 5, (3, 2), {"stride": (1, 2), "dilation": (2, 1), "padding": (2, 1)}),
    (4, 4, (2, 4), {"padding": "same", "dilation": (1, 2)}),
    (3, 4, 3, {"padding": "same", "padding_mode": "reflect"}),
    (3, 2, (4, 2), {"padding": "same", "padding_mode": "circular"}),
    (4, 3, 3, {"padding": "valid", "bias": False}),
    (3, 4, 3, {"padding": (1, 2), "padding_mode": "reflect", "stride": (2, 1)}),
    (3, 3, (3, 5), {"padding": (2, 1), "padding_mode": "replicate", "dilation": (1, 2)}),
    (6, 6, 3, {"groups": 3, "padding": 1, "padding_mode": "circular", "stride": 2}),
    (4, 4, 3, {"groups": 4, "padding": 1}),  # depthwise
    (5, 3, 1, {}),  # pointwise
]


def _conv(in_c: int, out_c: int, kernel: Any, kwargs: dict[str, Any]) -> nn.Conv2d:
    torch.manual_seed(0)
    return nn.Conv2d(in_c, out_c, kernel, dtype=torch.float64, **kwargs)


def _random_cp(dims: tuple[int, ...], rank: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    factors = [torch.randn(d, rank, generator=generator, dtype=torch.float64) for d in dims]
    return cp_to_tensor(torch.ones(rank, dtype=torch.float64), factors)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


# ---------------------------------------------------------------- decomposition math
@pytest.mark.parametrize(
    ("dims", "rank"), [((16, 12, 9), 5), ((10, 8, 4, 3), 4), ((30, 20, 9), 12)]
)
def test_cp_als_recovers_exact_rank_tensor(dims: tuple[int, ...], rank: int) -> None:
    tensor = _random_cp(dims, rank, seed=2)
    result = cp_als(
        tensor, rank, max_iter=OPTIONS.cp_max_iter, tol=OPTIONS.cp_tol, seed=OPTIONS.seed
    )
    actual = _rel(cp_to_tensor(result.weights, result.factors), tensor)
    assert actual < 1e-3
    assert result.rel_error == pytest.approx(actual, abs=1e-6)
    assert [tuple(f.shape) for f in result.factors] == [(d, rank) for d in dims]
    norms = torch.stack([f.norm(dim=0) for f in result.factors])
    torch.testing.assert_close(norms, torch.ones_like(norms))
    assert bool((result.weights >= 0).all())


def test_cp_als_reports_its_error_in_float32() -> None:
    """The error comes from an expansion that cancels; in float32 it must still be right."""
    generator = torch.Generator().manual_seed(7)
    tensor = _random_cp((128, 96, 9), 20, seed=7).float()
    tensor += 0.02 * tensor.std() * torch.randn(tensor.shape, generator=generator)
    for sweeps in (1, 4):
        result = cp_als(tensor, 20, max_iter=sweeps)
        actual = _rel(cp_to_tensor(result.weights, result.factors).double(), tensor.double())
        assert result.rel_error == pytest.approx(actual, abs=1e-4)


def test_cp_als_is_deterministic_and_seeded() -> None:
    tensor = torch.randn(16, 12, 9, dtype=torch.float64)
    first = cp_als(tensor, 14, max_iter=10, seed=3)  # rank > 12 and 9: random start columns
    again = cp_als(tensor, 14, max_iter=10, seed=3)
    other = cp_als(tensor, 14, max_iter=10, seed=4)
    assert torch.equal(first.weights, again.weights)
    assert all(torch.equal(a, b) for a, b in zip(first.factors, again.factors, strict=True))
    assert not torch.equal(first.factors[2], other.factors[2])


def test_cp_exact_is_exact_at_the_trivial_bound() -> None:
    tensor = torch.randn(5, 7, 3, 2, dtype=torch.float64)
    bound = cp_full_rank(tensor.shape)
    assert bound == 5 * 3 * 2
    for rank in (bound, bound + 3):
        result = cp_exact(tensor, rank)
        assert _rel(cp_to_tensor(result.weights, result.factors), tensor) < 1e-14
        assert result.rel_error == 0.0
    padded = cp_exact(tensor, bound + 3)
    assert torch.equal(padded.weights[bound:], torch.zeros(3, dtype=torch.float64))
    via_als = cp_als(tensor, bound)  # cp_als hands over to the exact construction
    assert via_als.iterations == 0
    with pytest.raises(ValueError, match="rank"):
        cp_exact(tensor, bound - 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cp_als_never_produces_nan_on_degenerate_tensors(dtype: torch.dtype) -> None:
    one_slice = torch.zeros(8, 6, 9, dtype=dtype)
    one_slice[:, :, 4] = torch.randn(8, 6, dtype=dtype)
    rank_two = _random_cp((8, 6, 5), 2, seed=0).to(dtype)
    cases = [
        (one_slice, 10),  # true rank 6: rank 10 is more than the tensor has
        (rank_two, 12),
        (torch.zeros(6, 5, 4, dtype=dtype), 3),
        (torch.ones(6, 5, 4, dtype=dtype), 7),
    ]
    for tensor, rank in cases:
        result = cp_als(tensor, rank, max_iter=50)
        assert all(bool(torch.isfinite(t).all()) for t in (result.weights, *result.factors))
        rebuilt = cp_to_tensor(result.weights, result.factors)
        assert float((rebuilt - tensor).norm()) <= 1e-3 * max(float(tensor.norm()), 1.0)
        assert math.isfinite(result.rel_error)


def test_cp_als_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="rank"):
        cp_als(torch.randn(4, 4, 4), 0)
    with pytest.raises(ValueError, match="finite"):
        cp_als(torch.full((4, 4, 4), float("nan")), 2)
    with pytest.raises(ValueError, match="2 modes"):
        cp_als(torch.randn(4), 2)


@pytest.mark.filterwarnings("ignore:Trying to compute SVD")
def test_cp_als_matches_tensorly_parafac() -> None:
    tensorly = pytest.importorskip("tensorly")
    from tensorly.decomposition import parafac

    generator = torch.Generator().manual_seed(5)
    # A noisy low-rank tensor, fitted below its rank: a genuine approximation problem.
    tensor = _random_cp((20, 16, 9), 10, seed=5)
    tensor = tensor + 0.1 * tensor.std() * torch.randn(
        tensor.shape, generator=generator, dtype=torch.float64
    )
    array = tensor.numpy()
    for rank in (8, 20):  # 20 is more than two of the dims: random start columns
        ours = cp_als(tensor, rank, max_iter=50, tol=0.0)
        cp = parafac(tensorly.tensor(array), rank, n_iter_max=50, init="svd", tol=0.0)
        theirs = np.linalg.norm(tensorly.cp_to_tensor(cp) - array) / np.linalg.norm(array)
        ours_error = _rel(cp_to_tensor(ours.weights, ours.factors), tensor)
        assert ours_error <= theirs + 0.01, (rank, ours_error, theirs)


# ---------------------------------------------------------------- layers
@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize(("in_c", "out_c", "kernel", "kwargs"), GEOMETRIES)
def test_full_rank_layer_reproduces_the_conv(
    cls: type[CP3Conv2d] | type[CP4Conv2d],
    in_c: int,
    out_c: int,
    kernel: Any,
    kwargs: dict[str, Any],
) -> None:
    conv = _conv(in_c, out_c, kernel, kwargs)
    shape = LayerShape.from_module(conv)
    full = cls.full_rank(shape, OPTIONS)
    layer = cls.from_module(conv, full)
    x = torch.randn(2, in_c, 9, 10, dtype=torch.float64)
    assert _rel(layer(x), conv(x)) < 1e-5
    assert _rel(layer.dense_weight(), conv.weight) < 1e-12
    assert layer.param_count(shape, full, OPTIONS) == sum(p.numel() for p in layer.parameters())


@pytest.mark.parametrize("cls", CLASSES)
@pytest.mark.parametrize(("in_c", "out_c", "kernel", "kwargs"), GEOMETRIES)
def test_forward_matches_dense_weight_at_any_rank(
    cls: type[CP3Conv2d] | type[CP4Conv2d],
    in_c: int,
    out_c: int,
    kernel: Any,
    kwargs: dict[str, Any],
) -> None:
    """A freshly initialised low-rank layer computes the conv of its own dense weight."""
    shape = LayerShape.from_module(_conv(in_c, out_c, kernel, kwargs))
    layer = cls(shape, (2,), OPTIONS, dtype=torch.float64)
    x = torch.randn(2, in_c, 11, 8, dtype=torch.float64)
    assert _rel(layer(x), layer.to_dense()(x)) < 1e-12


@pytest.mark.parametrize("cls", CLASSES)
def test_low_rank_layer_error_matches_the_cp_fit(cls: type[CP3Conv2d] | type[CP4Conv2d]) -> None:
    conv = _conv(8, 12, 3, {"padding": 1, "groups": 2})
    layer = cls.from_module(conv, 6)
    x = torch.randn(2, 8, 7, 7, dtype=torch.float64)
    weight_error = _rel(layer.dense_weight(), conv.weight)
    assert 0.0 < weight_error < 0.9
    torch.testing.assert_close(layer.dense_bias(), conv.bias)
    assert _rel(layer(x), conv(x)) < 1.0
    assert layer.first.weight.dtype == torch.float64


@pytest.mark.parametrize("cls", CLASSES)
def test_param_count_and_full_rank(cls: type[CP3Conv2d] | type[CP4Conv2d]) -> None:
    shapes = [
        LayerShape("conv2d", 64, 64, (3, 3), padding=(1, 1)),
        LayerShape("conv2d", 32, 48, (3, 5), groups=4, bias=False),
        LayerShape("conv2d", 3, 64, (7, 7), stride=(2, 2), padding=(3, 3)),
        LayerShape("conv2d", 16, 16, (1, 1)),
    ]
    for shape in shapes:
        full = cls.full_rank(shape, OPTIONS)
        kh, kw = shape.kernel_size
        dims = (
            (shape.out_per_group, shape.in_per_group, kh * kw)
            if cls is CP3Conv2d
            else (shape.out_per_group, shape.in_per_group, kh, kw)
        )
        assert full == (math.prod(dims) // max(dims),)
        for rank in (1, 5, full[0]):
            ranks = cls.normalize_rank(shape, rank, OPTIONS)
            layer = cls(shape, ranks, OPTIONS)
            real = sum(p.numel() for p in layer.parameters())
            assert cls.param_count(shape, ranks, OPTIONS) == real


@pytest.mark.parametrize("cls", CLASSES)
def test_empty_layer_has_dense_init_scale(cls: type[CP3Conv2d] | type[CP4Conv2d]) -> None:
    for shape, rank in [
        (LayerShape("conv2d", 64, 64, (3, 3), padding=(1, 1)), 32),
        (LayerShape("conv2d", 32, 64, (3, 3), groups=2), 100),
        (LayerShape("conv2d", 16, 32, (5, 5)), 8),
    ]:
        layer = cls(shape, (rank,), OPTIONS)
        dense = shape.build_dense()
        ratio = float(layer.dense_weight().detach().std() / dense.weight.detach().std())
        assert 0.5 < ratio < 2.0, (shape, ratio)
        bias = layer.dense_bias()
        assert bias is not None and dense.bias is not None
        assert float(bias.detach().abs().max()) <= float(dense.bias.detach().abs().max()) * 1.5


def test_cp4_even_kernel_same_padding_modes() -> None:
    """Even kernels pad asymmetrically under 'same'; each 1-D conv must do the same."""
    for mode in ("zeros", "reflect", "replicate", "circular"):
        conv = _conv(2, 3, (4, 2), {"padding": "same", "padding_mode": mode})
        layer = CP4Conv2d.from_module(
            conv, CP4Conv2d.full_rank(LayerShape.from_module(conv), OPTIONS)
        )
        x = torch.randn(1, 2, 7, 6, dtype=torch.float64)
        assert layer(x).shape == conv(x).shape
        assert _rel(layer(x), conv(x)) < 1e-10, mode


def test_layers_keep_dtype_and_train_mode() -> None:
    conv = nn.Conv2d(8, 8, 3, padding=1).eval()
    for cls in CLASSES:
        layer = cls.from_module(conv, 4)
        assert not layer.training
        assert all(p.dtype == torch.float32 for p in layer.parameters())
        out = layer(torch.randn(1, 8, 5, 5))
        assert out.shape == (1, 8, 5, 5)
        assert bool(torch.isfinite(out).all())
