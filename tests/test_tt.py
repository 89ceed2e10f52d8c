"""Tensor train: TT-SVD, TT-rounding, TT-matrices, and the TT Linear / Conv2d layers."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from stagecomp.decompositions.tt import (
    factorize_modes,
    pad_tt_ranks,
    tt_full_ranks,
    tt_matrix,
    tt_matrix_apply,
    tt_matrix_modes,
    tt_matrix_to_dense,
    tt_round,
    tt_svd,
    tt_to_dense,
)
from stagecomp.errors import UnsupportedLayerError
from stagecomp.layer_shape import LayerShape
from stagecomp.layers.tt_conv2d import TTConv2d
from stagecomp.layers.tt_linear import TTLinear
from stagecomp.options import DecomposeOptions

F64 = torch.float64
OPTIONS = DecomposeOptions()


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """These tensors are tiny: a second thread only adds sync waits (seconds on a busy host)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-30))


def random_tt(sizes: tuple[int, ...], ranks: tuple[int, ...], seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    bonds = (1, *ranks, 1)
    return [
        torch.randn(bonds[k], n, bonds[k + 1], dtype=F64, generator=generator)
        for k, n in enumerate(sizes)
    ]


def core_ranks(cores: list[torch.Tensor]) -> tuple[int, ...]:
    return tuple(int(c.shape[-1]) for c in cores[:-1])


# ---------------------------------------------------------------------- TT-SVD
@pytest.mark.parametrize("sizes", [(4, 5, 6, 3), (2, 3), (7,), (3, 1, 4, 2), (2, 2, 2, 2, 2)])
def test_tt_svd_is_exact_at_full_rank(sizes: tuple[int, ...]) -> None:
    tensor = torch.randn(*sizes, dtype=F64)
    cores = tt_svd(tensor)
    assert relative_error(tt_to_dense(cores), tensor) < 1e-12
    assert core_ranks(cores) == tt_full_ranks(sizes)
    assert [c.shape[1] for c in cores] == list(sizes)


@pytest.mark.parametrize(
    ("sizes", "ranks"),
    [((4, 5, 6, 3), (2, 3, 2)), ((6, 6, 6), (5, 4)), ((8, 3, 9), (1, 1)), ((16, 9), (7,))],
)
def test_tt_svd_recovers_a_tensor_of_exact_tt_ranks(
    sizes: tuple[int, ...], ranks: tuple[int, ...]
) -> None:
    tensor = tt_to_dense(random_tt(sizes, ranks))
    cores = tt_svd(tensor, ranks)
    assert core_ranks(cores) == ranks
    assert relative_error(tt_to_dense(cores), tensor) < 1e-10
    # float32 as the layers use it for large weights
    cores32 = tt_svd(tensor.float(), ranks)
    assert relative_error(tt_to_dense(cores32).double(), tensor) < 1e-5
    # eps picks exactly these ranks when the rest is numerically zero
    assert core_ranks(tt_svd(tensor, eps=1e-9)) == ranks


def test_tt_svd_caps_ranks_at_what_each_bond_holds() -> None:
    tensor = torch.randn(3, 4, 5, dtype=F64)
    assert core_ranks(tt_svd(tensor, 100)) == (3, 5)
    # after bond 1 is cut to 1, bond 2 can hold at most 1 * 4
    assert core_ranks(tt_svd(tensor, (1, 5))) == (1, 4)


@pytest.mark.parametrize("eps", [0.5, 0.2, 0.05, 1e-3])
def test_tt_svd_eps_meets_the_accuracy(eps: float) -> None:
    tensor = torch.randn(5, 6, 7, 4, dtype=F64)
    cores = tt_svd(tensor, eps=eps)
    assert relative_error(tt_to_dense(cores), tensor) <= eps
    looser = tt_svd(tensor, eps=eps * 2)
    assert all(a <= b for a, b in zip(core_ranks(looser), core_ranks(cores), strict=True))


@pytest.mark.parametrize("bad", [(2,), (2, 0, 2), (2, 2.5, 2), True, -1])
def test_tt_svd_rejects_bad_ranks(bad: Any) -> None:
    with pytest.raises(ValueError, match="rank"):
        tt_svd(torch.randn(3, 4, 5, 6), bad)


# ---------------------------------------------------------------------- TT-rounding
@pytest.mark.parametrize("ranks", [(3, 4, 2), (2, 2, 2), (1, 3, 1)])
def test_tt_round_equals_tt_svd_of_the_dense(ranks: tuple[int, ...]) -> None:
    sizes = (4, 5, 6, 3)
    tensor = tt_to_dense(random_tt(sizes, (3, 4, 2), seed=1))
    # the same tensor with redundant ranks: full-rank TT-SVD, mixed up by invertible gauges
    cores = tt_svd(tensor)
    generator = torch.Generator().manual_seed(2)
    for k in range(len(cores) - 1):
        size = cores[k].shape[-1]
        gauge = torch.randn(size, size, dtype=F64, generator=generator) + 3 * torch.eye(size)
        cores[k] = cores[k] @ gauge
        cores[k + 1] = torch.tensordot(torch.linalg.inv(gauge), cores[k + 1], dims=1)
    rounded = tt_round(cores, ranks)
    reference = tt_svd(tensor, ranks)
    assert core_ranks(rounded) == core_ranks(reference)
    assert relative_error(tt_to_dense(rounded), tt_to_dense(reference)) < 1e-8
    if ranks == (3, 4, 2):
        assert relative_error(tt_to_dense(rounded), tensor) < 1e-10


def test_tt_round_eps_and_matrix_cores() -> None:
    low = [torch.randn(1, 2, 5, 2), torch.randn(2, 3, 3, 2), torch.randn(2, 4, 2, 1)]
    matrix = tt_matrix_to_dense([c.double() for c in low])
    matrix = matrix + 1e-3 * matrix.norm() / 30 * torch.randn(24, 30, dtype=F64)
    cores = tt_matrix(matrix, (2, 3, 4), (5, 3, 2))
    rounded = tt_round(cores, eps=0.05)
    assert [c.shape[1:3] for c in rounded] == [c.shape[1:3] for c in cores]
    assert core_ranks(rounded) == (2, 2)
    assert relative_error(tt_matrix_to_dense(rounded), matrix) <= 0.05


# ---------------------------------------------------------------------- modes
@given(n=st.integers(1, 2_000_000), d=st.integers(1, 5))
def test_factorize_modes_multiplies_back_and_is_balanced(n: int, d: int) -> None:
    modes = factorize_modes(n, d)
    assert len(modes) == d
    assert math.prod(modes) == n
    assert list(modes) == sorted(modes, reverse=True)
    assert modes[0] <= modes[-1] * _largest_prime_factor(n)
    assert factorize_modes(n, d) == modes


def _largest_prime_factor(n: int) -> int:
    largest, p = 1, 2
    while p * p <= n:
        while n % p == 0:
            largest, n = p, n // p
        p += 1
    return max(largest, n)


@pytest.mark.parametrize(
    ("n", "d", "expected"),
    [
        (4096, 3, (16, 16, 16)),
        (256, 2, (16, 16)),
        (12, 2, (4, 3)),
        (7, 2, (7, 1)),
        (1, 3, (1, 1, 1)),
    ],
)
def test_factorize_modes_examples(n: int, d: int, expected: tuple[int, ...]) -> None:
    assert factorize_modes(n, d) == expected


def test_tt_full_ranks() -> None:
    assert tt_full_ranks((4, 5, 6)) == (4, 6)
    assert tt_full_ranks((256, 256, 9)) == (256, 9)
    assert tt_full_ranks((7,)) == ()


def test_tt_matrix_modes_validation_names_the_values() -> None:
    assert tt_matrix_modes(12, 10, 2) == ((4, 3), (5, 2))
    assert tt_matrix_modes(12, 10, 5, in_modes=(2, 5, 1)) == ((3, 2, 2), (2, 5, 1))
    with pytest.raises(ValueError, match=r"\(2, 4\) multiply to 8.*10"):
        tt_matrix_modes(12, 10, 2, in_modes=(2, 4))
    with pytest.raises(ValueError, match="same length"):
        tt_matrix_modes(12, 10, 2, out_modes=(3, 4), in_modes=(2, 5, 1))


# ---------------------------------------------------------------------- TT-matrices
def test_tt_matrix_index_convention() -> None:
    out_modes, in_modes = (2, 3), (4, 5)
    cores = [torch.randn(1, 2, 4, 3, dtype=F64), torch.randn(3, 3, 5, 1, dtype=F64)]
    dense = tt_matrix_to_dense(cores)
    assert dense.shape == (6, 20)
    for o1, o2, i1, i2 in [(1, 2, 3, 4), (0, 1, 2, 0), (1, 0, 0, 3)]:
        expected = cores[0][0, o1, i1] @ cores[1][:, o2, i2, 0]
        assert torch.allclose(dense[o1 * 3 + o2, i1 * 5 + i2], expected)
    assert relative_error(tt_matrix_to_dense(tt_matrix(dense, out_modes, in_modes)), dense) < 1e-12


@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("columns", [1, 5, 200])
@pytest.mark.parametrize("last", [1, 2])
def test_tt_matrix_apply_matches_the_dense_product(groups: int, columns: int, last: int) -> None:
    out_modes, in_modes, ranks = (3, 2, 2), (2, 4, 3), (2, 3)
    bonds = (1, *ranks, last)
    cores = [
        torch.randn(groups, bonds[k], o, i, bonds[k + 1], dtype=F64)
        for k, (o, i) in enumerate(zip(out_modes, in_modes, strict=True))
    ]
    x = torch.randn(4, groups, 24, last, columns, dtype=F64)
    # the open last bond is a trailing part of the column index: T[o, (i, s)]
    closed = [*cores[:-1], cores[-1].reshape(groups, ranks[-1], 2, 3 * last, 1)]
    dense = tt_matrix_to_dense(closed)
    expected = torch.einsum("gon,bgnc->bgoc", dense, x.reshape(4, groups, 24 * last, columns))
    assert relative_error(tt_matrix_apply(cores, x), expected) < 1e-12


# ---------------------------------------------------------------------- TT Linear
LINEAR_CASES = [
    (24, 18, {}),
    (64, 48, {"tt_cores": 2}),
    (64, 48, {"tt_cores": 4}),
    (7, 13, {}),
    (1, 5, {}),
    (30, 12, {"tt_in_modes": (2, 3, 5), "tt_out_modes": (3, 2, 2)}),
    (30, 12, {"tt_in_modes": (5, 6)}),
]


@pytest.mark.parametrize(("fan_in", "fan_out", "changes"), LINEAR_CASES)
@pytest.mark.parametrize("bias", [True, False])
def test_tt_linear_is_exact_at_full_rank(
    fan_in: int, fan_out: int, changes: dict[str, Any], bias: bool
) -> None:
    options = OPTIONS.updated(changes)
    linear = nn.Linear(fan_in, fan_out, bias=bias, dtype=F64)
    shape = LayerShape.from_module(linear)
    layer = TTLinear.from_module(linear, TTLinear.full_rank(shape, options), options)
    x = torch.randn(3, 2, fan_in, dtype=F64)
    with torch.no_grad():
        assert relative_error(layer(x), linear(x)) < 1e-10
        assert relative_error(layer(x[0, 0]), linear(x[0, 0])) < 1e-10
        assert relative_error(layer.to_dense()(x), linear(x)) < 1e-10
    assert TTLinear.param_count(shape, layer.ranks, options) == sum(
        p.numel() for p in layer.parameters()
    )
    if "tt_in_modes" in changes:
        assert layer.in_modes == changes["tt_in_modes"]
    assert math.prod(layer.in_modes) == fan_in and math.prod(layer.out_modes) == fan_out


def test_tt_linear_recovers_a_weight_of_exact_tt_ranks() -> None:
    shape = LayerShape(kind="linear", in_channels=60, out_channels=48)
    target = TTLinear(shape, (3, 5), OPTIONS, dtype=F64)
    linear = target.to_dense()
    layer = TTLinear.from_module(linear, (3, 5), OPTIONS)
    assert relative_error(layer.dense_weight(), linear.weight) < 1e-10
    lower = TTLinear.from_module(linear, (3, 4), OPTIONS)
    assert relative_error(lower.dense_weight(), linear.weight) > 1e-3


def test_tt_linear_pads_bonds_that_came_out_smaller() -> None:
    # bond sizes (4, 2, 4): after bond 1 is cut to 1, bond 2 holds at most 2 of the 4 asked
    options = OPTIONS.updated({"tt_in_modes": (2, 2, 2), "tt_out_modes": (2, 1, 2)})
    linear = nn.Linear(8, 4, dtype=F64)
    layer = TTLinear.from_module(linear, (1, 4), options)
    assert [tuple(c.shape) for c in layer.cores] == [(1, 2, 2, 1), (1, 1, 2, 4), (4, 2, 2, 1)]
    reference = tt_matrix(linear.weight.detach(), (2, 1, 2), (2, 2, 2), (1, 4))
    assert relative_error(layer.dense_weight(), tt_matrix_to_dense(reference)) < 1e-12


def test_tt_linear_structure_rebuilds_the_same_layer() -> None:
    options = OPTIONS.updated({"tt_cores": 2})
    linear = nn.Linear(40, 36)
    layer = TTLinear.from_module(linear, 5, options)
    empty = TTLinear(layer.shape, layer.ranks, DecomposeOptions().updated(layer.structure()))
    assert (empty.in_modes, empty.out_modes) == (layer.in_modes, layer.out_modes)
    empty.load_state_dict(layer.state_dict())
    x = torch.randn(3, 40)
    with torch.no_grad():
        assert torch.equal(empty(x), layer(x))


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"tt_in_modes": (4, 5)}, r"tt_in_modes \(4, 5\) multiply to 20.*24"),
        ({"tt_out_modes": (3, 3)}, r"tt_out_modes \(3, 3\) multiply to 9.*18"),
        ({"tt_in_modes": (4, 6), "tt_out_modes": (2, 3, 3)}, "same length"),
        ({"tt_cores": 1}, "at least 2 cores"),
        ({"tt_in_modes": (4, 0, 6)}, "positive integers"),
    ],
)
def test_tt_linear_refuses_bad_modes(changes: dict[str, Any], match: str) -> None:
    options = OPTIONS.updated(changes)
    with pytest.raises(UnsupportedLayerError, match=match):
        TTLinear.from_module(nn.Linear(24, 18), 2, options, name="fc")
    with pytest.raises(UnsupportedLayerError, match="fc"):
        TTLinear.normalize_rank(LayerShape.from_module(nn.Linear(24, 18)), 2, options, "fc")


