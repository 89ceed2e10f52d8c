"""The main job: train a CNN on real digits, compress it in stages, fine-tune between steps.

Prints, after every step, test accuracy, parameters, MACs and measured CPU
latency against the original model. Deterministic for a seed.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass

import torch

from stagecomp.compressor import Compressor
from stagecomp.digits import DigitsCNN, accuracy, load_digits_data, train
from stagecomp.stats import model_stats
from stagecomp.strategies.reduction import Reduction
from stagecomp.timing import forward_latency

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoRow:
    """One line of the demo table."""

    label: str
    accuracy: float
    params: int
    macs: int
    latency_ratio: float


def run_demo(
    *,
    seed: int = 0,
    rate: float = 3.0,
    stages: int = 2,
    layers_per_step: int = 2,
    epochs: int = 15,
    finetune_epochs: int = 2,
    threads: int | None = None,
) -> list[DemoRow]:
    """Train, compress in stages with fine-tuning, and return one row per step."""
    if threads is not None:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    data = load_digits_data(seed)
    model = train(DigitsCNN(), data, epochs=epochs, seed=seed)
    original = copy.deepcopy(model).eval()
    example = data.test_x[:1]
    batch = data.test_x[:256]
    base_latency = forward_latency(original, batch, repeats=30)
    base = model_stats(original, example)
    rows = [DemoRow("original", accuracy(model, data), base.params, base.macs, 1.0)]
    compressor = Compressor(
        model,
        strategy=Reduction(rate),
        example_input=example,
        stages=stages,
        layers_per_step=layers_per_step,
        progress=False,
    )
    while not compressor.done:
        result = compressor.compression_step()
        train(model, data, epochs=finetune_epochs, lr=1e-3, seed=seed + result.step)
        stats = model_stats(model, example)
        model.eval()
        ratio = base_latency / forward_latency(model, batch, repeats=30)
        rows.append(
            DemoRow(f"step {result.step}", accuracy(model, data), stats.params, stats.macs, ratio)
        )
    return rows


def format_rows(rows: list[DemoRow]) -> str:
    """The demo table, with reductions relative to the first row."""
    first = rows[0]
    lines = [f"{'':<10} {'accuracy':>8} {'params':>9} {'MACs':>10} {'MACs x':>7} {'speed x':>8}"]
    for row in rows:
        lines.append(
            f"{row.label:<10} {row.accuracy * 100:>7.2f}% {row.params:>9,} {row.macs:>10,} "
            f"{first.macs / row.macs:>6.2f}x {row.latency_ratio:>7.2f}x"
        )
    return "\n".join(lines)
