"""Latency-aware choice: decompose a layer only with the structure that is measurably faster.

Fewer MACs rarely means proportionally faster: a rank-13 convolution runs no faster than
a rank-16 one on vectorised hardware, depthwise and 1x1 convolutions are memory bound, and
a three-convolution chain pays three kernel launches. So for each target layer the
Compressor can time, on the model's own device and dtype and at the real input shape of
that layer, the layer as it is now and every candidate decomposition at the ranks the
strategy allows (optionally rounded up to a hardware-friendly multiple), and keep the
fastest one, or the layer itself when nothing beats it.

Candidates are timed as freshly initialised layers (``stagecomp.empty_layer``): latency
depends on the structure, not on the weights, so nothing is decomposed to be timed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn

from stagecomp.decompose import empty_layer
from stagecomp.errors import StagecompError
from stagecomp.example_input import caches_off, call_model
from stagecomp.layer_shape import LayerShape
from stagecomp.memory_format import to_channels_last
from stagecomp.methods import check_method, layer_class, methods_for
from stagecomp.options import DecomposeOptions
from stagecomp.surgery import eval_mode
from stagecomp.timing import forward_latency

logger = logging.getLogger(__name__)

CURRENT = "current"
"""The ``Candidate.method`` of the layer as it is now (dense, or an earlier stage's layer)."""


@dataclass(frozen=True)
class Candidate:
    """One structure to time for one layer.

    Attributes:
        name: Qualified name of the layer in the model.
        method: A decomposition method, or ``CURRENT`` for the layer as it is now.
        ranks: The candidate's ranks (``None`` for ``CURRENT``).
        shape: Geometry of the layer being replaced.
        input_shape: Shape of the tensor the layer receives, batch included.
        params: Parameters of the candidate.
        channels_last: The layer receives (and is timed on) channels-last input and weights.
    """

    name: str
    method: str
    ranks: tuple[int, ...] | None
    shape: LayerShape
    input_shape: tuple[int, ...]
    params: int
    channels_last: bool = False


Timer = Callable[[Candidate], float]
"""Seconds of one forward pass of a candidate; inject one to make choices reproducible."""


@dataclass(frozen=True)
class LatencyAware:
    """Settings of the latency-aware choice (``Compressor(..., latency_aware=LatencyAware())``).

    Attributes:
        methods: Candidate methods; ``None`` tries every method that applies to the layer.
            A layer whose method is pinned by the Compressor's ``methods=`` tries only that.
        round_to: Also try each rank rounded up to a multiple of this and of twice this
            (vector width, tile size); rounding up never loses accuracy against the
            strategy's ranks, and is kept only when it is faster and still has fewer
            parameters. ``None`` skips it.
        min_speedup: A candidate replaces the layer only when it is at least this many
            times faster. The default 1.0 takes any measured gain, so the result is never
            slower than the plain pass (whose choice is among the candidates when its
            method is); a margin such as 1.05 keeps more layers as they are, trading the
            parameters they would save for robustness to timing noise.
        batch_size: Time at this batch size instead of the example input's.
        warmup: Untimed forward passes before each measurement.
        repeats: Timed passes per measurement (the fastest is kept: see ``fastest_run``).
        timer: Replaces the measurement (e.g. a fixed table in tests, or a cost model).
    """

    methods: tuple[str, ...] | None = None
    round_to: int | None = 8
    min_speedup: float = 1.0
    batch_size: int | None = None
    warmup: int = 2
    repeats: int = 7
    timer: Timer | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.methods is not None:
            if isinstance(self.methods, str):
                object.__setattr__(self, "methods", (self.methods,))
            for method in self.methods or ():
                check_method(method)
        for label, value, low in (
            ("round_to", self.round_to, 1),
            ("batch_size", self.batch_size, 1),
            ("warmup", self.warmup, 0),
            ("repeats", self.repeats, 1),
        ):
            if value is None and label in ("round_to", "batch_size"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise StagecompError(
                    f"LatencyAware {label}={value!r} is not allowed; expected an integer >= {low}"
                )
        speed = self.min_speedup
        if isinstance(speed, bool) or not isinstance(speed, (int, float)) or not speed > 0:
            raise StagecompError(
                f"LatencyAware min_speedup={speed!r} is not allowed; expected a number > 0 "
                "(1.05: a candidate must be 5% faster than the layer it replaces)"
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON description (an injected timer is recorded only as present)."""
        return {
            "methods": list(self.methods) if self.methods is not None else None,
            "round_to": self.round_to,
            "min_speedup": self.min_speedup,
            "batch_size": self.batch_size,
            "warmup": self.warmup,
            "repeats": self.repeats,
            "timer": None if self.timer is None else "injected",
        }


@dataclass(frozen=True)
class LatencyChoice:
    """What the latency-aware choice decided for one layer.

    Attributes:
        method: The chosen method, or ``None`` to leave the layer as it is.
        ranks: The chosen ranks (``None`` with ``method``).
        current_s: Seconds of the layer as it is now (``None`` when it was not timed).
        chosen_s: Seconds of the chosen candidate (``current_s`` when kept).
        reason: Why the layer is kept (``None`` when a candidate was chosen).
        timings: Every candidate timed, as ``(candidate, seconds)``, in trial order.
    """

    method: str | None
    ranks: tuple[int, ...] | None
    current_s: float | None
    chosen_s: float | None
    reason: str | None
    timings: tuple[tuple[Candidate, float], ...]


def round_up_ranks(
    ranks: Sequence[int], full: Sequence[int], multiple: int
) -> tuple[int, ...] | None:
    """``ranks`` each rounded up to a multiple of ``multiple`` (capped at full rank).

    Returns ``None`` when rounding changes nothing.
    """
    rounded = tuple(
        min(f, math.ceil(r / multiple) * multiple) for r, f in zip(ranks, full, strict=True)
    )
    return None if rounded == tuple(ranks) else rounded


class LayerInput(NamedTuple):
    """The first input a layer receives: its shape and whether it is channels-last."""

    shape: tuple[int, ...]
    channels_last: bool


def _is_channels_last(x: torch.Tensor) -> bool:
    return (
        x.dim() == 4
        and not x.is_contiguous()
        and x.is_contiguous(memory_format=torch.channels_last)
    )


def layer_inputs(
    model: nn.Module, example_input: Any, names: Sequence[str]
) -> dict[str, LayerInput]:
    """The shape and layout of the first tensor each named layer receives on ``example_input``.

    Runs one forward pass in eval mode without gradients; the model's modes are restored.
    Layers the example input does not reach are missing from the result.
    """
    wanted = set(names)
    shapes: dict[str, LayerInput] = {}
    handles = []

    def hook_for(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if name not in shapes and args and isinstance(args[0], torch.Tensor):
                shapes[name] = LayerInput(tuple(args[0].shape), _is_channels_last(args[0]))

        return hook

    for name, module in model.named_modules():
        if name in wanted:
            handles.append(module.register_forward_pre_hook(hook_for(name)))
    try:
        with eval_mode(model), torch.no_grad(), caches_off(model):
            call_model(model, example_input)
    finally:
        for handle in handles:
            handle.remove()
    return shapes


class LatencyChooser:
    """Times candidates (cached per geometry, input shape, device and dtype) and picks one.

    One chooser lives as long as its Compressor, so the many layers of equal geometry in
    a ResNet or a VGG are timed once.
    """

    def __init__(
        self,
        config: LatencyAware,
        inputs: dict[str, LayerInput],
        cache: dict[tuple[Any, ...], float] | None = None,
    ) -> None:
        """
        Args:
            config: The settings.
            inputs: Each layer's input (``layer_inputs``).
            cache: Measured seconds by geometry, to share with other choosers (timings
                of one process on one machine stay valid); default: a new one.
        """
        self.config = config
        self.inputs = inputs
        self._cache: dict[tuple[Any, ...], float] = {} if cache is None else cache

    def candidate_methods(self, shape: LayerShape, pinned: str | None) -> tuple[str, ...]:
        """The methods to try on a layer of ``shape`` (only ``pinned`` when one is named)."""
        if pinned is not None:
            return (pinned,)
        if self.config.methods is not None:
            return tuple(m for m in self.config.methods if m in methods_for(shape))
        return methods_for(shape)

    def choose(
        self,
        name: str,
        module: nn.Module,
        proposals: Sequence[tuple[str, tuple[int, ...]]],
        options: DecomposeOptions,
        allows_growth: bool = False,
    ) -> LatencyChoice:
        """The fastest of the layer as it is and each proposed ``(method, ranks)``.

        The proposals are the strategy's ranks for each candidate method, computed once
        by the caller; each is also tried rounded up to ``round_to``.
        """
        shape = LayerShape.from_module(module, name)
        if name not in self.inputs:
            reason = (
                "the example input never reaches this layer, so its latency cannot be "
                "measured; give an example_input that reaches it, or exclude it"
            )
            return LatencyChoice(None, None, None, None, reason, ())
        input_shape, channels_last = self.inputs[name]
        if self.config.batch_size is not None:
            input_shape = (self.config.batch_size, *input_shape[1:])
        current_params = sum(p.numel() for p in module.parameters())
        current = Candidate(name, CURRENT, None, shape, input_shape, current_params, channels_last)
        current_s = self.time(current, module, options)
        timings: list[tuple[Candidate, float]] = [(current, current_s)]
        for candidate in self._candidates(
            module, shape, proposals, options, current, allows_growth
        ):
            timings.append((candidate, self.time(candidate, module, options)))
        best: tuple[Candidate, float] | None = None
        for candidate, seconds in timings[1:]:
            # Strictly faster wins; on a tie the earlier (unrounded, preferred) one stays.
            if best is None or seconds < best[1]:
                best = (candidate, seconds)
        frozen = tuple(timings)
        if best is not None and current_s >= self.config.min_speedup * best[1]:
            candidate, seconds = best
            logger.info(
                "%s: %s %s takes %.3g ms, the layer as it is %.3g ms",
                name,
                candidate.method,
                candidate.ranks,
                seconds * 1e3,
                current_s * 1e3,
            )
            return LatencyChoice(
                candidate.method, candidate.ranks, current_s, seconds, None, frozen
            )
        speedup = self.config.min_speedup
        margin = "" if speedup == 1 else f"{speedup:g}x "
        tried = ", ".join(
            f"{c.method} {_ranks_text(c.ranks)} {s * 1e3:.3g} ms" for c, s in timings[1:]
        )
        reason = (
            f"no candidate is {margin}faster than the layer as it is "
            f"({current_s * 1e3:.3g} ms): {tried or 'none saves parameters'}"
        )
        return LatencyChoice(None, None, current_s, current_s, reason, frozen)

    def _candidates(
        self,
        module: nn.Module,
        shape: LayerShape,
        proposals: Sequence[tuple[str, tuple[int, ...]]],
        options: DecomposeOptions,
        current: Candidate,
        allows_growth: bool,
    ) -> list[Candidate]:
        found: list[Candidate] = []
        for method, ranks in proposals:
            cls = layer_class(method, shape, current.name)
            variants = [ranks]
            if self.config.round_to is not None:
                # The vector width and twice it: AVX-512 and tensor-core tiles work in 16s.
                full = cls.full_rank(shape, options)
                for multiple in (self.config.round_to, 2 * self.config.round_to):
                    rounded = round_up_ranks(ranks, full, multiple)
                    if rounded is not None and rounded not in variants:
                        variants.append(rounded)
            for variant in variants:
                if isinstance(module, cls) and module.ranks == variant:
                    continue  # that is the layer as it is
                params = cls.param_count(shape, variant, options)
                if params >= current.params and not allows_growth:
                    continue
                found.append(
                    Candidate(
                        current.name,
                        method,
                        variant,
                        shape,
                        current.input_shape,
                        params,
                        current.channels_last,
                    )
                )
        return found

    def time(self, candidate: Candidate, module: nn.Module, options: DecomposeOptions) -> float:
        """Seconds of ``candidate`` on ``module``'s device and dtype (cached per geometry).

        ``module`` is the layer as it is (timed itself for ``CURRENT``); it only lends its
        device and dtype to the other candidates, which are built from their structure.
        """
        if self.config.timer is not None:
            return float(self.config.timer(candidate))
        device, dtype = _device_dtype(module)
        current = candidate.method == CURRENT
        structure = (type(module).__name__, getattr(module, "ranks", None)) if current else ()
        key = (
            candidate.shape,
            candidate.input_shape,
            candidate.channels_last,
            candidate.method,
            candidate.ranks,
            structure,
            str(device),
            dtype,
            torch.get_num_threads(),
        )
        if key in self._cache:
            return self._cache[key]
        if current:
            layer = module
        else:
            layer = empty_layer(
                candidate.shape,
                candidate.method,
                candidate.ranks or (),
                options=options,
                name=candidate.name,
                device=device,
                dtype=dtype,
            )
        x = torch.randn(candidate.input_shape, device=device, dtype=dtype)
        if candidate.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
            if not current:
                to_channels_last(layer)
        with eval_mode(layer):
            seconds = fastest_run(layer, x, self.config.warmup, self.config.repeats)
        self._cache[key] = seconds
        return seconds


def fastest_run(layer: nn.Module, x: torch.Tensor, warmup: int, repeats: int) -> float:
    """The fastest of ``repeats`` forward passes after ``warmup``, in seconds.

    Other processes and threads only ever add time, so the minimum is the steadiest
    estimate of what a structure costs, and the one that keeps choices stable on a busy
    machine (the median suits whole-model benchmarks, where the spread is the point).
    """
    forward_latency(layer, x, warmup=warmup, repeats=1)
    return min(forward_latency(layer, x, warmup=0, repeats=1) for _ in range(repeats))


def _device_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    reference = next(module.parameters(), None)
    if reference is None:
        return torch.device("cpu"), torch.float32
    return reference.device, reference.dtype


def _ranks_text(ranks: tuple[int, ...] | None) -> str:
    return "-" if ranks is None else "(" + ",".join(str(r) for r in ranks) + ")"


__all__ = [
    "CURRENT",
    "Candidate",
    "LatencyAware",
    "LatencyChoice",
    "LatencyChooser",
    "LayerInput",
    "Timer",
    "fastest_run",
    "layer_inputs",
    "round_up_ranks",
]
