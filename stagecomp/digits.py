"""The digits task: a small real data set and CNN for the demo, examples and tests.

scikit-learn ships 1797 real 8x8 handwritten digits, so a model can be
trained, compressed and fine-tuned here with no download. Everything is seeded:
the same seed gives the same split, model and accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class DigitsData:
    """Train/test tensors: images ``(N, 1, 8, 8)`` scaled to [0, 1], labels ``(N,)``."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def load_digits_data(seed: int = 0, test_fraction: float = 0.25) -> DigitsData:
    """scikit-learn's digits, shuffled with ``seed`` and split into train and test."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:  # pragma: no cover - depends on the install
        raise ImportError(
            "the digits task needs scikit-learn: pip install 'stagecomp[demo]'"
        ) from error
    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(bunch.target, dtype=torch.long)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    images, labels = images[order], labels[order]
    n_test = round(len(labels) * test_fraction)
    return DigitsData(images[n_test:], labels[n_test:], images[:n_test], labels[:n_test])


class DigitsCNN(nn.Module):
    """Three 3x3 convolutions and two Linear layers: every kind stagecomp decomposes."""

    def __init__(self, width: int = 32) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.conv3 = nn.Conv2d(2 * width, 4 * width, 3, padding=1)
        self.bn3 = nn.BatchNorm2d(4 * width)
        self.fc1 = nn.Linear(4 * width * 2 * 2, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = F.max_pool2d(F.relu(self.bn3(self.conv3(x))), 2)
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


def train(
    model: nn.Module,
    data: DigitsData,
    *,
    epochs: int = 10,
    lr: float = 3e-3,
    batch_size: int = 64,
    seed: int = 0,
) -> nn.Module:
    """Plain Adam training; a fresh optimizer each call, as after a compression step."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    n = len(data.train_y)
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            optimizer.zero_grad()
            loss = F.cross_entropy(model(data.train_x[idx]), data.train_y[idx])
            loss.backward()
            optimizer.step()
    model.eval()
    return model


@torch.no_grad()
def accuracy(model: nn.Module, data: DigitsData) -> float:
    """Test-set accuracy in [0, 1], evaluated in eval mode (mode restored after)."""
    was_training = model.training
    model.eval()
    predictions = model(data.test_x).argmax(dim=1)
    model.train(was_training)
    return float((predictions == data.test_y).float().mean())


def trained_digits_cnn(seed: int = 0, epochs: int = 15) -> tuple[DigitsCNN, DigitsData]:
    """A DigitsCNN trained on the digits split of ``seed`` (a few seconds on a CPU)."""
    torch.manual_seed(seed)
    data = load_digits_data(seed)
    model = DigitsCNN()
    train(model, data, epochs=epochs, seed=seed)
    return model, data
