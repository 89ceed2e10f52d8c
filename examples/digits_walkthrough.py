"""The demo, step by step: train, compress in stages with fine-tuning, save, load.

Everything runs on a CPU in seconds on scikit-learn's 1797 real 8x8 digits
(no download). Read it top to bottom: it is the loop you would write around
your own model and trainer.

Run:
    python examples/digits_walkthrough.py [--out DIR] [--quick]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

import stagecomp as sc
from stagecomp.digits import DigitsCNN, DigitsData, load_digits_data


def finetune(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: DigitsData,
    epochs: int,
    seed: int,
) -> None:
    """A plain training loop: any trainer (Lightning, HF Trainer, your own) works the same way."""
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(data.train_y), generator=generator)
        for start in range(0, len(order), 64):
            idx = order[start : start + 64]
            optimizer.zero_grad()
            F.cross_entropy(model(data.train_x[idx]), data.train_y[idx]).backward()
            optimizer.step()
    model.eval()


@torch.no_grad()
def test_accuracy(model: nn.Module, data: DigitsData) -> float:
    model.eval()
    return float((model(data.test_x).argmax(1) == data.test_y).float().mean())


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=15, help="training of the original")
    parser.add_argument("--finetune-epochs", type=int, default=3, help="after each step")
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--rate", type=float, default=3.0, help="parameter reduction per layer")
    parser.add_argument("--out", help="where to save the compressed model (default: a temp dir)")
    parser.add_argument("--quick", action="store_true", help="a few epochs, one stage")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.finetune_epochs, args.stages = 3, 1, 1
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)  # small model: one thread is fastest and deterministic

    # 1. Data and a trained model.
    data = load_digits_data(args.seed)
    model = DigitsCNN()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    finetune(model, optimizer, data, args.epochs, args.seed)
    example = data.test_x[:1]  # any batch the model accepts; used to count MACs
    before = sc.model_stats(model, example)
    accuracy_before = test_accuracy(model, data)
    print(
        f"original: accuracy {accuracy_before:.2%}, {before.params:,} params, {before.macs:,} MACs"
    )

    # 2. The plan: every conv/linear layer except the 10-way classifier, shrunk `rate`
    #    times by the last stage, two layers per step.
    compressor = sc.Compressor(
        model,
        strategy=sc.Reduction(rate=args.rate),
        example_input=example,
        exclude=["fc2"],
        stages=args.stages,
        layers_per_step=2,
        progress=False,
    )
    print(f"plan: {compressor.total_steps} steps over {[t.name for t in compressor.targets]}")
    if compressor.skipped:
        print(f"left alone: {compressor.skipped}")

    # 3. The loop: one step, then fine-tuning. A step replaces modules, so their old
    #    parameters are gone; build a new optimizer (or add result.new_parameters()
    #    to the old one with optimizer.add_param_group, if you need to keep its state).
    while not compressor.done:
        result = compressor.compression_step()
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        finetune(model, optimizer, data, args.finetune_epochs, args.seed + result.step)
        names = ", ".join(f"{c.name} {c.method}{c.ranks}" for c in result.changes)
        print(
            f"step {result.step}: {names} -> accuracy {test_accuracy(model, data):.2%}, "
            f"{result.params_after:,} params, {result.macs_after:,} MACs"
        )
    print()
    print(compressor.report())

    # 4. Save (a JSON recipe + safetensors weights) and load into a freshly built model.
    with tempfile.TemporaryDirectory() as tmp:
        folder = sc.save(model, args.out or tmp)
        started = time.perf_counter()
        restored = sc.load(DigitsCNN(), folder)
        load_seconds = time.perf_counter() - started
        with torch.no_grad():
            same = torch.equal(restored.eval()(data.test_x), model(data.test_x))
    print(f"\nsaved and reloaded in {load_seconds * 1000:.0f} ms; outputs identical: {same}")

    after = sc.model_stats(model, example)
    return {
        "accuracy_before": accuracy_before,
        "accuracy_after": test_accuracy(model, data),
        "params_before": before.params,
        "params_after": after.params,
        "macs_before": before.macs,
        "macs_after": after.macs,
        "steps": compressor.total_steps,
        "reload_identical": same,
    }


if __name__ == "__main__":
    main()
