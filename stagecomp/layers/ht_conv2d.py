"""HT Conv2d: an HT tensor over the paired channel modes and the kernel as one more leaf.

Per group, the kernel ``W[(o_1..o_d), (i_1..i_d), (kh, kw)]`` is the HT tensor of the
leaves ``(o_1 i_1, ..., o_d i_d, kh kw)`` over a balanced dimension tree
(``stagecomp.decompositions.ht``), so HT-SVD gives it: exact at full ranks and
recovering any kernel that has the given HT ranks. The ranks are the ``2 (d + 1) - 3``
edge ranks (default ``d = 3``, ``options.ht_cores``): for 3 channel modes the tree is
``((1, 2), (3, k))`` and the ranks ``(r_{12|3k}, r_1, r_2, r_3, r_k)``.

The forward pass runs the kernel leaf first, as a depthwise convolution with ``r_k``
outputs per input channel, then sweeps the channel leaves and transfer tensors
through the tree (one batched matmul each); or, when that costs less for the input
size (``contraction="auto"``), rebuilds the dense kernel and runs one convolution.
"""

from __future__ import annotations

import torch

from stagecomp.decompositions.ht import ht_matrix_apply
from stagecomp.layers.conv_geometry import convolve, explicit_padding, output_pixels
from stagecomp.layers.factory import Factory
from stagecomp.layers.ht_base import HTLayer


class HTConv2d(HTLayer):
    """A Conv2d whose per-group kernel is an HT tensor of channel leaves and a kernel leaf.

    Every padding, padding mode, stride, dilation and groups value of nn.Conv2d is
    kept; groups are decomposed one by one and swept together.
    """

    kinds = ("conv2d",)
    default_modes = 3

    def _build(self, new: Factory) -> None:
        super()._build(new)
        self._pads = explicit_padding(self.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3:  # unbatched (C, H, W), as nn.Conv2d accepts
            return self.forward(x.unsqueeze(0)).squeeze(0)
        shape = self.shape
        if self._dense_is_cheaper(x.shape[0] * output_pixels(shape, self._pads, x)):
            return convolve(shape, self._pads, x, self.dense_weight(), self.bias, shape.groups)
        groups, in_per_group, rank = shape.groups, shape.in_per_group, self.kernel_rank
        # The kernel leaf (g, kh kw, r_k) as r_k filters per input channel: U[b, c, r_k, p].
        leaf = self.factors[self.tree.leaf(self.tree.leaves - 1)]
        spatial = leaf.transpose(1, 2).reshape(groups, 1, rank, *shape.kernel_size)
        spatial = spatial.expand(groups, in_per_group, rank, *shape.kernel_size)
        u = convolve(
            shape,
            self._pads,
            x,
            spatial.reshape(-1, 1, *shape.kernel_size),
            None,
            shape.in_channels,
        )
        batch, _, height, width = u.shape
        y = ht_matrix_apply(
            list(self.factors),
            self._sweep,
            u.reshape(batch, groups, in_per_group * rank, height * width),
        )
        y = y.reshape(batch, shape.out_channels, height, width)
        return y if self.bias is None else y + self.bias.view(1, -1, 1, 1)
