"""CP3 Conv2d: 1x1 ``in -> R``, depthwise ``kh x kw`` on R channels, 1x1 ``R -> out``.

The CP decomposition of each group's kernel seen as a 3-way tensor
``(out, in, kh * kw)`` (Lebedev et al. 2015 with the spatial modes kept together):
every rank-one term is an input mix, one spatial filter and an output mix.
"""

from __future__ import annotations

from torch import nn

from stagecomp.layer_shape import LayerShape
from stagecomp.layers.cp_base import CPLayer
from stagecomp.layers.factory import Factory


class CP3Conv2d(CPLayer):
    """A Conv2d factorised by a rank-R CP of each group's ``(out, in, kh*kw)`` kernel."""

    method = "cp3"

    def _build(self, new: Factory) -> None:
        shape, (rank,) = self.shape, self.ranks
        width = shape.groups * rank
        self.first = new.conv(shape.in_channels, width, 1, shape.groups)
        self.spatial = new.conv(width, width, shape.kernel_size, width, **shape.conv_kwargs())
        self.last = new.conv(width, shape.out_channels, 1, shape.groups, bias=shape.bias)
        self._init_from_scratch()

    @classmethod
    def tensor_shape(cls, shape: LayerShape) -> tuple[int, ...]:
        return (shape.out_per_group, shape.in_per_group, shape.kernel_numel)

    def _chain(self) -> list[nn.Conv2d]:
        return [self.first, self.spatial, self.last]
