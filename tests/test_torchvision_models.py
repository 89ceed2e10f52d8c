"""Every listed torchvision classifier compresses without error and keeps its output shape."""

from __future__ import annotations

import pytest
import torch
import torchvision

import stagecomp as sc

FAST = [("resnet18", 64), ("mobilenet_v2", 64)]
SLOW = [
    ("resnet50", 64),
    ("vgg16", 32),
    ("efficientnet_b0", 64),
    ("densenet121", 64),
    ("convnext_tiny", 64),
    ("vit_b_16", 224),
]


def _check(name: str, size: int, strategy: sc.Reduction | str) -> None:
    """Random weights are pure noise to EVBMF, so only the reduction strategy must shrink."""
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=10).eval()
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        shape = model(x).shape
    c = sc.Compressor(model, strategy, x, layers_per_step=1000, progress=False)
    result = c.compression_step()
    assert c.done
    assert result.macs_after is not None and result.macs_before is not None
    if strategy != "vbmf":
        assert result.params_after < result.params_before
        assert result.macs_after < result.macs_before
    with torch.no_grad():
        assert model(x).shape == shape
        assert torch.isfinite(model(x)).all()


@pytest.mark.parametrize(("name", "size"), FAST)
def test_fast_models(name: str, size: int) -> None:
    _check(name, size, sc.Reduction(2.0))


@pytest.mark.slow
@pytest.mark.parametrize(("name", "size"), FAST + SLOW)
@pytest.mark.parametrize("strategy", ["vbmf", "reduction"])
def test_all_models(name: str, size: int, strategy: str) -> None:
    _check(name, size, strategy)
