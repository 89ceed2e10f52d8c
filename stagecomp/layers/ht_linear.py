"""HT Linear: the weight as a Hierarchical Tucker matrix over paired channel modes.

``in`` and ``out`` are split into ``d`` modes each (default 4, ``options.ht_cores``);
leaf ``t`` of a balanced dimension tree holds the ``(o_t x i_t)`` block, so
``W[(o_1..o_d), (i_1..i_d)]`` is the HT tensor of leaves ``(o_1 i_1, ..., o_d i_d)``
(the HT-matrix format of Yin et al. 2020, "Towards compact RNNs with Hierarchical
Tucker"). The ranks are the ``2 d - 3`` edge ranks of the tree
(``stagecomp.decompositions.ht``): for 4 modes ``(r_{12|34}, r_1, r_2, r_3, r_4)``.

The forward pass sweeps the input through the tree, leaf frames first and transfer
tensors as their two subtrees finish, when that is cheaper than rebuilding the
weight and doing one matmul (``contraction="auto"``); a sweep costs about
``o_t r_t`` multiply-adds per input entry and leaf, so it only wins at high
compression.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from stagecomp.decompositions.ht import ht_matrix_apply
from stagecomp.layers.ht_base import HTLayer


class HTLinear(HTLayer):
    """A Linear layer whose weight is an HT-matrix over ``d`` paired channel modes.

    The modes come from ``options.ht_in_modes`` / ``ht_out_modes`` when given, else
    from a balanced factorisation of the sizes into ``options.ht_cores`` (default 4)
    factors; ``structure()`` records them so an empty layer can be rebuilt with the
    same tree.
    """

    kinds = ("linear",)
    default_modes = 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, 1, self.shape.in_channels, 1)
        if self._dense_is_cheaper(flat.shape[0]):
            return F.linear(x, self.dense_weight(), self.bias)
        y = ht_matrix_apply(list(self.factors), self._sweep, flat)
        y = y.reshape(*x.shape[:-1], self.shape.out_channels)
        return y if self.bias is None else y + self.bias
