"""CP4 Conv2d: 1x1 ``in -> R``, depthwise ``kh x 1``, depthwise ``1 x kw``, 1x1 ``R -> out``.

The CP decomposition of each group's kernel as a 4-way tensor ``(out, in, kh, kw)``
(Lebedev et al. 2015): every rank-one term's spatial filter is separable, a vertical
then a horizontal 1-D filter.

Splitting the spatial conv in two is exact for every padding: stride, padding and
dilation act on each axis separately, and padding one axis (zeros, reflect, replicate
or circular) commutes with a filter that only runs along the other axis. ``"same"``
and ``"valid"`` are passed to both 1-D convs; each one then pads only its own axis,
asymmetrically for even kernels exactly as the dense conv does.
"""

from __future__ import annotations

from torch import nn

from stagecomp.layer_shape import LayerShape
from stagecomp.layers.cp_base import CPLayer
from stagecomp.layers.factory import Factory


class CP4Conv2d(CPLayer):
    """A Conv2d factorised by a rank-R CP of each group's ``(out, in, kh, kw)`` kernel."""

    method = "cp4"

    def _build(self, new: Factory) -> None:
        shape, (rank,) = self.shape, self.ranks
        width = shape.groups * rank
        (kh, kw), (sh, sw), (dh, dw) = shape.kernel_size, shape.stride, shape.dilation
        if isinstance(shape.padding, str):
            pad_v: tuple[int, int] | str = shape.padding
            pad_h: tuple[int, int] | str = shape.padding
        else:
            pad_v, pad_h = (shape.padding[0], 0), (0, shape.padding[1])

        def depthwise(
            kernel: tuple[int, int],
            stride: tuple[int, int],
            padding: tuple[int, int] | str,
            dilation: tuple[int, int],
        ) -> nn.Conv2d:
            """A depthwise conv on the R channels running along one axis only."""
            return new.conv(
                width,
                width,
                kernel,
                width,
                stride=stride,
                padding=padding,
                dilation=dilation,
                padding_mode=shape.padding_mode,
            )

        self.first = new.conv(shape.in_channels, width, 1, shape.groups)
        self.vertical = depthwise((kh, 1), (sh, 1), pad_v, (dh, 1))
        self.horizontal = depthwise((1, kw), (1, sw), pad_h, (1, dw))
        self.last = new.conv(width, shape.out_channels, 1, shape.groups, bias=shape.bias)
        self._init_from_scratch()

    @classmethod
    def tensor_shape(cls, shape: LayerShape) -> tuple[int, ...]:
        return (shape.out_per_group, shape.in_per_group, *shape.kernel_size)

    def _chain(self) -> list[nn.Conv2d]:
        return [self.first, self.vertical, self.horizontal, self.last]
