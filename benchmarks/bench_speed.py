"""Whole-model speed: measured speed-up against MAC cut, in eager PyTorch and onnxruntime.

For each torchvision model (random weights, eval mode) and each target (2x, 3x) it builds:

- ``plain``: a ``Reduction`` pass (Tucker2 for kxk, SVD for 1x1 and Linear) at the rate
  whose pass cuts the MACs target-fold (bisection on fvcore's count, from structures);
- ``aware=``: ``latency_aware`` (each layer the fastest of SVD, Tucker2 and the dense
  layer, timed at its real input shape and layout) at the rate that meets the MAC target;
- ``speedup bN``: ``Speedup(target, batch_size=N)``: every layer's method and ranks chosen
  for a whole-model speed-up of ``target`` measured at batch N (layer tables, Lagrangian
  allocation, closed loop on the whole model).
- ``macs bN``: ``Speedup(efficiency * target, macs=target, batch_size=N)``: the MAC cut
  ``target`` spent where it buys time measured at batch N, asking for at least
  ``--efficiency`` (0.85) of it as speed-up: the MAC-targeted path that uses the timings.

``plain`` and ``aware=`` are the paths as they were before ``Speedup``; they are rebuilt
and timed in the same run, so "before" and "after" share the machine's conditions.

Every model, the original included, gets the same inference preparation: BatchNorm
folded, channels-last weights and input (eager). Models are timed side by side in this
process, one forward pass each per round, rounds interleaved, median after warm-up, at
every batch size; then exported to ONNX (BatchNorm folded, dynamic batch) and timed the
same way in onnxruntime with every graph optimisation on (``--no-onnx`` skips it).
Latency does not depend on the weights, so compressed models are built from structures
(``empty_layer``) unless ``--decompose`` runs the Compressor, which also measures the
weight and output errors (minutes more).

Efficiency = latency ratio / MAC ratio; the goal is >= 0.8.

Run: ``python benchmarks/bench_speed.py [--models resnet18] [--targets 2 3] [--threads 2]``
"""

from __future__ import annotations

import argparse
import copy
import logging
import math
import os
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
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
from stagecomp.methods import layer_class
from stagecomp.plan import decomposable_layers
from stagecomp.stats import layer_macs, model_stats
from stagecomp.strategies.base import ModelRequest, RankRequest
from stagecomp.surgery import get_module, replace_module
from stagecomp.timing import describe_device, forward_latency

GOAL = 0.8

Plan = dict[str, tuple[str, tuple[int, ...]]]
"""Layer name -> (method, ranks) of one compression pass."""


@dataclass
class Row:
    """One compressed model and what is known about it."""

    model_name: str
    size: int
    target: float
    variant: str
    rate: float | None
    stats: sc.ModelStats
    model: nn.Module
    asked: float | None = None
    loop_measured: float | None = None
    strategy_s: float | None = None
    compress_s: float | None = None
    weight_error: float | None = None
    output_error: float | None = None
    note: str = ""
    eager: dict[int, float] = field(default_factory=dict)
    onnx: dict[int, float] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.target:g}x {self.variant}"


class StructureTimer:
    """Times a candidate from its structure alone, cached, so every pass sees the same table."""

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


# ---------------------------------------------------------------------- plain / aware
def plan_at_rate(model: nn.Module, rate: float, chooser: LatencyChooser | None) -> Plan:
    """What a ``Reduction(rate)`` pass does to each layer, plain or latency-aware."""
    compressor = sc.Compressor(model, sc.Reduction(rate), None, progress=False)
    plan: Plan = {}
    for target in compressor.targets:
        module = get_module(model, target.name)
        shape = sc.LayerShape.from_module(module, target.name)
        methods = (
            chooser.candidate_methods(shape, None) if chooser is not None else (target.method,)
        )
        proposals = []
        for method in methods:
            cls = layer_class(method, shape, target.name)
            request = RankRequest(target.name, cls, shape, module, 0, 1, compressor.options)
            proposals.append((method, target.strategy.choose_ranks(request)))
        if chooser is not None:
            choice = chooser.choose(target.name, module, proposals, compressor.options)
            if choice.method is not None and choice.ranks is not None:
                plan[target.name] = (choice.method, choice.ranks)
            continue
        method, ranks = proposals[0]
        cls = layer_class(method, shape, target.name)
        if cls.param_count(shape, ranks, compressor.options) < shape.dense_params:
            plan[target.name] = (method, ranks)
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
    model: nn.Module, x: torch.Tensor, target: float, chooser: LatencyChooser | None = None
) -> float:
    """The Reduction rate whose pass gives ``target`` times fewer MACs (or the most it can)."""
    base = model_stats(model, x)
    names = [n for n, _ in decomposable_layers(model)]
    shapes = {name: info.shape for name, info in layer_inputs(model, x, names).items()}
    cache: dict[Any, int] = {}

    def ratio(rate: float) -> float:
        return base.macs / plan_macs(model, plan_at_rate(model, rate, chooser), base, shapes, cache)

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


