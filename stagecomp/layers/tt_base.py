"""What TTLinear and TTConv2d share: the channel modes and the TT they imply.

Both layers are a TT of one group's weight over the modes ``(o_1 i_1, ...,
o_d i_d)`` followed, for convolutions, by the spatial mode ``kh kw``. The modes,
the full ranks, the parameter count and the recorded structure follow from
that alone, so they live here once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from stagecomp.decompositions.tt import tt_full_ranks
from stagecomp.layer_shape import LayerShape
from stagecomp.layers.base import DecomposedLayer, describe, math_dtype
from stagecomp.layers.matrix_modes import MatrixModes
from stagecomp.options import DecomposeOptions


class TTLayer(MatrixModes, DecomposedLayer):
    """Base of the TT layers; subclasses say how many cores they default to and need."""

    method = "tt"
    mode_option = "tt"
    min_cores: ClassVar[int] = 1
    """Fewest channel cores that make a TT (a Linear needs two)."""
    structure_keys = ("tt_in_modes", "tt_out_modes")

    in_modes: tuple[int, ...]
    out_modes: tuple[int, ...]
    cores: nn.ParameterList

    @classmethod
    def too_few_modes(cls, shape: LayerShape, in_modes: tuple[int, ...]) -> str | None:
        if len(in_modes) < cls.min_cores:
            return f"a {cls.__name__} needs at least {cls.min_cores} cores, got {len(in_modes)}"
        return None

    def _set_modes(self) -> None:
        """Take the modes ``options`` give; a TT of ``n`` cores has ``n - 1`` bond ranks."""
        self.out_modes, self.in_modes = self.modes(self.shape, self.options)
        cores = len(self.mode_sizes(self.shape, self.options))
        if len(self.ranks) != cores - 1:
            raise ValueError(
                f"{describe(self.shape, None)}: a TT of {cores} cores needs {cores - 1} ranks, "
                f"got {self.ranks}"
            )

    def _math_dtype(self) -> torch.dtype:
        """The dtype the dense weight would be factorised in (``math_dtype``), not forming it."""
        weight = torch.empty(self.shape.weight_shape, dtype=self.cores[0].dtype, device="meta")
        return math_dtype(weight)

    def structure(self) -> dict[str, Any]:
        return {"tt_in_modes": self.in_modes, "tt_out_modes": self.out_modes}

    @classmethod
    def full_rank(cls, shape: LayerShape, options: DecomposeOptions) -> tuple[int, ...]:
        return tt_full_ranks(cls.mode_sizes(shape, options))

    @classmethod
    def param_count(cls, shape: LayerShape, ranks: Sequence[int], options: DecomposeOptions) -> int:
        bonds = (1, *ranks, 1)
        per_group = sum(
            bonds[k] * size * bonds[k + 1] for k, size in enumerate(cls.mode_sizes(shape, options))
        )
        return shape.groups * per_group + (shape.out_channels if shape.bias else 0)
