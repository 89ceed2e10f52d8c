"""Tucker2 Conv2d: 1x1 conv ``in -> r_in``, kxk conv ``r_in -> r_out``, 1x1 conv ``r_out -> out``.

The channel modes of the kernel are compressed and the spatial ones kept
(Kim et al. 2016; the decomposition MUSCO refines stage after stage). The
padding lives in the middle convolution: the first 1x1 conv has no bias, so it
maps zero padding to zero padding and commutes with reflect, replicate and
circular padding, which copy whole channels.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from stagecomp.decompositions.tucker2 import tucker2, tucker2_recompress
from stagecomp.layer_shape import LayerShape
from stagecomp.layers.base import DecomposedLayer
from stagecomp.layers.factory import Factory
from stagecomp.layers.init import init_bias_, init_factor_chain_
from stagecomp.options import DecomposeOptions

_Factors = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


class Tucker2Conv2d(DecomposedLayer):
    """A Conv2d factorised by Tucker2 of each group's kernel; ranks ``(r_out, r_in)`` per group.

    The factor convolutions start with orthonormal channel bases and all of the
    kernel's energy in the core, as HOSVD/HOOI produce them.
    """

    method = "tucker2"
    kinds = ("conv2d", "conv1d")
    rank_names = ("r_out", "r_in")

    def _build(self, new: Factory) -> None:
        shape, (r_out, r_in) = self.shape, self.ranks
        groups = shape.groups
        self.first = new.conv(shape.in_channels, groups * r_in, 1, groups)
        self.core = new.conv(
            groups * r_in, groups * r_out, shape.kernel_size, groups, **shape.conv_kwargs()
        )
        self.last = new.conv(groups * r_out, shape.out_channels, 1, groups, bias=shape.bias)
        fan_in = shape.in_per_group * shape.kernel_numel
        init_factor_chain_(
            [self.first.weight, self.core.weight, self.last.weight], fan_in, [r_out, r_in]
        )
        init_bias_(self.last.bias, fan_in)

    @classmethod
    def full_rank(cls, shape: LayerShape, options: DecomposeOptions) -> tuple[int, ...]:
        return (shape.out_per_group, shape.in_per_group)

    @classmethod
    def param_count(cls, shape: LayerShape, ranks: Sequence[int], options: DecomposeOptions) -> int:
        r_out, r_in = ranks
        per_group = (
            shape.in_per_group * r_in
            + r_out * r_in * shape.kernel_numel
            + r_out * shape.out_per_group
        )
        return shape.groups * per_group + (shape.out_channels if shape.bias else 0)

    @classmethod
    def from_factors(
        cls,
        shape: LayerShape,
        factors: Sequence[_Factors],
        bias: torch.Tensor | None,
        options: DecomposeOptions | None = None,
    ) -> Tucker2Conv2d:
        """A layer from one ``(core, u_out, u_in)`` per group, computed elsewhere.

        Data-aware factorisations (``stagecomp.data_aware``) use it, so their layers
        are ordinary ``Tucker2Conv2d`` layers that save, load and recompress as usual.
        """
        core = factors[0][0]
        ranks = (core.shape[0], core.shape[1])
        return cls._with_factors(shape, ranks, options, factors, bias, like=core)

    def _refactored(self, ranks: tuple[int, ...], options: DecomposeOptions) -> Tucker2Conv2d:
        """Straight from the factors (no dense kernel formed), in float64: they are small.

        The result equals ``Tucker2Conv2d.from_module(self.to_dense(), rank)`` up to
        float error, at a cost set by the current ranks rather than the layer's size.
        The factors need not be orthonormal any more (e.g. after fine-tuning): they
        are QR-factorised first (see ``tucker2_recompress``).
        """
        shape, (r_out, r_in) = self.shape, self.ranks
        groups = shape.groups
        first = self.first.weight.double().reshape(groups, r_in, -1)
        core = self.core.weight.double().reshape(groups, r_out, r_in, *shape.kernel_size)
        last = self.last.weight.double().reshape(groups, -1, r_out)
        factors = [
            tucker2_recompress(
                core[g],
                last[g],
                first[g].T,
                (ranks[0], ranks[1]),
                hooi_iters=options.hooi_iters,
                hooi_tol=options.hooi_tol,
            )
            for g in range(groups)
        ]
        return self.from_factors(shape, factors, self.dense_bias(), options)

    def _decompose(self, weight: torch.Tensor) -> list[_Factors]:
        return [
            tucker2(
                group,
                (self.ranks[0], self.ranks[1]),
                hooi_iters=self.options.hooi_iters,
                hooi_tol=self.options.hooi_tol,
            )
            for group in self.shape.grouped_weight(weight)
        ]

    def _assign(self, factors: Sequence[_Factors], bias: torch.Tensor | None) -> None:
        """Copy per-group ``(core, u_out, u_in)`` into the three convolutions."""
        shape, (r_out, r_in) = self.shape, self.ranks
        self.first.weight.copy_(
            torch.cat([u_in.T for _, _, u_in in factors]).reshape(
                shape.groups * r_in, shape.in_per_group, 1, 1
            )
        )
        self.core.weight.copy_(
            torch.cat([core for core, _, _ in factors]).reshape(
                shape.groups * r_out, r_in, *shape.kernel_size
            )
        )
        self.last.weight.copy_(
            torch.cat([u_out for _, u_out, _ in factors]).reshape(shape.out_channels, r_out, 1, 1)
        )
        if bias is not None and self.last.bias is not None:
            self.last.bias.copy_(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.from_2d(self.last(self.core(self.first(self.as_2d(x)))))

    def dense_weight(self) -> torch.Tensor:
        shape = self.shape
        r_out, r_in = self.ranks
        groups = shape.groups
        first = self.first.weight.reshape(groups, r_in, shape.in_per_group)
        core = self.core.weight.reshape(groups, r_out, r_in * shape.kernel_numel)
        last = self.last.weight.reshape(groups, shape.out_per_group, r_out)
        outer = torch.bmm(last, core).reshape(groups, shape.out_per_group, r_in, -1)
        dense = torch.einsum("gobk,gbi->goik", outer, first)
        return shape.module_weight(dense)

    def dense_bias(self) -> torch.Tensor | None:
        return self.last.bias
