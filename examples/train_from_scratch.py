"""Train factorised models from scratch: dense vs CP vs Tucker2 vs TT vs HT layers on digits.

``stagecomp.factorize`` replaces layers by low-rank ones built from shapes alone, with an
initialisation under which each layer's effective weight has PyTorch's default
dense variance, so the usual optimiser settings work. This is the comparison
tensor-layer papers make on MNIST/CIFAR, here on scikit-learn's real digits:
every variant gets the same parameter budget per factorised layer, the same
seed and the same training, and we report test accuracy, parameters, MACs and
time per epoch.

Run:
    python examples/train_from_scratch.py [--rate 4] [--epochs 15] [--quick]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

import stagecomp as sc
from stagecomp.digits import DigitsCNN, DigitsData, accuracy, load_digits_data
from stagecomp.registry import layer_class
from stagecomp.strategies.reduction import ranks_for_reduction

CONVS = ["conv2", "conv3"]  # conv1 has one input channel: nothing to factorise
LINEARS = ["fc1"]  # fc2 (128 -> 10) is already tiny


def ranks_at_rate(
    model: nn.Module, names: list[str], method: str, rate: float
) -> dict[str, tuple[int, ...]]:
    """Per layer, the ranks that make ``method`` use ``rate`` times fewer parameters."""
    ranks = {}
    for name in names:
        shape = sc.LayerShape.from_module(model.get_submodule(name), name)
        ranks[name] = ranks_for_reduction(layer_class(method, shape), shape, rate, name=name)
    return ranks


def build(variant: str, rate: float, seed: int) -> tuple[nn.Module, str]:
    """A fresh DigitsCNN whose conv2, conv3 and fc1 use ``variant`` (or stay dense)."""
    torch.manual_seed(seed)
    model = DigitsCNN()
    if variant == "dense":
        return model, "all layers dense"
    # Methods with Linear layers (TT, HT) factorise fc1 too; CP and Tucker2 use SVD there.
    linear_method = variant if "linear" in sc.get_method(variant).kinds else "svd"
    conv_ranks = ranks_at_rate(model, CONVS, variant, rate)
    linear_ranks = ranks_at_rate(model, LINEARS, linear_method, rate)
    sc.factorize(model, variant, conv_ranks)
    sc.factorize(model, linear_method, linear_ranks)
    layout = ", ".join(f"{n} {variant}{r}" for n, r in conv_ranks.items())
    layout += ", " + ", ".join(f"{n} {linear_method}{r}" for n, r in linear_ranks.items())
    return model, layout


def train(model: nn.Module, data: DigitsData, epochs: int, seed: int, lr: float = 3e-3) -> None:
    """Adam with a cosine learning-rate decay, the same for every variant."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    batches = -(-len(data.train_y) // 64)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * batches)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(data.train_y), generator=generator)
        for start in range(0, len(order), 64):
            idx = order[start : start + 64]
            optimizer.zero_grad()
            F.cross_entropy(model(data.train_x[idx]), data.train_y[idx]).backward()
            optimizer.step()
            schedule.step()
    model.eval()


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=["dense", "cp3", "tucker2", "tt", "ht"])
    parser.add_argument("--rate", type=float, default=4.0, help="parameter reduction per layer")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="3 epochs")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs = 3
    torch.set_num_threads(1)  # small layers: one thread is fastest and deterministic
    data = load_digits_data(args.seed)
    example = data.test_x[:1]
    print(
        f"training from scratch for {args.epochs} epochs, factorised layers {args.rate:g}x smaller"
    )
    print(f"{'variant':<8} {'accuracy':>8} {'params':>8} {'MACs':>10} {'s/epoch':>8}  layers")
    results = {}
    for variant in args.variants:
        model, layout = build(variant, args.rate, args.seed)
        stats = sc.model_stats(model, example)
        started = time.perf_counter()
        train(model, data, args.epochs, args.seed)
        per_epoch = (time.perf_counter() - started) / args.epochs
        acc = accuracy(model, data)
        results[variant] = {
            "accuracy": acc,
            "params": stats.params,
            "macs": stats.macs,
            "seconds_per_epoch": per_epoch,
            "layers": layout,
        }
        print(
            f"{variant:<8} {acc:>8.2%} {stats.params:>8,} {stats.macs:>10,} {per_epoch:>8.3f}  "
            f"{layout}"
        )
    return results


if __name__ == "__main__":
    main()
