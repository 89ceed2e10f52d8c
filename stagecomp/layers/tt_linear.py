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
from stagecomp.layers.factory import Factory
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
    default_modes = 3
    min_cores = 2

    def _build(self, new: Factory) -> None:
        shape = self.shape
        self._set_modes()
        bonds = (1, *self.ranks, 1)
        self.cores = nn.ParameterList(
            new.parameter(bonds[k], o, i, bonds[k + 1])
            for k, (o, i) in enumerate(zip(self.out_modes, self.in_modes, strict=True))
        )
        self.bias = new.bias(shape)
        init_tt_cores_(list(self.cores), shape.in_channels, self.ranks)
        init_bias_(self.bias, shape.in_channels)

    def _decompose(self, weight: torch.Tensor) -> list[torch.Tensor]:
        return tt_matrix(
            weight.reshape(self.shape.out_channels, self.shape.in_channels),
            self.out_modes,
            self.in_modes,
            self.ranks,
            solver=self.options.svd_solver,
            seed=self.options.seed,
        )

    def _refactored(self, ranks: tuple[int, ...], options: DecomposeOptions) -> TTLinear:
        """TT-rounding of the cores; the dense weight is never formed.

        The result equals TT-SVD of the dense weight at the new ranks (up to
        float error), at a cost polynomial in the old ranks only.
        """
        dtype = self._math_dtype()
        cores = [c.to(dtype) for c in self.cores]
        rounded = tt_round(cores, ranks)
        return self._with_factors(
            self.shape, ranks, options, rounded, self.dense_bias(), like=cores[0]
        )

    def _assign(self, factors: Sequence[torch.Tensor], bias: torch.Tensor | None) -> None:
        """Copy TT cores (padded with zeros where a bond came out smaller) and the bias."""
        for param, core in zip(
            self.cores, balance_tt_cores(pad_tt_ranks(factors, self.ranks)), strict=True
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
