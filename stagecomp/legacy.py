"""The Compressor's arguments before version 0.2, accepted for one release with a warning.

``conv_method=``/``linear_method=`` became ``methods=`` entries, and the five calibration
arguments (``calibration=batches``, ``data_aware=``, ``calibration_forward=``,
``correct_drift=``, ``calibration_output=``) became one ``stagecomp.Calibration``. This
adapter translates an old call into the new settings before the constructor sees it, so
the constructor itself keeps only the new signature.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any

from torch import nn

from stagecomp.config import Calibration
from stagecomp.errors import StagecompError
from stagecomp.layer_shape import LayerShape
from stagecomp.methods import check_method, default_method, methods_for_kind
from stagecomp.plan import decomposable_layers

LEGACY_ARGUMENTS = (
    "conv_method",
    "linear_method",
    "data_aware",
    "calibration_forward",
    "correct_drift",
    "calibration_output",
)


def kind_methods(
    model: nn.Module, conv_method: str | None = None, linear_method: str | None = None
) -> dict[str, str]:
    """``methods=`` entries giving every kxk convolution ``conv_method`` and every Linear
    layer ``linear_method`` (1x1 convolutions keep SVD, as the old arguments did)."""
    if conv_method is not None:
        check_method(conv_method)
    linear = methods_for_kind("linear")
    if linear_method is not None and linear_method not in linear:
        raise StagecompError(
            f"linear_method={linear_method!r} is not allowed; expected one of {linear}"
        )
    found: dict[str, str] = {}
    for name, module in decomposable_layers(model):
        try:
            shape = LayerShape.from_module(module, name)
        except StagecompError:
            continue
        if shape.kind == "linear" and linear_method is not None:
            found[name] = linear_method
        elif shape.kind == "conv2d" and not shape.is_pointwise and conv_method is not None:
            found[name] = conv_method
    return {n: m for n, m in found.items() if m != default_method(_shape(model, n))}


def _shape(model: nn.Module, name: str) -> LayerShape:
    return LayerShape.from_module(model.get_submodule(name), name)


def translate(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
    """New-style keyword arguments for an old-style call (``args`` holds the positionals)."""
    legacy = {k: kwargs.pop(k) for k in LEGACY_ARGUMENTS if k in kwargs}
    batches = kwargs.get("calibration")
    old_calibration = batches is not None and not isinstance(batches, Calibration)
    if not legacy and not old_calibration:
        return kwargs
    warnings.warn(
        "Compressor(conv_method=, linear_method=, data_aware=, calibration=batches, "
        "calibration_forward=, correct_drift=, calibration_output=) are deprecated and will "
        "be removed in the next release; use methods={...} and "
        "calibration=stagecomp.Calibration(batches, factors=..., forward=..., output=..., "
        "correct_drift=...)",
        DeprecationWarning,
        stacklevel=3,
    )
    model = args[0] if args else kwargs.get("model")
    if "conv_method" in legacy or "linear_method" in legacy:
        if not isinstance(model, nn.Module):
            raise StagecompError("conv_method=/linear_method= need the model")
        methods = kind_methods(model, legacy.get("conv_method"), legacy.get("linear_method"))
        methods.update(dict(kwargs.get("methods") or {}))
        kwargs["methods"] = methods
    calibration_settings = {
        "data_aware",
        "calibration_forward",
        "correct_drift",
        "calibration_output",
    } & set(legacy)
    if batches is not None and old_calibration:
        kwargs["calibration"] = Calibration(
            batches,
            factors=legacy.get("data_aware"),
            forward=legacy.get("calibration_forward"),
            output=legacy.get("calibration_output"),
            correct_drift=bool(legacy.get("correct_drift", False)),
        )
    elif calibration_settings and (
        legacy.get("data_aware") is not None or legacy.get("correct_drift")
    ):
        raise StagecompError(
            f"{', '.join(sorted(calibration_settings))} need calibration batches: "
            "Compressor(..., calibration=stagecomp.Calibration(batches, factors=...))"
        )
    return kwargs


class AcceptsLegacyArguments(type):
    """Metaclass of the Compressor: translate an old-style call, then construct as usual."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        return super().__call__(*args, **translate(args, kwargs))

    @property
    def __signature__(cls) -> inspect.Signature:
        """The constructor's own signature (not this adapter's), for help() and docs."""
        init = inspect.signature(cls.__init__)  # type: ignore[misc]
        return init.replace(parameters=list(init.parameters.values())[1:])


__all__ = ["LEGACY_ARGUMENTS", "AcceptsLegacyArguments", "kind_methods", "translate"]
