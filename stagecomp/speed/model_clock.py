"""The whole model timed as it will run, with any choice of layer structures swapped in.

A per-layer latency table predicts the whole model only roughly: activations, additions
and pooling keep their cost, caches are shared, and a thin factor can fall into another
convolution kernel than it did alone. So the allocation is checked on the whole model:
a working copy (BatchNorm folded, laid out like the example input, on the serving
device, at the serving batch size) in which each target layer can be swapped for a
structure built from shapes alone (``empty_layer``: latency does not depend on the
weights). Models are timed in interleaved rounds, one forward pass each, so drift hits
every model alike, and compared by their fastest pass: other processes only ever add
time, and the layer tables count the same way (``fastest_run``), so layer seconds and
model seconds can be compared.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from stagecomp.decompose import empty_layer
from stagecomp.errors import StagecompError
from stagecomp.fold import fold_batchnorm
from stagecomp.latency_aware import LayerInput, layer_inputs
from stagecomp.layer_shape import LayerShape
from stagecomp.memory_format import to_channels_last
from stagecomp.options import DecomposeOptions
from stagecomp.speed.layer_table import Structure, current_structure
from stagecomp.surgery import get_module, replace_module

logger = logging.getLogger(__name__)

ModelTimer = Callable[[Mapping[str, Structure | None]], float]
"""Seconds of one forward pass of the whole model with each target layer given as a
structure (``None``: dense); inject one to make the closed loop reproducible."""


def _inputs(example_input: Any) -> tuple[Any, ...]:
    return example_input if isinstance(example_input, tuple) else (example_input,)


def resize_batch(example_input: Any, batch_size: int | None, device: torch.device) -> Any:
    """``example_input`` on ``device``, its batch dimension set to ``batch_size`` (repeating
    the first sample), each tensor in its own memory layout."""
    if isinstance(example_input, torch.Tensor):
        return _resize(example_input, batch_size, device)
    if isinstance(example_input, tuple) and all(isinstance(x, torch.Tensor) for x in example_input):
        return tuple(_resize(x, batch_size, device) for x in example_input)
    if batch_size is None:
        return example_input
    raise StagecompError(
        f"Speedup batch_size={batch_size} needs an example_input that is a tensor or a tuple "
        f"of tensors, not {type(example_input).__name__}; give the input at the batch size "
        "to time at and batch_size=None"
    )


def _resize(x: torch.Tensor, batch_size: int | None, device: torch.device) -> torch.Tensor:
    layout = torch.channels_last if _is_channels_last(x) else torch.contiguous_format
    x = x.to(device)
    if batch_size is not None and x.dim() > 0:
        x = x[:1].expand(batch_size, *x.shape[1:])
    return x.contiguous(memory_format=layout)


def _is_channels_last(x: Any) -> bool:
    return (
        isinstance(x, torch.Tensor)
        and x.dim() == 4
        and not x.is_contiguous()
        and x.is_contiguous(memory_format=torch.channels_last)
    )


class ModelClock:
    """A working copy of the model, prepared as it will be served, that times structures.

    Args:
        model: The model as it is now (left untouched: a copy is timed).
        example_input: What the model serves (its layout decides channels-last).
        names: The target layers whose structures are swapped.
        options: Decomposition options (structure of TT layers).
        device: Where to time (default: the model's device).
        batch_size: Time at this batch size (default: the example input's).
        fold: Fold BatchNorm first, as a served model would be (when the model traces).
        warmup: Untimed passes of each model before the rounds.
        rounds: Timed passes of each model; the fastest counts.
    """

    def __init__(
        self,
        model: nn.Module,
        example_input: Any,
        names: Sequence[str],
        options: DecomposeOptions,
        *,
        device: torch.device | str | None = None,
        batch_size: int | None = None,
        fold: bool = True,
        warmup: int = 2,
        rounds: int = 5,
    ) -> None:
        reference = next(model.parameters(), None)
        self.device = (
            torch.device(device)
            if device is not None
            else (reference.device if reference is not None else torch.device("cpu"))
        )
        self.options, self.warmup, self.rounds = options, warmup, rounds
        self.model = copy.deepcopy(model).to(self.device).eval()
        self.input = resize_batch(example_input, batch_size, self.device)
        if fold:
            try:
                fold_batchnorm(self.model)
            except StagecompError as error:
                logger.info("timing without folding BatchNorm: %s", error)
        self.channels_last = any(_is_channels_last(x) for x in _inputs(self.input))
        if self.channels_last:
            to_channels_last(self.model)
        self.inputs: dict[str, LayerInput] = layer_inputs(self.model, self.input, names)
        self.current = {name: get_module(self.model, name) for name in names}
        self._dense: dict[str, nn.Module] = {}

    def build(self, name: str, structure: Structure | None) -> nn.Module:
        """Layer ``name`` with ``structure`` (``None``: dense), as it runs in the copy."""
        current = self.current[name]
        if structure == current_structure(current):
            return current
        shape = LayerShape.from_module(current, name)
        place = next(current.parameters())
        if structure is None:
            if name not in self._dense:
                self._dense[name] = self._laid_out(
                    shape.build_dense(device=place.device, dtype=place.dtype)
                )
            return self._dense[name]
        method, ranks = structure
        layer = empty_layer(
            shape, method, ranks, options=self.options, device=place.device, dtype=place.dtype
        )
        return self._laid_out(layer)

    def _laid_out(self, layer: nn.Module) -> nn.Module:
        layer.eval()
        return to_channels_last(layer) if self.channels_last else layer

    @torch.no_grad()
    def time(self, layouts: Sequence[Mapping[str, Structure | None]]) -> list[float]:
        """Fastest seconds of a forward pass of the model with each layout, interleaved."""
        built = [{name: self.build(name, s) for name, s in layout.items()} for layout in layouts]
        samples: list[list[float]] = [[] for _ in built]
        try:
            for round_index in range(self.warmup + self.rounds):
                for k, modules in enumerate(built):
                    for name, module in modules.items():
                        replace_module(self.model, name, module)
                    seconds = self._forward_seconds()
                    if round_index >= self.warmup:
                        samples[k].append(seconds)
        finally:
            for name, module in self.current.items():
                replace_module(self.model, name, module)
        return [min(s) for s in samples]

    def _forward_seconds(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        begin = time.perf_counter()
        self.model(*_inputs(self.input))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - begin


__all__ = ["ModelClock", "ModelTimer", "resize_batch"]
