"""Ranks from calibration data: a per-layer output-error budget, or a global allocation.

``DataAware(tolerance)`` gives each layer the smallest rank whose output error on
the calibration inputs stays within ``tolerance`` (a per-layer budget, used inside
the Compressor, which collects the statistics before each step).

``allocate_ranks`` spends a global parameter budget where it hurts the model's
final output least. One uniform cut is far from optimal: the layers of a
network differ both in how fast their whitened spectrum decays and in how much
an error in their output moves the final output. It measures the second
directly (falor-style: the noise-to-signal ratio of the final output when one
layer alone is truncated, divided by that layer's own relative output error),
then minimises the predicted total ``sum_l sensitivity_l * error_l(r_l)^2``
under the budget with a Lagrange multiplier, every layer choosing between its
ranks and staying dense.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import nn
from tqdm.auto import tqdm

from stagecomp.calibration import (
    Forward,
    OutputFn,
    collect_gradient_moments,
    collect_statistics,
    main_output,
    run_batch,
)
from stagecomp.data_aware import check_variant, decompose_data_aware, output_error_curve
from stagecomp.decompositions.data_aware import weighted_spectrum
from stagecomp.errors import RankError, StagecompError, UnsupportedLayerError
from stagecomp.layer_shape import LayerShape
from stagecomp.layers.base import DecomposedLayer, describe
from stagecomp.options import DecomposeOptions
from stagecomp.registry import layer_class
from stagecomp.surgery import get_module, replace_module

if TYPE_CHECKING:
    from stagecomp.strategies.base import RankRequest

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataAware:
    """Per-layer budget: the smallest ranks whose output error on the calibration data is small.

    Needs ``Compressor(..., calibration=batches)``. For SVD layers (Linear, 1x1 conv)
    the error is the exact relative output error of the whitened truncation; for
    Tucker2 each channel rank keeps ``1 - tolerance^2`` of its channel energy.

    Attributes:
        tolerance: Relative output error allowed per layer, in (0, 1).
    """

    tolerance: float = 0.1

    def __post_init__(self) -> None:
        if (
            isinstance(self.tolerance, bool)
            or not isinstance(self.tolerance, (int, float))
            or not 0 < self.tolerance < 1
        ):
            raise RankError(
                f"DataAware tolerance {self.tolerance!r} is not allowed; expected a number "
                "in (0, 1), e.g. 0.05 for 5% relative output error per layer"
            )

    def choose_ranks(self, request: RankRequest) -> tuple[int, ...]:
        stats = request.statistics
        if stats is None:
            raise StagecompError(
                f"layer {request.name!r}: the DataAware strategy needs calibration data; "
                "pass Compressor(..., calibration=batches)"
            )
        shape = request.shape
        if request.cls.method == "svd" and (shape.kind == "linear" or shape.is_pointwise):
            curve = output_error_curve(request.module, stats)
            rank = int((curve <= self.tolerance).nonzero()[0])
            return request.cls.normalize_rank(shape, max(rank, 1), request.options, request.name)
        if request.cls.method == "tucker2":
            covariance = stats.output_covariance()
            if covariance is None:
                raise StagecompError(
                    f"layer {request.name!r}: DataAware Tucker2 ranks need output statistics"
                )
            ranks = (
                _energy_rank(covariance, shape.groups, self.tolerance),
                _energy_rank(stats.input_moment, shape.groups, self.tolerance),
            )
            return request.cls.normalize_rank(shape, ranks, request.options, request.name)
        raise UnsupportedLayerError(
            f"{describe(shape, request.name)}: the DataAware strategy sizes 'svd' (Linear, "
            f"1x1 conv) and 'tucker2' layers, not {request.cls.method!r}"
        )

    def to_dict(self) -> dict[str, object]:
        return {"strategy": "data_aware", "tolerance": self.tolerance}


def _energy_rank(moment: torch.Tensor, groups: int, tolerance: float) -> int:
    """Smallest rank keeping ``1 - tolerance^2`` of every group's channel energy."""
    size = moment.shape[0] // groups
    best = 1
    for g in range(groups):
        block = moment[g * size : (g + 1) * size, g * size : (g + 1) * size]
        values = torch.linalg.eigvalsh((block + block.T) / 2).flip(0).clamp_min(0)
        total = float(values.sum())
        if total <= 0:
            continue
        tail = 1 - values.cumsum(0) / total
        best = max(best, int((tail <= tolerance**2).nonzero()[0]) + 1)
    return best


