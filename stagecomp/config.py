"""Settings objects of a compression run: small frozen values that validate themselves.

Each advanced concern of the Compressor is one object here, so the constructor keeps
the everyday arguments of a user's loop, every rule between options is checked once,
and a run's configuration can be written to JSON and read back (``to_dict`` /
``from_dict``). Data (calibration batches) and code (``forward=``, ``output=``, a
latency ``timer``) cannot be written: they are recorded as present, and must be given
again when a run is rebuilt from its saved state.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from stagecomp.calibration import Forward, MaskFn, OutputFn
from stagecomp.data_aware import VARIANTS, check_variant
from stagecomp.distillation import LocalDistillation
from stagecomp.errors import StagecompError
from stagecomp.latency_aware import LatencyAware
from stagecomp.options import DecomposeOptions

FactorsSetting = str | Mapping[str, str | None] | None
"""How factors are fitted: one variant for every layer, a per-layer mapping by name or
pattern (``None`` values keep weight-only factors), or ``None`` for weight-only."""

_CUSTOM = "custom"


@dataclass(frozen=True)
class Calibration:
    """Real inputs, and how a run uses them (``Compressor(..., calibration=Calibration(...))``).

    Before each step the statistics of that step's layers are collected on the model as
    it is then, so later layers see the outputs of the already compressed ones.

    Attributes:
        batches: A list of batches or a DataLoader (iterated once per step that needs it).
        factors: Data-aware factors: ``"whiten"`` (fit the layer's real inputs),
            ``"output"`` (also centre its outputs), ``"gradient"`` (also weight by how
            much the layer's output moves the model's output), a mapping from layer names
            or patterns to one of these (``None``: weight-only for those layers), or
            ``None`` for weight-only factors everywhere (the batches then serve only a
            strategy that needs them, such as ``DataAware``). Methods without data-aware
            factors use weight-only ones; each layer's report row says which it got.
        forward: ``forward(model, batch)`` when the model is not called as ``model(batch)``,
            ``model(*batch)`` or ``model(**batch)``.
        output: Picks the tensor whose gradients ``"gradient"`` uses from the model's
            output (default ``stagecomp.calibration.main_output``).
        correct_drift: Keep a copy of the original model and fit each data-aware layer to
            the original layer's outputs on the original inputs, so it also undoes the
            drift of earlier compressed layers (one copy of the model, a second forward
            per batch).
        blocks: Calibrate block by block, for large models: a pattern naming the
            model's repeated blocks (``"model.layers.*"`` for Llama, ``"encoder.layer.*"``
            for BERT) or ``"auto"`` (the longest ``nn.ModuleList`` of one kind of
            module). Each block's inputs are cached once and moved on through the
            compressed blocks, so a step runs only its block instead of the whole model,
            and the statistics of only its layers are alive: the same input and output
            moments as without, in a fraction of the memory and time. ``"gradient"``
            moments are exact for the first block and the last two; the blocks between
            get the output gradients measured once, before earlier blocks were
            compressed (SVD-LLM's approximation; see ``stagecomp.sequential``). Steps
            never span two blocks; with ``layers_per_step`` at least a block's layers,
            one step is one block. The batches are kept as a list.
        mask: Which positions of a batch are samples: ``mask(batch) -> bool tensor``
            shaped like the leading dimensions of the layers' activations, or None for
            all. Default: a dict batch's ``attention_mask`` (batch x tokens, 0 at
            padding), so padding never counts; pass e.g. ``lambda b: b["mask"].T`` for
            tokens-first activations.
        refine: After each step swaps its new layers in, train them briefly to reproduce
            the layers they replaced on these batches (``stagecomp.LocalDistillation``);
            ``None``: no training. Works with ``factors=None`` too.
    """

    batches: Iterable[Any] = field(repr=False, compare=False)
    factors: FactorsSetting = "whiten"
    forward: Forward | None = field(default=None, repr=False, compare=False)
    output: OutputFn | None = field(default=None, repr=False, compare=False)
    correct_drift: bool = False
    blocks: str | None = None
    mask: MaskFn | None = field(default=None, repr=False, compare=False)
    refine: LocalDistillation | None = None

    def __post_init__(self) -> None:
        batches = self.batches
        if batches is None or isinstance(batches, (str, bytes, Mapping)):
            raise StagecompError(
                f"Calibration batches={type(batches).__name__} is not allowed; expected a "
                "list of batches or a DataLoader"
            )
        if isinstance(batches, torch.Tensor):
            raise StagecompError(
                "Calibration batches is one tensor; expected a list of batches or a "
                "DataLoader, e.g. Calibration([x]) or Calibration(list(x.split(32)))"
            )
        if not hasattr(batches, "__iter__"):
            raise StagecompError(
                f"Calibration batches={batches!r} is not iterable; expected a list of "
                "batches or a DataLoader"
            )
        if isinstance(self.factors, Mapping):
            frozen = dict(self.factors)
            for key, variant in frozen.items():
                if not isinstance(key, str):
                    raise StagecompError(
                        f"Calibration factors key {key!r} is not a layer name or pattern"
                    )
                if variant is not None:
                    check_variant(variant, key)
            object.__setattr__(self, "factors", frozen)
        elif self.factors is not None:
            check_variant(self.factors)
        if not isinstance(self.correct_drift, bool):
            raise StagecompError(
                f"Calibration correct_drift={self.correct_drift!r} is not allowed; "
                "expected True or False"
            )
        if self.refine is not None and not isinstance(self.refine, LocalDistillation):
            raise StagecompError(
                f"Calibration refine={type(self.refine).__name__} is not allowed; expected "
                "stagecomp.LocalDistillation(...) or None"
            )
        if self.correct_drift and not self.variants():
            raise StagecompError(
                "Calibration correct_drift=True refits data-aware factors, but factors=None "
                f"asks for none; set factors to one of {VARIANTS}"
            )
        if self.blocks is not None and (not isinstance(self.blocks, str) or not self.blocks):
            raise StagecompError(
                f"Calibration blocks={self.blocks!r} is not allowed; expected a pattern "
                "naming the model's repeated blocks (e.g. 'model.layers.*'), 'auto' or None"
            )
        if self.blocks is not None and self.correct_drift:
            raise StagecompError(
                "Calibration correct_drift=True cannot be combined with blocks=: drift "
                "correction runs a second, uncompressed copy of the model beside it, which "
                "block-by-block calibration exists to avoid; drop one of them"
            )
        if self.output is not None and "gradient" not in self.variants():
            raise StagecompError(
                "Calibration output= picks the tensor whose gradients factors='gradient' "
                "uses, but no layer uses 'gradient'; drop output= or use factors='gradient'"
            )

    def variants(self) -> set[str]:
        """The data-aware variants some layer may use."""
        if isinstance(self.factors, Mapping):
            return {v for v in self.factors.values() if v is not None}
        return set() if self.factors is None else {self.factors}

    def to_dict(self) -> dict[str, Any]:
        """JSON description; batches are not written, code is recorded as present."""
        factors = dict(self.factors) if isinstance(self.factors, Mapping) else self.factors
        return {
            "factors": factors,
            "forward": None if self.forward is None else _CUSTOM,
            "output": None if self.output is None else _CUSTOM,
            "correct_drift": self.correct_drift,
            "blocks": self.blocks,
            "mask": None if self.mask is None else _CUSTOM,
            "refine": None if self.refine is None else self.refine.to_dict(),
        }

    @classmethod
    def from_dict(
        cls,
        data: Mapping[str, Any],
        batches: Iterable[Any],
        *,
        forward: Forward | None = None,
        output: OutputFn | None = None,
        mask: MaskFn | None = None,
    ) -> Calibration:
        """The settings of ``to_dict`` with the batches (and code) given again."""
        for label, given in (("forward", forward), ("output", output), ("mask", mask)):
            if data.get(label) == _CUSTOM and given is None:
                raise StagecompError(
                    f"the saved calibration used a custom {label}= function; pass it again "
                    f"(code is not saved)"
                )
        return cls(
            batches,
            factors=data.get("factors"),
            forward=forward,
            output=output,
            correct_drift=bool(data.get("correct_drift", False)),
            blocks=data.get("blocks"),
            mask=mask,
            refine=None
            if data.get("refine") is None
            else LocalDistillation.from_dict(data["refine"]),
        )


def latency_from_dict(data: Mapping[str, Any]) -> LatencyAware:
    """A ``LatencyAware`` from its ``to_dict`` (an injected timer must be set again)."""
    values = {k: v for k, v in data.items() if k != "timer"}
    if values.get("methods") is not None:
        values["methods"] = tuple(values["methods"])
    return LatencyAware(**values)


__all__ = [
    "Calibration",
    "DecomposeOptions",
    "FactorsSetting",
    "LatencyAware",
    "LocalDistillation",
    "latency_from_dict",
]
