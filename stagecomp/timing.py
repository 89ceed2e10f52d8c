"""Wall-clock latency of a forward pass: median of repeated runs after warm-up."""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from torch import nn


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def forward_latency(
    module: nn.Module,
    example_input: torch.Tensor,
    *,
    warmup: int = 3,
    repeats: int = 10,
    min_seconds: float = 0.0,
) -> float:
    """Median seconds of ``module(example_input)``, the module left in its own mode.

    Args:
        module: The module to time (its train/eval mode is used as it is).
        example_input: Input on the module's device.
        warmup: Untimed runs first (allocator, kernel selection, caches).
        repeats: Timed runs; the median is robust to a stray slow run.
        min_seconds: Keep timing past ``repeats`` until this much time is spent,
            so very fast layers are not judged on two or three samples.
    """
    device = example_input.device
    for _ in range(warmup):
        module(example_input)
    _synchronize(device)
    samples: list[float] = []
    started = time.perf_counter()
    while len(samples) < repeats or time.perf_counter() - started < min_seconds:
        begin = time.perf_counter()
        module(example_input)
        _synchronize(device)
        samples.append(time.perf_counter() - begin)
        if len(samples) >= 10 * max(repeats, 1):
            break
    return statistics.median(samples)


@torch.no_grad()
def speed_ratio(
    reference: nn.Module,
    candidate: nn.Module,
    example_input: torch.Tensor,
    *,
    warmup: int = 5,
    rounds: int = 30,
) -> float:
    """How many times faster ``candidate`` runs than ``reference``: median over interleaved
    rounds (one pass of each per round, after warm-up).

    Timing the two in alternation, in the same process, means a burst of other work on
    the machine slows both alike instead of skewing one, so the ratio is steady where two
    separate timings minutes apart are not.
    """
    device = example_input.device
    for _ in range(warmup):
        reference(example_input)
        candidate(example_input)
    _synchronize(device)
    times: dict[int, list[float]] = {0: [], 1: []}
    for round_ in range(rounds):
        order = (0, 1) if round_ % 2 == 0 else (1, 0)
        for which in order:
            module = reference if which == 0 else candidate
            begin = time.perf_counter()
            module(example_input)
            _synchronize(device)
            times[which].append(time.perf_counter() - begin)
    return statistics.median(times[0]) / statistics.median(times[1])


def describe_device(device: Any) -> str:
    """A short name of the device the timings come from, for benchmark headers."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU, {torch.get_num_threads()} threads"
