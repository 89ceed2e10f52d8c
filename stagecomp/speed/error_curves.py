"""What a choice costs in accuracy: the truncation error of a method at given ranks.

The error of each choice is read from the spectra of the matrices the method's handler
names for each of its ranks (``MethodHandler.spectral_matrices``, the ones VBMF reads):
the energy beyond rank ``r`` of each, relative to the weight's energy, summed over the
method's ranks. For SVD this is the exact squared relative error of the truncation; for
Tucker2 and TT it is the HOSVD / TT-SVD bound (what HOOI returns is at most this); for CP
an estimate. Nothing is decomposed, so a whole model's choices cost one spectrum per
layer and method.

With calibration the same is read from the weight as the data sees it: mixed on its
input channels by the square root of the input moment (so the error is the layer's output
error on the calibration inputs, channel-wise), and for ``"gradient"`` also on its output
channels by the square root of the final output's gradient moment, so errors of different
layers are in one unit, the predicted squared change of the model's output (as
``allocate_ranks`` counts them).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from stagecomp.calibration import Forward, OutputFn, collect_gradient_moments, collect_statistics
from stagecomp.layer_shape import LayerShape
from stagecomp.methods import get_method
from stagecomp.methods.unfoldings import dense_weight
from stagecomp.options import DecomposeOptions

_SVD_UP_TO = 1 << 14
"""Up to this many entries a spectrum comes from the SVD; above, from the eigenvalues of
the smaller Gram matrix, 10-100x faster (a ResNet's 3x3 kernels took 30 s by SVD)."""

_FLOAT32_GRAM_ABOVE = 1 << 22
"""Above this many entries the Gram product runs in float32 (VGG-16's 4096 x 25088
classifier in seconds); its rounding, ~1e-7 of the largest eigenvalue, is far below any
error a choice is priced at."""


def squared_spectrum(matrix: torch.Tensor) -> torch.Tensor:
    """The squared singular values of ``matrix``, largest first, in float64."""
    if matrix.numel() <= _SVD_UP_TO:
        return torch.linalg.svdvals(matrix.double()).square()
    m = matrix.float() if matrix.numel() > _FLOAT32_GRAM_ABOVE else matrix.double()
    gram = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
    return torch.linalg.eigvalsh(gram.double()).flip(0).clamp_min(0.0)


def _psd_root(moment: torch.Tensor) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(moment.double())
    return (vectors * values.clamp_min(0.0).sqrt()) @ vectors.T


@torch.no_grad()
def weight_seen_by_data(
    module: nn.Module,
    shape: LayerShape,
    input_moment: torch.Tensor | None = None,
    gradient_moment: torch.Tensor | None = None,
    name: str | None = None,
) -> nn.Module:
    """A dense float64 layer whose weight is ``module``'s mixed by the data's moments.

    Args:
        module: The layer as it is now (dense or decomposed).
        shape: Its geometry.
        input_moment: ``E[x x^T]`` over input channels; ``None`` leaves that side alone.
        gradient_moment: Moment of the final output's gradients over output channels.
        name: The layer's name, for messages.
    """
    grouped = shape.grouped_weight(dense_weight(module, name).double().cpu())
    i, o = shape.in_per_group, shape.out_per_group
    blocks = []
    for g in range(shape.groups):
        block = grouped[g]
        if input_moment is not None:
            root = _psd_root(input_moment.cpu()[g * i : (g + 1) * i, g * i : (g + 1) * i])
            block = torch.einsum("oikl,ij->ojkl", block, root)
        if gradient_moment is not None:
            root = _psd_root(gradient_moment.cpu()[g * o : (g + 1) * o, g * o : (g + 1) * o])
            block = torch.einsum("po,oikl->pikl", root, block)
        blocks.append(block)
    layer = shape.build_dense(dtype=torch.float64)
    layer.weight.copy_(shape.module_weight(torch.stack(blocks)))
    return layer


def layers_seen_by_data(
    model: nn.Module,
    modules: Mapping[str, nn.Module],
    batches: Iterable[Any],
    *,
    gradient: bool = False,
    forward: Forward | None = None,
    output: OutputFn | None = None,
) -> dict[str, nn.Module]:
    """``weight_seen_by_data`` for every named layer, from one calibration pass (and, with
    ``gradient``, one backward pass per batch and probe for the gradient moments)."""
    names = list(modules)
    stats = collect_statistics(model, batches, names, forward=forward, progress=False)
    gradients: dict[str, torch.Tensor] = {}
    if gradient:
        gradients = collect_gradient_moments(
            model, batches, names, forward=forward, output=output, progress=False
        )
    return {
        name: weight_seen_by_data(
            module,
            LayerShape.from_module(module, name),
            stats[name].input_moment,
            gradients.get(name),
            name,
        )
        for name, module in modules.items()
    }


def error_curve(
    module: nn.Module,
    shape: LayerShape,
    method: str,
    ranks: Sequence[tuple[int, ...]],
    options: DecomposeOptions,
    *,
    relative: bool = True,
    name: str | None = None,
) -> list[float]:
    """The squared truncation error of ``method`` at each of ``ranks`` (see the module doc).

    Args:
        module: The layer as it is now, or ``weight_seen_by_data``'s layer.
        shape: Its geometry.
        method: The decomposition method.
        ranks: The ranks to price, one tuple per choice.
        options: Decomposition options (TT modes).
        relative: Divide by the weight's energy (``False``: absolute, for ``"gradient"``).
        name: The layer's name, for messages.
    """
    matrices = get_method(method).spectral_matrices(module, shape, options, name)
    spectra = [[squared_spectrum(m) for m in group] for group in matrices]
    totals = [sum(float(s.sum()) for s in group) for group in spectra]
    tails = [[torch.cat([s.flip(0).cumsum(0).flip(0), s.new_zeros(1)]) for s in g] for g in spectra]
    # Absolute errors are relative ones times the weight's energy: a handler may list
    # one matrix twice over (CP reads both channel unfoldings for its one rank).
    scale = 1.0 if relative else float(dense_weight(module, name).double().square().sum())
    curve = []
    for choice in ranks:
        error = 0.0
        for k, rank in enumerate(choice):
            if totals[k] > 0:
                error += sum(float(t[min(rank, t.numel() - 1)]) for t in tails[k]) / totals[k]
        curve.append(min(error, 1.0) * scale)  # no truncation loses more than everything
    return curve


__all__ = ["error_curve", "layers_seen_by_data", "squared_spectrum", "weight_seen_by_data"]
