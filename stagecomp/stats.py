"""MACs and parameters per layer and per model, counted by fvcore.

fvcore calls one multiply-add a "flop"; we report the same number under its
right name, MACs. Counting traces the model once on the example input, in eval
mode and without gradients, so BatchNorm statistics and the model's mode are
left exactly as they were.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from stagecomp.example_input import caches_off, strip_prefix, traceable
from stagecomp.surgery import eval_mode

with warnings.catch_warnings():
    # fvcore scripts a helper at import time, which recent torch reports as deprecated.
    warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
    from fvcore.nn import FlopCountAnalysis, parameter_count

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelStats:
    """MACs and parameters of a model on one example input.

    Attributes:
        macs: Multiply-accumulates of one forward pass over the example input.
        params: Number of parameters.
        layer_macs: MACs per qualified module name (every module, nested names included).
        layer_params: Parameters per qualified module name.
    """

    macs: int
    params: int
    layer_macs: dict[str, int] = field(default_factory=dict)
    layer_params: dict[str, int] = field(default_factory=dict)


def model_stats(model: nn.Module, example_input: Any) -> ModelStats:
    """Count MACs and parameters of ``model`` (unchanged) on ``example_input``.

    Args:
        model: Any module fvcore can trace.
        example_input: A tensor, a tuple of positional inputs, or a dict of keyword
            inputs (a Hugging Face tokenizer's output). A model's key/value cache is
            turned off for the count (fvcore cannot trace it), then restored.
    """
    module, inputs, prefix = traceable(model, example_input)
    with eval_mode(model), torch.no_grad(), caches_off(model):
        analysis = FlopCountAnalysis(module, inputs)
        analysis.unsupported_ops_warnings(False)
        analysis.uncalled_modules_warnings(False)
        analysis.tracer_warnings("none")
        by_module = strip_prefix(analysis.by_module(), prefix)
        by_module = {name: int(v) for name, v in by_module.items()}
    params = {name: int(v) for name, v in parameter_count(model).items()}
    return ModelStats(
        macs=by_module.get("", 0),
        params=params.get("", 0),
        layer_macs=by_module,
        layer_params=params,
    )


def layer_macs(module: nn.Module, input_shape: tuple[int, ...]) -> int:
    """MACs of ``module`` on a zero input of ``input_shape`` (on its device and dtype)."""
    reference = next(module.parameters(), None)
    device = reference.device if reference is not None else None
    dtype = reference.dtype if reference is not None else None
    example = torch.zeros(input_shape, device=device, dtype=dtype)
    return model_stats(module, example).macs
