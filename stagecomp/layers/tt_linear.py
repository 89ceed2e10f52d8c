"""TT Linear: the weight as a TT-matrix (Novikov et al. 2015, "Tensorizing Neural Networks").

``in`` and ``out`` are split into ``d`` modes each, ``W[(o_1..o_d), (i_1..i_d)] =
G_1[o_1, i_1] G_2[o_2, i_2] ... G_d[o_d, i_d]`` with cores ``G_k`` of shape
``(r_{k-1}, o_k, i_k, r_k)``, ``r_0 = r_d = 1``. The ranks are the ``d - 1`` bond
ranks. Only very small ranks save compute: a bond of rank ``r`` costs about
``r^2 * o_k * i_k`` multiply-adds per remaining mode, so the forward pass is
cheaper than the dense one only at high compression.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from stagecomp.decompositions.tt import (
    balance_tt_cores,
    pad_tt_ranks,
    tt_full_ranks,
    tt_matrix,
    tt_matrix_apply,
    tt_matrix_modes,
    tt_matrix_to_dense,
    tt_round,
)
from stagecomp.errors import NonFiniteWeightError, UnsupportedLayerError
from stagecomp.layer_shape import LayerShape
from stagecomp.layers.base import DecomposedLayer, Rank, describe, math_dtype
from stagecomp.layers.init import dense_weight_variance, init_bias_, init_factor_chain_
from stagecomp.options import DecomposeOptions

_DEFAULT_CORES = 3


@torch.no_grad()
def init_tt_cores_(cores: Sequence[torch.Tensor], fan_in: int, ranks: Sequence[int]) -> None:
    """``init_factor_chain_``, then each core rescaled to exactly its target mean square.

    TT cores can be tiny (a ``(1, 1, 1, 1)`` core for a mode of size 1): a random
    draw would then scale the whole weight by chance. With every core at its
    exact scale the dense weight's variance is the dense init's, up to the
    cross terms of the rank sums.
    """
    init_factor_chain_(cores, fan_in, ranks)
    per_core = (dense_weight_variance(fan_in) / math.prod(ranks)) ** (1.0 / len(cores))
    for core in cores:
        core.mul_(math.sqrt(per_core) / core.pow(2).mean().sqrt().clamp_min(1e-30))


class TTLinear(DecomposedLayer):
    """A Linear layer whose weight is a TT-matrix with ``d`` cores.

    The modes come from ``options.tt_in_modes`` / ``tt_out_modes`` when given,
    else from a balanced factorisation of the sizes into ``options.tt_cores``
    (default 3) factors; ``structure()`` records them so an empty layer can be
    rebuilt with the same cores.
    """

    method = "tt"
    kinds = ("linear",)

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

    # ------------------------------------------------------------------ structure
    @classmethod
    def modes(
        cls, shape: LayerShape, options: DecomposeOptions
    ) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """``(out_modes, in_modes)`` of the TT-matrix, or ``UnsupportedLayerError``."""
        cores = _DEFAULT_CORES if options.tt_cores is None else options.tt_cores
        try:
            out_modes, in_modes = tt_matrix_modes(
                shape.out_channels,
                shape.in_channels,
                cores,
                options.tt_out_modes,
                options.tt_in_modes,
            )
        except ValueError as error:
            raise UnsupportedLayerError(f"{describe(shape, None)}: {error}") from None
        if len(in_modes) < 2:
            raise UnsupportedLayerError(
                f"{describe(shape, None)}: a TT Linear needs at least 2 cores, got "
                f"{len(in_modes)} (tt_cores={options.tt_cores}, tt_in_modes="
                f"{options.tt_in_modes}, tt_out_modes={options.tt_out_modes})"
            )
        return out_modes, in_modes

    @classmethod
    def bond_mode_sizes(cls, shape: LayerShape, options: DecomposeOptions) -> tuple[int, ...]:
        """Sizes ``o_k * i_k`` of the TT modes; bond ``k`` splits the first ``k`` from the rest."""
        out_modes, in_modes = cls.modes(shape, options)
        return tuple(o * i for o, i in zip(out_modes, in_modes, strict=True))

    @classmethod
    def tt_ordered_weight(
        cls, weight: torch.Tensor, shape: LayerShape, options: DecomposeOptions
    ) -> torch.Tensor:
        """The weight (``(out, in)``, or ``(out, in, 1, 1)``) as the tensor TT-SVD factorises.

        Its modes are ``bond_mode_sizes``; unfolding it after ``k`` modes gives the
        matrix whose rank is the exact TT rank of bond ``k``.
        """
        out_modes, in_modes = cls.modes(shape, options)
        d = len(in_modes)
        tensor = weight.reshape(*out_modes, *in_modes)
        tensor = tensor.permute(*(j for k in range(d) for j in (k, d + k)))
        return tensor.reshape(cls.bond_mode_sizes(shape, options))

    def structure(self) -> dict[str, Any]:
        return {"tt_in_modes": self.in_modes, "tt_out_modes": self.out_modes}

    # ------------------------------------------------------------------ contract
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
        cores = sum(
            bonds[k] * size * bonds[k + 1]
            for k, size in enumerate(cls.bond_mode_sizes(shape, options))
        )
        return cores + (shape.out_channels if shape.bias else 0)

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
