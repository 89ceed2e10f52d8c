"""Hierarchical Tucker: the tree, HT-SVD, truncation, contraction, and the HT layers."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import stagecomp as sc
from stagecomp.decompositions.ht import (
    DimensionTree,
    ht_full_ranks,
    ht_matricization,
    ht_matrix_apply,
    ht_matrix_sweep,
    ht_nested_ranks,
    ht_orthogonalize,
    ht_param_count,
    ht_svd,
    ht_to_dense,
    ht_truncate,
    pad_ht_ranks,
)
from stagecomp.errors import UnsupportedLayerError
from stagecomp.layer_shape import LayerShape
from stagecomp.layers.ht_conv2d import HTConv2d
from stagecomp.layers.ht_linear import HTLinear
from stagecomp.methods import get_method
from stagecomp.options import DecomposeOptions
from stagecomp.strategies.base import RankRequest

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
    return float((actual - expected).detach().norm() / expected.detach().norm().clamp_min(1e-30))


def random_ht(
    sizes: tuple[int, ...], ranks: tuple[int, ...], seed: int = 0, batch: tuple[int, ...] = ()
) -> tuple[DimensionTree, list[torch.Tensor]]:
    """Random factors of the given edge ranks over the balanced tree."""
    tree = DimensionTree.balanced(len(sizes))
    per_node = tree.node_ranks(ranks)
    generator = torch.Generator().manual_seed(seed)
    factors = []
    for node, pair in enumerate(tree.children):
        if pair is None:
            shape: tuple[int, ...] = (sizes[tree.spans[node][0]], per_node[node])
        else:
            shape = (per_node[node], per_node[pair[0]], per_node[pair[1]])
        factors.append(torch.randn(*batch, *shape, dtype=F64, generator=generator))
    return tree, factors


def edge_singular_values(tensor: torch.Tensor, tree: DimensionTree) -> list[torch.Tensor]:
    return [torch.linalg.svdvals(ht_matricization(tensor, tree, e[0])) for e in tree.edges()]


# ---------------------------------------------------------------------- tree
def test_balanced_tree_layout_and_rank_order() -> None:
    tree = DimensionTree.balanced(4)
    assert tree.spans == ((0, 4), (0, 2), (2, 4), (0, 1), (1, 2), (2, 3), (3, 4))
    assert tree.children == ((1, 2), (3, 4), (5, 6), None, None, None, None)
    # Documented order: the root's two children share the first rank, then breadth first.
    assert tree.edges() == ((1, 2), (3,), (4,), (5,), (6,))
    assert tree.node_ranks((9, 1, 2, 3, 4)) == (1, 9, 9, 1, 2, 3, 4)
    assert tree.edge_ranks(tree.node_ranks((9, 1, 2, 3, 4))) == (9, 1, 2, 3, 4)
    assert [tree.parent(n) for n in range(1, 7)] == [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)]
    odd = DimensionTree.balanced(5)  # left child takes the larger half
    assert odd.spans[:3] == ((0, 5), (0, 3), (3, 5))
    assert [len(DimensionTree.balanced(d).edges()) for d in range(2, 8)] == [
        2 * d - 3 for d in range(2, 8)
    ]
    assert [tree.leaf(m) for m in range(4)] == [3, 4, 5, 6]
    with pytest.raises(ValueError, match="at least 2 modes"):
        DimensionTree.balanced(1)
    with pytest.raises(ValueError, match="needs 5 ranks"):
        tree.node_ranks((1, 2, 3))


def test_full_ranks_and_param_count() -> None:
    tree = DimensionTree.balanced(4)
    assert ht_full_ranks((4, 5, 6, 3), tree) == (18, 4, 5, 6, 3)
    assert ht_full_ranks((2, 3, 2)) == (2, 2, 3)  # (r_{12|3}, r_1, r_2)
    # Leaves n_t r_t, transfer tensors r_t r_l r_r, root r r.
    assert ht_param_count((4, 5, 6, 3), (2, 3, 1, 2, 2), tree) == (
        4 * 3 + 5 * 1 + 6 * 2 + 3 * 2 + 2 * 3 * 1 + 2 * 2 * 2 + 2 * 2
    )


def test_nested_ranks_lower_what_the_tree_cannot_hold() -> None:
    tree = DimensionTree.balanced(4)
    assert ht_nested_ranks(tree, (2046, 32, 32, 32, 32)) == (1024, 32, 32, 32, 32)
    assert ht_nested_ranks(tree, (3, 1, 5, 2, 2)) == (3, 1, 3, 2, 2)  # r_2 <= r_12 r_1
    assert ht_nested_ranks(tree, (8, 1, 1, 8, 8)) == (1, 1, 1, 8, 8)  # shared root rank
    assert ht_nested_ranks(tree, (5, 5, 5, 5, 5)) == (5, 5, 5, 5, 5)
    shape = LayerShape.from_module(nn.Linear(4096, 4096))
    assert HTLinear.normalize_rank(shape, (2046, 32, 32, 32, 32)) == (1024, 32, 32, 32, 32)
    assert HTLinear.normalize_rank(shape, 40) == (40,) * 5  # an int cap is always nested
    assert HTLinear.param_count(shape, (2046, 32, 32, 32, 32), OPTIONS) == HTLinear.param_count(
        shape, (1024, 32, 32, 32, 32), OPTIONS
    )
    small = LayerShape.from_module(nn.Linear(64, 48))
    layer = HTLinear(small, (16, 1, 1, 4, 4), OPTIONS)  # built directly: lowered too
    assert layer.ranks == (1, 1, 1, 4, 4)
    assert sum(p.numel() for p in layer.parameters()) == HTLinear.param_count(
        small, (16, 1, 1, 4, 4), OPTIONS
    )


# ---------------------------------------------------------------------- HT-SVD
@pytest.mark.parametrize("sizes", [(4, 5, 6, 3), (2, 3), (3, 4, 5), (2, 3, 2, 3, 2), (6, 1, 4)])
def test_ht_svd_is_exact_at_full_rank(sizes: tuple[int, ...]) -> None:
    tensor = torch.randn(*sizes, dtype=F64, generator=torch.Generator().manual_seed(1))
    dense = ht_to_dense(ht_svd(tensor), DimensionTree.balanced(len(sizes)))
    assert relative_error(dense, tensor) < 1e-14  # ~1e-15 observed


@pytest.mark.parametrize(
    ("sizes", "ranks"),
    [
        ((4, 5, 6, 3), (3, 2, 4, 2, 3)),
        ((3, 4, 5), (3, 3, 1)),
        ((2, 3, 2, 3, 2), (3, 4, 2, 2, 2, 2, 2)),
    ],
)
def test_ht_svd_recovers_a_tensor_of_exact_ht_ranks(
    sizes: tuple[int, ...], ranks: tuple[int, ...]
) -> None:
    """Nested ranks (each at most what its neighbours' ranks allow) are the exact ranks
    of random factors, so none can be lowered without losing something."""
    tree, factors = random_ht(sizes, ranks, seed=2)
    tensor = ht_to_dense(factors, tree)
    recovered = ht_svd(tensor, ranks, tree=tree)
    assert relative_error(ht_to_dense(recovered, tree), tensor) < 1e-12
    # One rank less on any edge is not enough: the test above can fail.
    for k in range(len(ranks)):
        smaller = tuple(r - (j == k) for j, r in enumerate(ranks))
        if smaller[k] >= 1:
            approx = ht_to_dense(ht_svd(tensor, smaller, tree=tree), tree)
            assert relative_error(approx, tensor) > 1e-6


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize(
    ("sizes", "fraction"), [((4, 5, 6, 3), 0.5), ((3, 3, 3, 3, 3), 0.4), ((6, 5, 4), 0.6)]
)
def test_ht_svd_is_quasi_optimal(sizes: tuple[int, ...], fraction: float, seed: int) -> None:
    """Grasedyck 2010, Theorem 3.11: ``||A - A_H||^2 <= sum of the edges' squared tails``.

    Every HT of these ranks has each matricization's rank at most the edge's rank,
    so the largest tail is a lower bound on the best error: the result is within
    ``sqrt(2d - 3)`` of the best.
    """
    tensor = torch.randn(*sizes, dtype=F64, generator=torch.Generator().manual_seed(seed))
    tree = DimensionTree.balanced(len(sizes))
    ranks = tuple(max(1, round(f * fraction)) for f in ht_full_ranks(sizes, tree))
    error = float((ht_to_dense(ht_svd(tensor, ranks, tree=tree), tree) - tensor).norm())
    tails = [
        float(s[r:].square().sum())
        for s, r in zip(edge_singular_values(tensor, tree), ranks, strict=True)
    ]
    best_lower_bound = math.sqrt(max(tails))
    assert best_lower_bound <= error * (1 + 1e-12)
    assert error <= math.sqrt(sum(tails)) * (1 + 1e-12)
    assert error <= math.sqrt(2 * len(sizes) - 3) * best_lower_bound * (1 + 1e-12)


def test_ht_svd_caps_ranks_and_rejects_bad_ones() -> None:
    tensor = torch.randn(2, 3, 4, dtype=F64)
    factors = ht_svd(tensor, 100)
    assert relative_error(ht_to_dense(factors, DimensionTree.balanced(3)), tensor) < 1e-13
    assert factors[0].shape == (1, 4, 4)  # root edge capped at min(6, 4)
    for bad in [(1, 2), 0, (1, 2, 2.5), True]:
        with pytest.raises(ValueError, match="ranks"):
            ht_svd(tensor, bad)  # type: ignore[arg-type]


def test_randomized_solver_gives_the_same_truncation() -> None:
    tree, factors = random_ht((8, 8, 8, 8), (30, 6, 6, 6, 6), seed=3)
    tensor = ht_to_dense(factors, tree)
    exact = ht_to_dense(ht_svd(tensor, 30, tree=tree), tree)
    fast = ht_to_dense(ht_svd(tensor, 30, tree=tree, solver="randomized", seed=1), tree)
    assert relative_error(exact, tensor) < 1e-12 and relative_error(fast, tensor) < 1e-10


# ---------------------------------------------------------------------- from the factors
def test_orthogonalize_keeps_the_tensor_and_orthonormalises_the_frames() -> None:
    tree, factors = random_ht((4, 5, 6, 3), (3, 2, 4, 2, 3), seed=4, batch=(2,))
    orth = ht_orthogonalize(factors, tree)
    assert relative_error(ht_to_dense(orth, tree), ht_to_dense(factors, tree)) < 1e-13
    for node, pair in enumerate(tree.children):
        if node == 0:
            continue
        f = orth[node]
        matrix = f if pair is None else f.reshape(2, f.shape[1], -1).transpose(1, 2)
        gram = matrix.transpose(1, 2) @ matrix
        assert torch.allclose(gram, torch.eye(gram.shape[-1], dtype=F64).expand_as(gram))


@pytest.mark.parametrize("new", [(4, 2, 3, 2, 2), (1, 1, 1, 1, 1), 3, (9, 4, 5, 6, 3)])
def test_truncate_equals_ht_svd_of_the_dense(new: Any) -> None:
    tree, factors = random_ht((4, 5, 6, 3), (9, 4, 5, 6, 3), seed=5, batch=(3,))
    truncated = ht_truncate(factors, tree, new)
    for g in range(3):
        dense = ht_to_dense([f[g] for f in factors], tree)
        expected = ht_to_dense(ht_svd(dense, new, tree=tree), tree)
        assert relative_error(ht_to_dense([f[g] for f in truncated], tree), expected) < 1e-10


def test_truncate_pads_what_an_edge_cannot_hold() -> None:
    tree, factors = random_ht((2, 2, 2, 2), (2, 1, 1, 1, 1), seed=6)  # every edge holds 1
    out = ht_truncate(factors, tree, (3, 2, 2, 2, 2))
    assert [tuple(f.shape) for f in out] == [(1, 3, 3), (3, 2, 2), (3, 2, 2)] + [(2, 2)] * 4
    assert relative_error(ht_to_dense(out, tree), ht_to_dense(factors, tree)) < 1e-13
    padded = pad_ht_ranks(factors, tree, (2, 2, 1, 1, 1))
    assert torch.equal(ht_to_dense(padded, tree), ht_to_dense(factors, tree))
    with pytest.raises(ValueError, match="larger than ranks"):
        pad_ht_ranks(out, tree, (1, 1, 1, 1, 1))


# ---------------------------------------------------------------------- contraction
@pytest.mark.parametrize("groups", [1, 3])
@pytest.mark.parametrize("firsts", [None, (0, 0, 0), (1, 1, 1), (0, 1, 0)])
def test_sweep_matches_the_dense_product(groups: int, firsts: tuple[int, ...] | None) -> None:
    out_modes, in_modes = (2, 3, 1, 2), (3, 2, 2, 2)
    sizes = tuple(o * i for o, i in zip(out_modes, in_modes, strict=True))
    tree, factors = random_ht(sizes, (5, 3, 4, 2, 3), seed=7, batch=(groups,))
    order = None if firsts is None else (*firsts, 0, 0, 0, 0)
    sweep = ht_matrix_sweep(
        tree, tree.node_ranks((5, 3, 4, 2, 3)), out_modes, in_modes, groups=groups, firsts=order
    )
    dense = ht_to_dense(factors, tree).reshape(groups, 2, 3, 3, 2, 1, 2, 2, 2)
    matrix = dense.permute(0, 1, 3, 5, 7, 2, 4, 6, 8).reshape(groups, 12, 24)
    x = torch.randn(5, groups, 24, 7, dtype=F64)
    expected = torch.einsum("goi,bgic->bgoc", matrix, x)
    assert relative_error(ht_matrix_apply(factors, sweep, x), expected) < 1e-13


def test_the_sweep_order_is_the_cheapest() -> None:
    tree = DimensionTree.balanced(4)
    ranks = tree.node_ranks((96, 8, 8, 8, 6))
    modes = ((4, 4, 4, 3), (4, 4, 4, 4))
    best = ht_matrix_sweep(tree, ranks, *modes)
    every = [
        ht_matrix_sweep(tree, ranks, *modes, firsts=(a, b, c, 0, 0, 0, 0)).macs
        for a, b, c in itertools.product((0, 1), repeat=3)
    ]
    assert best.macs == min(every) < max(every)


# ---------------------------------------------------------------------- layers
LINEAR_CASES = [(24, 18, None), (48, 60, 3), (7, 5, None), (16, 16, 2), (1, 9, None)]


@pytest.mark.parametrize(("in_features", "out_features", "cores"), LINEAR_CASES)
def test_ht_linear_is_exact_at_full_rank(
    in_features: int, out_features: int, cores: int | None
) -> None:
    options = OPTIONS.updated({"ht_cores": cores})
    linear = nn.Linear(in_features, out_features, dtype=F64)
    shape = LayerShape.from_module(linear)
    layer = HTLinear.from_module(linear, HTLinear.full_rank(shape, options), options)
    x = torch.randn(3, 2, in_features, dtype=F64)
    with torch.no_grad():
        for contraction in ("ht", "dense", "auto"):
            layer.contraction = contraction
            assert relative_error(layer(x), linear(x)) < 1e-13, contraction
        assert relative_error(layer.to_dense()(x), linear(x)) < 1e-14
    assert HTLinear.param_count(shape, layer.ranks, options) == sum(
        p.numel() for p in layer.parameters()
    )


def test_ht_linear_recovers_a_weight_of_exact_ht_ranks() -> None:
    shape = LayerShape.from_module(nn.Linear(96, 64))
    ranks = (5, 3, 2, 4, 2)
    target = HTLinear(shape, ranks, OPTIONS, dtype=F64)
    linear = target.to_dense()
    layer = HTLinear.from_module(linear, ranks, OPTIONS)
    assert relative_error(layer.dense_weight(), linear.weight) < 1e-12
    layer32 = HTLinear.from_module(HTLinear(shape, ranks, OPTIONS).to_dense(), ranks, OPTIONS)
    assert layer32.factors[0].dtype == torch.float32


def test_ht_linear_refuses_bad_modes() -> None:
    with pytest.raises(UnsupportedLayerError, match=r"ht_in_modes \(5, 5\) multiply to 25.*24"):
        HTLinear.from_module(nn.Linear(24, 18), 2, OPTIONS.updated({"ht_in_modes": (5, 5)}))
    with pytest.raises(UnsupportedLayerError, match=r"fc.*at least 2 leaves"):
        sc.decompose(
            nn.Linear(24, 18), "ht", 2, options=OPTIONS.updated({"ht_cores": 1}), name="fc"
        )


CONV_CASES = [
    {"in_channels": 12, "out_channels": 16, "kernel_size": 3, "padding": 1},
    {"in_channels": 8, "out_channels": 6, "kernel_size": (3, 2), "stride": (2, 1), "bias": False},
    {"in_channels": 7, "out_channels": 5, "kernel_size": 3, "padding": "same", "dilation": 2},
    {"in_channels": 6, "out_channels": 9, "kernel_size": 3, "groups": 3, "padding": "valid"},
    {"in_channels": 8, "out_channels": 8, "kernel_size": 3, "groups": 8, "padding": 1},
    {"in_channels": 12, "out_channels": 8, "kernel_size": 1, "stride": 2, "groups": 2},
    {"in_channels": 13, "out_channels": 11, "kernel_size": (1, 5), "padding": (0, 2)},
    {"in_channels": 16, "out_channels": 24, "kernel_size": 2, "padding": "same", "groups": 2},
]


@pytest.mark.parametrize("geometry", CONV_CASES)
@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("cores", [None, 1, 2])
def test_ht_conv2d_is_exact_at_full_rank(
    geometry: dict[str, Any], padding_mode: Any, cores: int | None
) -> None:
    options = OPTIONS.updated({"ht_cores": cores})
    conv = nn.Conv2d(padding_mode=padding_mode, dtype=F64, **geometry)
    shape = LayerShape.from_module(conv)
    layer = HTConv2d.from_module(conv, HTConv2d.full_rank(shape, options), options)
    x = torch.randn(2, conv.in_channels, 9, 10, dtype=F64)
    with torch.no_grad():
        expected = conv(x)
        for contraction in ("ht", "dense", "auto"):
            layer.contraction = contraction
            assert relative_error(layer(x), expected) < 1e-13, contraction
        assert relative_error(layer(x[0]), expected[0]) < 1e-13
        assert relative_error(layer.to_dense()(x), expected) < 1e-14
    assert HTConv2d.param_count(shape, layer.ranks, options) == sum(
        p.numel() for p in layer.parameters()
    )


@pytest.mark.parametrize("geometry", CONV_CASES)
def test_ht_conv2d_sweep_equals_its_dense_kernel_at_low_rank(geometry: dict[str, Any]) -> None:
    """Away from full rank the factors are arbitrary: the sweep must still be the kernel's."""
    conv = nn.Conv2d(padding_mode="reflect", dtype=F64, **geometry)
    full = HTConv2d.full_rank(LayerShape.from_module(conv), OPTIONS)
    layer = sc.decompose(conv, "ht", min(2, max(full)))
    x = torch.randn(3, conv.in_channels, 8, 7, dtype=F64)
    with torch.no_grad():
        layer.contraction = "ht"
        swept = layer(x)
        assert relative_error(swept, layer.to_dense()(x)) < 1e-13
        if layer.ranks != full:
            assert relative_error(swept, conv(x)) > 1e-3  # rank 2 does lose something


@pytest.mark.parametrize("groups", [1, 2])
@pytest.mark.parametrize("ranks", [(3, 2, 2, 3, 2), (1, 1, 1, 1, 1), (6, 3, 5, 2, 4)])
def test_ht_conv2d_recovers_a_kernel_of_exact_ht_ranks(groups: int, ranks: tuple[int, ...]) -> None:
    shape = LayerShape(
        kind="conv2d",
        in_channels=16 * groups,
        out_channels=24 * groups,
        kernel_size=(3, 3),
        padding=(1, 1),
        groups=groups,
    )
    target = HTConv2d(shape, ranks, OPTIONS, dtype=F64)
    conv = target.to_dense()
    layer = HTConv2d.from_module(conv, ranks, OPTIONS)
    assert relative_error(layer.dense_weight(), conv.weight) < 1e-12
    x = torch.randn(2, shape.in_channels, 7, 7, dtype=F64)
    layer.contraction = "ht"
    with torch.no_grad():
        assert relative_error(layer(x), conv(x)) < 1e-12


@pytest.mark.parametrize(
    ("module", "old", "new"),
    [
        (nn.Linear(48, 60, dtype=F64), (12, 4, 4, 3, 4), (5, 2, 3, 2, 2)),
        (nn.Conv2d(16, 24, 3, padding=1, groups=2, dtype=F64), (12, 4, 4, 4, 6), (5, 3, 2, 2, 3)),
    ],
    ids=["linear", "conv"],
)
def test_recompressed_truncates_without_the_dense_weight(
    module: nn.Module, old: tuple[int, ...], new: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    layer = sc.decompose(module, "ht", old)
    expected = sc.decompose(layer.to_dense(), "ht", new)
    cls = type(layer)

    def forbidden(self: Any) -> torch.Tensor:
        raise AssertionError("dense weight formed")

    monkeypatch.setattr(cls, "dense_weight", forbidden)
    smaller = layer.recompressed(new)
    monkeypatch.undo()
    assert smaller.ranks == expected.ranks and smaller.structure() == layer.structure()
    assert relative_error(smaller.dense_weight(), expected.dense_weight()) < 1e-9
    params = sum(p.numel() for p in smaller.parameters())
    assert params < sum(p.numel() for p in layer.parameters())
    assert smaller.dense_bias() is not None and torch.equal(smaller.dense_bias(), module.bias)


@pytest.mark.parametrize("cls", [HTLinear, HTConv2d])
def test_recompression_never_adds_parameters(cls: type[HTLinear] | type[HTConv2d]) -> None:
    module = nn.Linear(64, 48) if cls is HTLinear else nn.Conv2d(16, 24, 3)
    shape = LayerShape.from_module(module)
    layer = sc.decompose(module, "ht", tuple(max(1, f // 2) for f in cls.full_rank(shape, OPTIONS)))
    for cap in (64, 8, 3, 1):  # each rank capped where it is (an int caps the full ranks)
        smaller = layer.recompressed(tuple(min(cap, r) for r in layer.ranks))
        assert all(n <= o for n, o in zip(smaller.ranks, layer.ranks, strict=True))
        assert sum(p.numel() for p in smaller.parameters()) <= sum(
            p.numel() for p in layer.parameters()
        )
        layer = smaller


def test_contraction_choice_follows_the_cost() -> None:
    shape = LayerShape.from_module(nn.Conv2d(64, 64, 3, padding=1))
    cheap = HTConv2d(shape, (2,) * 5, OPTIONS)
    costly = HTConv2d(shape, HTConv2d.full_rank(shape, OPTIONS), OPTIONS)
    positions = 2 * 8 * 8
    assert cheap.contraction_macs(positions)[0] < cheap.contraction_macs(positions)[1]
    assert not cheap._dense_is_cheaper(positions)
    assert costly._dense_is_cheaper(positions)
    costly.contraction = "sideways"
    with pytest.raises(ValueError, match="contraction"):
        costly(torch.randn(2, 64, 8, 8))


@pytest.mark.parametrize(
    ("module", "x"),
    [
        (nn.Linear(64, 48), torch.randn(7, 64)),
        (nn.Linear(256, 192), torch.randn(3, 5, 256)),
        (nn.Conv2d(16, 24, 3, padding=1), torch.randn(2, 16, 8, 8)),
        (nn.Conv2d(12, 18, 3, stride=2, groups=3), torch.randn(2, 12, 9, 9)),
        (nn.Conv2d(32, 32, (3, 1), groups=2, padding="same", padding_mode="circular"), None),
    ],
    ids=["linear", "linear3d", "conv", "grouped", "circular"],
)
@pytest.mark.parametrize("fraction", [0.5, 0.1])
def test_fvcore_counts_the_real_macs(
    module: nn.Module, x: torch.Tensor | None, fraction: float
) -> None:
    x = torch.randn(1, 32, 6, 6) if x is None else x
    shape = LayerShape.from_module(module)
    cls = get_method("ht").layer_class(shape)
    layer = sc.decompose(
        module, "ht", tuple(max(1, int(f * fraction)) for f in cls.full_rank(shape, OPTIONS))
    )
    with torch.no_grad():
        positions = x[..., 0].numel() if shape.kind == "linear" else module(x)[:, 0].numel()
    sweep, dense = layer.contraction_macs(positions)
    for contraction, expected in (("ht", sweep), ("dense", dense)):
        layer.contraction = contraction
        assert sc.model_stats(layer, x).macs == expected, contraction
    dense_macs = sc.model_stats(module, x).macs
    assert dense == layer._assembly_macs + dense_macs  # the dense route: rebuild, then the layer


@pytest.mark.parametrize("cls", [HTLinear, HTConv2d])
def test_gradients_reach_every_factor(cls: type[HTLinear] | type[HTConv2d]) -> None:
    module: nn.Module = nn.Linear(24, 18) if cls is HTLinear else nn.Conv2d(12, 16, 3, padding=1)
    layer = cls.from_module(module, 3, OPTIONS)
    x = torch.randn(2, 24) if cls is HTLinear else torch.randn(2, 12, 6, 6)
    for contraction in ("ht", "dense"):
        layer.contraction = contraction
        layer.zero_grad()
        layer(x).square().sum().backward()
        grads = [p.grad for p in layer.parameters()]
        assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("cls", [HTLinear, HTConv2d])
@pytest.mark.parametrize("fraction", [1.0, 0.5, 0.0])
def test_empty_layer_weight_scale_is_the_dense_init(
    cls: type[HTLinear] | type[HTConv2d], fraction: float
) -> None:
    module = nn.Linear(256, 192) if cls is HTLinear else nn.Conv2d(64, 96, 3)
    shape = LayerShape.from_module(module)
    ranks = tuple(max(1, int(f * fraction)) for f in cls.full_rank(shape, OPTIONS))
    for seed in range(3):
        torch.manual_seed(seed)
        layer = sc.empty_layer(shape, "ht", ranks)
        ratio = float(layer.dense_weight().detach().std() / module.weight.detach().std())
        assert 0.5 < ratio < 2.0, (ranks, ratio)


# ---------------------------------------------------------------------- strategies
def _request(module: nn.Module, stage: int = 0, stages: int = 1) -> RankRequest:
    shape = LayerShape.from_module(module)
    cls = get_method("ht").layer_class(shape)
    return RankRequest("layer", cls, shape, module, stage, stages, OPTIONS)


@pytest.mark.parametrize(
    "module", [nn.Linear(64, 48), nn.Conv2d(16, 24, 3, groups=2)], ids=["linear", "conv"]
)
def test_strategies_give_valid_ranks(module: nn.Module) -> None:
    torch.manual_seed(0)
    request = _request(module)
    cls, shape = request.cls, request.shape
    full = cls.full_rank(shape, OPTIONS)
    for rate in (2.0, 4.0):
        ranks = sc.Reduction(rate).choose_ranks(request)
        assert cls.normalize_rank(shape, ranks, OPTIONS) == ranks
        assert cls.param_count(shape, ranks, OPTIONS) <= shape.dense_params / rate
    assert sc.Manual(rank=3).choose_ranks(request) == tuple(min(3, f) for f in full)
    # VBMF on a weight of exact HT ranks plus a little noise finds about those ranks.
    exact = (3, 2, 2, 2, 2)
    target = cls(shape, exact, OPTIONS).to_dense()
    with torch.no_grad():
        target.weight.add_(1e-4 * target.weight.std() * torch.randn_like(target.weight))
    found = sc.VBMF().choose_ranks(_request(target))
    assert cls.normalize_rank(shape, found, OPTIONS) == found
    assert all(abs(f - e) <= 1 for f, e in zip(found, exact, strict=True)), found
    # At a later stage VBMF reads the decomposed layer and never grows a rank.
    layer = sc.decompose(target, "ht", found)
    again = sc.VBMF(weakening=0.5).choose_ranks(_request(layer, 1, 2))
    assert all(a <= f for a, f in zip(again, found, strict=True))


def test_compressor_runs_ht_over_two_stages() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.Flatten(),
        nn.Linear(16 * 36, 32),
        nn.ReLU(),
        nn.Linear(32, 8),
    )
    x = torch.randn(2, 3, 6, 6)
    c = sc.Compressor(
        model,
        sc.Reduction(3.0),
        x,
        methods={"*": "ht"},
        exclude=["0"],
        layers_per_step=3,
        stages=2,
        progress=False,
    )
    while not c.done:
        c.compression_step()
    decomposed = [m for m in model.modules() if isinstance(m, sc.DecomposedLayer)]
    assert {m.method for m in decomposed} == {"ht"} and len(decomposed) == 3
    for name in ("2", "4", "6"):
        layer = model.get_submodule(name)
        assert layer.shape.dense_params / sum(p.numel() for p in layer.parameters()) >= 2.5
    assert model(x).shape == (2, 8)


# ---------------------------------------------------------------------- save / load
def _ht_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.Conv2d(16, 24, 3, padding=1, groups=2),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(24, 18),
    )


def test_save_load_round_trip_is_exact(tmp_path: Path) -> None:
    model = _ht_model()
    model[1] = sc.decompose(model[1], "ht", 3)
    model[4] = sc.decompose(
        model[4], "ht", 2, options=OPTIONS.updated({"ht_in_modes": (4, 6), "ht_out_modes": (3, 6)})
    )
    with torch.no_grad():  # weights that differ from any fresh decomposition
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.eval()
    sc.save(model, tmp_path)
    loaded = sc.load(_ht_model().eval(), tmp_path)
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(loaded(x), model(x))
    assert loaded[4].in_modes == (4, 6) and loaded[4].out_modes == (3, 6)