def allocate_ranks(
    model: nn.Module,
    batches: Iterable[Any],
    names: Sequence[str],
    *,
    rate: float,
    variant: str = "whiten",
    forward: Forward | None = None,
    output: OutputFn | None = None,
    sensitivity: str = "gradient",
    sensitivity_batches: int = 2,
    rounds: int = 1,
    options: DecomposeOptions | None = None,
    progress: bool = True,
) -> dict[str, int | None]:
    """SVD ranks for ``names`` with ``rate`` times fewer parameters in total, where they hurt least.

    Args:
        model: The trained model (left as it was).
        batches: Calibration batches (iterated several times; a list or a DataLoader).
        names: Linear / 1x1 conv layers to share the budget.
        rate: Their total parameters are divided by at least this (> 1).
        variant: Data-aware variant used when probing the sensitivity.
        sensitivity: ``"gradient"``: each layer's whitened spectrum weighted on the
            output side by the moment of the final output's gradients
            (``collect_gradient_moments``), so every dropped component has a predicted
            cost in the final output, comparable across layers (one forward and
            backward per batch). ``"probe"``: truncate each layer alone and measure
            the final output's noise-to-signal ratio (one forward per layer, batch
            and round).
        forward: How a batch is fed (see ``stagecomp.calibration.run_batch``).
        output: Picks the tensor to compare from the model's output (``main_output``).
        sensitivity_batches: Batches used to measure each layer's sensitivity (probe).
        rounds: Probe rounds; round 1 probes every layer at its
            ``rate``-times-smaller rank, later rounds at the ranks just allocated.
        options: Decomposition options.
        progress: Show progress bars.

    Returns:
        ``{name: rank}``, or ``None`` for a layer best left dense; usable as
        ``Compressor(ranks=...)`` together with ``data_aware=``.
    """
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not rate > 1:
        raise RankError(f"allocate_ranks rate {rate!r} is not allowed; expected a number > 1")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise RankError(f"allocate_ranks rounds={rounds!r} is not allowed; expected >= 1")
    check_variant(variant)
    if sensitivity not in ("gradient", "probe"):
        raise StagecompError(
            f"allocate_ranks sensitivity={sensitivity!r} is not allowed; "
            "expected 'gradient' or 'probe'"
        )
    options = options or DecomposeOptions()
    pick = output or main_output
    batch_list = list(batches)
    stats = collect_statistics(model, batch_list, names, forward=forward, progress=progress)
    gradients = (
        collect_gradient_moments(
            model, batch_list, names, forward=forward, output=output, progress=progress
        )
        if sensitivity == "gradient"
        else {}
    )
    layers: list[_Layer] = []
    for name in names:
        module = get_module(model, name)
        shape = LayerShape.from_module(module, name)
        if not (shape.kind == "linear" or shape.is_pointwise):
            raise UnsupportedLayerError(
                f"{describe(shape, name)}: allocate_ranks sizes SVD layers (Linear, 1x1 conv)"
            )
        cls = layer_class("svd", shape, name)
        full = cls.full_rank(shape, options)[0]
        params = torch.tensor(
            [cls.param_count(shape, (r,), options) for r in range(1, full + 1)], dtype=torch.float64
        )
        if sensitivity == "gradient":
            weight = (
                module.dense_weight()
                if isinstance(module, DecomposedLayer)
                else cast(torch.Tensor, module.weight)
            )
            energy = weighted_spectrum(
                weight.detach().reshape(shape.out_channels, -1),
                stats[name].input_moment,
                gradients[name],
            ).square()
            curve = energy.flip(0).cumsum(0).flip(0)[1:]
            curve = torch.cat([curve, curve.new_zeros(1)])  # cost of keeping ranks 1..full
        else:
            curve = output_error_curve(module, stats[name])[1:].square()  # ranks 1..full
        layers.append(_Layer(name, shape.dense_params, params, curve))
    budget = sum(layer.dense for layer in layers) / rate
    if sensitivity == "gradient":
        return _lagrangian(layers, budget)

    was_training = model.training
    model.eval()
    probe_batches = batch_list[:sensitivity_batches]
    with torch.no_grad():
        reference = [pick(run_batch(model, b, forward)).detach().double() for b in probe_batches]
    signal = sum(float(r.square().sum()) for r in reference)
    chosen: dict[str, int | None] = {}
    try:
        for round_index in range(rounds):
            bar = tqdm(layers, desc=f"sensitivity {round_index + 1}/{rounds}", disable=not progress)
            for layer in bar:
                rank = chosen.get(layer.name) or layer.rank_for(layer.dense / rate)
                module = get_module(model, layer.name)
                probe = decompose_data_aware(
                    module, "svd", rank, stats[layer.name], variant=variant, options=options
                )
                replace_module(model, layer.name, probe)
                try:
                    with torch.no_grad():
                        noise = sum(
                            float((pick(run_batch(model, b, forward)).double() - r).square().sum())
                            for b, r in zip(probe_batches, reference, strict=True)
                        )
                finally:
                    replace_module(model, layer.name, module)
                error = float(layer.curve[rank - 1])
                layer.sensitivity = (noise / signal) / error if error > 0 else 0.0
            chosen = _lagrangian(layers, budget)
            logger.info("allocation round %d: %s", round_index + 1, chosen)
    finally:
        model.train(was_training)
    return chosen


