"""Decompose one layer: the single entry point shared by users and the Compressor."""

from __future__ import annotations

import torch
from torch import nn

from stagecomp.layer_shape import LayerShape
from stagecomp.layers.base import DecomposedLayer, Rank
from stagecomp.methods import layer_class
from stagecomp.options import DecomposeOptions


def decompose(
    module: nn.Module,
    method: str,
    rank: Rank,
    *,
    options: DecomposeOptions | None = None,
    name: str | None = None,
) -> DecomposedLayer:
    """Replace-ready low-rank version of ``module``; ``module`` itself is not changed.

    Args:
        module: An nn.Linear, nn.Conv2d or a layer stagecomp already decomposed.
        method: One of ``stagecomp.METHODS`` (what each does: ``stagecomp.methods``).
        rank: One int (a cap on every rank of the method) or one int per rank:
            ``(r_out, r_in)`` for Tucker2, the TT bond ranks for TT, the HT edge ranks
            for HT (``stagecomp.decompositions.ht`` gives their order).
        options: Algorithm settings (seed, solver, iterations, TT and HT modes).
        name: The layer's name in the model, used in error messages.

    Returns:
        A new module on the same device and dtype, in the same train/eval mode.
    """
    shape = LayerShape.from_module(module, name)
    cls = layer_class(method, shape, name)
    return cls.from_module(module, rank, options, name)


def empty_layer(
    shape: LayerShape,
    method: str,
    rank: Rank,
    *,
    options: DecomposeOptions | None = None,
    name: str | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> DecomposedLayer:
    """A freshly initialised decomposed layer built from shapes alone (no weights read).

    Used to load a saved model without decomposing anything, and to train
    factorised layers from scratch.
    """
    options = options or DecomposeOptions()
    cls = layer_class(method, shape, name)
    ranks = cls.normalize_rank(shape, rank, options, name)
    return cls(shape, ranks, options, device=device, dtype=dtype)
