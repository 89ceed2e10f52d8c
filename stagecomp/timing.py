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


def describe_device(device: Any) -> str:
    """A short name of the device the timings come from, for benchmark headers."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU, {torch.get_num_threads()} threads"
