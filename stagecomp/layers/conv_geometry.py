"""Running a convolution with a layer's own geometry, and counting its output positions.

Layers whose forward pass calls ``F.conv2d`` themselves (TT, HT: a depthwise kernel
step, or the rebuilt dense kernel) must pad, stride and dilate exactly as the
nn.Conv2d they replace, every padding mode included, and must know how many output
pixels an input gives to choose the cheaper contraction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from stagecomp.errors import UnsupportedLayerError
from stagecomp.layer_shape import LayerShape


def explicit_padding(shape: LayerShape) -> tuple[int, int, int, int]:
    """``(left, right, top, bottom)`` padding as F.pad takes it, the way nn.Conv2d pads."""
    if shape.padding == "valid":
        return (0, 0, 0, 0)
    if shape.padding == "same":
        pads: list[int] = []
        for k, dil in zip(reversed(shape.kernel_size), reversed(shape.dilation), strict=True):
            total = dil * (k - 1)
            pads += [total // 2, total - total // 2]
        left, right, top, bottom = pads
        return (left, right, top, bottom)
    if isinstance(shape.padding, str):
        raise UnsupportedLayerError(f"padding {shape.padding!r}: allowed 'same', 'valid' or ints")
    ph, pw = shape.padding
    return (pw, pw, ph, ph)


def convolve(
    shape: LayerShape,
    pads: tuple[int, int, int, int],
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    groups: int,
) -> torch.Tensor:
    """A convolution with ``shape``'s stride, padding, dilation and padding mode."""
    if shape.padding_mode == "zeros":
        return F.conv2d(x, weight, bias, shape.stride, shape.padding, shape.dilation, groups)
    x = F.pad(x, pads, mode=shape.padding_mode)
    return F.conv2d(x, weight, bias, shape.stride, 0, shape.dilation, groups)


def output_pixels(shape: LayerShape, pads: tuple[int, int, int, int], x: torch.Tensor) -> int:
    """Output pixels per image of a convolution with ``shape``'s geometry on input ``x``."""
    left, right, top, bottom = pads
    pixels = 1
    for size, pad, k, dil, stride in zip(
        x.shape[-2:],
        (top + bottom, left + right),
        shape.kernel_size,
        shape.dilation,
        shape.stride,
        strict=True,
    ):
        pixels = pixels * max((size + pad - dil * (k - 1) - 1) // stride + 1, 0)
    return pixels
