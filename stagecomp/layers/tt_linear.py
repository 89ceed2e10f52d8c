"""TT Linear: the weight as a TT-matrix (Novikov et al. 2015, "Tensorizing Neural Networks").

``in`` and ``out`` are split into ``d`` modes each, ``W[(o_1..o_d), (i_1..i_d)] =
G_1[o_1, i_1] G_2[o_2, i_2] ... G_d[o_d, i_d]`` with cores ``G_k`` of shape
``(r_{k-1}, o_k, i_k, r_k)``, ``r_0 = r_d = 1``. The ranks are the ``d - 1`` bond
ranks. Only very small ranks save compute: a bond of rank ``r`` costs about
``r^2 * o_k * i_k`` multiply-adds per remaining mode, so the forward pass is
cheaper than the dense one only at high compression.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from stagecomp.decompositions.tt import (
    balance_tt_cores,
    pad_tt_ranks,
    tt_matrix,
    tt_matrix_apply,
    tt_matrix_to_dense,
    tt_round,
)
from stagecomp.errors import NonFiniteWeightError
from stagecomp.layer_shape import LayerShape
from stagecomp.layers.base import Rank, describe, math_dtype
from stagecomp.layers.init import init_bias_, init_tt_cores_
from stagecomp.layers.tt_base import TTLayer
from stagecomp.options import DecomposeOptions


class TTLinear(TTLayer):
    """A Linear layer whose weight is a TT-matrix with ``d`` cores.

    The modes come from ``options.tt_in_modes`` / ``tt_out_modes`` when given,
    else from a balanced factorisation of the sizes into ``options.tt_cores``
    (default 3) factors; ``structure()`` records them so an empty layer can be
    rebuilt with the same cores.
    """

    kinds = ("linear",)
    default_cores = 3
    min_cores = 2

    def __init__(
        self,
        shape: LayerShape,
        ranks: Sequence[int],
        options: DecomposeOptions | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(shape, ranks, options)
        self.out_modes, self.in_modes = self.modes(shape, self.options)
        if len(self.ranks) != len(self.in_modes) - 1:
            raise ValueError(
                f"{describe(shape, None)}: {len(self.in_modes)} TT cores need "
                f"{len(self.in_modes) - 1} ranks, got {self.ranks}"
            )
        bonds = (1, *self.ranks, 1)
        self.cores = nn.ParameterList(
            nn.Parameter(torch.empty(bonds[k], o, i, bonds[k + 1], device=device, dtype=dtype))
            for k, (o, i) in enumerate(zip(self.out_modes, self.in_modes, strict=True))
        )
        self.bias = (
            nn.Parameter(torch.empty(shape.out_channels, device=device, dtype=dtype))
            if shape.bias
            else None
        )
        init_tt_cores_(list(self.cores), shape.in_channels, self.ranks)
        init_bias_(self.bias, shape.in_channels)

    @classmethod
    def from_weights(
        cls,
        shape: LayerShape,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        ranks: tuple[int, ...],
        options: DecomposeOptions,
    ) -> TTLinear:
        layer = cls(shape, ranks, options, device=weight.device, dtype=weight.dtype)
        cores = tt_matrix(
            weight.reshape(shape.out_channels, shape.in_channels),
            layer.out_modes,
            layer.in_modes,
            ranks,
            solver=options.svd_solver,
            seed=options.seed,
        )
        layer._assign(cores, bias)
        return layer

    def recompressed(
        self, rank: Rank, options: DecomposeOptions | None = None, name: str | None = None
    ) -> TTLinear:
        """Smaller ranks by TT-rounding the cores; the dense weight is never formed.

        The result equals TT-SVD of the dense weight at the new ranks (up to
        float error), at a cost polynomial in the old ranks only.
        """
        options = (options or self.options).updated(self.structure())
        ranks = self.normalize_rank(self.shape, rank, options, name)
        reference = self.cores[0]
        dtype = math_dtype(
            torch.empty(self.shape.weight_shape, dtype=reference.dtype, device="meta")
        )
        with torch.no_grad():
            cores = [c.detach().to(dtype) for c in self.cores]
            if not all(torch.isfinite(c).all() for c in cores):
                raise NonFiniteWeightError(
                    f"{describe(self.shape, name)} has NaN or infinite weights; "
                    "only finite weights can be decomposed"
                )
            layer = type(self)(self.shape, ranks, options, device=reference.device, dtype=dtype)
            bias = None if self.bias is None else self.bias.detach().to(dtype)
            layer._assign(tt_round(cores, ranks), bias)
        return layer.matched_to(reference, self.training)

    @torch.no_grad()
    def _assign(self, cores: Sequence[torch.Tensor], bias: torch.Tensor | None) -> None:
        """Copy TT cores (padded with zeros where a bond came out smaller) and the bias."""
        for param, core in zip(
            self.cores, balance_tt_cores(pad_tt_ranks(cores, self.ranks)), strict=True
        ):
            param.copy_(core)
        if bias is not None and self.bias is not None:
            self.bias.copy_(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        flat = x.reshape(-1, 1, self.shape.in_channels, 1, 1)
        y = tt_matrix_apply([c.unsqueeze(0) for c in self.cores], flat)
        y = y.reshape(*lead, self.shape.out_channels)
        return y if self.bias is None else y + self.bias

    def dense_weight(self) -> torch.Tensor:
        return tt_matrix_to_dense(list(self.cores))

    def dense_bias(self) -> torch.Tensor | None:
        return self.bias

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, out_modes={self.out_modes}, in_modes={self.in_modes}"