def test_tt_linear_recompressed_rounds_without_the_dense_weight(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    linear = nn.Linear(48, 60, dtype=F64)
    layer = TTLinear.from_module(linear, (8, 6), OPTIONS)
    expected = TTLinear.from_module(layer.to_dense(), (4, 3), OPTIONS)

    def forbidden(self: Any) -> torch.Tensor:
        raise AssertionError("dense weight formed")

    monkeypatch.setattr(TTLinear, "dense_weight", forbidden)
    smaller = layer.recompressed((4, 3))
    monkeypatch.undo()
    assert smaller.ranks == (4, 3) and smaller.structure() == layer.structure()
    assert relative_error(smaller.dense_weight(), expected.dense_weight()) < 1e-8
    assert smaller.bias is not None and torch.equal(smaller.bias, linear.bias)


# ---------------------------------------------------------------------- TT Conv2d
CONV_CASES = [
    {"in_channels": 12, "out_channels": 16, "kernel_size": 3, "padding": 1},
    {"in_channels": 8, "out_channels": 6, "kernel_size": (3, 2), "stride": (2, 1), "bias": False},
    {"in_channels": 7, "out_channels": 5, "kernel_size": 3, "padding": "same", "dilation": 2},
    {"in_channels": 6, "out_channels": 9, "kernel_size": 3, "groups": 3, "padding": "valid"},
    {"in_channels": 8, "out_channels": 8, "kernel_size": 3, "groups": 8, "padding": 1},
    {"in_channels": 12, "out_channels": 8, "kernel_size": 1, "stride": 2, "groups": 2},
    {"in_channels": 13, "out_channels": 11, "kernel_size": (1, 5), "padding": (0, 2)},
    {"in_channels": 10, "out_channels": 14, "kernel_size": 2, "padding": "same", "groups": 2},
]


@pytest.mark.parametrize("geometry", CONV_CASES)
@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("cores", [None, 1, 3])
def test_tt_conv2d_is_exact_at_full_rank(
    geometry: dict[str, Any], padding_mode: Any, cores: int | None
) -> None:
    options = OPTIONS.updated({"tt_cores": cores})
    conv = nn.Conv2d(padding_mode=padding_mode, dtype=F64, **geometry)
    shape = LayerShape.from_module(conv)
    layer = TTConv2d.from_module(conv, TTConv2d.full_rank(shape, options), options)
    x = torch.randn(2, conv.in_channels, 9, 10, dtype=F64)
    with torch.no_grad():
        expected = conv(x)
        for contraction in ("tt", "dense", "auto"):
            layer.contraction = contraction
            assert relative_error(layer(x), expected) < 1e-10, contraction
        assert relative_error(layer(x[0]), expected[0]) < 1e-10
        assert relative_error(layer.to_dense()(x), expected) < 1e-10
    assert TTConv2d.param_count(shape, layer.ranks, options) == sum(
        p.numel() for p in layer.parameters()
    )


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("ranks", [(3, 2), (1, 9), (5, 1)])
def test_tt_conv2d_recovers_a_kernel_of_exact_tt_ranks(groups: int, ranks: tuple[int, ...]) -> None:
    shape = LayerShape(
        kind="conv2d",
        in_channels=8 * groups,
        out_channels=12 * groups,
        kernel_size=(3, 3),
        padding=(1, 1),
        groups=groups,
    )
    target = TTConv2d(shape, ranks, OPTIONS, dtype=F64)
    conv = target.to_dense()
    layer = TTConv2d.from_module(conv, ranks, OPTIONS)
    assert relative_error(layer.dense_weight(), conv.weight) < 1e-10
    x = torch.randn(2, shape.in_channels, 7, 7, dtype=F64)
    layer.contraction = "tt"
    with torch.no_grad():
        assert relative_error(layer(x), conv(x)) < 1e-10
    conv32 = TTConv2d(shape, ranks, OPTIONS).to_dense()
    layer32 = TTConv2d.from_module(conv32, ranks, OPTIONS)
    assert relative_error(layer32.dense_weight().double(), conv32.weight.double()) < 1e-5


@pytest.mark.parametrize("ranks", [(1, 1), (4, 2), (10, 9), (24, 5)])
@pytest.mark.parametrize("groups", [1, 4])
def test_tt_conv2d_param_count(ranks: tuple[int, ...], groups: int) -> None:
    shape = LayerShape.from_module(nn.Conv2d(32, 48, 3, groups=groups))
    full = TTConv2d.full_rank(shape, OPTIONS)
    ranks = tuple(min(r, f) for r, f in zip(ranks, full, strict=True))
    layer = TTConv2d(shape, ranks, OPTIONS)
    assert TTConv2d.param_count(shape, ranks, OPTIONS) == sum(p.numel() for p in layer.parameters())


def test_tt_conv2d_recompressed_rounds_without_the_dense_weight(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    conv = nn.Conv2d(12, 16, 3, padding=1, groups=2, dtype=F64)
    layer = TTConv2d.from_module(conv, (12, 9), OPTIONS)
    expected = TTConv2d.from_module(layer.to_dense(), (5, 4), OPTIONS)

    def forbidden(self: Any) -> torch.Tensor:
        raise AssertionError("dense weight formed")

    monkeypatch.setattr(TTConv2d, "dense_weight", forbidden)
    smaller = layer.recompressed((5, 4))
    monkeypatch.undo()
    assert smaller.ranks == (5, 4) and smaller.structure() == layer.structure()
    assert relative_error(smaller.dense_weight(), expected.dense_weight()) < 1e-8


def test_tt_conv2d_contraction_choice_follows_the_cost() -> None:
    shape = LayerShape.from_module(nn.Conv2d(64, 64, 3, padding=1))
    cheap = TTConv2d(shape, (2, 2), OPTIONS)  # ~300x fewer parameters: the sweep wins
    costly = TTConv2d(shape, (48, 9), OPTIONS)
    x = torch.randn(2, 64, 8, 8)
    assert not cheap._dense_is_cheaper(x)
    assert costly._dense_is_cheaper(x)
    costly.contraction = "sideways"
    with pytest.raises(ValueError, match="contraction"):
        costly(x)


def test_tt_conv2d_refuses_bad_modes() -> None:
    conv = nn.Conv2d(12, 8, 3, groups=2)  # 6 in / 4 out per group
    with pytest.raises(UnsupportedLayerError, match=r"tt_in_modes \(3, 3\) multiply to 9.*6"):
        TTConv2d.from_module(conv, 2, OPTIONS.updated({"tt_in_modes": (3, 3)}), name="conv")


@pytest.mark.parametrize("cls", [TTLinear, TTConv2d])
def test_gradients_reach_every_core(cls: type[TTLinear] | type[TTConv2d]) -> None:
    module: nn.Module = nn.Linear(24, 18) if cls is TTLinear else nn.Conv2d(12, 16, 3, padding=1)
    layer = cls.from_module(module, 3, OPTIONS)
    x = torch.randn(2, 24) if cls is TTLinear else torch.randn(2, 12, 6, 6)
    contractions = ["tt", "dense"] if cls is TTConv2d else ["tt"]
    for contraction in contractions:
        layer.contraction = contraction
        layer.zero_grad()
        layer(x).square().sum().backward()
        grads = [p.grad for p in layer.parameters()]
        assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("cls", [TTLinear, TTConv2d])
@pytest.mark.parametrize("fraction", [1.0, 0.5, 0.0])
def test_empty_layer_weight_scale_is_the_dense_init(
    cls: type[TTLinear] | type[TTConv2d], fraction: float
) -> None:
    module = nn.Linear(256, 192) if cls is TTLinear else nn.Conv2d(64, 96, 3)
    shape = LayerShape.from_module(module)
    ranks = tuple(max(1, int(f * fraction)) for f in cls.full_rank(shape, OPTIONS))
    for seed in range(3):
        torch.manual_seed(seed)
        layer = cls(shape, ranks, OPTIONS)
        ratio = float(layer.dense_weight().detach().std() / module.weight.detach().std())
        assert 0.5 < ratio < 2.0, (ranks, ratio)
        bias = layer.dense_bias()
        assert bias is not None and float(bias.abs().max()) <= 1 / math.sqrt(
            shape.in_per_group * shape.kernel_numel
        )


def test_pad_tt_ranks_keeps_the_tensor() -> None:
    cores = random_tt((3, 4, 5), (2, 3))
    padded = pad_tt_ranks(cores, (3, 5))
    assert [tuple(c.shape) for c in padded] == [(1, 3, 3), (3, 4, 5), (5, 5, 1)]
    assert torch.equal(tt_to_dense(padded), tt_to_dense(cores))
