"""The interpolative form of the SVD: the same function as ``svd`` with r^2 fewer parameters."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

import stagecomp as sc
from stagecomp.decompositions.interpolative import pivot_rows, row_interpolative
from stagecomp.layer_shape import LayerShape
from stagecomp.layers.interpolative import InterpolativeLayer

OPTIONS = sc.DecomposeOptions()


def test_row_interpolative_reproduces_the_product_with_small_mixing() -> None:
    generator = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(200, 40, dtype=torch.float64, generator=generator))[0]
    c = torch.randn(40, 90, dtype=torch.float64, generator=generator)
    rows, mix, kept = row_interpolative(u, c)
    product = u @ c
    assert sorted(rows.tolist()) == list(range(200))
    assert torch.allclose(kept, product[rows[:40]], atol=1e-12)
    assert torch.allclose(mix @ kept, product[rows[40:]], atol=1e-10)
    # Pivoted QR keeps the kept block well conditioned: no huge mixing weights.
    assert float(mix.abs().max()) < 10.0


def test_pivot_rows_refuses_a_wide_factor() -> None:
    with pytest.raises(ValueError, match="tall"):
        pivot_rows(torch.randn(3, 5))


@pytest.mark.parametrize(
    "module",
    [
        nn.Linear(48, 36, dtype=torch.float64),
        nn.Linear(20, 60, bias=False, dtype=torch.float64),
        nn.Conv2d(12, 18, 3, padding=1, dtype=torch.float64),
        nn.Conv2d(12, 18, 1, groups=3, dtype=torch.float64),
        nn.Conv2d(8, 20, (3, 1), stride=2, groups=2, padding_mode="reflect", padding=1).double(),
    ],
    ids=["linear", "linear-wide", "conv3x3", "conv1x1-groups", "conv-groups-reflect"],
)
@pytest.mark.parametrize("rank", [1, 2, 4])
def test_same_function_as_svd_with_fewer_parameters(module: nn.Module, rank: int) -> None:
    torch.manual_seed(1)
    shape = LayerShape.from_module(module)
    svd = sc.decompose(module, "svd", rank)
    interpolative = sc.decompose(module, "svd_id", rank)
    assert isinstance(interpolative, InterpolativeLayer)
    size = (2, shape.in_channels) if shape.kind == "linear" else (2, shape.in_channels, 9, 10)
    x = torch.randn(size, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(interpolative(x), svd(x), atol=1e-10)
        assert torch.allclose(interpolative.dense_weight(), svd.dense_weight(), atol=1e-10)
    svd_params = sum(p.numel() for p in svd.parameters())
    params = sum(p.numel() for p in interpolative.parameters())
    (kept,) = interpolative.ranks  # a rank above the full rank is capped
    assert params == svd_params - shape.groups * kept * kept


def test_rank_for_a_budget_is_higher_than_svd() -> None:
    """At 1.5x fewer parameters a 384x384 Linear keeps rank 162 instead of 128."""
    shape = LayerShape.from_module(nn.Linear(384, 384, bias=False))
    budget = shape.dense_params / 1.5
    best = {
        method: max(
            r
            for r in range(1, 385)
            if sc.registry.layer_class(method, shape).param_count(shape, (r,), OPTIONS) <= budget
        )
        for method in ("svd", "svd_id")
    }
    assert best == {"svd": 128, "svd_id": 162}


def test_recompressed_equals_a_fresh_truncation() -> None:
    torch.manual_seed(2)
    conv = nn.Conv2d(16, 24, 3, groups=2, dtype=torch.float64)
    layer = sc.decompose(conv, "svd_id", 8)
    smaller = layer.recompressed(3)
    fresh = sc.decompose(layer.to_dense(), "svd", 3)
    with torch.no_grad():
        assert torch.allclose(smaller.dense_weight(), fresh.dense_weight(), atol=1e-10)
    assert smaller.ranks == (3,)


def test_unbatched_conv_input() -> None:
    conv = nn.Conv2d(6, 10, 3, padding=1, dtype=torch.float64)
    layer = sc.decompose(conv, "svd_id", 10)
    x = torch.randn(6, 7, 7, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(layer(x), conv(x), atol=1e-10)


def test_save_and_load_keep_the_output_order(tmp_path: Path) -> None:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(30, 40), nn.ReLU(), nn.Linear(40, 20))
    fresh = nn.Sequential(nn.Linear(30, 40), nn.ReLU(), nn.Linear(40, 20))
    ranks = {"0": 12, "2": 9}
    c = sc.Compressor(model, "manual", ranks=ranks, methods={"*": "svd_id"}, progress=False)
    c.compression_step()
    sc.save(model, tmp_path)
    loaded = sc.load(fresh, tmp_path)
    x = torch.randn(5, 30)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
    assert isinstance(loaded[0], InterpolativeLayer)
    assert not torch.equal(loaded[0].order, torch.arange(40))
