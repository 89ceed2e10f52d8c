"""What CP3Conv2d and CP4Conv2d share: a CP of each group's kernel as a chain of convs.

Both layers take the CP of each group's kernel seen as a tensor with modes
``(out, in, spatial...)`` and run it as a chain: a 1x1 conv ``in -> R`` per
group (the input factors), depthwise convolutions on the ``R`` channels (one per
spatial mode) and a 1x1 conv ``R -> out`` per group (the output factors). Only
the spatial modes differ, so the CP itself, the full rank, the parameter count
and the dense weight live here once.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import nn

from stagecomp.decompositions.cp import cp_als, cp_full_rank
from stagecomp.layer_shape import LayerShape
from stagecomp.layers.base import DecomposedLayer
from stagecomp.layers.init import init_bias_, init_factor_chain_
from stagecomp.options import DecomposeOptions

logger = logging.getLogger(__name__)


class CPLayer(DecomposedLayer):
    """Base of the CP layers; subclasses say what the spatial modes are and build the chain.

    The CP weights are spread evenly over the factors (each column of each factor
    gets ``weight ** (1 / modes)``), so no factor is orders of magnitude larger
    than another and fine-tuning stays well conditioned.
    """

    kinds = ("conv2d",)

    @classmethod
    def tensor_shape(cls, shape: LayerShape) -> tuple[int, ...]:
        """Each group's kernel as the CP sees it: ``(out/g, in/g, spatial modes...)``."""
        raise NotImplementedError

    def _chain(self) -> list[nn.Conv2d]:
        """The convolutions in the order they run: input mix, spatial ones, output mix."""
        raise NotImplementedError

    @classmethod
    def full_rank(cls, shape: LayerShape, options: DecomposeOptions) -> tuple[int, ...]:
        return (cp_full_rank(cls.tensor_shape(shape)),)

    @classmethod
    def param_count(cls, shape: LayerShape, ranks: Sequence[int], options: DecomposeOptions) -> int:
        (rank,) = ranks
        per_group = rank * sum(cls.tensor_shape(shape))
        return shape.groups * per_group + (shape.out_channels if shape.bias else 0)

    def _decompose(self, weight: torch.Tensor) -> list[list[torch.Tensor]]:
        shape, (rank,) = self.shape, self.ranks
        options = self.options
        tensors = shape.grouped_weight(weight).reshape(shape.groups, *self.tensor_shape(shape))
        factors = []
        for g, tensor in enumerate(tensors):
            result = cp_als(
                tensor, rank, max_iter=options.cp_max_iter, tol=options.cp_tol, seed=options.seed
            )
            logger.debug(
                "%s group %d: rank %d, relative error %.4g after %d sweeps",
                self.method,
                g,
                rank,
                result.rel_error,
                result.iterations,
            )
            share = result.weights.pow(1.0 / len(result.factors))
            factors.append([f * share for f in result.factors])
        return factors

    def _init_from_scratch(self) -> None:
        """The dense layer's initial scale for the chain's product, and its bias init."""
        chain = self._chain()
        fan_in = self.shape.in_per_group * self.shape.kernel_numel
        init_factor_chain_([conv.weight for conv in chain], fan_in, self.ranks)
        init_bias_(chain[-1].bias, fan_in)

    def _assign(self, factors: Sequence[Sequence[torch.Tensor]], bias: torch.Tensor | None) -> None:
        """Copy each group's CP factors (modes ``out, in, spatial...``, each ``(n, R)``)."""
        *inputs, last = self._chain()
        for mode, conv in enumerate([last, *inputs]):
            # The output factor is (out/g, R) as a 1x1 conv weight; the others are (R, n).
            columns = [group[mode] if mode == 0 else group[mode].T for group in factors]
            conv.weight.copy_(torch.cat(columns).reshape(conv.weight.shape))
        if bias is not None and last.bias is not None:
            last.bias.copy_(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv in self._chain():
            x = conv(x)
        return x

    def dense_weight(self) -> torch.Tensor:
        shape, (rank,) = self.shape, self.ranks
        groups = shape.groups
        first, *spatial, last = self._chain()
        # (g, R, in * k): every rank-one term's input mix times its spatial filters,
        # mode after mode, which is the module's (in/g, kh, kw) order.
        terms = first.weight.reshape(groups, rank, -1)
        for conv in spatial:
            factor = conv.weight.reshape(groups, rank, 1, -1)
            terms = (terms[:, :, :, None] * factor).reshape(groups, rank, -1)
        out_factor = last.weight.reshape(groups, shape.out_per_group, rank)
        return shape.module_weight(torch.bmm(out_factor, terms))

    def dense_bias(self) -> torch.Tensor | None:
        return self._chain()[-1].bias
