"""Decomposition time with stagecomp's bounded threads against torch's default thread count.

stagecomp runs the small linear algebra of a decomposition on one thread and
gives the caller's threads back only to large products (``stagecomp.threads``).
This benchmark times, side by side and interleaved in one process, each case
with that bound ("bounded") and with it switched off ("default": every call
uses torch's thread count, one per core unless the caller set it), on the
machine as it is and, with ``--hog``, with one busy-loop process per core
beside it (started here, killed at the end). Medians of ``--reps`` runs.

Cases: cp3 of a 256-channel 3x3 conv (5 ALS sweeps, rank for 4x fewer
parameters), tucker2 (2 HOOI sweeps; random weights need 6 or more to reach
the default tolerance) and svd of a 512-channel 3x3 conv (2x fewer), and the
EVBMF ranks of every conv of torchvision's resnet18 (random weights). The
sweep counts are fixed so that both settings do the same work, and small so
that the default setting on a busy machine finishes in a few minutes.

Run: ``python benchmarks/bench_threads.py [--hog] [--reps 3]``
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torchvision
from torch import nn

from stagecomp import DecomposeOptions, LayerShape, decompose, threads
from stagecomp.registry import layer_class
from stagecomp.strategies.evbmf import tucker2_vbmf_ranks
from stagecomp.strategies.reduction import ranks_for_reduction

SETTINGS = ("bounded", "default")


def layer_case(channels: int, method: str, rate: float, options: DecomposeOptions) -> Callable:
    conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
    shape = LayerShape.from_module(conv)
    ranks = ranks_for_reduction(layer_class(method, shape), shape, rate, options)
    return lambda: decompose(conv, method, ranks, options=options)


def evbmf_case() -> Callable:
    kernels = [
        m.weight.detach()
        for m in torchvision.models.resnet18(weights=None).modules()
        if isinstance(m, nn.Conv2d)
    ]
    return lambda: [tucker2_vbmf_ranks(k) for k in kernels]


def cases() -> dict[str, Callable]:
    torch.manual_seed(0)
    cp_options = DecomposeOptions(cp_max_iter=5, cp_tol=0.0)  # same work in every run
    return {
        "cp3 256ch 3x3, 5 sweeps": layer_case(256, "cp3", 4.0, cp_options),
        "tucker2 512ch 3x3, 2 sw": layer_case(512, "tucker2", 2.0, DecomposeOptions(hooi_iters=2)),
        "svd 512ch 3x3": layer_case(512, "svd", 2.0, DecomposeOptions()),
        "evbmf resnet18 (20 convs)": evbmf_case(),
    }


def timed(function: Callable, bounded: bool) -> float:
    threads.enabled = bounded
    try:
        start = time.perf_counter()
        function()
        return time.perf_counter() - start
    finally:
        threads.enabled = True


Times = dict[tuple[str, str], list[float]]


def measure(work: dict[str, Callable], reps: int, times: Times) -> None:
    """Fill ``times[(case, setting)]``; what is there stays if a time limit cuts the run."""
    for rep in range(reps):
        order = SETTINGS if rep % 2 == 0 else SETTINGS[::-1]
        for name, function in work.items():
            for setting in order:
                seconds = timed(function, setting == "bounded")
                times.setdefault((name, setting), []).append(seconds)
                print(f"  {name}, {setting}: {seconds:.3f} s", file=sys.stderr, flush=True)


def start_hog() -> list[subprocess.Popen]:
    loop = "while True: pass"
    return [subprocess.Popen([sys.executable, "-c", loop]) for _ in range(os.cpu_count() or 1)]


def print_table(work: dict[str, Callable], phases: dict[str, Times], reps: int) -> None:
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"# bench_threads: CPU, {os.cpu_count()} cores, torch default {torch.get_num_threads()}"
        f" threads; median of up to {reps} interleaved runs, seconds; 'idle' = no hog started;"
        f" load average at the end {load}; '-' = cut by a time limit"
    )
    header = f"{'case':<26}"
    for phase in phases:
        header += f" {phase + ' bounded':>13} {phase + ' default':>13} {'default/b':>9}"
    print(header)
    for name in work:
        row = f"{name:<26}"
        for times in phases.values():
            bounded, default = (times.get((name, s)) for s in SETTINGS)
            row += f" {statistics.median(bounded):>13.3f}" if bounded else f" {'-':>13}"
            row += f" {statistics.median(default):>13.3f}" if default else f" {'-':>13}"
            if bounded and default:
                row += f" {statistics.median(default) / statistics.median(bounded):>9.2f}"
            else:
                row += f" {'-':>9}"
        print(row, flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hog", action="store_true", help="also time with a busy loop per core")
    parser.add_argument("--reps", type=int, default=3)
    args = parser.parse_args()
    # A time limit's SIGTERM still kills the busy loops and prints what was measured.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    work = cases()
    for function in work.values():  # warm-up: allocator, thread pools, LAPACK workspaces
        function()
    phases: dict[str, Times] = {"idle": {}}
    if args.hog:
        phases["hog"] = {}
    try:
        measure(work, args.reps, phases["idle"])
        if args.hog:
            hogs = start_hog()
            try:
                time.sleep(1.0)
                measure(work, args.reps, phases["hog"])
            finally:
                for process in hogs:
                    process.kill()
                    process.wait()
    finally:
        print_table(work, phases, args.reps)


if __name__ == "__main__":
    main()
