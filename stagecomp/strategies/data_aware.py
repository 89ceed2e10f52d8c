"""Ranks from calibration data: a per-layer output-error budget, or a global allocation.

``DataAware(tolerance)`` gives each layer the smallest rank whose output error on
the calibration inputs stays within ``tolerance`` (a per-layer budget, used inside
the Compressor, which collects the statistics before each step).

``allocate_ranks`` spends a global parameter budget where it hurts the model's
final output least. One uniform cut is far from optimal: the layers of a
network differ both in how fast their whitened spectrum decays and in how much
an error in their output moves the final output. By default each dropped
component gets a predicted cost in the final output from the gradient moments
(Gauss-Newton, Kronecker-factored); that prediction is then checked against
the real change of the final output when each layer alone is truncated at its
allocated rank, and rescaled (falor-style measurement: the model's own output
is the judge). The total ``sum_l sensitivity_l * cost_l(r_l)`` is minimised
under the budget with a Lagrange multiplier, every layer choosing between its
ranks and staying dense.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn
from tqdm.auto import tqdm

from stagecomp.blocks import find_blocks, starting_at
from stagecomp.calibration import (
    GRADIENT_PROBES,
    NO_GRADIENT,
    Forward,
    LayerStatistics,
    MaskFn,
    OutputFn,
    collect_gradient_moments,
    collect_statistics,
    main_output,
    run_batch,
)
from stagecomp.data_aware import (
    SVD_METHODS,
    check_variant,
    decompose_data_aware,
    output_error_curve,
)
from stagecomp.decompositions.data_aware import weighted_spectrum
from stagecomp.errors import RankError, StagecompError, UnsupportedLayerError
from stagecomp.layer_shape import LayerShape
from stagecomp.layers.base import describe
from stagecomp.memory import release_free_memory
from stagecomp.methods import METHODS, get_method
from stagecomp.methods.unfoldings import dense_weight
from stagecomp.options import DecomposeOptions
from stagecomp.sequential import sweep_statistics
from stagecomp.surgery import eval_mode, get_module, replace_module

if TYPE_CHECKING:
    from stagecomp.strategies.base import RankRequest

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataAware:
    """Per-layer budget: the smallest ranks whose output error on the calibration data is small.

    Needs ``Compressor(..., calibration=stagecomp.Calibration(batches, ...))`` (the
    Compressor refuses it without). For SVD layers (Linear, 1x1 conv)
    the error is the exact relative output error of the whitened truncation; for
    Tucker2 each channel rank keeps ``1 - tolerance^2`` of its channel energy.

    Attributes:
        tolerance: Relative output error allowed per layer, in (0, 1).
    """

    tolerance: float = 0.1

    needs_calibration: ClassVar[bool] = True
    """Ranks come from the layer's calibration statistics."""

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
                "pass Compressor(..., calibration=stagecomp.Calibration(batches))"
            )
        shape = request.shape
        handler = get_method(request.cls.method)
        if not handler.supports_data_aware(shape):
            here = [m for m in METHODS if get_method(m).supports_data_aware(shape)]
            raise UnsupportedLayerError(
                f"{describe(shape, request.name)}: the DataAware strategy sizes layers whose "
                f"method has data-aware factors ({', '.join(here) or 'none'} here), not "
                f"{request.cls.method!r}"
            )
        ranks = handler.data_aware_ranks(request.module, shape, stats, self.tolerance, request.name)
        return request.cls.normalize_rank(shape, ranks, request.options, request.name)

    def to_dict(self) -> dict[str, object]:
        return {"strategy": "data_aware", "tolerance": self.tolerance}


