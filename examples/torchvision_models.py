"""Compress torchvision models (resnet18, resnet50, vgg16) with each rank strategy.

For every model and strategy this builds the model, compresses all its
Linear/Conv2d layers in one step, prints ``compressor.report()`` and a summary
line, and checks the compressed model still runs. No fine-tuning happens here;
see digits_walkthrough.py for the loop with fine-tuning between steps.

Weights: torchvision's pretrained weights need a download, so models are built
with random weights unless you pass ``--weights FILE`` (a state dict). On random
weights VBMF finds no noise floor to cut at and keeps (nearly) full ranks, which
is the right answer for noise; use trained weights to see what it does.

Run:
    python examples/torchvision_models.py                       # 3 models x 3 strategies, 224 px
    python examples/torchvision_models.py --models resnet18 --strategies vbmf --weights r18.pt
    python examples/torchvision_models.py --quick               # resnet18 at 32 px, reduction
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from typing import Any

import torch
import torchvision
from torch import nn

import stagecomp as sc
from stagecomp.zoo import load_weights_file

# Manual ranks for the layers that hold most of each model's parameters.
MANUAL_RANKS: dict[str, dict[str, int]] = {
    "resnet": {"layer3.*": 64, "layer4.*": 128},
    "vgg": {"features.2[468]": 128, "classifier.0": 512, "classifier.3": 256},
}


def strategy_and_ranks(name: str, strategy: str, rate: float) -> tuple[Any, dict[str, int]]:
    """The strategy object and per-layer ranks (manual only) for one model."""
    if strategy == "vbmf":
        return sc.VBMF(weakening=1.0), {}
    if strategy == "reduction":
        return sc.Reduction(rate=rate), {}
    family = "vgg" if name.startswith("vgg") else "resnet"
    return sc.Manual(), MANUAL_RANKS[family]  # Manual(): only the layers named in ranks


def compress(
    model: nn.Module, strategy: Any, ranks: dict[str, int], example: torch.Tensor
) -> sc.Compressor:
    """Compress every target layer of ``model`` in a single step, in place."""
    targets = len(sc.Compressor(model, strategy, ranks=ranks, progress=False).targets)
    compressor = sc.Compressor(
        model, strategy, example, ranks=ranks, layers_per_step=targets, progress=False
    )
    compressor.compression_step()
    return compressor


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "resnet50", "vgg16"])
    parser.add_argument(
        "--strategies",
        nargs="+",
        choices=["vbmf", "reduction", "manual"],
        default=["vbmf", "reduction", "manual"],
    )
    parser.add_argument("--rate", type=float, default=2.0, help="reduction: per-layer rate")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--weights", help="state dict for the (single) model in --models")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--quiet", action="store_true", help="summary lines only")
    parser.add_argument("--quick", action="store_true", help="resnet18 at 32 px, reduction only")
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.strategies, args.input_size = ["resnet18"], ["reduction"], 32
    if args.weights and len(args.models) != 1:
        parser.error("--weights needs exactly one model in --models")
    torch.set_num_threads(args.threads)

    results: dict[str, dict[str, Any]] = {}
    for name in args.models:
        for strategy_name in args.strategies:
            torch.manual_seed(0)
            model = torchvision.models.get_model(name, weights=None).eval()
            if args.weights:
                model.load_state_dict(load_weights_file(args.weights))
            example = torch.randn(1, 3, args.input_size, args.input_size)
            with torch.no_grad():
                reference = model(example)
            strategy, ranks = strategy_and_ranks(name, strategy_name, args.rate)
            started = time.perf_counter()
            compressor = compress(model, strategy, ranks, example)
            seconds = time.perf_counter() - started
            result = compressor.history[-1]
            with torch.no_grad():
                output = model(example)
            relative = float((output - reference).norm() / reference.norm())
            if not args.quiet:
                print(compressor.report())
            summary = {
                "layers": len(compressor.targets),
                "replaced": len(result.replaced),
                "params_before": result.params_before,
                "params_after": result.params_after,
                "macs_before": result.macs_before,
                "macs_after": result.macs_after,
                "output_change": relative,
                "seconds": seconds,
            }
            results[f"{name}/{strategy_name}"] = summary
            print(
                f"== {name} {strategy_name}: {summary['replaced']}/{summary['layers']} layers "
                f"replaced, params {result.params_before / 1e6:.2f}M -> "
                f"{result.params_after / 1e6:.2f}M, MACs {(result.macs_before or 0) / 1e9:.3f}G "
                f"-> {(result.macs_after or 0) / 1e9:.3f}G, output change {relative:.3f}, "
                f"{seconds:.1f} s\n",
                flush=True,
            )
    return results


if __name__ == "__main__":
    main()
