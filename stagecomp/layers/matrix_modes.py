"""Channels split into paired modes: what the tensor-network layers (TT, HT) share.

A TT or HT layer factorises one group's weight as a tensor over the modes
``(o_1 i_1, ..., o_d i_d)`` followed, for convolutions, by the kernel mode ``kh kw``:
mode ``t`` holds an ``(o_t x i_t)`` block, as in a TT-matrix. How the channels split,
the mode sizes and the weight reordered into that tensor depend only on the shape and
the options (``{prefix}_cores``, ``{prefix}_in_modes``, ``{prefix}_out_modes``), so
they live here once; each format adds only its own least number of modes.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from stagecomp.decompositions.tt import tt_matrix_modes
from stagecomp.errors import UnsupportedLayerError
from stagecomp.layer_shape import LayerShape
from stagecomp.layers.base import describe
from stagecomp.options import DecomposeOptions


class MatrixModes:
    """Mixin of the layers whose weight is a tensor over paired channel modes."""

    mode_option: ClassVar[str]
    """Prefix of the options that set the modes (``"tt"``, ``"ht"``)."""
    default_modes: ClassVar[int]
    """Channel modes when neither ``{prefix}_cores`` nor explicit modes are given."""

    @classmethod
    def spatial_modes(cls, shape: LayerShape) -> tuple[int, ...]:
        """Modes after the channel ones: ``(kh * kw,)`` for convolutions, none for Linear."""
        return (shape.kernel_numel,) if shape.kind == "conv2d" else ()

    @classmethod
    def too_few_modes(cls, shape: LayerShape, in_modes: tuple[int, ...]) -> str | None:
        """Why ``in_modes`` cannot make this format, or None when they can."""
        return None

    @classmethod
    def modes(
        cls, shape: LayerShape, options: DecomposeOptions
    ) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """``(out_modes, in_modes)`` of each group's channels, or ``UnsupportedLayerError``."""
        prefix = cls.mode_option
        count = getattr(options, f"{prefix}_cores")
        out_given = getattr(options, f"{prefix}_out_modes")
        in_given = getattr(options, f"{prefix}_in_modes")
        try:
            out_modes, in_modes = tt_matrix_modes(
                shape.out_per_group,
                shape.in_per_group,
                cls.default_modes if count is None else count,
                out_given,
                in_given,
                option=prefix,
            )
        except ValueError as error:
            raise UnsupportedLayerError(f"{describe(shape, None)}: {error}") from None
        problem = cls.too_few_modes(shape, in_modes)
        if problem is not None:
            raise UnsupportedLayerError(
                f"{describe(shape, None)}: {problem} ({prefix}_cores={count}, "
                f"{prefix}_in_modes={in_given}, {prefix}_out_modes={out_given})"
            )
        return out_modes, in_modes

    @classmethod
    def unsupported_reason(cls, shape: LayerShape, options: DecomposeOptions) -> str | None:
        """Why the channels cannot split into this format's modes, or None."""
        try:
            cls.modes(shape, options)
        except UnsupportedLayerError as error:
            return str(error)
        return None

    @classmethod
    def mode_sizes(cls, shape: LayerShape, options: DecomposeOptions) -> tuple[int, ...]:
        """Sizes of the modes: ``o_t i_t`` per channel mode, then the kernel for Conv2d."""
        out_modes, in_modes = cls.modes(shape, options)
        channels = tuple(o * i for o, i in zip(out_modes, in_modes, strict=True))
        return (*channels, *cls.spatial_modes(shape))

    @classmethod
    def mode_ordered_weight(
        cls, weight: torch.Tensor, shape: LayerShape, options: DecomposeOptions
    ) -> torch.Tensor:
        """One group's weight as the tensor the format factorises (modes ``mode_sizes``).

        Unfolding it after ``k`` modes gives the matrix whose rank is the exact rank of
        the edge that splits the first ``k`` modes from the rest.
        """
        out_modes, in_modes = cls.modes(shape, options)
        spatial = cls.spatial_modes(shape)
        d = len(in_modes)
        tensor = weight.reshape(*out_modes, *in_modes, *spatial)
        order = [j for k in range(d) for j in (k, d + k)] + [2 * d + s for s in range(len(spatial))]
        return tensor.permute(*order).reshape(cls.mode_sizes(shape, options))


__all__ = ["MatrixModes"]
