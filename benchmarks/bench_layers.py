"""Single-layer benchmark: decomposition time, parameter, MAC and latency ratios.

For representative layers (ResNet-50 3x3 convs at 56/28/14/7 px, VGG-16's
3x3 512 conv at 14 px, a 4096x4096 Linear) and each method at the ranks that
give 2x and 4x fewer parameters, it prints the time to decompose, the
relative weight error ``||W - W_r|| / ||W||`` (random weights: a flat spectrum,
so the errors are large), the parameter ratio, the MAC ratio (fvcore) and the
forward latency of the dense layer divided by the decomposed one's, measured
side by side in this process. ``tucker2`` runs HOOI to its tolerance (the
default); ``tucker2-1`` is the same with a single HOOI sweep (``hooi_iters=1``).

Run: ``python benchmarks/bench_layers.py [--device cuda] [--threads 2] [--quick]
[--methods tucker2 tucker2-1 ht]``
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from stagecomp import DecomposeOptions, LayerShape, decompose
from stagecomp.registry import layer_class, methods_for
from stagecomp.stats import layer_macs
from stagecomp.strategies.reduction import ranks_for_reduction
from stagecomp.timing import describe_device, forward_latency

# Extra rows: a method run with other options, under its own label.
VARIANTS = {"tucker2": [("tucker2", {}), ("tucker2-1", {"hooi_iters": 1})]}

LAYERS: list[tuple[str, nn.Module, tuple[int, ...]]] = [
    ("resnet50 3x3 64 @56", nn.Conv2d(64, 64, 3, padding=1, bias=False), (64, 56, 56)),
    ("resnet50 3x3 128 @28", nn.Conv2d(128, 128, 3, padding=1, bias=False), (128, 28, 28)),
    ("resnet50 3x3 256 @14", nn.Conv2d(256, 256, 3, padding=1, bias=False), (256, 14, 14)),
    ("resnet50 3x3 512 @7", nn.Conv2d(512, 512, 3, padding=1, bias=False), (512, 7, 7)),
    ("vgg16 3x3 512 @14", nn.Conv2d(512, 512, 3, padding=1), (512, 14, 14)),
    ("linear 4096x4096", nn.Linear(4096, 4096), (4096,)),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--rates", type=float, nargs="+", default=[2.0, 4.0])
    parser.add_argument("--quick", action="store_true", help="first two layers only")
    parser.add_argument("--methods", nargs="+", help="only these rows (e.g. tucker2 tucker2-1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    options = DecomposeOptions()
    print(f"# stagecomp layer benchmark on {describe_device(device)}")
    lat_cols = " ".join(f"{'lat x b' + str(b):>10}" for b in args.batches)
    print(
        f"{'layer':<22} {'method':<9} {'rate':>4} {'ranks':<16} {'decomp s':>9} {'w.err':>7} "
        f"{'params x':>8} {'MACs x':>7} {lat_cols}"
    )
    layers = LAYERS[:2] if args.quick else LAYERS
    for label, dense, in_shape in layers:
        dense = dense.to(device).eval()
        shape = LayerShape.from_module(dense)
        dense_params = sum(p.numel() for p in dense.parameters())
        dense_macs = layer_macs(dense, (1, *in_shape))
        inputs = {b: torch.randn(b, *in_shape, device=device) for b in args.batches}
        dense_lat = {b: forward_latency(dense, x, min_seconds=0.3) for b, x in inputs.items()}
        rows = [row for m in methods_for(shape) for row in VARIANTS.get(m, [(m, {})])]
        for label_method, changes in rows:
            if args.methods and label_method not in args.methods:
                continue
            method = label_method.split("-")[0]
            cls = layer_class(method, shape)
            row_options = options.updated(changes)
            for rate in args.rates:
                ranks = ranks_for_reduction(cls, shape, rate, row_options)
                start = time.perf_counter()
                layer = decompose(dense, method, ranks, options=row_options).eval()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                seconds = time.perf_counter() - start
                with torch.no_grad():
                    weight = dense.weight
                    error = float((layer.dense_weight() - weight).norm() / weight.norm())
                params = sum(p.numel() for p in layer.parameters())
                macs = layer_macs(layer, (1, *in_shape))
                lats = " ".join(
                    f"{dense_lat[b] / forward_latency(layer, x, min_seconds=0.3):>10.2f}"
                    for b, x in inputs.items()
                )
                rank_text = ",".join(str(r) for r in ranks)
                rank_text = rank_text if len(rank_text) <= 16 else rank_text[:13] + "..."
                print(
                    f"{label:<22} {label_method:<9} {rate:>4.0f} {rank_text:<16} {seconds:>9.3f} "
                    f"{error:>7.4f} {dense_params / params:>8.2f} {dense_macs / macs:>7.2f} {lats}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
