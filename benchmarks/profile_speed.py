"""Where whole-model time goes: torch.profiler per-op shares, before and after compression.

For each model it times, at one batch size, the original (BatchNorm folded,
channels-last), the plain ``Reduction`` pass at 2x fewer MACs, ``Speedup(2.0)`` and
``Speedup(0.85 * 2.0, macs=2.0)`` (all built from structures, as in ``bench_speed.py``;
``--target`` changes the 2), and splits each forward pass by
the top-level operator torch.profiler records: convolutions by kind (kxk, 1x1, depthwise,
read from the weight's shape), Linear, activations, residual additions, pooling and the
rest. The shares say what a decomposition can and cannot speed up: only convolutions and
Linear layers shrink; everything else keeps its cost (Amdahl).

Run: ``python benchmarks/profile_speed.py [--models resnet18 mobilenet_v2] [--batch 1]``
"""

from __future__ import annotations

import argparse
import copy
import statistics
from collections import defaultdict
from typing import Any

import torch
import torchvision
from bench_speed import find_rate, plan_at_rate, prepare, with_structures
from torch import nn
from torch.profiler import ProfilerActivity, profile

import stagecomp as sc
from stagecomp.stats import model_stats
from stagecomp.strategies.base import ModelRequest
from stagecomp.timing import describe_device, forward_latency

CATEGORIES = ("conv kxk", "conv 1x1", "conv depthwise", "linear", "activation", "add", "pool")
ACTIVATIONS = ("relu", "clamp", "hardtanh", "hardswish", "silu", "gelu")


def category(name: str, shapes: list[Any]) -> str:
    """The kind of one top-level operator, from its name and (for convolutions) shapes."""
    if name in ("aten::conv2d", "aten::convolution", "aten::_convolution"):
        if len(shapes) > 1 and len(shapes[0]) == 4 and len(shapes[1]) == 4:
            channels = shapes[0][1]
            _, per_group, kh, kw = shapes[1]
            groups = channels // per_group if per_group else 1
            if groups == channels and channels > 1:
                return "conv depthwise"
            return "conv 1x1" if (kh, kw) == (1, 1) else "conv kxk"
        return "conv kxk"
    if name in ("aten::linear", "aten::addmm", "aten::matmul", "aten::mm"):
        return "linear"
    if any(a in name for a in ACTIVATIONS):
        return "activation"
    if name in ("aten::add", "aten::add_"):
        return "add"
    if "pool" in name or name == "aten::mean":
        return "pool"
    return "other"


@torch.no_grad()
def shares(model: nn.Module, x: torch.Tensor, runs: int) -> dict[str, float]:
    """Seconds per forward pass of each category (top-level operators only)."""
    for _ in range(2):
        model(x)
    totals: dict[str, float] = defaultdict(float)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(runs):
            model(x)
    for event in prof.events():
        if event.cpu_parent is None and event.name.startswith("aten::"):
            key = category(event.name, list(event.input_shapes or []))
            totals[key] += event.cpu_time_total / 1e6 / runs
    return dict(totals)


def speedup_model(
    laid_out: nn.Module, x: torch.Tensor, target: float, macs: float | None = None
) -> nn.Module:
    """``Speedup(target, macs=macs)``'s structures for ``laid_out`` timed at ``x``."""
    strategy = sc.Speedup(target, macs=macs)
    compressor = sc.Compressor(copy.deepcopy(laid_out), strategy, x, progress=False)
    names = tuple(t.name for t in compressor.targets)
    strategy.prepare(ModelRequest(laid_out, x, names, {}, 0, 1, compressor.options))
    plan = {
        n: (p.method, p.ranks)
        for n, p in strategy.outcome(0).picks.items()
        if p.method is not None and p.ranks is not None
    }
    return with_structures(laid_out, plan, x.device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", nargs="+", default=["resnet18", "resnet50", "vgg16", "mobilenet_v2"]
    )
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--target", type=float, default=2.0)
    parser.add_argument("--efficiency", type=float, default=0.85)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with open("/proc/loadavg") as loadavg:
        load = " ".join(loadavg.read().split()[:3])
    print(
        f"# profile_speed: {describe_device('cpu')}, load average {load}, batch {args.batch}, "
        f"{args.size} px, BN folded, channels-last; ms per forward pass by top-level "
        f"operator (torch.profiler); plain = Reduction at {args.target:g}x fewer MACs, "
        f"speedup = Speedup({args.target:g}), macs = Speedup({args.efficiency:g} * "
        f"{args.target:g}, macs={args.target:g})"
    )
    head = " ".join(f"{c:>14}" for c in (*CATEGORIES, "other"))
    print(f"{'model':<13} {'variant':<8} {'MACs x':>6} {'ms':>8} {'speed x':>7} {head}")
    for model_name in args.models:
        torch.manual_seed(0)
        original = torchvision.models.get_model(model_name, weights=None).eval()
        x1 = torch.randn(1, 3, args.size, args.size)
        laid_out = sc.to_channels_last(copy.deepcopy(original))
        x = x1.expand(args.batch, -1, -1, -1).contiguous(memory_format=torch.channels_last)
        rate = find_rate(original, x1, args.target)
        variants = {
            "original": copy.deepcopy(original),
            "plain": with_structures(original, plan_at_rate(original, rate, None), x.device),
            "speedup": speedup_model(laid_out, x, args.target),
            "macs": speedup_model(laid_out, x, args.efficiency * args.target, args.target),
        }
        models = {k: sc.to_channels_last(prepare(m)) for k, m in variants.items()}
        base = model_stats(models["original"], x1)
        seconds: dict[str, list[float]] = {k: [] for k in models}
        for _ in range(args.runs):
            for key, model in models.items():
                seconds[key].append(forward_latency(model, x, warmup=1, repeats=1))
        reference = statistics.median(seconds["original"])
        for key, model in models.items():
            split = shares(model, x, args.runs)
            median = statistics.median(seconds[key])
            macs_x = base.macs / model_stats(model, x1).macs
            cells = " ".join(f"{split.get(c, 0.0) * 1e3:>14.2f}" for c in (*CATEGORIES, "other"))
            print(
                f"{model_name:<13} {key:<8} {macs_x:>6.2f} {median * 1e3:>8.2f} "
                f"{reference / median:>7.2f} {cells}",
                flush=True,
            )


if __name__ == "__main__":
    main()