def with_structures(original: nn.Module, plan: Plan, device: torch.device) -> nn.Module:
    """A copy of ``original`` with each planned layer replaced by its structure."""
    model = copy.deepcopy(original)
    for name, (method, ranks) in plan.items():
        shape = sc.LayerShape.from_module(get_module(model, name), name)
        replace_module(model, name, sc.empty_layer(shape, method, ranks, device=device))
    return model


# ---------------------------------------------------------------------- Speedup
def speedup_row(
    original: nn.Module,
    x: torch.Tensor,
    target: float,
    batch: int,
    decompose: bool,
    cache: dict[Any, float],
    model_name: str,
    size: int,
    efficiency: float | None = None,
) -> Row:
    """``Speedup(target)`` timed at ``batch``: its structures, or the Compressor's result.

    With ``efficiency``: ``Speedup(efficiency * target, macs=target)`` instead.
    """
    model = copy.deepcopy(original)
    if efficiency is None:
        strategy = sc.Speedup(target, batch_size=batch, layer_cache=cache)
    else:
        strategy = sc.Speedup(efficiency * target, macs=target, batch_size=batch, layer_cache=cache)
    started = time.perf_counter()
    compressor = sc.Compressor(model, strategy, x, layers_per_step=10**6, progress=False)
    if decompose:
        result = compressor.compression_step()
        outcome = strategy.outcome(0)
        errors = [c.weight_error for c in result.changes if c.weight_error is not None]
        w_error = statistics.mean(errors) if errors else 0.0
    else:
        names = tuple(t.name for t in compressor.targets)
        strategy.prepare(ModelRequest(model, x, names, {}, 0, 1, compressor.options))
        outcome = strategy.outcome(0)
        plan = {
            n: (p.method, p.ranks)
            for n, p in outcome.picks.items()
            if p.method is not None and p.ranks is not None
        }
        model = with_structures(original, plan, x.device)
        w_error = None
    total_s = time.perf_counter() - started
    note = "" if outcome.reached else f"not reached: {outcome.reason}"
    return Row(
        model_name,
        size,
        target,
        f"speedup b{batch}" if efficiency is None else f"macs b{batch}",
        None,
        model_stats(model, x),
        model,
        asked=strategy.target,
        loop_measured=outcome.measured,
        strategy_s=outcome.seconds,
        compress_s=total_s if decompose else None,
        weight_error=w_error,
        note=note,
    )


# ---------------------------------------------------------------------- timing
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


def onnx_sessions(
    models: dict[str, nn.Module], folder: str, threads: int, size: int
) -> dict[str, Any]:
    """Each model exported to ONNX (dynamic batch) and loaded in onnxruntime, all
    graph optimisations on, ``threads`` intra-op threads."""
    import onnxruntime as ort

    sessions = {}
    for key, model in models.items():
        path = os.path.join(folder, key.replace(" ", "_").replace("=", "eq") + ".onnx")
        x = torch.randn(1, 3, size, size)
        torch.onnx.export(
            model,
            (x,),
            path,
            dynamo=False,
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
        )
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        sessions[key] = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    return sessions


def ort_latency(
    sessions: dict[str, Any], x: np.ndarray, warmup: int, repeats: int
) -> dict[str, float]:
    """Median seconds per session, interleaved like ``interleaved_latency``."""

    def once(session: Any) -> float:
        begin = time.perf_counter()
        session.run(None, {"x": x})
        return time.perf_counter() - begin

    for session in sessions.values():
        for _ in range(warmup):
            once(session)
    samples: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(repeats):
        for name, session in sessions.items():
            samples[name].append(once(session))
    return {name: statistics.median(s) for name, s in samples.items()}


@torch.no_grad()
def output_error(original: nn.Module, model: nn.Module, x: torch.Tensor) -> float:
    """Relative error of the final output against the original model's."""
    reference = original(x)
    return float((model(x) - reference).norm() / reference.norm())


