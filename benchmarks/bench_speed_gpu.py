"""Whole-model speed on a CUDA GPU: float16 / bfloat16, batch 1 / 32 / 256, CUDA events.

The GPU counterpart of ``bench_speed.py`` (same variants, same efficiency: latency ratio
over MAC ratio, goal >= 0.7 on GPU): for each torchvision model (random weights) and
each target (2x, 3x) it builds

- ``plain``: ``Reduction`` at the rate whose pass cuts MACs target-fold;
- ``aware=``: latency-aware (fastest of SVD, Tucker2 and dense per layer, each timed on
  the GPU in the benchmark's dtype at ``--aware-batch``) at the rate meeting the MAC target;
- ``speedup bN``: ``Speedup(target, batch_size=N, device="cuda")``, timed on the GPU in
  the dtype at batch N (``--speedup-batches``, default 32);

and times every model, the original included (BatchNorm folded, channels-last, cast to
the dtype), with CUDA events in interleaved rounds, median after warm-up, at every batch.

It has not been run yet: no GPU was lent to the work that wrote it. It fails at once,
saying so, where ``torch.cuda.is_available()`` is False.

Run: ``python benchmarks/bench_speed_gpu.py [--models resnet50] [--dtypes float16]``
(about 10 minutes for the four models on one recent GPU with the defaults).
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import time
from typing import Any

import torch
import torchvision
from bench_speed import GOAL, find_rate, plan_at_rate, prepare, with_structures
from torch import nn

import stagecomp as sc
from stagecomp.latency_aware import CURRENT, Candidate, LatencyChooser, fastest_run, layer_inputs
from stagecomp.plan import decomposable_layers
from stagecomp.stats import model_stats
from stagecomp.strategies.base import ModelRequest

GPU_GOAL = 0.7
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class GPUStructureTimer:
    """Times a candidate's structure on the GPU in one dtype (cached per geometry)."""

    def __init__(self, dtype: torch.dtype, warmup: int, repeats: int) -> None:
        self.dtype, self.warmup, self.repeats = dtype, warmup, repeats
        self.cache: dict[Any, float] = {}

    def __call__(self, candidate: Candidate) -> float:
        c = candidate
        key = (c.shape, c.input_shape, c.channels_last, c.method, c.ranks)
        if key not in self.cache:
            device = torch.device("cuda")
            if c.method == CURRENT:
                layer: nn.Module = c.shape.build_dense(device=device, dtype=self.dtype)
            else:
                layer = sc.empty_layer(
                    c.shape, c.method, c.ranks or (), device=device, dtype=self.dtype
                )
            x = torch.randn(c.input_shape, device=device, dtype=self.dtype)
            if c.channels_last:
                sc.to_channels_last(layer)
                x = x.contiguous(memory_format=torch.channels_last)
            layer.eval()
            self.cache[key] = fastest_run(layer, x, self.warmup, self.repeats)
        return self.cache[key]


@torch.no_grad()
def cuda_latency(
    models: dict[str, nn.Module], x: torch.Tensor, warmup: int, repeats: int
) -> dict[str, float]:
    """Median seconds per model by CUDA events, in interleaved rounds."""
    for model in models.values():
        for _ in range(warmup):
            model(x)
    torch.cuda.synchronize()
    samples: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats):
        for name, model in models.items():
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            model(x)
            end.record()
            torch.cuda.synchronize()
            samples[name].append(start.elapsed_time(end) / 1e3)
    return {name: statistics.median(s) for name, s in samples.items()}


