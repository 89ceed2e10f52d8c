"""Compress to a measured whole-model speed-up, at the least loss.

``Speedup(2.0)`` decides for every target layer whether it stays as it is, and otherwise
which method and ranks it gets, so that the whole model runs twice as fast, measured, on
the device, batch size, dtype and memory layout it serves with:

1. every layer's choices are timed at the input it really receives (the latency-aware
   timer, cached per geometry) on a grid of ranks that are multiples of the vector width,
   and priced by their truncation error (weight error, or with calibration the output
   error; see ``stagecomp.speed.error_curves``);
2. a Lagrangian spends the layer-latency budget where it costs least error;
3. the whole model is timed with that allocation, and the budget is adjusted until the
   measured speed-up is within ``tolerance`` of the target (``stagecomp.speed.closed_loop``),
   or the best reachable one is kept with the reason.

With ``macs=`` the model must also end with that many times fewer MACs: the allocation
then meets a MAC budget too, and ``target`` becomes the least speed-up to reach. That is
the path for a compute cut that turns into time: ``Speedup(0.85 * r, macs=r)`` spends the
MAC cut ``r`` where it buys speed (layers bound by memory traffic stay as they are) and
asks for an efficiency (speed-up over MAC cut) of at least 0.85.

Stage ``s`` of ``S`` aims at ``target ** ((s + 1) / S)``, like ``Reduction``. The strategy
needs the whole model, so the Compressor calls ``prepare`` before each stage's first step
(``needs_model``); each layer's method then comes from ``pick_method`` and its ranks from
``choose_ranks``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from stagecomp.errors import RankError, StagecompError
from stagecomp.latency_aware import LatencyAware, LatencyChooser, Timer, layer_inputs
from stagecomp.layer_shape import LayerShape
from stagecomp.methods import check_method
from stagecomp.speed.allocation import total_error, total_macs
from stagecomp.speed.closed_loop import LoopResult, Measure, search
from stagecomp.speed.error_curves import layers_seen_by_data
from stagecomp.speed.layer_table import LayerOption, LayerTable, Structure, build_layer_table
from stagecomp.speed.mac_count import MacCounter
from stagecomp.speed.model_clock import ModelClock, ModelTimer
from stagecomp.strategies.base import (
    MethodPick,
    ModelRequest,
    RankRequest,
    is_factor_above_one,
)
from stagecomp.surgery import get_module

logger = logging.getLogger(__name__)

ERRORS = ("weight", "output", "gradient")
"""What a choice's error measures: the weight's, the layer's output on the calibration
data, or the model's output predicted through the gradient moments."""


@dataclass
class SpeedupOutcome:
    """What ``Speedup`` decided at one stage, and what it cost.

    Attributes:
        stage: The stage (0-based).
        goal: The whole-model speed-up aimed at in this stage.
        measured: Measured speed-up of the chosen allocation over the dense model.
        reached: Whether ``measured`` is within the tolerance of ``goal``.
        reason: Why not, when it is not.
        error: Summed predicted error of the allocation.
        rounds: Whole-model measurements the loop made.
        seconds: Time the strategy took (tables, spectra, the loop).
        picks: The choice of every layer.
        mac_cut: With ``macs=``: how many times fewer MACs the model has with ``picks``
            than with every target layer dense (on the example input).
    """

    stage: int
    goal: float
    measured: float
    reached: bool
    reason: str | None
    error: float
    rounds: int
    seconds: float
    picks: dict[str, LayerOption] = field(repr=False)
    mac_cut: float | None = None

    def __str__(self) -> str:
        kept = sum(p.method is None for p in self.picks.values())
        status = "reached" if self.reached else f"not reached: {self.reason}"
        macs = "" if self.mac_cut is None else f", {self.mac_cut:.3g}x fewer MACs"
        return (
            f"stage {self.stage + 1}: {self.goal:.3g}x asked, {self.measured:.3g}x measured "
            f"({status}{macs}); {len(self.picks) - kept} layers decomposed, {kept} as they are; "
            f"{self.rounds} whole-model measurements, {self.seconds:.1f} s"
        )


