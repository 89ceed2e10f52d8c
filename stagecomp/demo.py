"""The main job: train a CNN on real digits, compress it in stages, fine-tune between steps.

Prints, after every step, test accuracy, parameters, MACs and measured CPU
latency against the original model, and can write the table (text and CSV),
a plot of accuracy against MACs and the compressed model to a folder.
Deterministic for a seed and a thread count (one thread by default, so the
numbers are the same on every machine).
"""

from __future__ import annotations

import copy
import csv
import io
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from stagecomp.compressor import Compressor
from stagecomp.digits import DigitsCNN, accuracy, load_digits_data, train
from stagecomp.report import compressor_summary
from stagecomp.serialization import save
from stagecomp.stats import model_stats
from stagecomp.strategies.reduction import Reduction
from stagecomp.timing import speed_ratio

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoRow:
    """One line of the demo table: the model after one step (or the original)."""

    label: str
    accuracy: float
    params: int
    macs: int
    latency_ratio: float


@dataclass
class DemoResult:
    """Everything the demo produced.

    Attributes:
        rows: The original model, then one row per compression step.
        model: The compressed, fine-tuned model.
        compressor: The finished Compressor (``compressor.report()`` has per-layer detail).
        seconds: Wall time of the whole run.
        settings: The arguments of the run, for the record.
    """

    rows: list[DemoRow]
    model: nn.Module
    compressor: Compressor
    seconds: float
    settings: dict[str, object]


def run_demo(
    *,
    seed: int = 0,
    rate: float = 3.0,
    stages: int = 2,
    layers_per_step: int = 2,
    epochs: int = 15,
    finetune_epochs: int = 3,
    exclude: Sequence[str] = ("fc2",),
    threads: int | None = 1,
    latency_repeats: int = 30,
    on_row: Callable[[DemoRow], None] | None = None,
) -> DemoResult:
    """Train, compress in stages with fine-tuning, and return one row per step.

    Args:
        seed: Seed of the data split, the model, training and decomposition.
        rate: Parameter reduction of every compressed layer after the last stage.
        stages: Global compression passes.
        layers_per_step: Layers decomposed between two fine-tuning rounds.
        epochs: Training epochs of the original model.
        finetune_epochs: Fine-tuning epochs after each step (a fresh optimizer each time,
            since a step replaces parameters).
        exclude: Layers left alone; the 10-way classifier by default, whose rank
            is already tiny and which costs accuracy for almost no MACs.
        threads: Torch CPU threads during the run (restored after); results depend
            on it, so the default of 1 gives the same numbers everywhere.
        latency_repeats: Rounds of interleaved forward passes, original and compressed,
            per row (the ratio of the medians is the row's speed-up).
        on_row: Called with each row as soon as it is measured (for live printing).
    """
    settings: dict[str, object] = {
        "seed": seed,
        "rate": rate,
        "stages": stages,
        "layers_per_step": layers_per_step,
        "epochs": epochs,
        "finetune_epochs": finetune_epochs,
        "exclude": list(exclude),
        "threads": threads,
    }
    previous_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    started = time.perf_counter()
    try:
        torch.manual_seed(seed)
        data = load_digits_data(seed)
        model = train(DigitsCNN(), data, epochs=epochs, seed=seed)
        original = copy.deepcopy(model).eval()
        example = data.test_x[:1]
        batch = data.test_x[:256]
        base = model_stats(original, example)
        rows = [DemoRow("original", accuracy(model, data), base.params, base.macs, 1.0)]
        if on_row is not None:
            on_row(rows[0])
        compressor = Compressor(
            model,
            strategy=Reduction(rate),
            example_input=example,
            exclude=list(exclude),
            stages=stages,
            layers_per_step=layers_per_step,
            progress=False,
        )
        while not compressor.done:
            result = compressor.compression_step()
            logger.info("step %d: %s", result.step, [c.name for c in result.changes])
            train(model, data, epochs=finetune_epochs, lr=1e-3, seed=seed + result.step)
            stats = model_stats(model, example)
            model.eval()
            ratio = speed_ratio(original, model, batch, rounds=latency_repeats)
            row = DemoRow(
                f"step {result.step}", accuracy(model, data), stats.params, stats.macs, ratio
            )
            rows.append(row)
            if on_row is not None:
                on_row(row)
    finally:
        torch.set_num_threads(previous_threads)
    return DemoResult(rows, model, compressor, time.perf_counter() - started, settings)