def speedup_structures(
    laid_out: nn.Module, x: torch.Tensor, target: float, cache: dict[Any, float]
) -> tuple[nn.Module, sc.strategies.speedup.SpeedupOutcome]:
    """``Speedup(target)``'s choices for ``laid_out`` (on the GPU, in its dtype) at ``x``."""
    strategy = sc.Speedup(target, device="cuda", layer_cache=cache)
    compressor = sc.Compressor(copy.deepcopy(laid_out), strategy, x, progress=False)
    names = tuple(t.name for t in compressor.targets)
    strategy.prepare(ModelRequest(laid_out, x, names, {}, 0, 1, compressor.options))
    outcome = strategy.outcome(0)
    plan = {
        n: (p.method, p.ranks)
        for n, p in outcome.picks.items()
        if p.method is not None and p.ranks is not None
    }
    return with_structures(laid_out, plan, x.device), outcome


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--models", nargs="+", default=["resnet18", "resnet50", "vgg16", "mobilenet_v2"]
    )
    parser.add_argument("--targets", type=float, nargs="+", default=[2.0, 3.0])
    parser.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16"], choices=DTYPES)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32, 256])
    parser.add_argument("--speedup-batches", type=int, nargs="+", default=[32])
    parser.add_argument("--aware-batch", type=int, default=32)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit(
            "bench_speed_gpu.py needs a CUDA GPU and torch.cuda.is_available() is False here; "
            "the CPU table comes from benchmarks/bench_speed.py"
        )
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING)
    print(
        f"# bench_speed_gpu: {torch.cuda.get_device_name()}, torch {torch.__version__}, "
        f"{args.size} px, BN folded, channels-last, CUDA events, median of {args.repeats} "
        f"interleaved runs after {args.warmup} warm-up; goal: efficiency >= {GPU_GOAL} "
        f"(CPU: {GOAL})"
    )
    cols = " ".join(f"{f'x b{b}':>7} {f'eff b{b}':>8}" for b in args.batches)
    print(f"{'model':<13} {'dtype':<9} {'target':>6} {'variant':<12} {'MACs x':>7} {cols} goal")
    for model_name in args.models:
        for dtype_name in args.dtypes:
            run(model_name, DTYPES[dtype_name], dtype_name, args)


def run(model_name: str, dtype: torch.dtype, dtype_name: str, args: argparse.Namespace) -> None:
    """Every variant of one model in one dtype, timed at every batch size."""
    device = torch.device("cuda")
    torch.manual_seed(0)
    original = torchvision.models.get_model(model_name, weights=None).eval()
    x1 = torch.randn(1, 3, args.size, args.size)
    base = model_stats(original, x1)
    laid_out = sc.to_channels_last(copy.deepcopy(original).to(device, dtype))
    xa = x1.to(device, dtype).contiguous(memory_format=torch.channels_last)
    timer = GPUStructureTimer(dtype, warmup=3, repeats=10)
    aware = sc.LatencyAware(methods=("svd", "tucker2"), batch_size=args.aware_batch, timer=timer)
    names = [n for n, _ in decomposable_layers(laid_out)]
    chooser = LatencyChooser(aware, layer_inputs(laid_out, xa, names))
    variants: dict[str, tuple[nn.Module, str]] = {"1x original": (original, "")}
    cache: dict[Any, float] = {}
    for target in args.targets:
        rate = find_rate(original, x1, target)
        plain = with_structures(original, plan_at_rate(original, rate, None), torch.device("cpu"))
        variants[f"{target:g}x plain"] = (plain, "")
        matched = find_rate(laid_out, xa, target, chooser)
        aware_model = with_structures(original, plan_at_rate(laid_out, matched, chooser), "cpu")
        variants[f"{target:g}x aware="] = (aware_model, "")
        for batch in args.speedup_batches:
            x = xa.expand(batch, -1, -1, -1).contiguous(memory_format=torch.channels_last)
            started = time.perf_counter()
            model, outcome = speedup_structures(laid_out, x, target, cache)
            note = f"loop {outcome.measured:.2f}x, {time.perf_counter() - started:.0f} s"
            variants[f"{target:g}x speedup b{batch}"] = (model.float().cpu(), note)
    stats = {key: model_stats(model, x1) for key, (model, _) in variants.items()}
    models = {
        key: sc.to_channels_last(prepare(copy.deepcopy(model)).to(device, dtype))
        for key, (model, _) in variants.items()
    }
    latencies = {}
    for batch in args.batches:
        x = torch.randn(batch, 3, args.size, args.size, device=device, dtype=dtype)
        x = x.contiguous(memory_format=torch.channels_last)
        latencies[batch] = cuda_latency(models, x, args.warmup, args.repeats)
    for key, (_, note) in variants.items():
        target, variant = key.split(" ", 1)
        macs_x = base.macs / stats[key].macs
        cells, effs = [], []
        for batch in args.batches:
            speed = latencies[batch]["1x original"] / latencies[batch][key]
            effs.append(speed / macs_x)
            cells.append(f"{speed:>7.2f} {speed / macs_x:>8.2f}")
        goal = "met" if min(effs) >= GPU_GOAL else f"no: eff {min(effs):.2f}"
        print(
            f"{model_name:<13} {dtype_name:<9} {target:>6} {variant:<12} {macs_x:>7.2f} "
            f"{' '.join(cells)} {goal} {note}",
            flush=True,
        )
    del models
    torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
