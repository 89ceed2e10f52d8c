"""int8 sensitivity of svd and svd_id factors: relative output error of quantize_dynamic.

A 256x256 Linear with a decaying spectrum (1 to 0.01), decomposed at several ranks; the
error is measured against the float compressed layer, so it is the quantization's alone.
Run: ``python benchmarks/bench_int8.py`` (seconds, CPU).
"""

from __future__ import annotations

import torch
from torch import nn

import stagecomp as sc


def main() -> None:
    torch.manual_seed(0)
    n = 256
    u, _ = torch.linalg.qr(torch.randn(n, n))
    v, _ = torch.linalg.qr(torch.randn(n, n))
    dense = nn.Linear(n, n)
    with torch.no_grad():
        dense.weight.copy_((u * torch.logspace(0, -2, n)) @ v.T)
    x = torch.randn(512, n)
    print("| rank | svd | svd_id |")
    print("|---:|---:|---:|")
    for rank in (32, 64, 128):
        errors = []
        for method in ("svd", "svd_id"):
            model = nn.Sequential(sc.decompose(dense, method, rank)).eval()
            with torch.no_grad():
                reference = model(x)
                quantized = torch.ao.quantization.quantize_dynamic(
                    model, {nn.Linear}, dtype=torch.qint8
                )
                errors.append(float((quantized(x) - reference).norm() / reference.norm()))
        print(f"| {rank} | {errors[0]:.3f} | {errors[1]:.3f} |")


if __name__ == "__main__":
    main()