def allocate_ranks(
    model: nn.Module,
    batches: Iterable[Any],
    names: Sequence[str],
    *,
    rate: float,
    method: str = "svd",
    variant: str | None = None,
    forward: Forward | None = None,
    output: OutputFn | None = None,
    sensitivity: str = "gradient",
    sensitivity_batches: int = 4,
    rounds: int = 1,
    gradient_probes: int = GRADIENT_PROBES,
    options: DecomposeOptions | None = None,
    progress: bool = True,
    blocks: str | None = None,
    mask: MaskFn | None = None,
) -> dict[str, int | None]:
    """SVD ranks for ``names`` with ``rate`` times fewer parameters in total, where they hurt least.

    Args:
        model: The trained model (left as it was).
        batches: Calibration batches (iterated several times; a list or a DataLoader).
        names: Linear / 1x1 conv layers to share the budget.
        rate: Their total parameters are divided by at least this (> 1).
        method: ``"svd"`` or ``"svd_id"`` (the interpolative form: ``r^2`` fewer
            parameters per layer at rank ``r``, so the same budget buys higher ranks);
            compress with the same method (``Compressor(methods=...)``).
        variant: Data-aware variant of the factors used when measuring a layer's real
            effect; default ``"gradient"`` with gradient sensitivity, else ``"whiten"``.
        sensitivity: ``"gradient"``: each layer's whitened spectrum weighted on the
            output side by the moment of the final output's gradients
            (``collect_gradient_moments``), so every dropped component has a predicted
            cost in the final output, comparable across layers (one forward and
            ``gradient_probes`` backward passes per batch); each of ``rounds`` then
            measures every layer's real effect at its allocated rank and rescales its
            predicted costs by it, which corrects what the Kronecker-factored,
            first-order prediction misses (attention's softmax, errors of one
            sentence's tokens adding up in the pooled output). ``"probe"``: truncate
            each layer alone and measure the final output's noise-to-signal ratio.
        forward: How a batch is fed (see ``stagecomp.calibration.run_batch``).
        output: Picks the tensor to compare from the model's output (``main_output``).
        sensitivity_batches: Batches used to measure each layer's real effect.
        rounds: Measurement rounds: with ``"probe"`` at least 1 (round 1 probes every
            layer at its ``rate``-times-smaller rank, later rounds at the ranks just
            allocated); with ``"gradient"`` 0 keeps the predicted costs as they are.
        gradient_probes: Random output projections per batch for the gradient moments.
        options: Decomposition options.
        progress: Show progress bars.
        blocks: Calibrate block by block, for large models: a pattern naming the
            model's repeated blocks (``"model.layers.*"``) or ``"auto"`` (see
            ``stagecomp.Calibration``). Every block's inputs are cached once; the
            gradient moments are backpropagated one block at a time from the last, and
            each layer's moments are dropped once its cost curve is computed, so only
            one block's moments are alive (a measurement round computes them again).
            The same ranks as without.
        mask: Which positions of a batch are samples (default: a dict batch's
            ``attention_mask``; see ``stagecomp.Calibration``).

    Returns:
        ``{name: rank}`` in the order of ``names``, or ``None`` for a layer best left
        dense, or one no gradient of the output reaches (an unused pooler: logged, and
        left out of the budget); usable as ``Compressor(ranks=...)`` together with
        ``calibration=stagecomp.Calibration(batches, factors=...)``.
    """
    if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not rate > 1:
        raise RankError(f"allocate_ranks rate {rate!r} is not allowed; expected a number > 1")
    if sensitivity not in ("gradient", "probe"):
        raise StagecompError(
            f"allocate_ranks sensitivity={sensitivity!r} is not allowed; "
            "expected 'gradient' or 'probe'"
        )
    least = 0 if sensitivity == "gradient" else 1
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < least:
        raise RankError(
            f"allocate_ranks rounds={rounds!r} is not allowed with sensitivity="
            f"{sensitivity!r}; expected an integer >= {least}"
        )
    if method not in SVD_METHODS:
        raise StagecompError(
            f"allocate_ranks method={method!r} is not allowed; expected one of {SVD_METHODS}"
        )
    if isinstance(names, str) or not isinstance(names, Sequence) or not names:
        raise StagecompError(
            f"allocate_ranks names={names!r} is not allowed; expected a non-empty list of "
            "Linear / 1x1 conv layer names to share the budget"
        )
    variant = variant or ("gradient" if sensitivity == "gradient" else "whiten")
    check_variant(variant)
    options = options or DecomposeOptions()
    batch_list = list(batches)
    gradients = sensitivity == "gradient" or variant == "gradient"
    block_names = find_blocks(model, blocks) if blocks is not None else []
    source = _Statistics(model, batch_list, names, block_names, gradients, forward, output, mask)
    source.probes, source.progress = gradient_probes, progress
    layers: list[_Layer] = []
    for _start, group in source.groups():
        for name in list(group):
            stats = group.pop(name)  # dropped once its costs are known (until a round)
            if block_names:
                release_free_memory()  # memory-bounded: what the last layer's costs freed
            if gradients and stats.gradient_moment is None:
                logger.warning("allocate_ranks leaves layer %r dense: %s", name, NO_GRADIENT)
                continue
            layers.append(_layer_costs(model, name, stats, method, sensitivity, options))
            del stats
    layers.sort(key=lambda layer: names.index(layer.name))
    budget = sum(layer.dense for layer in layers) / rate
    if sensitivity == "gradient" and rounds == 0:
        return _in_order(names, _lagrangian(layers, budget))

    probe = _Probe(model, batch_list[:sensitivity_batches], forward, output or main_output)
    by_name = {layer.name: layer for layer in layers}
    # Gradient rounds measure at the predicted allocation; probe round 1 at the uniform rate.
    chosen = _lagrangian(layers, budget) if sensitivity == "gradient" else {}
    for round_index in range(rounds):
        bar = tqdm(
            total=len(layers), desc=f"sensitivity {round_index + 1}/{rounds}", disable=not progress
        )
        for start, group in source.groups():
            for name in list(group):
                stats = group.pop(name)
                layer = by_name.get(name)
                if layer is None:
                    continue
                rank = chosen.get(layer.name) or layer.rank_for(layer.dense / rate)
                module = get_module(model, layer.name)
                replacement = decompose_data_aware(
                    module, method, rank, stats, variant=variant, options=options
                )
                noise = probe.noise(layer.name, replacement, start)
                predicted = float(layer.curve[rank - 1])
                if sensitivity == "probe":
                    # Relative squared error of the output per unit of the layer's own.
                    layer.sensitivity = noise / probe.signal / predicted if predicted > 0 else 0.0
                elif predicted > 0:
                    # Squared change of the final output per batch, as the gradient moments
                    # count it.
                    layer.sensitivity = noise / len(probe.batches) / predicted
                bar.update()
                del stats, replacement
        bar.close()
        chosen = _lagrangian(layers, budget)
        logger.info("allocation round %d: %s", round_index + 1, chosen)
    return _in_order(names, chosen)


