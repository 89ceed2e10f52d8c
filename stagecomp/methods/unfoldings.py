"""Reading a layer's dense weight, and the matrices several handlers unfold it into.

Every handler's VBMF matrices and data-aware factors start from the same dense
weight (of a plain layer or of one decomposed by an earlier stage), grouped as
``(groups, out/g, in/g, kh, kw)``; the unfoldings here are shared so that two
methods reading the same matrix read it the same way.
"""

from __future__ import annotations

import torch
from torch import nn

from stagecomp.errors import NonFiniteWeightError, RankError
from stagecomp.layer_kinds import plain_weight
from stagecomp.layer_shape import LayerShape
from stagecomp.layers.base import DecomposedLayer, describe


def dense_weight(module: nn.Module, name: str | None) -> torch.Tensor:
    """The weight ``module`` computes with, detached (decomposed layers rebuild it)."""
    if isinstance(module, DecomposedLayer):
        weight = module.dense_weight()
    elif isinstance(getattr(module, "weight", None), torch.Tensor):
        weight = plain_weight(module)  # a Hugging Face Conv1D's weight is transposed
    else:
        raise RankError(f"layer {name!r} has no weight tensor")
    return weight.detach()


def finite_weights(
    module: nn.Module, shape: LayerShape, name: str | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The dense weight and bias in float64, or ``NonFiniteWeightError``: fitted factors
    of NaN weights would silently be NaN too."""
    w = dense_weight(module, name).to(torch.float64)
    bias = module.dense_bias() if isinstance(module, DecomposedLayer) else module.bias
    b = bias.detach().to(torch.float64) if isinstance(bias, torch.Tensor) else None
    if not torch.isfinite(w).all() or (b is not None and not torch.isfinite(b).all()):
        raise NonFiniteWeightError(
            f"{describe(shape, name)} has NaN or infinite weights; "
            "only finite weights can be decomposed"
        )
    return w, b


def grouped_float64(module: nn.Module, shape: LayerShape, name: str | None) -> torch.Tensor:
    """The dense weight in float64 as ``(groups, out/g, in/g, kh, kw)``."""
    return shape.grouped_weight(dense_weight(module, name).double())


def output_unfoldings(shape: LayerShape, grouped: torch.Tensor) -> list[torch.Tensor]:
    """Per group, the weight as ``(out/g, in/g * kh * kw)``: its rows are output channels."""
    return [g.reshape(shape.out_per_group, -1) for g in grouped]


def input_unfoldings(shape: LayerShape, grouped: torch.Tensor) -> list[torch.Tensor]:
    """Per group, the weight as ``(in/g, out/g * kh * kw)``: its rows are input channels."""
    return [g.transpose(0, 1).reshape(shape.in_per_group, -1) for g in grouped]


def orthonormal_fold(factor: torch.Tensor) -> torch.Tensor:
    """The R of a thin QR: what remains of a factor once its orthonormal part is removed.

    Folding both outer factors of a decomposed layer this way leaves a small core with
    the layer's whole spectrum, which is what later VBMF stages read.
    """
    return torch.linalg.qr(factor, mode="r")[1]


def both_channel_unfoldings(
    module: nn.Module, shape: LayerShape, name: str | None
) -> list[list[torch.Tensor]]:
    """One rank read from the output and the input unfoldings of every group together.

    A CP rank bounds the rank of both channel unfoldings, so VBMF keeps the largest
    rank it finds in either.
    """
    with torch.no_grad():
        grouped = grouped_float64(module, shape, name)
        return [output_unfoldings(shape, grouped) + input_unfoldings(shape, grouped)]
