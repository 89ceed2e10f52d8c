"""BatchNorm folding is exact on dense and decomposed convolutions, and only where it should be."""

from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

import stagecomp as sc


def _random_bn_stats(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            n = module.num_features
            with torch.no_grad():
                module.running_mean.copy_(torch.randn(n, generator=g) * 0.5)
                module.running_var.copy_(torch.rand(n, generator=g) + 0.5)
                module.weight.copy_(torch.rand(n, generator=g) + 0.5)
                module.bias.copy_(torch.randn(n, generator=g) * 0.2)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_resnet18_fold_is_exact() -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    _random_bn_stats(model)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
    folded = sc.fold_batchnorm(model)
    with torch.no_grad():
        after = model(x)
    # 20 convs each followed by its BN: conv1/bn1, 8 blocks x 2, 3 downsample pairs.
    assert len(folded) == 20
    assert ("conv1", "bn1") in folded and (
        "layer2.0.downsample.0",
        "layer2.0.downsample.1",
    ) in folded
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert _rel(after, before) < 1e-5


@pytest.mark.parametrize("method", ["svd", "tucker2", "cp3", "cp4"])
def test_decomposed_conv_fold_is_exact(method: str) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, 3, padding=1, bias=False)
    layer = sc.decompose(conv, method, 4)
    model = nn.Sequential(layer, nn.BatchNorm2d(12), nn.ReLU()).eval()
    _random_bn_stats(model)
    x = torch.randn(2, 8, 9, 9)
    with torch.no_grad():
        before = model(x)
    assert sc.fold_batchnorm(model) == [("0", "1")]
    with torch.no_grad():
        after = model(x)
    assert isinstance(model[1], nn.Identity)
    assert _rel(after, before) < 1e-5
    # The layer's recorded shape now has the bias it gained, so to_dense keeps it.
    assert layer.shape.bias
    with torch.no_grad():
        dense = layer.to_dense()(x)
        assert _rel(torch.relu(dense), after) < 1e-5


def test_not_folded_when_output_is_shared_or_bn_trains_or_tt() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.bn = nn.BatchNorm2d(4)
            self.tt = sc.empty_layer(sc.LayerShape("conv2d", 4, 4, (3, 3), padding=(1, 1)), "tt", 2)
            self.bn2 = nn.BatchNorm2d(4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return self.bn2(self.tt(self.bn(y) + y))

    model = Branchy().eval()
    assert sc.fold_batchnorm(model) == []
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)).train()
    assert sc.fold_batchnorm(model) == []
    assert isinstance(model[1], nn.BatchNorm2d)


def test_untraceable_model_raises() -> None:
    class Dynamic(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.conv(x) if x.sum() > 0 else x

    with pytest.raises(sc.StagecompError, match=r"torch\.fx"):
        sc.fold_batchnorm(Dynamic())


def test_compressed_resnet_fold_is_exact() -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    _random_bn_stats(model, seed=1)
    x = torch.randn(1, 3, 32, 32)
    sc.Compressor(
        model,
        sc.Reduction(2.0),
        layers_per_step=100,
        exclude=["fc"],
        options=sc.DecomposeOptions(hooi_iters=0),
        progress=False,
    ).compression_step()
    with torch.no_grad():
        before = model(x)
    folded = dict(sc.fold_batchnorm(model))
    with torch.no_grad():
        after = model(x)
    assert isinstance(model.layer1[0].conv1, sc.Tucker2Conv2d)
    assert folded["layer1.0.conv1"] == "layer1.0.bn1"
    assert isinstance(model.layer4[1].conv2, sc.Tucker2Conv2d)
    assert len(folded) == 20
    assert _rel(after, before) < 1e-5
