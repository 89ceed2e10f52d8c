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

from stagecomp.decompositions.tt import tt_full_ranks, tt_matrix_modes
from stagecomp.errors import UnsupportedLayerError
from stagecomp.layer_shape import LayerShape
from stagecomp.layers.base import DecomposedLayer, describe, math_dtype
from stagecomp.options import DecomposeOptions


class TTLayer(DecomposedLayer):
    """Base of the TT layers; subclasses say how many cores they default to and need."""

    method = "tt"
    default_cores: ClassVar[int]
    """Channel cores when neither ``options.tt_cores`` nor explicit modes are given."""
    min_cores: ClassVar[int] = 1
    """Fewest channel cores that make a TT (a Linear needs two)."""
    structure_keys = ("tt_in_modes", "tt_out_modes")

    in_modes: tuple[int, ...]
    out_modes: tuple[int, ...]
    cores: nn.ParameterList

    @classmethod
    def spatial_modes(cls, shape: LayerShape) -> tuple[int, ...]:
        """Modes after the channel ones: ``(kh * kw,)`` for convolutions, none for Linear."""
        return (shape.kernel_numel,) if shape.kind == "conv2d" else ()

    @classmethod
    def modes(
        cls, shape: LayerShape, options: DecomposeOptions
    ) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """``(out_modes, in_modes)`` of each group's channels, or ``UnsupportedLayerError``."""
        cores = cls.default_cores if options.tt_cores is None else options.tt_cores
        try:
            out_modes, in_modes = tt_matrix_modes(
                shape.out_per_group,
                shape.in_per_group,
                cores,
                options.tt_out_modes,
                options.tt_in_modes,
            )
        except ValueError as error:
            raise UnsupportedLayerError(f"{describe(shape, None)}: {error}") from None
        if len(in_modes) < cls.min_cores:
            raise UnsupportedLayerError(
                f"{describe(shape, None)}: a {cls.__name__} needs at least {cls.min_cores} "
                f"cores, got {len(in_modes)} (tt_cores={options.tt_cores}, tt_in_modes="
                f"{options.tt_in_modes}, tt_out_modes={options.tt_out_modes})"
            )
        return out_modes, in_modes

    @classmethod
    def bond_mode_sizes(cls, shape: LayerShape, options: DecomposeOptions) -> tuple[int, ...]:
        """Sizes of the TT modes; bond ``k`` splits the first ``k`` modes from the rest."""
        out_modes, in_modes = cls.modes(shape, options)
        channels = tuple(o * i for o, i in zip(out_modes, in_modes, strict=True))
        return (*channels, *cls.spatial_modes(shape))

    @classmethod
    def tt_ordered_weight(
        cls, weight: torch.Tensor, shape: LayerShape, options: DecomposeOptions
    ) -> torch.Tensor:
        """One group's weight as the tensor TT-SVD factorises (modes ``bond_mode_sizes``).

        Unfolding it after ``k`` modes gives the matrix whose rank is the exact
        TT rank of bond ``k``.
        """
        out_modes, in_modes = cls.modes(shape, options)
        spatial = cls.spatial_modes(shape)
        d = len(in_modes)
        tensor = weight.reshape(*out_modes, *in_modes, *spatial)
        order = [j for k in range(d) for j in (k, d + k)] + [2 * d + s for s in range(len(spatial))]
        return tensor.permute(*order).reshape(cls.bond_mode_sizes(shape, options))

    def _set_modes(self) -> None:
        """Take the modes ``options`` give; a TT of ``n`` cores has ``n - 1`` bond ranks."""
        self.out_modes, self.in_modes = self.modes(self.shape, self.options)
        cores = len(self.bond_mode_sizes(self.shape, self.options))
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
    def unsupported_reason(cls, shape: LayerShape, options: DecomposeOptions) -> str | None:
        try:
            cls.modes(shape, options)
        except UnsupportedLayerError as error:
            return str(error)
        return None

    @classmethod
    def full_rank(cls, shape: LayerShape, options: DecomposeOptions) -> tuple[int, ...]:
        return tt_full_ranks(cls.bond_mode_sizes(shape, options))

    @classmethod
    def param_count(cls, shape: LayerShape, ranks: Sequence[int], options: DecomposeOptions) -> int:
        bonds = (1, *ranks, 1)
        per_group = sum(
            bonds[k] * size * bonds[k + 1]
            for k, size in enumerate(cls.bond_mode_sizes(shape, options))
        )
        return shape.groups * per_group + (shape.out_channels if shape.bias else 0)