_HEADER = (
    f"{'':<10} {'accuracy':>8} {'params':>9} {'params x':>8} {'MACs':>10} {'MACs x':>7} "
    f"{'speed x':>8}"
)


def format_header() -> str:
    """The column titles of :func:`format_row`."""
    return _HEADER


def format_row(row: DemoRow, first: DemoRow) -> str:
    """One table line; reductions are relative to ``first`` (the original model)."""
    return (
        f"{row.label:<10} {row.accuracy * 100:>7.2f}% {row.params:>9,} "
        f"{first.params / row.params:>7.2f}x {row.macs:>10,} {first.macs / row.macs:>6.2f}x "
        f"{row.latency_ratio:>7.2f}x"
    )


def format_rows(rows: Sequence[DemoRow]) -> str:
    """The demo table, with reductions relative to the first row."""
    return "\n".join([_HEADER, *(format_row(row, rows[0]) for row in rows)])


def rows_csv(rows: Sequence[DemoRow]) -> str:
    """The table as CSV, one row per step, for spreadsheets and plotting elsewhere."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["step", "accuracy", "params", "macs", "macs_reduction", "speedup"])
    for row in rows:
        writer.writerow(
            [
                row.label,
                f"{row.accuracy:.6f}",
                row.params,
                row.macs,
                f"{rows[0].macs / row.macs:.4f}",
                f"{row.latency_ratio:.4f}",
            ]
        )
    return out.getvalue()


def plot_rows(rows: Sequence[DemoRow], path: str | Path, title: str = "") -> Path:
    """Write a PNG of test accuracy against MACs, one labelled point per step."""
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError(
            "the demo plot needs matplotlib: pip install 'stagecomp[demo]'"
        ) from error
    matplotlib.use("Agg", force=True)
    from matplotlib import pyplot as plt

    macs = [row.macs / 1e6 for row in rows]
    acc = [row.accuracy * 100 for row in rows]
    figure, axes = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    axes.plot(macs, acc, "-o", color="tab:blue")
    axes.axhline(acc[0], color="gray", linestyle="--", linewidth=0.8, label="original accuracy")
    for x, y, row in zip(macs, acc, rows, strict=True):
        label = row.label if row is rows[0] else f"{row.label} ({rows[0].macs / row.macs:.1f}x)"
        axes.annotate(label, (x, y), textcoords="offset points", xytext=(5, -12), fontsize=8)
    axes.margins(x=0.12, y=0.2)
    axes.set_xlabel("MACs per image (millions)")
    axes.set_ylabel("test accuracy (%)")
    axes.set_title(title or "stagecomp demo: accuracy after each compression step")
    axes.invert_xaxis()  # compression moves to the right
    axes.grid(alpha=0.3)
    axes.legend(loc="lower left", fontsize=8)
    figure.tight_layout()
    target = Path(path)
    figure.savefig(target, metadata={"Software": None})
    plt.close(figure)
    return target


def write_outputs(result: DemoResult, folder: str | Path) -> dict[str, Path]:
    """Write ``demo.txt``, ``demo.csv``, ``demo.png`` and the compressed model to ``folder``.

    Returns:
        The paths written, by kind ("table", "csv", "plot", "model").
    """
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    table = out / "demo.txt"
    table.write_text(format_rows(result.rows) + "\n\n" + result.compressor.report() + "\n")
    data = out / "demo.csv"
    data.write_text(rows_csv(result.rows))
    settings = result.settings
    title = (
        f"digits CNN, {settings['rate']}x per layer in {settings['stages']} stages "
        f"(seed {settings['seed']})"
    )
    plot = plot_rows(result.rows, out / "demo.png", title)
    model = save(
        result.model,
        out / "model",
        extra={
            "command": "stagecomp demo",
            "model": "stagecomp.digits.DigitsCNN",
            "input_size": 8,
            "strategy": result.compressor.strategy.to_dict(),
            "stages": settings["stages"],
            "demo": settings,
            "summary": compressor_summary(result.compressor),
        },
    )
    return {"table": table, "csv": data, "plot": plot, "model": model}


__all__ = [
    "DemoResult",
    "DemoRow",
    "format_header",
    "format_row",
    "format_rows",
    "plot_rows",
    "rows_csv",
    "run_demo",
    "write_outputs",
]
