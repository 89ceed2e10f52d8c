"""Every submodule keeps its own train/eval mode through everything a step runs."""

from __future__ import annotations

import torch
from torch import nn

import stagecomp as sc


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.frozen_bn = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(16 * 16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.frozen_bn(self.conv(x)))
        return self.fc(self.drop(torch.relu(self.conv2(x))).flatten(1))


def _modes(model: nn.Module) -> dict[str, bool]:
    return {name: module.training for name, module in model.named_modules()}


def _frozen_in_training_model() -> Net:
    torch.manual_seed(0)
    model = Net().train()
    model.frozen_bn.eval()  # a frozen BatchNorm inside a model that is training
    return model


def test_calibration_latency_probing_and_statistics_keep_every_submodule_mode() -> None:
    model = _frozen_in_training_model()
    x = torch.randn(2, 3, 4, 4)
    batches = [torch.randn(4, 3, 4, 4) for _ in range(2)]
    before = _modes(model)
    running = model.frozen_bn.running_mean.clone()
    c = sc.Compressor(
        model,
        sc.Manual(rank=4),
        x,  # statistics (MACs) counted on it
        calibration=sc.Calibration(batches, factors={"fc": "gradient", "conv2": "whiten"}),
        latency_aware=sc.LatencyAware(timer=lambda candidate: float(candidate.params)),
        layers_per_step=3,
        progress=False,
    )
    assert _modes(model) == before
    result = c.compression_step()
    assert result.replaced, "the step replaced nothing, so it proves nothing"
    modes = _modes(model)
    for name, mode in before.items():
        if name in modes and not any(name.startswith(r) for r in result.replaced):
            assert modes[name] == mode, name
    # The frozen BatchNorm never saw a batch in training mode.
    assert modes["frozen_bn"] is False
    assert torch.equal(model.frozen_bn.running_mean, running)
    # New layers take the mode of the layer they replace.
    assert all(module.training for module in result.replaced.values())


def test_collect_functions_restore_modes() -> None:
    model = _frozen_in_training_model()
    before = _modes(model)
    batches = [torch.randn(2, 3, 4, 4)]
    sc.collect_statistics(model, batches, ["conv2"], progress=False)
    assert _modes(model) == before
    from stagecomp.calibration import collect_gradient_moments

    collect_gradient_moments(model, batches, ["conv2"], progress=False)
    assert _modes(model) == before
    sc.model_stats(model, batches[0])
    assert _modes(model) == before
