"""Whole-model speed: latency ratio against MAC ratio, with and without latency-aware choice.

For each torchvision model (random weights, eval mode) and each MAC target (2x, 3x fewer
MACs) it builds three compressed models:

- plain: a ``Reduction`` pass (Tucker2 for kxk, SVD for 1x1 and Linear) at the rate found
  by bisection on the MAC count (fvcore, from layer structures alone);
- aware: the same rate with ``latency_aware`` (each layer the fastest of the candidates
  and the dense layer, timed at its real input shape and layout);
- aware=: latency-aware at the rate, found by bisection, that meets the MAC target.

All models, the original included, get the same inference preparation (BatchNorm folded,
channels-last weights and input unless ``--no-channels-last``) and are timed side by side
in this process: rounds of one forward pass each, interleaved, median after warm-up, at
every batch size. By default the compressed models are built from structures
(``empty_layer``), since latency does not depend on the weights; ``--decompose`` runs the
Compressor instead (same choices: the timing table is shared), which takes minutes more.

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
from stagecomp.latency_aware import (
    CURRENT,
    Candidate,
    LatencyChooser,
    fastest_run,
    layer_inputs,
)
from stagecomp.legacy import kind_methods
from stagecomp.methods import layer_class
from stagecomp.stats import layer_macs, model_stats
from stagecomp.strategies.base import RankRequest
from stagecomp.surgery import get_module, replace_module
from stagecomp.timing import describe_device, forward_latency

GOAL = 0.8


Ranks = tuple[int, ...]
Plan = dict[str, tuple[str, Ranks]]
"""Layer name -> (method, ranks) of one compression pass."""


class StructureTimer:
    """Times a candidate from its structure alone, cached, so every pass sees the same table.

    Injected as ``LatencyAware(timer=...)``: the rate search and the final Compressor run
    then make identical choices, and each structure is timed once per benchmark run.
    """

    def __init__(self, device: torch.device, warmup: int, repeats: int) -> None:
        self.device, self.warmup, self.repeats = device, warmup, repeats
        self.cache: dict[Any, float] = {}

    def __call__(self, candidate: Candidate) -> float:
        c = candidate
        key = (c.shape, c.input_shape, c.channels_last, c.method, c.ranks)
        if key not in self.cache:
            if c.method == CURRENT:
                layer: nn.Module = c.shape.build_dense(device=self.device)
            else:
                layer = sc.empty_layer(c.shape, c.method, c.ranks or (), device=self.device)
            x = torch.randn(c.input_shape, device=self.device)
            if c.channels_last:
                sc.to_channels_last(layer)
                x = x.contiguous(memory_format=torch.channels_last)
            layer.eval()
            self.cache[key] = fastest_run(layer, x, self.warmup, self.repeats)
        return self.cache[key]


def plan_at_rate(
    model: nn.Module, rate: float, conv_method: str, chooser: LatencyChooser | None
) -> Plan:
    """What a ``Reduction(rate)`` pass does to each layer, plain or latency-aware.

    The ranks are asked of the strategy once per candidate method and the chooser
    times them, as the Compressor's layer job does, without decomposing anything.
    """
    compressor = sc.Compressor(
        model,
        sc.Reduction(rate),
        None,
        methods=kind_methods(model, conv_method=conv_method),  # kxk convs; 1x1 keep SVD
        progress=False,
    )
    options = compressor.options

    def ranks_for(method: str, module: nn.Module, shape: sc.LayerShape, name: str) -> Ranks:
        cls = layer_class(method, shape, name)
        cls.check_supported(shape, options, name)
        request = RankRequest(name, cls, shape, module, 0, 1, options)
        return compressor.strategy.choose_ranks(request)

    plan: Plan = {}
    for target in compressor.targets:
        module = get_module(model, target.name)
        shape = sc.LayerShape.from_module(module, target.name)
        if chooser is not None:
            proposals = []
            pinned = target.method if target.pinned else None
            for method in chooser.candidate_methods(shape, pinned):
                try:
                    proposals.append((method, ranks_for(method, module, shape, target.name)))
                except (sc.UnsupportedLayerError, ValueError):
                    continue
            choice = chooser.choose(target.name, module, proposals, options)
            if choice.method is not None and choice.ranks is not None:
                plan[target.name] = (choice.method, choice.ranks)
            continue
        ranks = ranks_for(target.method, module, shape, target.name)
        cls = layer_class(target.method, shape, target.name)
        if cls.param_count(shape, ranks, options) < shape.dense_params:
            plan[target.name] = (target.method, ranks)
    return plan


def plan_macs(
    model: nn.Module,
    plan: Plan,
    base: sc.ModelStats,
    shapes: dict[str, tuple[int, ...]],
    cache: dict[Any, int],
) -> int:
    """Whole-model MACs after ``plan``, from layer structures alone."""
    total = base.macs
    for name, (method, ranks) in plan.items():
        shape = sc.LayerShape.from_module(get_module(model, name), name)
        key = (shape, method, ranks, shapes[name])
        if key not in cache:
            cache[key] = layer_macs(sc.empty_layer(shape, method, ranks), shapes[name])
        total += cache[key] - base.layer_macs.get(name, 0)
    return total


def find_rate(
    model: nn.Module,
    x: torch.Tensor,
    target: float,
    conv_method: str,
    chooser: LatencyChooser | None = None,
) -> float:
    """The Reduction rate whose pass gives ``target`` times fewer MACs (or the most it can)."""
    base = model_stats(model, x)
    names = [n for n, _ in sc.compressor.decomposable_layers(model)]
    shapes = {name: info.shape for name, info in layer_inputs(model, x, names).items()}
    cache: dict[Any, int] = {}

    def ratio(rate: float) -> float:
        plan = plan_at_rate(model, rate, conv_method, chooser)
        return base.macs / plan_macs(model, plan, base, shapes, cache)

    lo, hi = 1.0, 64.0
    if ratio(hi) < target:
        return hi  # out of reach: the table shows how far it got
    for _ in range(16):
        mid = math.sqrt(lo * hi)
        if ratio(mid) < target:
            lo = mid
        else:
            hi = mid
        if hi / lo < 1.01:
            break
    return hi


def build(
    original: nn.Module,
    x: torch.Tensor,
    rate: float,
    conv_method: str,
    aware: sc.LatencyAware | None,
    chooser: LatencyChooser | None,
    decompose: bool,
) -> nn.Module:
    """The compressed model: by the Compressor (``decompose``), or its structure alone.

    Latency does not depend on the weights, and the models have random weights anyway;
    the structure-only build makes the choices the Compressor makes (same strategy,
    same timing table) without the minutes of decomposing VGG-16's classifier.
    """
    model = copy.deepcopy(original)
    if decompose:
        compressor = sc.Compressor(
            model,
            sc.Reduction(rate),
            x,
            methods=kind_methods(model, conv_method=conv_method),
            layers_per_step=10_000,
            latency_aware=aware,
            progress=False,
        )
        compressor.compression_step()
        return model
    for name, (method, ranks) in plan_at_rate(model, rate, conv_method, chooser).items():
        shape = sc.LayerShape.from_module(get_module(model, name), name)
        replace_module(model, name, sc.empty_layer(shape, method, ranks, device=x.device))
    return model


def prepare(model: nn.Module) -> nn.Module:
    """Inference preparation applied to every model alike (channels-last comes later)."""
    model.eval()
    sc.fold_batchnorm(model)
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
    parser.add_argument("--aware-repeats", type=int, default=5)
    parser.add_argument(
        "--no-aware-match",
        action="store_true",
        help="skip the latency-aware pass whose rate is searched to meet the MAC target",
    )
    parser.add_argument(
        "--decompose",
        action="store_true",
        help="run the Compressor (real decompositions) instead of building structures",
    )
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
        f"plain = {args.conv_method} (1x1: svd); aware = fastest of {args.aware_methods} or "
        f"the dense layer, timed at batch {args.aware_batch}, at the plain rate (aware) or "
        f"at the rate that meets the MAC target (aware=); "
        f"{'decomposed by the Compressor' if args.decompose else 'structures only'}"
    )
    batch_cols = " ".join(f"{f'lat x b{b}':>9} {f'eff b{b}':>7}" for b in args.batches)
    print(
        f"{'model':<13} {'target':>6} {'variant':<7} {'rate':>6} {'MACs x':>7} "
        f"{'params x':>8} {batch_cols} {'goal':<25} {'vs plain':>11}"
    )
    timer = StructureTimer(device, warmup=1, repeats=args.aware_repeats)
    aware = sc.LatencyAware(
        methods=tuple(args.aware_methods), batch_size=args.aware_batch, timer=timer
    )
    for model_name in args.models:
        torch.manual_seed(0)
        original = torchvision.models.get_model(model_name, weights=None).eval().to(device)
        x1 = torch.randn(1, 3, args.size, args.size, device=device)
        base = model_stats(original, x1)
        # The aware choice times each layer in the layout it will run in.
        laid_out = to_layout(original, channels_last)
        xa = x1.to(memory_format=torch.channels_last) if channels_last else x1
        names = [n for n, _ in sc.compressor.decomposable_layers(laid_out)]
        chooser = LatencyChooser(aware, layer_inputs(laid_out, xa, names))
        variants: dict[str, nn.Module] = {"original": prepare(copy.deepcopy(original))}
        rows: list[tuple[float, str, float, sc.ModelStats]] = []
        for target in args.targets:
            started = time.perf_counter()
            rate = find_rate(original, x1, target, args.conv_method)
            passes: list[tuple[str, float, sc.LatencyAware | None]] = [
                ("plain", rate, None),
                ("aware", rate, aware),
            ]
            if not args.no_aware_match:
                matched = find_rate(laid_out, xa, target, args.conv_method, chooser)
                passes.append(("aware=", matched, aware))
            for variant, variant_rate, config in passes:
                source, x = (laid_out, xa) if config is not None else (original, x1)
                model = build(
                    source,
                    x,
                    variant_rate,
                    args.conv_method,
                    config,
                    chooser if config is not None else None,
                    args.decompose,
                )
                stats = model_stats(model, x1)
                variants[f"{target:g}x {variant}"] = prepare(model)
                rows.append((target, variant, variant_rate, stats))
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
            if macs_x < 0.97 * target:
                goal += ", MACs short"  # efficiency met on fewer MACs saved than asked
            versus = "-"
            if variant != "plain":
                plain = f"{target:g}x plain"
                versus = " ".join(
                    f"{latencies[b][key] / latencies[b][plain]:.2f}" for b in args.batches
                )
            print(
                f"{model_name:<13} {target:>5g}x {variant:<7} {rate:>6.2f} {macs_x:>7.2f} "
                f"{base.params / stats.params:>8.2f} {' '.join(cells)} {goal:<25} {versus:>11}",
                flush=True,
            )


def to_layout(model: nn.Module, channels_last: bool) -> nn.Module:
    """A copy in the layout the benchmark runs in, so the aware pass times what will run."""
    copied = copy.deepcopy(model)
    return sc.to_channels_last(copied) if channels_last else copied


if __name__ == "__main__":
    main()