# ---------------------------------------------------------------------- output
def efficiency_table(rows: list[Row], batches: list[int], runtime: str) -> None:
    """One line per model and variant: rate, MAC and parameter cuts, speed-up and efficiency."""
    cols = " ".join(f"{f'lat x b{b}':>9} {f'eff b{b}':>7}" for b in batches)
    print(f"\n## {runtime}: latency ratio (original / compressed) and efficiency")
    print(
        f"{'model':<13} {'px':>4} {'target':>6} {'variant':<12} {'rate':>6} {'MACs x':>7} "
        f"{'params x':>8} {cols} {'goal':<20}"
    )
    for row in rows:
        latencies = row.eager if runtime == "eager" else row.onnx
        if not latencies:
            continue
        base = rows_original(rows, row)
        macs_x = base.stats.macs / row.stats.macs
        cells, effs = [], []
        for batch in batches:
            speed = (base.eager if runtime == "eager" else base.onnx)[batch] / latencies[batch]
            effs.append(speed / macs_x)
            cells.append(f"{speed:>9.2f} {speed / macs_x:>7.2f}")
        worst = min(effs)
        goal = "met" if worst >= GOAL else f"no: eff {worst:.2f}"
        rate = f"{row.rate:>6.2f}" if row.rate is not None else f"{'-':>6}"
        print(
            f"{row.model_name:<13} {row.size:>4} {row.target:>5g}x {row.variant:<12} {rate} "
            f"{macs_x:>7.2f} {base.stats.params / row.stats.params:>8.2f} {' '.join(cells)} "
            f"{goal:<20}",
            flush=True,
        )


def speedup_table(rows: list[Row], batches: list[int]) -> None:
    """One line per ``Speedup`` run: asked, measured by its loop and here, cuts, errors, cost."""
    print("\n## Speedup: asked, measured (loop / eager here), cuts, errors, time of the strategy")
    cols = " ".join(f"{f'eager b{b}':>9}" for b in batches)
    print(
        f"{'model':<13} {'px':>4} {'variant':<12} {'asked':>6} {'loop':>6} {cols} "
        f"{'MACs x':>7} {'params x':>8} {'w err':>6} {'out err':>7} {'strategy s':>10} "
        f"{'compress s':>10}  note"
    )
    for row in rows:
        if row.asked is None:
            continue
        base = rows_original(rows, row)
        measured = " ".join(f"{base.eager[b] / row.eager[b]:>9.2f}" for b in batches)

        def cell(value: float | None, width: int, spec: str) -> str:
            return f"{value:>{width}{spec}}" if value is not None else f"{'-':>{width}}"

        print(
            f"{row.model_name:<13} {row.size:>4} {row.variant:<12} {row.asked:>5g}x "
            f"{row.loop_measured or 0:>5.2f}x {measured} "
            f"{base.stats.macs / row.stats.macs:>7.2f} "
            f"{base.stats.params / row.stats.params:>8.2f} "
            f"{cell(row.weight_error, 6, '.3f')} {cell(row.output_error, 7, '.3f')} "
            f"{cell(row.strategy_s, 10, '.1f')} {cell(row.compress_s, 10, '.1f')}  {row.note}",
            flush=True,
        )


def rows_original(rows: list[Row], row: Row) -> Row:
    return next(
        r
        for r in rows
        if r.model_name == row.model_name and r.size == row.size and r.variant == "original"
    )


