"""Torchvision classifiers compress without error and keep their output shape; the slow
zoo test runs every classification model through a pass, full rank and save/load."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

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


# ---------------------------------------------------------------------- the whole zoo
ZOO = torchvision.models.list_models(module=torchvision.models)  # classification only
SIZES = {"inception_v3": 128, "maxvit_t": 224}  # below them the model itself fails
LARGEST = 150_000_000  # parameters: above, a float64 copy and its SVDs take minutes


def _zoo_model(name: str) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, num_classes=10).eval()
    with torch.no_grad():  # ViT's head starts at zero: its output would say nothing
        for param in model.parameters():
            if param.ndim >= 2 and not param.any():
                param.normal_(0.0, 0.02)
    size = 224 if name.startswith("vit_") else SIZES.get(name, 64)
    return model, torch.randn(1, 3, size, size)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.slow
@pytest.mark.parametrize("name", ZOO)
def test_zoo_model_compresses_is_exact_at_full_rank_and_round_trips(
    name: str, tmp_path: Path
) -> None:
    """Every torchvision classifier (random weights): one ``Reduction(2.0)`` pass shrinks
    it and runs; every target rebuilt at its full ranks (float64) gives the original
    output; the compressed model saved and loaded onto a fresh one gives the same output."""
    model, x = _zoo_model(name)
    if sum(p.numel() for p in model.parameters()) > LARGEST:
        pytest.skip(f"{name}: over {LARGEST:,} parameters, too slow for this test")

    # Full rank, float64: the targets of the plan, each at its method's full ranks.
    exact, x64 = copy.deepcopy(model).double(), x.double()
    with torch.no_grad():
        reference = exact(x64)
    planned = sc.Compressor(exact, sc.Reduction(2.0), x64, layers_per_step=10_000, progress=False)
    assert planned.plan.targets, f"{name}: nothing to compress"
    options = sc.DecomposeOptions()
    full = {}
    for target in planned.plan.targets:
        module = exact.get_submodule(target.name)
        shape = sc.LayerShape.from_module(module, target.name)
        full[target.name] = (
            sc.get_method(target.method).layer_class(shape).full_rank(shape, options)
        )
    methods = {t.name: t.method for t in planned.plan.targets}
    c = sc.Compressor(
        exact, "manual", x64, ranks=full, methods=methods, layers_per_step=10_000, progress=False
    )
    c.compression_step()
    assert sum(isinstance(m, sc.DecomposedLayer) for m in exact.modules()) == len(full)
    with torch.no_grad():
        assert _relative(exact(x64), reference) < 1e-9

    # One Reduction(2.0) pass, float32.
    c = sc.Compressor(model, sc.Reduction(2.0), x, layers_per_step=10_000, progress=False)
    result = c.compression_step()
    assert c.done
    assert result.params_after < result.params_before
    with torch.no_grad():
        compressed = model(x)
    assert torch.isfinite(compressed).all()

    # Save, then load onto a freshly built model.
    sc.save(model, tmp_path / name)
    fresh, _ = _zoo_model(name)
    sc.load(fresh, tmp_path / name)
    with torch.no_grad():
        assert _relative(fresh(x), compressed) < 1e-6
