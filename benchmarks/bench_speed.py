"""Whole-model speed: latency ratio against MAC ratio, with and without latency-aware choice.

For each torchvision model (random weights, eval mode) and each MAC target (2x, 3x fewer
MACs), it finds the ``Reduction`` rate that gives the target (bisection on MACs counted
by fvcore, from layer structures alone), compresses the model with the Compressor at that
rate (plain), and again with ``latency_aware`` (candidates timed at the layers' real input
shapes), then times the original and both compressed models side by side in this
process: rounds of one forward pass each, interleaved, median after warm-up, at every
batch size. All models get the same inference preparation (BatchNorm folded,
channels-last weights and input unless ``--no-channels-last``).

Efficiency = latency ratio / MAC ratio; the goal is >= 0.8 (3x fewer MACs -> 2.4x faster),
and the latency-aware model no slower than the plain one.

Run: ``python benchmarks/bench_speed.py [--models resnet18] [--targets 2 3] [--threads 2]``
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import statistics
import time
from typing import Any

import torch
import torchvision
from torch import nn

import stagecomp as sc
from stagecomp.latency_aware import layer_inputs
from stagecomp.registry import layer_class
from stagecomp.stats import layer_macs, model_stats
from stagecomp.strategies.base import RankRequest
from stagecomp.surgery import get_module
from stagecomp.timing import describe_device, forward_latency

GOAL = 0.8


def _macs_at_rate(
    model: nn.Module,
    x: torch.Tensor,
    rate: float,
    conv_method: str,
    base: sc.ModelStats,
    shapes: dict[str, tuple[int, ...]],
    cache: dict[Any, int],
) -> int:
    """Whole-model MACs after a plain Reduction(rate) pass, from layer structures alone."""
    compressor = sc.Compressor(
        model, sc.Reduction(rate), None, conv_method=conv_method, progress=False
    )
    total = base.macs
    for target in compressor.targets:
        module = get_module(model, target.name)
        shape = sc.LayerShape.from_module(module, target.name)
        cls = layer_class(target.method, shape, target.name)
        request = RankRequest(target.name, cls, shape, module, 0, 1, compressor.options)
        ranks = target.strategy.choose_ranks(request)
        if cls.param_count(shape, ranks, compressor.options) >= shape.dense_params:
            continue
        key = (shape, target.method, ranks, shapes[target.name])
        if key not in cache:
            layer = sc.empty_layer(shape, target.method, ranks)
            cache[key] = layer_macs(layer, shapes[target.name])
        total += cache[key] - base.layer_macs.get(target.name, 0)
    return total


def find_rate(model: nn.Module, x: torch.Tensor, target: float, conv_method: str) -> float:
    """The Reduction rate whose plain pass gives ``target`` times fewer MACs (or the most)."""
    base = model_stats(model, x)
    names = [n for n, _ in sc.compressor.decomposable_layers(model)]
    shapes = {name: info.shape for name, info in layer_inputs(model, x, names).items()}
    cache: dict[Any, int] = {}
    lo, hi = 1.0, 256.0
    if base.macs / _macs_at_rate(model, x, hi, conv_method, base, shapes, cache) < target:
        return hi  # out of reach: the benchmark reports how far it got
    for _ in range(24):
        mid = math.sqrt(lo * hi)
        ratio = base.macs / _macs_at_rate(model, x, mid, conv_method, base, shapes, cache)
        if ratio < target:
            lo = mid
        else:
            hi = mid
        if hi / lo < 1.005:
            break
    return hi


def prepare(model: nn.Module, channels_last: bool) -> nn.Module:
    """Inference preparation applied to every model alike."""
    model.eval()
    sc.fold_batchnorm(model)
    if channels_last:
        sc.to_channels_last(model)
    return model


def compress(
    original: nn.Module,
    x: torch.Tensor,
    rate: float,
    conv_method: str,
    aware: sc.LatencyAware | None,
) -> nn.Module:
    model = copy.deepcopy(original)
    compressor = sc.Compressor(
        model,
        sc.Reduction(rate),
        x,
        conv_method=conv_method,
        layers_per_step=10_000,
        latency_aware=aware,
        progress=False,
    )
    compressor.compression_step()
    return model


@torch.no_grad()
def interleaved_latency(
    models: dict[str, nn.Module], x: torch.Tensor, warmup: int, repeats: int
) -> dict[str, float]:
    """Median seconds per model, timed in interleaved rounds so drift hits all alike."""
    for model in models.values():
        forward_latency(model, x, warmup=warmup, repeats=1)
    samples: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            samples[name].append(forward_latency(model, x, warmup=0, repeats=1))
    return {name: statistics.median(s) for name, s in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", nargs="+", default=["resnet18", "resnet50", "vgg16", "mobilenet_v2"]
    )
    parser.add_argument("--targets", type=float, nargs="+", default=[2.0, 3.0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--conv-method", default="tucker2")
    parser.add_argument(
        "--aware-methods",
        nargs="+",
        default=["svd", "tucker2"],
        help="candidate methods of the latency-aware pass",
    )
    parser.add_argument(
        "--aware-batch", type=int, default=1, help="batch size the latency-aware pass times at"
    )
    parser.add_argument("--aware-repeats", type=int, default=3)
    parser.add_argument("--no-channels-last", action="store_true")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    channels_last = not args.no_channels_last
    layout = "channels-last" if channels_last else "NCHW"
    print(
        f"# bench_speed: {describe_device(device)}, {args.size} px, {layout}, BN folded, "
        f"median of {args.repeats} interleaved runs after {args.warmup} warm-up; "
        f"plain = {args.conv_method} (1x1: svd), aware = best of {args.aware_methods} "
        f"timed at batch {args.aware_batch}"
    )
    batch_cols = " ".join(f"{f'lat x b{b}':>9} {f'eff b{b}':>7}" for b in args.batches)
    print(
        f"{'model':<13} {'target':>6} {'variant':<7} {'rate':>6} {'MACs x':>7} "
        f"{'params x':>8} {batch_cols} {'goal':<14} {'aware/plain':>11}"
    )
    for model_name in args.models:
        torch.manual_seed(0)
        original = torchvision.models.get_model(model_name, weights=None).eval().to(device)
        x1 = torch.randn(1, 3, args.size, args.size, device=device)
        base = model_stats(original, x1)
        variants: dict[str, nn.Module] = {"original": prepare(copy.deepcopy(original), False)}
        rows: list[tuple[float, str, float, sc.ModelStats]] = []
        for target in args.targets:
            started = time.perf_counter()
            rate = find_rate(original, x1, target, args.conv_method)
            aware = sc.LatencyAware(
                methods=tuple(args.aware_methods),
                batch_size=args.aware_batch,
                repeats=args.aware_repeats,
                warmup=1,
            )
            xa = x1.to(memory_format=torch.channels_last) if channels_last else x1
            for variant, config in (("plain", None), ("aware", aware)):
                # The aware pass times layers as they will run: channels-last if asked.
                source = to_layout(original, channels_last) if config is not None else original
                model = compress(
                    source, xa if config is not None else x1, rate, args.conv_method, config
                )
                stats = model_stats(model, x1)
                variants[f"{target:g}x {variant}"] = prepare(model, False)
                rows.append((target, variant, rate, stats))
            logging.info(
                "%s %gx: built in %.0f s", model_name, target, time.perf_counter() - started
            )
        if channels_last:
            for model in variants.values():
                sc.to_channels_last(model)
        latencies: dict[int, dict[str, float]] = {}
        for batch in args.batches:
            x = torch.randn(batch, 3, args.size, args.size, device=device)
            if channels_last:
                x = x.to(memory_format=torch.channels_last)
            latencies[batch] = interleaved_latency(variants, x, args.warmup, args.repeats)
        for target, variant, rate, stats in rows:
            key = f"{target:g}x {variant}"
            macs_x = base.macs / stats.macs
            cells = []
            effs = []
            for batch in args.batches:
                speed = latencies[batch]["original"] / latencies[batch][key]
                effs.append(speed / macs_x)
                cells.append(f"{speed:>9.2f} {speed / macs_x:>7.2f}")
            worst = min(effs)
            goal = "met" if worst >= GOAL else f"no: eff {worst:.2f}"
            versus = "-"
            if variant == "aware":
                plain = f"{target:g}x plain"
                versus = " ".join(
                    f"{latencies[b][key] / latencies[b][plain]:.2f}" for b in args.batches
                )
            print(
                f"{model_name:<13} {target:>5g}x {variant:<7} {rate:>6.2f} {macs_x:>7.2f} "
                f"{base.params / stats.params:>8.2f} {' '.join(cells)} {goal:<14} {versus:>11}",
                flush=True,
            )


def to_layout(model: nn.Module, channels_last: bool) -> nn.Module:
    """A copy in the layout the benchmark runs in, so the aware pass times what will run."""
    copied = copy.deepcopy(model)
    return sc.to_channels_last(copied) if channels_last else copied


if __name__ == "__main__":
    main()