# ---------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", nargs="+", default=["resnet18", "resnet50", "vgg16", "mobilenet_v2"]
    )
    parser.add_argument("--targets", type=float, nargs="+", default=[2.0, 3.0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--sizes", type=int, nargs="+", default=[224])
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["plain", "aware=", "speedup", "macs"],
        choices=["plain", "aware=", "speedup", "macs"],
    )
    parser.add_argument(
        "--efficiency",
        type=float,
        default=0.85,
        help="the macs variant asks Speedup(efficiency * target, macs=target)",
    )
    parser.add_argument(
        "--speedup-batches",
        type=int,
        nargs="+",
        default=None,
        help="batch sizes Speedup times at (default: --batches)",
    )
    parser.add_argument("--aware-batch", type=int, default=1)
    parser.add_argument("--aware-repeats", type=int, default=5)
    parser.add_argument("--decompose", action="store_true", help="run the Compressor for Speedup")
    parser.add_argument("--no-onnx", action="store_true")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    with open("/proc/loadavg") as loadavg:
        load = " ".join(loadavg.read().split()[:3])
    print(
        f"# bench_speed: {describe_device(device)}, load average {load} at start, "
        f"{'/'.join(map(str, args.sizes))} px, BN folded, eager channels-last, "
        f"median of {args.repeats} interleaved runs after {args.warmup} warm-up; "
        f"plain = tucker2 (1x1: svd) at the MAC target; aware= = fastest of svd/tucker2/dense "
        f"timed at batch {args.aware_batch}, at the rate meeting the MAC target; "
        f"speedup bN = Speedup(target, batch_size=N); macs bN = Speedup({args.efficiency:g} * "
        f"target, macs=target, batch_size=N); "
        f"{'decomposed by the Compressor' if args.decompose else 'structures only'}"
    )
    timer = StructureTimer(device, warmup=1, repeats=args.aware_repeats)
    aware = sc.LatencyAware(methods=("svd", "tucker2"), batch_size=args.aware_batch, timer=timer)
    rows: list[Row] = []
    for model_name in args.models:
        for size in args.sizes:
            rows += run_model(model_name, size, args, device, aware)
    efficiency_table(rows, args.batches, "eager")
    if not args.no_onnx:
        efficiency_table(rows, args.batches, "onnxruntime")
    speedup_table(rows, args.batches)
    with open("/proc/loadavg") as loadavg:
        print(f"\n# load average at the end: {' '.join(loadavg.read().split()[:3])}")


def run_model(
    model_name: str,
    size: int,
    args: argparse.Namespace,
    device: torch.device,
    aware: sc.LatencyAware,
) -> list[Row]:
    """Build, prepare and time every variant of one model at one input size."""
    torch.manual_seed(0)
    original = torchvision.models.get_model(model_name, weights=None).eval().to(device)
    x1 = torch.randn(1, 3, size, size, device=device)
    xa = x1.to(memory_format=torch.channels_last)
    laid_out = sc.to_channels_last(copy.deepcopy(original))
    names = [n for n, _ in decomposable_layers(laid_out)]
    assert aware.timer is not None
    chooser = LatencyChooser(aware, layer_inputs(laid_out, xa, names))
    base_stats = model_stats(original, x1)
    rows = [Row(model_name, size, 1.0, "original", None, base_stats, original)]
    layer_cache: dict[Any, float] = {}
    for target in args.targets:
        if "plain" in args.variants:
            rate = find_rate(original, x1, target)
            model = with_structures(original, plan_at_rate(original, rate, None), device)
            rows.append(Row(model_name, size, target, "plain", rate, model_stats(model, x1), model))
        if "aware=" in args.variants:
            rate = find_rate(laid_out, xa, target, chooser)
            model = with_structures(original, plan_at_rate(laid_out, rate, chooser), device)
            rows.append(
                Row(model_name, size, target, "aware=", rate, model_stats(model, x1), model)
            )
        for variant in ("speedup", "macs"):
            if variant not in args.variants:
                continue
            efficiency = args.efficiency if variant == "macs" else None
            for batch in args.speedup_batches or args.batches:
                x = xa.expand(batch, -1, -1, -1).contiguous(memory_format=torch.channels_last)
                row = speedup_row(
                    laid_out,
                    x,
                    target,
                    batch,
                    args.decompose,
                    layer_cache,
                    model_name,
                    size,
                    efficiency,
                )
                row.stats = model_stats(row.model, x1)
                if args.decompose:
                    row.output_error = output_error(
                        prepare(copy.deepcopy(original)), prepare(copy.deepcopy(row.model)), x1
                    )
                rows.append(row)
    models = {row.key: prepare(copy.deepcopy(row.model)) for row in rows}
    if not args.no_onnx:
        with tempfile.TemporaryDirectory() as folder:
            sessions = onnx_sessions(models, folder, args.threads, size)
            for batch in args.batches:
                x = (
                    np.random.default_rng(0)
                    .standard_normal((batch, 3, size, size))
                    .astype(np.float32)
                )
                times = ort_latency(sessions, x, args.warmup, args.repeats)
                for row in rows:
                    row.onnx[batch] = times[row.key]
            del sessions
    for model in models.values():
        sc.to_channels_last(model)
    for batch in args.batches:
        x = torch.randn(batch, 3, size, size, device=device).to(memory_format=torch.channels_last)
        times = interleaved_latency(models, x, args.warmup, args.repeats)
        for row in rows:
            row.eager[batch] = times[row.key]
    for row in rows:
        row.model = nn.Identity()  # free the weights; the numbers are kept
    return rows


if __name__ == "__main__":
    main()