def _in_order(names: Sequence[str], chosen: dict[str, int | None]) -> dict[str, int | None]:
    """Every name in the given order; those left out (no gradient reaches them) dense."""
    return {name: chosen.get(name) for name in names}


StartAt = Callable[[], AbstractContextManager[Callable[[int], None]]]
"""Starts the model at a block from its cached inputs (``stagecomp.blocks.starting_at``)."""


class _Statistics:
    """The statistics ``allocate_ranks`` reads, in groups: all at once, or block by block.

    Each group comes with how to run the model from its block (``None``: from the start),
    so measuring a layer's effect skips the blocks before it.
    """

    probes: int = GRADIENT_PROBES
    progress: bool = True

    def __init__(
        self,
        model: nn.Module,
        batches: list[Any],
        names: Sequence[str],
        blocks: Sequence[str],
        gradients: bool,
        forward: Forward | None,
        output: OutputFn | None,
        mask: MaskFn | None,
    ) -> None:
        self.model, self.batches, self.names, self.blocks = model, batches, names, blocks
        self.gradients, self.forward, self.output, self.mask = gradients, forward, output, mask

    def groups(self) -> Iterator[tuple[StartAt | None, dict[str, LayerStatistics]]]:
        if not self.blocks:
            yield None, self._all()
            return
        for inputs, index, stats in sweep_statistics(
            self.model,
            self.batches,
            self.names,
            self.blocks,
            gradients=self.gradients,
            forward=self.forward,
            output=self.output,
            mask=self.mask,
            probes=self.probes,
            progress=self.progress,
        ):
            if index is None:
                yield None, stats
                continue
            hidden = [h for h in inputs.hidden[index] if h is not None]
            yield partial(starting_at, self.model, inputs, index, hidden), stats

    def _all(self) -> dict[str, LayerStatistics]:
        stats = collect_statistics(
            self.model,
            self.batches,
            self.names,
            forward=self.forward,
            progress=self.progress,
            mask=self.mask,
        )
        if self.gradients:
            moments = collect_gradient_moments(
                self.model,
                self.batches,
                self.names,
                forward=self.forward,
                output=self.output,
                probes=self.probes,
                progress=self.progress,
                mask=self.mask,
            )
            for name, moment in moments.items():
                stats[name].gradient_moment = moment
        return stats


