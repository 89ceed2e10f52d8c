"""The plan of a run: which layers, with which method and strategy, in which steps.

Computed once when the Compressor is built, from the model and the settings, so that it
can be read before anything is decomposed (``print(compressor.plan)``), and saved with
the run's state. Every layer the model has that could be decomposed is either a target
or in ``skipped`` with the reason.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from torch import nn

from stagecomp.errors import NoMatchingLayerError, StagecompError, UnsupportedLayerError
from stagecomp.layer_kinds import is_plain_layer, unsupported_reason
from stagecomp.layer_shape import LayerShape
from stagecomp.layers.base import DecomposedLayer, Rank
from stagecomp.matching import check_keys, key_matches, lookup, select
from stagecomp.methods import check_method, default_method, get_method
from stagecomp.options import DecomposeOptions
from stagecomp.plain_layers import OPT_IN, custom_code, fixed_code
from stagecomp.report import format_plan
from stagecomp.strategies import Manual, RankStrategy, unavailable_reason
from stagecomp.strategies.reduction import rank_at_step
from stagecomp.weight_reads import NOT_CHECKED, output_heads, weights_read_elsewhere

LayerRank = Rank | RankStrategy | None
"""A ``ranks=`` value: manual ranks, a strategy for that layer, or ``None`` to leave it."""

WEIGHT = "weight"
"""The ``factors`` of a layer whose factors are fitted to its weights alone."""

ORDERS = ("model", "macs")


@dataclass(frozen=True)
class PlannedLayer:
    """One target layer and how it is compressed.

    Attributes:
        name: Qualified name in the model.
        method: The decomposition method (a latency-aware run may pick another one).
        strategy: The rank strategy for this layer.
        factors: ``"weight"``, or the data-aware variant its factors are fitted with.
        pinned: The method was named for this layer in ``methods=`` (a latency-aware run
            then tries only that method).
        note: Why the settings asked for differs from what is planned (e.g. a method
            without data-aware factors), or ``None``.
    """

    name: str
    method: str
    strategy: RankStrategy
    factors: str = WEIGHT
    pinned: bool = False
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "method": self.method,
            "strategy": self.strategy.to_dict(),
            "factors": self.factors,
            "pinned": self.pinned,
            "note": self.note,
        }


@dataclass(frozen=True)
class Plan:
    """Targets in order, skipped layers with reasons, and the steps.

    Attributes:
        targets: The layers to compress, in the order of one stage.
        skipped: Every other decomposable layer, with the reason.
        steps: Per step, the ``(stage, layer)`` pairs it compresses.
        remarks: Checks the plan could not make (e.g. weight reads, without example_input).
    """

    targets: tuple[PlannedLayer, ...]
    skipped: Mapping[str, str]
    steps: tuple[tuple[tuple[int, PlannedLayer], ...], ...]
    remarks: tuple[str, ...] = ()

    def signature(self) -> list[list[list[Any]]]:
        """``[[stage, name, method], ...]`` per step: what must match to resume a run."""
        return [[[stage, t.name, t.method] for stage, t in step] for step in self.steps]

    def to_dict(self) -> dict[str, Any]:
        return {
            "targets": [t.to_dict() for t in self.targets],
            "skipped": dict(self.skipped),
            "steps": self.signature(),
            "remarks": list(self.remarks),
        }

    def __str__(self) -> str:
        text = format_plan(
            [[(stage, t.name, t.method, t.factors) for stage, t in step] for step in self.steps],
            {t.name: t.note for t in self.targets if t.note},
            self.skipped,
        )
        return "\n".join([text, *(f"note: {r}" for r in self.remarks)])


def _outside_decomposed(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Every named module except the insides of decomposed layers (their factors are not
    layers of the user's model)."""
    inside: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(prefix + ".") for prefix in inside):
            continue
        if isinstance(module, DecomposedLayer):
            inside.append(name)
        yield name, module


