"""TT Conv2d: a TT-matrix over the channel modes with a spatial core at the end of the chain.

After Garipov et al. 2016 ("Ultimate tensorization"): per group,
``W[(o_1..o_d), (i_1..i_d), (kh, kw)] = G_1[o_1, i_1] ... G_d[o_d, i_d] K[kh kw]``
with channel cores ``G_k`` of shape ``(r_{k-1}, o_k, i_k, r_k)`` (``r_0 = 1``) and
a spatial core ``K`` of shape ``(r_d, kh, kw)``. This is exactly a TT of the
weight reshaped to modes ``(o_1 i_1, ..., o_d i_d, kh kw)``, so TT-SVD gives it:
exact at full ranks and recovering any kernel that has the given TT ranks.
The ranks are the ``d`` bond ranks, the last one between ``G_d`` and ``K``.

Garipov puts ``K`` first; it sits last here so that the forward pass needs no
permutation at all. The spatial core runs first, as a depthwise convolution
with ``r_d`` outputs per input channel, giving ``U[b, i, r_d, p]``; the channel
cores then contract ``(i_d, r_d)``, ``(i_{d-1}, r_{d-1})``, ... one matmul each on
contiguous memory.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from stagecomp.decompositions.tt import (
    balance_tt_cores,
    pad_tt_ranks,
    tt_matrix_apply,
    tt_matrix_to_dense,
    tt_round,
    tt_svd,
)
from stagecomp.layers.conv_geometry import convolve, explicit_padding, output_pixels
from stagecomp.layers.factory import Factory
from stagecomp.layers.init import init_bias_, init_tt_cores_
from stagecomp.layers.tt_base import TTLayer
from stagecomp.options import DecomposeOptions

_CONTRACTIONS = ("auto", "tt", "dense")


class TTConv2d(TTLayer):
    """A Conv2d whose per-group kernel is a TT of channel cores and a spatial core.

    The forward pass picks the cheaper of two exact contraction orders for each
    input size (``contraction="auto"``): the TT sweep above, or contracting the
    cores into the dense kernel first (a cost independent of the batch) and then
    running one dense convolution. The sweep costs about ``o_k i_k`` times the
    parameter count per output pixel, so it only wins at high compression;
    ``contraction`` can be set to ``"tt"`` or ``"dense"`` to force one.
    """

    kinds = ("conv2d",)
    default_modes = 2

    def _build(self, new: Factory) -> None:
        shape, groups = self.shape, self.shape.groups
        self._set_modes()
        self.contraction = "auto"
        bonds = (1, *self.ranks)
        self.cores = nn.ParameterList(
            new.parameter(groups, bonds[k], o, i, bonds[k + 1])
            for k, (o, i) in enumerate(zip(self.out_modes, self.in_modes, strict=True))
        )
        self.kernel = new.parameter(groups, self.ranks[-1], *shape.kernel_size)
        self.bias = new.bias(shape)
        fan_in = shape.in_per_group * shape.kernel_numel
        init_tt_cores_([*self.cores, self.kernel], fan_in, self.ranks)
        init_bias_(self.bias, fan_in)
        self._pads = explicit_padding(shape)
        self._costs = self._contraction_costs()

    def _decompose(self, weight: torch.Tensor) -> list[list[torch.Tensor]]:
        shape, options = self.shape, self.options
        return [
            tt_svd(
                self.mode_ordered_weight(group, shape, options),
                self.ranks,
                solver=options.svd_solver,
                seed=options.seed,
            )
            for group in shape.grouped_weight(weight)
        ]

    def _refactored(self, ranks: tuple[int, ...], options: DecomposeOptions) -> TTConv2d:
        """TT-rounding of each group's cores; the kernel is never formed.

        The result equals TT-SVD of the dense kernel at the new ranks (up to
        float error), at a cost polynomial in the old ranks only.
        """
        dtype = self._math_dtype()
        cores = [c.to(dtype) for c in self.chain()]
        per_group = [tt_round([c[g] for c in cores], ranks) for g in range(self.shape.groups)]
        return self._with_factors(
            self.shape, ranks, options, per_group, self.dense_bias(), like=cores[0]
        )

    def chain(self) -> list[torch.Tensor]:
        """All ``d + 1`` cores as one TT per group.

        Channel cores ``(g, r_{k-1}, o_k i_k, r_k)``, then the spatial core ``(g, r_d, kh kw, 1)``.
        """
        groups = self.shape.groups
        cores = [c.reshape(groups, c.shape[1], -1, c.shape[-1]) for c in self.cores]
        return [*cores, self.kernel.reshape(groups, self.ranks[-1], -1, 1)]

    def _assign(self, factors: Sequence[Sequence[torch.Tensor]], bias: torch.Tensor | None) -> None:
        """Copy each group's TT (``d + 1`` cores ``(r, n, r')``), padded to the layer's ranks."""
        cores = [balance_tt_cores(pad_tt_ranks(group, self.ranks)) for group in factors]
        for k, param in enumerate(self.cores):
            param.copy_(torch.stack([group[k] for group in cores]).reshape(param.shape))
        self.kernel.copy_(torch.stack([group[-1] for group in cores]).reshape(self.kernel.shape))
        if bias is not None and self.bias is not None:
            self.bias.copy_(bias)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3:  # unbatched (C, H, W), as nn.Conv2d accepts
            return self.forward(x.unsqueeze(0)).squeeze(0)
        if self._dense_is_cheaper(x):
            return self._conv(x, self.dense_weight(), self.bias, self.shape.groups)
        shape, rank = self.shape, self.ranks[-1]
        batch = x.shape[0]
        # Each input channel convolved with its group's r_d spatial filters: U[b, c, s, p].
        groups, in_per_group = shape.groups, shape.in_per_group
        spatial = self.kernel.unsqueeze(1).expand(groups, in_per_group, rank, *shape.kernel_size)
        u = self._conv(x, spatial.reshape(-1, 1, *shape.kernel_size), None, shape.in_channels)
        height, width = u.shape[-2:]
        y = tt_matrix_apply(
            list(self.cores), u.view(batch, groups, in_per_group, rank, height * width)
        )
        y = y.view(batch, shape.out_channels, height, width)
        return y if self.bias is None else y + self.bias.view(1, -1, 1, 1)

    def _conv(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, groups: int
    ) -> torch.Tensor:
        """A convolution with this layer's stride, padding, dilation and padding mode."""
        return convolve(self.shape, self._pads, x, weight, bias, groups)

    def _contraction_costs(self) -> tuple[int, int, int]:
        """MACs: TT sweep per output pixel, dense conv per output pixel, kernel assembly."""
        shape, groups = self.shape, self.shape.groups
        bonds = (1, *self.ranks)
        sweep = shape.in_channels * self.ranks[-1] * shape.kernel_numel
        for k in range(len(self.in_modes)):
            left = math.prod(self.in_modes[:k])
            right = math.prod(self.out_modes[k + 1 :])
            core = bonds[k] * self.out_modes[k] * self.in_modes[k] * bonds[k + 1]
            sweep += groups * left * core * right
        dense = shape.out_channels * shape.in_per_group * shape.kernel_numel
        # dense_weight folds the spatial core into G_d, then merges left to right.
        sizes = [o * i for o, i in zip(self.out_modes, self.in_modes, strict=True)]
        sizes[-1] *= shape.kernel_numel
        edges = (1, *self.ranks[:-1], 1)
        assembly = groups * bonds[-2] * sizes[-1] * self.ranks[-1]
        assembly += sum(
            groups * math.prod(sizes[:k]) * edges[k] * sizes[k] * edges[k + 1]
            for k in range(1, len(sizes))
        )
        return sweep, dense, assembly

    def _dense_is_cheaper(self, x: torch.Tensor) -> bool:
        if self.contraction not in _CONTRACTIONS:
            raise ValueError(
                f"contraction {self.contraction!r}: allowed {', '.join(_CONTRACTIONS)}"
            )
        if self.contraction != "auto":
            return self.contraction == "dense"
        pixels = output_pixels(self.shape, self._pads, x)
        sweep, dense, assembly = self._costs
        positions = x.shape[0] * pixels
        return assembly + positions * dense < positions * sweep

    def dense_weight(self) -> torch.Tensor:
        # Fold the spatial core into the last channel core first: its column index
        # (i_d, kh kw) is then the trailing part of the module's (in/g, kh, kw) layout.
        shape, groups, cores = self.shape, self.shape.groups, list(self.cores)
        _, r0, o, i, rank = cores[-1].shape
        folded = torch.matmul(
            cores[-1].reshape(groups, r0 * o * i, rank), self.kernel.reshape(groups, rank, -1)
        )
        cores[-1] = folded.reshape(groups, r0, o, i * shape.kernel_numel, 1)
        return shape.module_weight(tt_matrix_to_dense(cores))

    def dense_bias(self) -> torch.Tensor | None:
        return self.bias

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, out_modes={self.out_modes}, in_modes={self.in_modes}"
