"""The VBMF strategy: EVBMF ranks per method, weakening and floors, later stages on cores."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import stagecomp as sc
from stagecomp.strategies.base import RankRequest


def low_rank_linear(out: int, inp: int, rank: int, noise: float = 0.01) -> nn.Linear:
    g = torch.Generator().manual_seed(1)
    layer = nn.Linear(inp, out)
    with torch.no_grad():
        signal = torch.randn(out, rank, generator=g) @ torch.randn(rank, inp, generator=g)
        layer.weight.copy_(signal + noise * torch.randn(out, inp, generator=g))
    return layer


def request(module: nn.Module, method: str, stage: int = 0, stages: int = 1) -> RankRequest:
    shape = sc.LayerShape.from_module(module)
    cls = sc.registry.layer_class(method, shape)
    return RankRequest("layer", cls, shape, module, stage, stages, sc.DecomposeOptions())


@pytest.mark.parametrize(("weakening", "expected"), [(1.0, 7), (0.0, 40), (0.5, 23), (0.25, 31)])
def test_weakening_moves_from_full_to_the_evbmf_rank(weakening: float, expected: int) -> None:
    layer = low_rank_linear(40, 90, rank=7)
    ranks = sc.VBMF(weakening=weakening).choose_ranks(request(layer, "svd"))
    assert ranks == (expected,)
    assert expected == math.floor(40 - weakening * (40 - 7))


def test_min_rank_is_a_floor() -> None:
    layer = low_rank_linear(40, 90, rank=3)
    assert sc.VBMF(min_rank=10).choose_ranks(request(layer, "svd")) == (10,)


def test_tucker2_ranks_come_from_both_unfoldings() -> None:
    g = torch.Generator().manual_seed(2)
    core = torch.randn(6, 4, 3, 3, generator=g)
    u_out, u_in = torch.randn(32, 6, generator=g), torch.randn(24, 4, generator=g)
    kernel = torch.einsum("abst,oa,ib->oist", core, u_out, u_in)
    conv = nn.Conv2d(24, 32, 3)
    with torch.no_grad():
        conv.weight.copy_(kernel + 1e-3 * torch.randn(kernel.shape, generator=g))
    assert sc.VBMF().choose_ranks(request(conv, "tucker2")) == (6, 4)


def test_pure_noise_keeps_the_layer_full() -> None:
    layer = nn.Linear(64, 48)  # random init: no structure above the noise
    assert sc.VBMF().choose_ranks(request(layer, "svd")) == (48,)


def test_later_stages_look_at_the_core_and_shrink_further() -> None:
    layer = low_rank_linear(60, 120, rank=30, noise=0.5)
    vbmf = sc.VBMF(weakening=0.5)
    (first,) = vbmf.choose_ranks(request(layer, "svd", 0, 2))
    decomposed = sc.decompose(layer, "svd", first)
    (second,) = vbmf.choose_ranks(request(decomposed, "svd", 1, 2))
    assert second < first <= 60
    # the core route equals EVBMF on the r x r middle of the orthonormalised factors
    s = torch.linalg.svdvals(decomposed.dense_weight().detach().double())
    middle = torch.diag(s[:first])
    found = sc.strategies.evbmf.evbmf_rank(middle).rank
    assert second == sc.strategies.evbmf.weakened_rank(first, min(found, first), 0.5)


def test_bad_settings_are_refused() -> None:
    with pytest.raises(sc.RankError, match="weakening"):
        sc.VBMF(weakening=1.5)
    with pytest.raises(sc.RankError, match="min_rank"):
        sc.VBMF(min_rank=0)
