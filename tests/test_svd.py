"""Truncated SVD: Eckart-Young optimal on the exact path, nearly so on the randomized one."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import stagecomp as sc
from stagecomp.decompositions.svd import svd_recompress, truncated_svd


def decaying(m: int, n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, min(m, n), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, min(m, n), generator=g, dtype=torch.float64))
    s = torch.logspace(0, -3, min(m, n), dtype=torch.float64)
    return u @ torch.diag(s) @ v.T


@pytest.mark.parametrize(("m", "n", "rank"), [(30, 50, 7), (64, 20, 20), (1, 9, 1), (80, 80, 1)])
def test_exact_path_is_the_eckart_young_optimum(m: int, n: int, rank: int) -> None:
    a = torch.randn(m, n, dtype=torch.float64)
    u, s, vh = truncated_svd(a, rank, solver="exact")
    optimum = torch.linalg.svdvals(a)[rank:].square().sum().sqrt()
    error = torch.linalg.norm(a - u @ torch.diag(s) @ vh)
    assert float(error) == pytest.approx(float(optimum), rel=1e-10, abs=1e-12)


def test_randomized_path_is_within_a_whisker_of_the_optimum() -> None:
    a = decaying(1500, 1200)
    u, s, vh = truncated_svd(a, 100, solver="randomized", seed=3)
    optimum = float(torch.linalg.svdvals(a)[100:].square().sum().sqrt())
    error = float(torch.linalg.norm(a - u @ torch.diag(s) @ vh))
    assert optimum <= error <= optimum * 1.01
    again = truncated_svd(a, 100, solver="randomized", seed=3)
    assert torch.equal(again[1], s)


def test_layer_error_equals_the_optimum() -> None:
    conv = nn.Conv2d(16, 24, 3, dtype=torch.float64)
    layer = sc.decompose(conv, "svd", 5)
    matrix = conv.weight.detach().reshape(24, -1)
    optimum = torch.linalg.svdvals(matrix)[5:].square().sum().sqrt()
    error = torch.linalg.norm(layer.dense_weight().detach().reshape(24, -1) - matrix)
    assert float(error) == pytest.approx(float(optimum), rel=1e-10)


def test_recompress_equals_svd_of_the_product() -> None:
    left, right = torch.randn(40, 12, dtype=torch.float64), torch.randn(12, 70, dtype=torch.float64)
    u, s, vh = svd_recompress(left, right, 5)
    expected = torch.linalg.svdvals(left @ right)[:5]
    assert torch.allclose(s, expected, rtol=1e-10)
    optimum = torch.linalg.svdvals(left @ right)[5:].square().sum().sqrt()
    error = torch.linalg.norm(left @ right - u @ torch.diag(s) @ vh)
    assert float(error) == pytest.approx(float(optimum), rel=1e-9)


@pytest.mark.parametrize("bad", [0, -1, 31])
def test_bad_rank_is_refused(bad: int) -> None:
    with pytest.raises(ValueError, match="out of range"):
        truncated_svd(torch.randn(30, 40), bad)


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float64, 1e-9), (torch.float32, 1e-4)])
def test_large_exact_path_through_the_gram_matrix_is_optimal(
    dtype: torch.dtype, tolerance: float
) -> None:
    a = decaying(1100, 1300).to(dtype)
    u, s, vh = truncated_svd(a, 400, solver="exact")
    assert u.shape == (1100, 400) and vh.shape == (400, 1300)
    reference = torch.linalg.svdvals(a.double())
    optimum = float(reference[400:].square().sum().sqrt())
    error = float(torch.linalg.norm(a.double() - (u @ torch.diag(s) @ vh).double()))
    assert error == pytest.approx(optimum, rel=tolerance)
    tall_u, _, tall_vh = truncated_svd(a.T.contiguous(), 400, solver="exact")
    assert tall_u.shape == (1300, 400) and tall_vh.shape == (400, 1100)
