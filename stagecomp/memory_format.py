"""Channels-last weights for every layer that can take them, TT layers included.

On CPU (oneDNN) and on tensor-core GPUs, convolutions run faster in NHWC
(``torch.channels_last``): a decomposed convolution is a chain of thin 1x1 and
depthwise convolutions, and NHWC spares the layout conversion around each one.
``model.to(memory_format=torch.channels_last)`` refuses a model with a TT
convolution, whose 5-D cores have no channels-last layout; this converts the
4-D weights and leaves every other tensor as it is.
"""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def to_channels_last(model: nn.Module) -> nn.Module:
    """Store every 4-D parameter and buffer of ``model`` channels-last, in place.

    Feed the model channels-last input too (``x.to(memory_format=torch.channels_last)``);
    the outputs are the same, only the memory layout and the speed change.

    Returns:
        ``model``, for chaining.
    """
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if param.dim() == 4:
                param.data = param.data.contiguous(memory_format=torch.channels_last)
        for name, buffer in module.named_buffers(recurse=False):
            if buffer is not None and buffer.dim() == 4:
                setattr(module, name, buffer.contiguous(memory_format=torch.channels_last))
    return model


__all__ = ["to_channels_last"]