def _layer_costs(
    model: nn.Module,
    name: str,
    stats: LayerStatistics,
    method: str,
    sensitivity: str,
    options: DecomposeOptions,
) -> _Layer:
    """A layer's parameters and predicted cost at every rank."""
    module = get_module(model, name)
    shape = LayerShape.from_module(module, name)
    handler = get_method(method)
    if not handler.supports_data_aware(shape):
        raise UnsupportedLayerError(
            f"{describe(shape, name)}: allocate_ranks sizes SVD layers (Linear, 1x1 conv)"
        )
    cls = handler.layer_class(shape, name)
    full = cls.full_rank(shape, options)[0]
    params = torch.tensor(
        [cls.param_count(shape, (r,), options) for r in range(1, full + 1)], dtype=torch.float64
    )
    if sensitivity == "gradient":
        assert stats.gradient_moment is not None
        weight = dense_weight(module, name)  # a Hugging Face Conv1D's weight is transposed
        energy = weighted_spectrum(
            weight.detach().reshape(shape.out_channels, -1),
            stats.input_moment,
            stats.gradient_moment,
        ).square()
        curve = energy.flip(0).cumsum(0).flip(0)[1:]
        curve = torch.cat([curve, curve.new_zeros(1)])  # cost of keeping ranks 1..full
    else:
        curve = output_error_curve(module, stats)[1:].square()  # ranks 1..full
    return _Layer(name, shape.dense_params, params, curve)


class _Probe:
    """The model's output on a few batches, and how far one replaced layer moves it."""

    def __init__(
        self, model: nn.Module, batches: list[Any], forward: Forward | None, pick: OutputFn
    ) -> None:
        self.model, self.batches, self.forward, self.pick = model, batches, forward, pick
        with torch.no_grad(), eval_mode(model):
            self.reference = [pick(run_batch(model, b, forward)).detach().double() for b in batches]
        self.signal = sum(float(r.square().sum()) for r in self.reference)

    def noise(self, name: str, replacement: nn.Module, start: StartAt | None = None) -> float:
        """Squared change of the output, summed over the batches, with ``name`` replaced
        (the model run from a block's cached inputs when ``start`` is given)."""
        original = get_module(self.model, name)
        replace_module(self.model, name, replacement)
        try:
            with (
                torch.no_grad(),
                eval_mode(self.model),
                start() if start is not None else nullcontext(None) as select,
            ):
                total = 0.0
                for index, (batch, reference) in enumerate(
                    zip(self.batches, self.reference, strict=True)
                ):
                    if select is not None:
                        select(index)
                    out = self.pick(run_batch(self.model, batch, self.forward)).double()
                    total += float((out - reference).square().sum())
                return total
        finally:
            replace_module(self.model, name, original)


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
