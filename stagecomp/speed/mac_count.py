"""MACs of each layer choice, for a budget on the model's compute beside the one on its time.

A measured speed-up holds on the machine that timed it; a MAC count travels to any
other, and it is what a cut is usually promised in. ``Speedup(macs=...)`` asks for both,
so every choice needs its MACs: counted by fvcore on a freshly built layer of that
structure (``empty_layer``), at the input shape the layer receives on the example input,
once per geometry (the repeated blocks of a ResNet share their counts).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from stagecomp.decompose import empty_layer
from stagecomp.errors import StagecompError
from stagecomp.latency_aware import layer_inputs
from stagecomp.layer_shape import LayerShape
from stagecomp.options import DecomposeOptions
from stagecomp.speed.layer_table import Structure
from stagecomp.stats import layer_macs, model_stats


class MacCounter:
    """Counts the MACs of the model and of each target layer's choices.

    Args:
        model: The model as it is now (earlier stages' layers included).
        example_input: The input the counts are made on.
        names: The target layers.
        options: Decomposition options (structure of TT layers).
    """

    def __init__(
        self,
        model: nn.Module,
        example_input: Any,
        names: Sequence[str],
        options: DecomposeOptions,
    ) -> None:
        try:
            stats = model_stats(model, example_input)
        except Exception as failure:  # fvcore raises whatever its tracer met
            raise StagecompError(
                f"Speedup macs= needs the model's MAC count, and fvcore could not count it "
                f"on the example input ({type(failure).__name__}: {failure}); leave macs=None"
            ) from None
        self.options = options
        reached = layer_inputs(model, example_input, names)
        self.inputs = {name: info.shape for name, info in reached.items()}
        self.model_macs = stats.macs
        self.current = {name: stats.layer_macs.get(name, 0) for name in names}
        self._cache: dict[tuple[Any, ...], int] = {}

    def count(self, name: str, shape: LayerShape, structure: Structure | None) -> int:
        """MACs of layer ``name`` with ``structure`` (``None``: dense) on the example input."""
        input_shape = self.inputs.get(name)
        if input_shape is None:
            return self.current[name]  # never reached: it costs nothing on this input
        key = (shape, structure, input_shape)
        if key not in self._cache:
            layer: nn.Module
            if structure is None:
                layer = shape.build_dense()
            else:
                method, ranks = structure
                layer = empty_layer(shape, method, ranks, options=self.options)
            self._cache[key] = layer_macs(layer, input_shape)
        return self._cache[key]

    def layer_budget(self, shapes: Mapping[str, LayerShape], rate: float) -> float:
        """The most MACs the target layers may sum to for the model to have ``rate`` times
        fewer MACs than with every target layer dense."""
        rest, dense = self._rest_and_dense(shapes)
        return (rest + dense) / rate - rest

    def cut(self, shapes: Mapping[str, LayerShape], layer_macs: float) -> float:
        """How many times fewer MACs the model has than with every target layer dense,
        when the target layers sum to ``layer_macs``."""
        rest, dense = self._rest_and_dense(shapes)
        return (rest + dense) / max(rest + layer_macs, 1.0)

    def _rest_and_dense(self, shapes: Mapping[str, LayerShape]) -> tuple[int, int]:
        """MACs outside the target layers, and of the target layers all dense."""
        dense = sum(self.count(name, shape, None) for name, shape in shapes.items())
        return self.model_macs - sum(self.current.values()), dense


__all__ = ["MacCounter"]
