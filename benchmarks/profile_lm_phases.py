"""Where block-by-block "gradient" calibration spends memory and time, phase by phase.

Wraps the phases of ``stagecomp.sequential`` (capturing block inputs, moving them on,
a block's input statistics, the sweep that takes the output gradients, a block's
gradient moments from the kept ones) and each layer's job, and prints the
CPU seconds of each call and the resident memory (RSS, Linux) above the loaded model
before, at the peak during (VmHWM, reset before the call) and after it, for the first
step of a ``bench_lm.py`` memory-part model (``--size 25m`` by default: a minute).

With ``--allocate``, the phases of ``allocate_ranks(blocks=..., rounds=0)`` instead
(the sweep's block steps and each layer's costs).

Run: ``python benchmarks/profile_lm_phases.py [--size 25m|97m] [--steps 1] [--allocate]``
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch
from bench_lm import BLOCKS, SIZES, _big_model, _peak_reset, _status

import stagecomp as sc
import stagecomp.compressor as compressor_module
import stagecomp.sequential as sequential
import stagecomp.strategies.data_aware as data_aware


def _wrap(module: Any, name: str, base: float) -> None:
    original = getattr(module, name)

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        before = _status("VmRSS") - base
        Path("/proc/self/clear_refs").write_text("5")
        cpu = time.process_time()
        result = original(*args, **kwargs)
        cpu = time.process_time() - cpu
        print(
            f"{name:26} CPU {cpu:6.2f} s  RSS before {before:6.0f}  peak "
            f"{_status('VmHWM') - base:6.0f}  after {_status('VmRSS') - base:6.0f} MiB",
            flush=True,
        )
        return result

    setattr(module, name, wrapped)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="25m")
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument(
        "--allocate", action="store_true", help="allocate_ranks(blocks=..., rounds=0) instead"
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = _big_model(args.size)
    vocab = SIZES[args.size]["vocab_size"]
    g = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(0, vocab, (2, 128), generator=g)} for _ in range(8)]
    base = _peak_reset()
    for name in ("capture_inputs", "propagate", "_block_input_statistics"):
        _wrap(sequential, name, base)
    _wrap(sequential, "collect_gradient_moments", base)
    for method in ("_sweep", "_kept_gradients"):
        _wrap(sequential.SequentialStatistics, method, base)
    _wrap(compressor_module, "run_layer_job", base)
    if args.allocate:
        _wrap(sequential._GradientSweep, "step", base)
        _wrap(data_aware, "_layer_costs", base)
        names = [n for n, m in model.named_modules() if n.startswith("model.layers.")]
        names = [n for n in names if isinstance(model.get_submodule(n), torch.nn.Linear)]
        cpu = time.process_time()
        sc.allocate_ranks(
            model, batches, names, rate=2.0, method="svd_id", rounds=0, progress=False,
            blocks=BLOCKS,
        )  # fmt: skip
        print(f"allocate_ranks: CPU {time.process_time() - cpu:.2f} s", flush=True)
        return
    compressor = sc.Compressor(
        model,
        sc.Reduction(2.0),
        exclude=["lm_head"],
        layers_per_step=7,
        progress=False,
        calibration=sc.Calibration(batches, factors="gradient", blocks=BLOCKS),
    )
    for _ in range(args.steps):
        cpu = time.process_time()
        compressor.compression_step()
        print(f"step: CPU {time.process_time() - cpu:.2f} s", flush=True)


if __name__ == "__main__":
    main()
