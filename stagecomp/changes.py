"""What a compression step did: one record per layer, one per step.

Plain data (JSON-ready through ``to_dict``), so the report, the compressor's saved
state and the distributed step all read the same records without importing the
Compressor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn


@dataclass
class LayerChange:
    """What one step did to one layer (or why it left it alone)."""

    step: int
    stage: int
    name: str
    method: str
    ranks: tuple[int, ...] | None
    params_before: int
    params_after: int
    macs_before: int | None = None
    macs_after: int | None = None
    weight_error: float | None = None
    skipped: str | None = None
    latency_before: float | None = None
    latency_after: float | None = None
    factors: str | None = None
    """How the factors were fitted: ``"weight"`` (weight-only), or the data-aware variant
    (``"whiten"``, ``"output"``, ``"gradient"``); ``None`` when the layer was skipped."""
    refined_error_before: float | None = None
    refined_error_after: float | None = None
    """Local distillation (``Calibration(refine=...)``): the relative output error on the
    calibration data of the layer (or of the block it was trained in) against what the
    replaced layer computed, before and after the training; ``None`` without it."""

    def to_dict(self) -> dict[str, Any]:
        data = dict(self.__dict__)
        data["ranks"] = list(self.ranks) if self.ranks is not None else None
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LayerChange:
        values = dict(data)
        values["ranks"] = tuple(values["ranks"]) if values.get("ranks") is not None else None
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in values.items() if k in known})


@dataclass
class StepResult:
    """The outcome of one ``compression_step()``.

    Attributes:
        step: 1-based number of the step that ran.
        changes: One entry per layer of the step, skipped ones included.
        replaced: The new modules by qualified name; their parameters are new
            objects, so rebuild the optimizer (see ``new_parameters``).
        macs_before / macs_after / params_before / params_after: Whole-model totals.
    """

    step: int
    changes: list[LayerChange]
    replaced: dict[str, nn.Module] = field(default_factory=dict)
    macs_before: int | None = None
    macs_after: int | None = None
    params_before: int = 0
    params_after: int = 0

    def new_parameters(self) -> list[nn.Parameter]:
        """Parameters created by this step (for adding to an existing optimizer)."""
        return [p for module in self.replaced.values() for p in module.parameters()]


__all__ = ["LayerChange", "StepResult"]
