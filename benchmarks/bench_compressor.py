"""Whole-model compression pass: wall time and peak memory per strategy.

Each (model, strategy) runs in a fresh subprocess so its peak RSS is its own.
Reference points measured on this machine with musco-pytorch (torchvision,
224 px, one thread): VBMF pass over resnet18 129 s / 1.3 GB; 2x reduction pass
over vgg16 > 13 min; VBMF over vgg16 stopped at 22 min / 9 GB.

Run: ``python benchmarks/bench_compressor.py [--models resnet50 vgg16] [--threads 1]``
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def _give_structure(model: object) -> None:
    """Make every weight low rank (a quarter of full) plus 10% noise, like trained weights.

    Random initial weights are pure noise, where EVBMF rightly keeps every rank and
    the VBMF pass has nothing to decompose; pretrained weights cannot be downloaded here.
    """
    import torch
    from torch import nn

    g = torch.Generator().manual_seed(0)
    for module in model.modules():  # type: ignore[attr-defined]
        if isinstance(module, (nn.Linear, nn.Conv2d)) and module.weight.shape[0] > 1:
            w = module.weight.detach()
            rows, cols = w.shape[0], w[0].numel()
            r = max(1, min(rows, cols) // 4)
            low = torch.randn(rows, r, generator=g) @ torch.randn(r, cols, generator=g)
            low *= w.norm() / low.norm()
            noise = torch.randn(rows, cols, generator=g) * (0.1 * w.norm() / (rows * cols) ** 0.5)
            with torch.no_grad():
                module.weight.copy_((low + noise).reshape(w.shape))


def _one(
    model_name: str, strategy: str, threads: int, size: int, structured: bool
) -> dict[str, float]:
    import torch
    import torchvision

    import stagecomp as sc

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = torchvision.models.get_model(model_name, weights=None).eval()
    if structured:
        _give_structure(model)
    weights_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    x = torch.randn(1, 3, size, size)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    chosen = {"vbmf": sc.VBMF(weakening=0.5), "reduction": sc.Reduction(2.0)}[strategy]
    start = time.perf_counter()
    c = sc.Compressor(model, chosen, x, layers_per_step=10_000, progress=False)
    result = c.compression_step()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "seconds": seconds,
        "weights_mb": weights_mb,
        "peak_extra_mb": peak - base_rss,
        "params_x": result.params_before / result.params_after,
        "macs_x": (result.macs_before or 0) / (result.macs_after or 1),
        "layers": len(c.targets),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["resnet18", "resnet50", "vgg16"])
    parser.add_argument("--strategies", nargs="+", default=["vbmf", "reduction"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument(
        "--structured",
        action="store_true",
        help="low-rank-plus-noise weights (see _give_structure)",
    )
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        result = _one(args.child[0], args.child[1], args.threads, args.size, args.structured)
        print(json.dumps(result))
        return
    weights = "low-rank + noise" if args.structured else "random"
    print(
        f"# whole-model compression pass, {args.threads} thread(s), {args.size} px input, "
        f"{weights} weights"
    )
    print(
        f"{'model':<10} {'strategy':<10} {'layers':>6} {'seconds':>8} {'weights MB':>10} "
        f"{'peak extra MB':>13} {'params x':>8} {'MACs x':>7}"
    )
    for model_name in args.models:
        for strategy in args.strategies:
            out = (
                subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--child",
                        model_name,
                        strategy,
                        "--threads",
                        str(args.threads),
                        "--size",
                        str(args.size),
                    ]
                    + (["--structured"] if args.structured else []),
                    check=True,
                    capture_output=True,
                    text=True,
                )
                .stdout.strip()
                .splitlines()[-1]
            )
            r = json.loads(out)
            print(
                f"{model_name:<10} {strategy:<10} {r['layers']:>6} {r['seconds']:>8.1f} "
                f"{r['weights_mb']:>10.0f} {r['peak_extra_mb']:>13.0f} {r['params_x']:>8.2f} "
                f"{r['macs_x']:>7.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