@dataclass(frozen=True)
class Speedup:
    """Choose each layer's method and ranks so that the whole model runs ``target`` times faster.

    Needs ``Compressor(..., example_input=...)`` at the shape the model serves. With
    calibration (``Compressor(calibration=...)``) the choices are priced by their output
    error on the calibration data instead of their weight error.

    Attributes:
        target: Whole-model speed-up over the dense model by the last stage (> 1); with
            ``macs`` the least one.
        macs: Also cut the model's MACs (counted by fvcore on the example input, against
            every target layer dense) this many times by the last stage (> 1); ``None``
            puts no bound on them.
        batch_size: Time at this batch size instead of the example input's.
        device: Time on this device (e.g. ``"cuda"``) instead of the model's.
        methods: Candidate methods; those that do not apply to a layer are passed over,
            and a method pinned with ``methods=`` is the only one tried there.
        tolerance: The measured speed-up counts as reached within this relative distance.
        max_rounds: Most whole-model measurements per stage.
        round_to: Ranks are timed at multiples of this (the vector width).
        error: ``"weight"``, ``"output"`` (needs calibration) or ``"gradient"`` (needs
            calibration; one backward pass per batch and probe); default: ``"output"``
            with calibration, else ``"weight"``.
        fold_batchnorm: Time the models with BatchNorm folded, as they would be served.
        warmup: Untimed passes before each layer measurement and of each whole model.
        repeats: Timed passes per layer measurement (the fastest counts).
        model_rounds: Interleaved timed passes of each whole model (the fastest counts).
        timer: Replaces the per-layer measurement (e.g. a table, for reproducible choices).
        model_timer: Replaces the whole-model measurement. With ``timer`` given and this
            ``None``, the model's time is the sum of its layers' from ``timer``.
        layer_cache: Measured layer seconds by geometry, shared with other ``Speedup``
            objects (several targets on one model time each layer choice once).
    """

    target: float
    macs: float | None = None
    batch_size: int | None = None
    device: str | None = None
    methods: tuple[str, ...] = ("svd", "tucker2")
    tolerance: float = 0.05
    max_rounds: int = 8
    round_to: int = 8
    error: str | None = None
    fold_batchnorm: bool = True
    warmup: int = 2
    repeats: int = 5
    model_rounds: int = 7
    timer: Timer | None = field(default=None, compare=False, repr=False)
    model_timer: ModelTimer | None = field(default=None, compare=False, repr=False)
    layer_cache: dict[tuple[Any, ...], float] | None = field(
        default=None, compare=False, repr=False
    )
    _state: dict[int, SpeedupOutcome] = field(
        default_factory=dict, init=False, compare=False, repr=False
    )
    _notes: dict[tuple[int, str], str] = field(
        default_factory=dict, init=False, compare=False, repr=False
    )

    needs_model: ClassVar[bool] = True
    """It sizes every layer together, from the whole model: see ``prepare``."""

    def __post_init__(self) -> None:
        target = self.target
        if not is_factor_above_one(target):
            raise RankError(
                f"Speedup target {target!r} is not allowed; expected a finite number > 1 "
                "(e.g. 2 for a model twice as fast)"
            )
        macs = self.macs
        if macs is not None and not is_factor_above_one(macs):
            raise StagecompError(
                f"Speedup macs={macs!r} is not allowed; expected a finite number > 1 "
                "(e.g. 2 for half the MACs) or None"
            )
        if isinstance(self.methods, str):
            object.__setattr__(self, "methods", (self.methods,))
        object.__setattr__(self, "methods", tuple(self.methods))
        if not self.methods:
            raise StagecompError("Speedup methods=() is not allowed; expected methods to try")
        for method in self.methods:
            check_method(method)
        for label, value, low in (
            ("batch_size", self.batch_size, 1),
            ("max_rounds", self.max_rounds, 1),
            ("round_to", self.round_to, 1),
            ("warmup", self.warmup, 0),
            ("repeats", self.repeats, 1),
            ("model_rounds", self.model_rounds, 1),
        ):
            if value is None and label == "batch_size":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise StagecompError(
                    f"Speedup {label}={value!r} is not allowed; expected an integer >= {low}"
                )
        tol = self.tolerance
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 < tol < 1:
            raise StagecompError(
                f"Speedup tolerance={tol!r} is not allowed; expected a number in (0, 1), "
                "e.g. 0.05 for within 5% of the target"
            )
        if self.error is not None and self.error not in ERRORS:
            raise StagecompError(
                f"Speedup error={self.error!r} is not allowed; expected one of {ERRORS} or None"
            )
        if self.device is not None:
            try:
                torch.device(self.device)
            except (RuntimeError, TypeError) as failure:
                raise StagecompError(
                    f"Speedup device={self.device!r} is not a device torch knows ({failure}); "
                    "e.g. 'cpu' or 'cuda:0'"
                ) from None

    # ------------------------------------------------------------------ protocol
    def goal(self, stage: int, stages: int) -> float:
        """The whole-model speed-up stage ``stage`` of ``stages`` aims at."""
        return float(self.target ** ((stage + 1) / stages))

    def outcome(self, stage: int) -> SpeedupOutcome:
        """What was decided at ``stage`` (after the Compressor prepared it)."""
        if stage not in self._state:
            raise StagecompError(
                f"Speedup has not prepared stage {stage + 1} yet; it is prepared by the "
                "Compressor before the stage's first step"
            )
        return self._state[stage]

    @property
    def outcomes(self) -> list[SpeedupOutcome]:
        """Every stage decided so far, in order."""
        return [self._state[s] for s in sorted(self._state)]

    def prepare(self, request: ModelRequest) -> None:
        """Time, price and allocate every target layer of ``request.model`` for its stage."""
        started = time.perf_counter()
        if request.example_input is None:
            raise StagecompError(
                "the Speedup strategy needs example_input: the model is timed on it"
            )
        goal = self.goal(request.stage, request.stages)
        names = list(request.names)
        modules = {name: get_module(request.model, name) for name in names}
        priced, relative = self._priced(request, modules)
        chooser_config = LatencyAware(
            round_to=None, warmup=self.warmup, repeats=self.repeats, timer=self.timer
        )
        clock: ModelClock | None = None
        if self.timer is not None:
            # Injected layer times: nothing is timed, so no working copy is made.
            timed: Mapping[str, nn.Module] = modules
            inputs = layer_inputs(request.model, request.example_input, names)
            if self.batch_size is not None:
                inputs = {
                    n: i._replace(shape=(self.batch_size, *i.shape[1:])) for n, i in inputs.items()
                }
        else:
            clock = ModelClock(
                request.model,
                request.example_input,
                names,
                request.options,
                device=self.device,
                batch_size=self.batch_size,
                fold=self.fold_batchnorm,
                warmup=self.warmup,
                rounds=self.model_rounds,
            )
            timed, inputs = clock.current, clock.inputs
        chooser = LatencyChooser(chooser_config, inputs, self.layer_cache)
        shapes = {name: LayerShape.from_module(modules[name], name) for name in names}
        counter = budget_macs = None
        if self.macs is not None:
            counter = MacCounter(request.model, request.example_input, names, request.options)
            budget_macs = counter.layer_budget(
                shapes, self.macs ** ((request.stage + 1) / request.stages)
            )
        tables = [
            build_layer_table(
                name,
                modules[name],
                timed[name],
                inputs.get(name),
                chooser,
                (request.pinned[name],) if name in request.pinned else self.methods,
                request.options,
                self.round_to,
                priced.get(name),
                relative,
                _counting(counter, name, shapes[name]),
            )
            for name in names
        ]
        result = search(
            tables,
            self._measure(tables, clock),
            goal,
            self.tolerance,
            self.max_rounds,
            budget_macs,
        )
        mac_cut = None
        if counter is not None and budget_macs is not None:
            mac_cut = counter.cut(shapes, total_macs(result.allocation))
            if total_macs(result.allocation) > budget_macs:
                fewest = sum(min(o.macs for o in t.options) for t in tables)
                result.reached = False
                result.reason = (
                    f"macs={self.macs:g} is out of reach: with every layer at its choice of "
                    f"fewest MACs the model has {counter.cut(shapes, fewest):.3g}x fewer "
                    "(layers left out and operations that are not layers keep theirs)"
                )
        outcome = SpeedupOutcome(
            stage=request.stage,
            goal=goal,
            measured=result.speedup,
            reached=result.reached,
            reason=result.reason,
            error=total_error(result.allocation),
            rounds=result.measurements,
            seconds=time.perf_counter() - started,
            picks=dict(result.allocation),
            mac_cut=mac_cut,
        )
        self._state[request.stage] = outcome
        self._reasons(request.stage, tables, result)
        if outcome.reached:
            logger.info("Speedup %s", outcome)
        else:
            logger.warning("Speedup %s", outcome)

    def pick_method(self, name: str, stage: int) -> MethodPick:
        """The method layer ``name`` gets at ``stage``, or why it stays as it is."""
        pick = self.outcome(stage).picks.get(name)
        if pick is None:
            raise StagecompError(f"Speedup was not prepared for layer {name!r}")
        if pick.method is None:
            return MethodPick(None, self._notes.get((stage, name), "Speedup: left as it is"))
        return MethodPick(pick.method)

    def choose_ranks(self, request: RankRequest) -> tuple[int, ...]:
        pick = self.outcome(request.stage).picks.get(request.name)
        if pick is None or pick.method is None or pick.ranks is None:
            raise StagecompError(
                f"layer {request.name!r}: Speedup leaves it as it is at stage "
                f"{request.stage + 1}; ask pick_method first"
            )
        if pick.method != request.cls.method:
            raise StagecompError(
                f"layer {request.name!r}: Speedup chose method {pick.method!r}, not "
                f"{request.cls.method!r} (a latency-aware run must try only the method it picks)"
            )
        return pick.ranks

    def to_dict(self) -> dict[str, object]:
        return {
            "strategy": "speedup",
            "target": self.target,
            "macs": self.macs,
            "batch_size": self.batch_size,
            "device": self.device,
            "methods": list(self.methods),
            "tolerance": self.tolerance,
            "max_rounds": self.max_rounds,
            "round_to": self.round_to,
            "error": self.error,
            "fold_batchnorm": self.fold_batchnorm,
            "warmup": self.warmup,
            "repeats": self.repeats,
            "model_rounds": self.model_rounds,
        }

    # ------------------------------------------------------------------ parts
    def _priced(
        self, request: ModelRequest, modules: Mapping[str, nn.Module]
    ) -> tuple[dict[str, nn.Module], bool]:
        """Layers whose spectra price the choices, and whether errors are relative."""
        mode = self.error or ("output" if request.batches is not None else "weight")
        if mode == "weight":
            return {}, True
        if request.batches is None:
            raise StagecompError(
                f"Speedup error={mode!r} needs calibration data; pass "
                "Compressor(..., calibration=stagecomp.Calibration(batches)) or error='weight'"
            )
        priced = layers_seen_by_data(
            request.model,
            modules,
            request.batches,
            gradient=mode == "gradient",
            forward=request.forward,
            output=request.output,
        )
        return priced, mode != "gradient"

    def _measure(self, tables: list[LayerTable], clock: ModelClock | None) -> Measure:
        """The loop's ``measure``: the model clock, the injected model timer, or the sum of
        the injected layer table."""
        by_name = {t.name: t for t in tables}

        def layout(allocation: Mapping[str, LayerOption]) -> dict[str, Structure | None]:
            return {name: by_name[name].structure(option) for name, option in allocation.items()}

        def measure(allocation: Mapping[str, LayerOption]) -> tuple[float, float]:
            reference: dict[str, Structure | None] = dict.fromkeys(allocation)
            candidate = layout(allocation)
            if self.model_timer is not None:
                return self.model_timer(reference), self.model_timer(candidate)
            if clock is not None:
                if candidate == reference:  # the same model: one time, not two noisy ones
                    (seconds,) = clock.time([reference])
                    return seconds, seconds
                ref_s, seconds = clock.time([reference, candidate])
                return ref_s, seconds
            return (
                sum(by_name[n].reference_s for n in allocation),
                sum(option.seconds for option in allocation.values()),
            )

        return measure

    def _reasons(self, stage: int, tables: list[LayerTable], result: LoopResult) -> None:
        """Why each layer left as it is stays so, for its report row."""
        stage_goal = result.goal
        for table in tables:
            pick = result.allocation[table.name]
            if pick.method is not None:
                continue
            if table.note is not None:
                why = table.note
            else:
                quickest = min(table.options, key=lambda o: o.seconds)
                why = (
                    f"the allocation for {stage_goal:.3g}x (measured {result.speedup:.3g}x) "
                    f"spends no budget here: {table.options[0].seconds * 1e3:.3g} ms as it is, "
                    f"at best {quickest.seconds * 1e3:.3g} ms with {quickest.method} "
                    f"{quickest.ranks} at error {quickest.error:.3g}"
                )
            self._notes[(stage, table.name)] = f"Speedup: {why}"


def _counting(
    counter: MacCounter | None, name: str, shape: LayerShape
) -> Callable[[Structure | None], int] | None:
    """Layer ``name``'s MAC count for ``build_layer_table`` (``None`` without a budget)."""
    if counter is None:
        return None
    return lambda structure: counter.count(name, shape, structure)


__all__ = ["ERRORS", "Speedup", "SpeedupOutcome"]
