"""Defaults never do nothing or harm silently (issue 15, item 2)."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import stagecomp as sc


def _resnet() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet18(weights=None).eval()


def test_manual_rank_that_grows_a_layer_is_skipped_unless_asked_for_that_layer() -> None:
    model = _resnet()
    # Rank 64 on the 3->64 7x7 stem (9.4k params) would make it larger: skipped, with why.
    c = sc.Compressor(
        model, sc.Manual(rank=64), ranks={"fc": None}, progress=False, layers_per_step=100
    )
    result = c.compression_step()
    stem = next(ch for ch in result.changes if ch.name == "conv1")
    assert stem.skipped is not None and "would not reduce" in stem.skipped
    assert isinstance(model.conv1, nn.Conv2d)
    grown = sum(ch.params_after > ch.params_before for ch in result.changes)
    assert grown == 0
    # Named exactly, the rank is what the user asked for, even if the layer grows.
    model = _resnet()
    c = sc.Compressor(model, "manual", ranks={"conv1": 64}, progress=False)
    (change,) = c.compression_step().changes
    assert change.skipped is None and change.params_after > change.params_before


def test_reduction_rate_of_one_or_less_is_refused() -> None:
    for rate in (1, 1.0, 0.5):
        with pytest.raises(sc.RankError, match="> 1"):
            sc.Reduction(rate)


def test_vbmf_on_untrained_weights_says_so_in_the_report() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    c = sc.Compressor(model, "vbmf", layers_per_step=2, progress=False)
    result = c.compression_step()
    assert not result.replaced
    assert all("untrained" in (ch.skipped or "") for ch in result.changes)
    report = c.report()
    assert "warning: no layer was replaced" in report
    assert "1.00x fewer" not in report and "no fewer" in report


def test_manual_without_ranks_groups_the_reason_and_says_what_to_pass() -> None:
    with pytest.raises(sc.NoMatchingLayerError) as info:
        sc.Compressor(_resnet(), "manual", progress=False)
    message = str(info.value)
    assert message.count("no manual rank given") == 1
    assert "ranks={name: rank}" in message and "21 layer(s)" in message


def test_a_layer_whose_macs_went_up_is_flagged() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1))
    c = sc.Compressor(model, "manual", torch.randn(1, 8, 6, 6), ranks={"0": (8, 8)}, progress=False)
    c.compression_step()
    assert "MACs up" in c.report()