@dataclass
class _Layer:
    name: str
    dense: int
    params: torch.Tensor  # params at rank 1..full
    curve: torch.Tensor  # relative squared output error at rank 1..full
    sensitivity: float = 1.0

    def rank_for(self, budget: float) -> int:
        fits = (self.params <= budget).nonzero()
        return int(fits[-1]) + 1 if len(fits) else 1


def _choose(layers: list[_Layer], lam: float) -> tuple[dict[str, int | None], float]:
    """Each layer's best option (a rank or dense) for the multiplier ``lam``; total params."""
    chosen: dict[str, int | None] = {}
    total = 0.0
    for layer in layers:
        cost = layer.sensitivity * layer.curve + lam * layer.params
        best = int(torch.argmin(cost))
        if float(cost[best]) < lam * layer.dense and float(layer.params[best]) < layer.dense:
            chosen[layer.name] = best + 1
            total += float(layer.params[best])
        else:
            chosen[layer.name] = None
            total += layer.dense
    return chosen, total


def _lagrangian(layers: list[_Layer], budget: float) -> dict[str, int | None]:
    """The allocation with the smallest multiplier whose total meets ``budget`` (bisection)."""
    lo, hi = -60.0, 10.0  # log10 of the multiplier, in error per parameter
    chosen, total = _choose(layers, 10.0**hi)
    if total > budget:
        logger.warning("even rank 1 everywhere does not meet the budget of %.0f", budget)
        return chosen
    for _ in range(100):
        mid = (lo + hi) / 2
        _, total = _choose(layers, 10.0**mid)
        if total <= budget:
            hi = mid
        else:
            lo = mid
    return _choose(layers, 10.0**hi)[0]


__all__ = ["DataAware", "OutputFn", "allocate_ranks", "main_output"]