def decomposable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every Linear, Conv2d, Conv1d, Hugging Face Conv1D and decomposed layer, not counting
    the insides of decomposed ones."""
    return [
        (name, module)
        for name, module in _outside_decomposed(model)
        if isinstance(module, DecomposedLayer) or is_plain_layer(module)
    ]


def unsupported_layers(model: nn.Module) -> dict[str, str]:
    """Layers with weights stagecomp does not decompose (Conv3d, Embedding ...), with the reason,
    so that the plan lists them instead of skipping them silently."""
    found: dict[str, str] = {}
    for name, module in _outside_decomposed(model):
        if isinstance(module, DecomposedLayer) or is_plain_layer(module):
            continue
        reason = unsupported_reason(module)
        if reason is not None:
            found[name] = reason
    return found


def used_outside_forward(model: nn.Module) -> dict[str, str]:
    """Layers that other code reads by weight, so replacing them would change nothing or break.

    ``nn.MultiheadAttention`` reads ``out_proj.weight`` directly, and a weight tied to
    another module (e.g. an embedding) would be untied by a replacement.
    """
    reasons: dict[str, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            prefix = f"{name}." if name else ""
            reasons[f"{prefix}out_proj"] = (
                "nn.MultiheadAttention uses this layer's weight directly, not its forward"
            )
    owners: dict[int, list[str]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for param in module.parameters(recurse=False):
            owners.setdefault(id(param), []).append(module_name)
    for names in owners.values():
        if len(set(names)) > 1:
            for owner in names:
                others = ", ".join(n for n in names if n != owner)
                reasons.setdefault(owner, f"its weight is shared with {others}")
    return reasons


def check_rank_value(name: str, value: object) -> None:
    """Refuse a ``ranks=`` value that is neither ranks, a strategy nor ``None``."""
    if value is None or (hasattr(value, "choose_ranks") and not isinstance(value, type)):
        return
    if isinstance(value, type):
        raise StagecompError(
            f"ranks[{name!r}] is the class {value.__name__}; pass an instance, e.g. "
            f"{value.__name__}(...)"
        )
    values = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else [value]
    for v in values:
        if isinstance(v, (bool, str, bytes, float)) or not hasattr(v, "__index__"):
            raise StagecompError(
                f"ranks[{name!r}]={value!r} is not allowed; expected an integer, a tuple of "
                "integers, a strategy object (e.g. stagecomp.Reduction(4.0)) or None"
            )


def build_plan(
    model: nn.Module,
    *,
    strategy: RankStrategy,
    ranks: Mapping[str, LayerRank],
    exclude: Sequence[str],
    methods: Mapping[str, str],
    factors: str | Mapping[str, str | None] | None,
    options: DecomposeOptions,
    stages: int,
    layers_per_step: int,
    order: str,
    layer_macs: Mapping[str, int] | None,
    calibrated: bool,
    example_input: Any = None,
) -> Plan:
    """The plan for ``model`` under these settings (see ``Compressor`` for their meaning).

    Raises:
        NoMatchingLayerError: a key matches no layer, or no layer can be compressed.
        StagecompError: an invalid value, named with its layer.
    """
    candidates = decomposable_layers(model)
    names = [name for name, _ in candidates]
    check_keys(ranks, names, "ranks")
    check_keys(exclude, names, "exclude")
    check_keys(methods, names, "methods")
    for method in methods.values():
        check_method(method)
    for key, value in ranks.items():
        check_rank_value(key, value)
    if isinstance(factors, Mapping):
        check_keys(factors, names, "calibration factors")
    if order not in ORDERS:
        raise StagecompError(f"order={order!r} is not allowed; expected one of {ORDERS}")
    if order == "macs" and layer_macs is None:
        raise StagecompError("order='macs' needs example_input to count MACs")

    excluded = set(select(names, exclude))
    fixed = used_outside_forward(model)
    for head, why in output_heads(model, names).items():
        if head not in ranks and head not in methods:
            fixed.setdefault(head, why)
    remarks: tuple[str, ...] = (NOT_CHECKED,)
    if example_input is not None:
        for read, why in weights_read_elsewhere(model, names, example_input).items():
            fixed.setdefault(read, why)
        remarks = ()
    targets: list[PlannedLayer] = []
    skipped: dict[str, str] = {}
    for name, module in candidates:
        reason = fixed.get(name) or fixed_code(module)
        custom = custom_code(module)
        named = name in methods or ranks.get(name, None) is not None
        if reason is None and custom is not None and not named:
            reason = f"{custom}; {OPT_IN}"
        if reason is None and name in excluded:
            reason = "excluded"
        layer_strategy = _strategy_for(ranks, strategy, name)
        if reason is None and layer_strategy is None:
            reason = "excluded (rank None)"
        if reason is None and layer_strategy is not None:
            reason = unavailable_reason(layer_strategy)
        if reason is None and layer_strategy is not None:
            planned = _planned_layer(
                name, module, layer_strategy, methods, factors, options, calibrated
            )
            if isinstance(planned, PlannedLayer):
                if custom is not None:
                    note = f"replaced as asked although {custom}"
                    planned = replace(
                        planned, note=f"{planned.note}; {note}" if planned.note else note
                    )
                targets.append(planned)
                continue
            reason = planned
        skipped[name] = reason or "skipped"
    for name, reason in unsupported_layers(model).items():
        skipped.setdefault(name, reason)
    if not targets:
        raise NoMatchingLayerError(
            "no layer of the model can be compressed: " + (_grouped(skipped) or "it has none")
        )
    if order == "macs" and layer_macs is not None:
        targets.sort(key=lambda t: -layer_macs.get(t.name, 0))
    flat = [(stage, t) for stage in range(stages) for t in targets]
    steps = tuple(
        tuple(flat[i : i + layers_per_step]) for i in range(0, len(flat), layers_per_step)
    )
    return Plan(tuple(targets), skipped, steps, remarks)


def _grouped(skipped: Mapping[str, str]) -> str:
    """Skip reasons with the layers that share each, so one reason is said once."""
    by_reason: dict[str, list[str]] = {}
    for name, reason in skipped.items():
        by_reason.setdefault(reason, []).append(name)
    parts = []
    for reason, names in by_reason.items():
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        parts.append(f"{len(names)} layer(s) ({shown}): {reason}")
    return "; ".join(parts)


def _strategy_for(
    ranks: Mapping[str, LayerRank], strategy: RankStrategy, name: str
) -> RankStrategy | None:
    found, value = lookup(ranks, name)
    if not found:
        return strategy
    if value is None:
        return None
    if isinstance(value, (int, Sequence)) or hasattr(value, "__index__"):
        # Ranks given to this layer by its exact name are taken even if the layer grows.
        return Manual(rank=value, allows_growth=name in ranks)  # type: ignore[arg-type]
    return value


def _method_for(methods: Mapping[str, str], name: str, shape: LayerShape) -> tuple[str, bool]:
    """The method for a layer and whether it was named for it.

    An exact name is taken as asked (an unsupported layer is then skipped with the
    reason); a pattern sets the method of the layers it can decompose, and the others
    keep the default (``methods={"*": "cp3"}`` leaves Linear layers to SVD).
    """
    if name in methods:
        return methods[name], True
    chosen: str | None = None
    for key, method in methods.items():
        if key_matches(key, name) and shape.kind in get_method(method).kinds:
            chosen = method
    if chosen is None:
        return default_method(shape), False
    return chosen, True


def _planned_layer(
    name: str,
    module: nn.Module,
    strategy: RankStrategy,
    methods: Mapping[str, str],
    factors: str | Mapping[str, str | None] | None,
    options: DecomposeOptions,
    calibrated: bool,
) -> PlannedLayer | str:
    """The planned layer, or the reason it is skipped."""
    try:
        shape = LayerShape.from_module(module, name)
    except UnsupportedLayerError as error:
        return str(error)
    if shape.kind != "linear" and min(shape.in_per_group, shape.out_per_group) == 1:
        return (
            "one input or output channel per group (depthwise or single-channel): "
            "nothing to factorise"
        )
    method, pinned = _method_for(methods, name, shape)
    handler = get_method(method)
    try:
        cls = handler.layer_class(shape, name)
        cls.check_supported(shape, options, name)
    except UnsupportedLayerError as error:
        return str(error)
    smallest = cls.param_count(shape, rank_at_step(cls.full_rank(shape, options), 1), options)
    if smallest >= shape.dense_params:
        return (
            f"too small: even rank 1 with {method} has {smallest} >= "
            f"{shape.dense_params} parameters"
        )
    if isinstance(strategy, Manual) and strategy.rank is not None:
        strategy.final_ranks(cls, shape, options, name)  # a bad rank fails now, not at its step
    variant = lookup(factors, name)[1] if isinstance(factors, Mapping) else factors
    note = None
    if variant is not None and not calibrated:
        variant = None
    if variant is not None and not handler.supports_data_aware(shape):
        note = f"{method} has no data-aware factors here: weight-only factors"
        variant = None
    return PlannedLayer(name, method, strategy, variant or WEIGHT, pinned, note)


__all__ = [
    "ORDERS",
    "WEIGHT",
    "LayerRank",
    "Plan",
    "PlannedLayer",
    "build_plan",
    "check_rank_value",
    "decomposable_layers",
    "unsupported_layers",
    "used_outside_forward",
]
