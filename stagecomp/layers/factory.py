"""Making a layer's parts on the device and dtype it is built for.

Every decomposed layer builds its submodules from ``(shape, ranks, options)``
and the ``device`` / ``dtype`` pair that PyTorch modules take (PyTorch's own
``factory_kwargs``). A ``Factory`` carries that pair, so building a part is one
short call and no part can be left on the default device or dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from stagecomp.layer_shape import LayerShape


@dataclass(frozen=True)
class Factory:
    """Makes parameters, Linear and Conv2d modules on one device and dtype."""

    device: torch.device | str | None = None
    dtype: torch.dtype | None = None

    @property
    def kwargs(self) -> dict[str, Any]:
        """``device`` and ``dtype`` as PyTorch's constructors take them (its ``factory_kwargs``)."""
        return {"device": self.device, "dtype": self.dtype}

    def parameter(self, *size: int) -> nn.Parameter:
        """An uninitialised parameter; the layer's initialisation fills it."""
        return nn.Parameter(torch.empty(*size, **self.kwargs))

    def bias(self, shape: LayerShape) -> nn.Parameter | None:
        """A parameter for the replaced layer's bias, or None where it had none."""
        return self.parameter(shape.out_channels) if shape.bias else None

    def linear(self, in_features: int, out_features: int, bias: bool = False) -> nn.Linear:
        """A Linear layer, bias-free unless asked: factors are linear maps."""
        return nn.Linear(in_features, out_features, bias=bias, **self.kwargs)

    def conv(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        groups: int,
        *,
        bias: bool = False,
        **geometry: Any,
    ) -> nn.Conv2d:
        """A Conv2d, bias-free unless asked: only the last conv of a chain adds the bias.

        ``geometry`` is ``stride``, ``padding``, ``dilation`` and ``padding_mode`` as
        nn.Conv2d takes them; ``shape.conv_kwargs()`` gives a layer's own.
        """
        return nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            groups=groups,
            bias=bias,
            **geometry,
            **self.kwargs,
        )
