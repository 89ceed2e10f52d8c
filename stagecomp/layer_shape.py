"""The geometry of a Linear, Conv2d or Conv1d layer, independent of its weights.

A decomposed layer must behave exactly like the layer it replaces, so it keeps
this description and builds every sub-convolution from it. It is a frozen
dataclass that round-trips through JSON, which is how recipes record what a
layer was before it was decomposed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from stagecomp.errors import UnsupportedLayerError
from stagecomp.layer_kinds import is_transposed_linear

_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def _pair(value: Any) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    first, second = value
    return (int(first), int(second))


def _count(value: Any, label: str, least: int) -> int:
    """An integer at least ``least`` read from a recipe; bools and floats are refused."""
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{label} {value!r} is not an integer >= {least}")
    return value


def _checked_pair(value: Any, label: str, least: int) -> tuple[int, int]:
    if isinstance(value, (list, tuple)) and len(value) == 2:
        return (_count(value[0], label, least), _count(value[1], label, least))
    single = _count(value, label, least)
    return (single, single)


@dataclass(frozen=True)
class LayerShape:
    """Everything about a Linear or Conv2d layer except its weights.

    A Linear layer is described as a 1x1 convolution with ``kind="linear"``, and a
    Conv1d as a Conv2d with a ``(1, k)`` kernel with ``kind="conv1d"``, so the
    decompositions see one weight layout, ``(out, in / groups, kh, kw)``. A Hugging
    Face ``Conv1D`` (a Linear with a transposed weight) is ``kind="linear"``.
    """

    kind: str
    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int] = (1, 1)
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] | str = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    groups: int = 1
    bias: bool = True
    padding_mode: str = "zeros"

    @classmethod
    def from_module(cls, module: nn.Module, name: str | None = None) -> LayerShape:
        """Describe ``module``; raise ``UnsupportedLayerError`` for anything but Linear/Conv2d."""
        label = name or type(module).__name__
        shape = getattr(module, "shape", None)
        if isinstance(shape, LayerShape):  # an already decomposed layer
            return shape
        if (
            isinstance(module, nn.modules.lazy.LazyModuleMixin)
            and module.has_uninitialized_params()
        ):
            raise UnsupportedLayerError(
                f"layer {label!r} is a lazy module whose shape is not known yet: "
                "run one forward pass before decomposing it"
            )
        if is_transposed_linear(module):
            weight = module.weight
            assert isinstance(weight, torch.Tensor)
            return cls(
                kind="linear",
                in_channels=int(weight.shape[0]),
                out_channels=int(weight.shape[1]),
                bias=getattr(module, "bias", None) is not None,
            )
        if isinstance(module, nn.Conv1d):
            (kernel,), (stride,), (dilation,) = module.kernel_size, module.stride, module.dilation
            padding1d = module.padding
            return cls(
                kind="conv1d",
                in_channels=module.in_channels,
                out_channels=module.out_channels,
                kernel_size=(1, kernel),
                stride=(1, stride),
                padding=padding1d if isinstance(padding1d, str) else (0, int(padding1d[0])),
                dilation=(1, dilation),
                groups=module.groups,
                bias=module.bias is not None,
                padding_mode=module.padding_mode,
            )
        if isinstance(module, nn.Linear):
            return cls(
                kind="linear",
                in_channels=module.in_features,
                out_channels=module.out_features,
                bias=module.bias is not None,
            )
        if isinstance(module, nn.Conv2d):
            if module.transposed:
                raise UnsupportedLayerError(
                    f"layer {label!r} is a transposed convolution; only nn.Linear and "
                    "nn.Conv2d can be decomposed"
                )
            padding = module.padding if isinstance(module.padding, str) else _pair(module.padding)
            return cls(
                kind="conv2d",
                in_channels=module.in_channels,
                out_channels=module.out_channels,
                kernel_size=_pair(module.kernel_size),
                stride=_pair(module.stride),
                padding=padding,
                dilation=_pair(module.dilation),
                groups=module.groups,
                bias=module.bias is not None,
                padding_mode=module.padding_mode,
            )
        raise UnsupportedLayerError(
            f"layer {label!r} is a {type(module).__name__}; stagecomp decomposes nn.Linear, "
            "nn.Conv2d, nn.Conv1d, transformers' Conv1D (and layers it has already decomposed)"
        )

    @property
    def in_per_group(self) -> int:
        return self.in_channels // self.groups

    @property
    def out_per_group(self) -> int:
        return self.out_channels // self.groups

    @property
    def kernel_numel(self) -> int:
        return self.kernel_size[0] * self.kernel_size[1]

    @property
    def is_pointwise(self) -> bool:
        """True for Linear layers and 1x1 convolutions (a plain matrix per group)."""
        return self.kernel_size == (1, 1)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """Shape of the original module's ``weight``."""
        if self.kind == "linear":
            return (self.out_channels, self.in_channels)
        if self.kind == "conv1d":
            return (self.out_channels, self.in_per_group, self.kernel_size[1])
        return (self.out_channels, self.in_per_group, *self.kernel_size)

    @property
    def weight_numel(self) -> int:
        return self.out_channels * self.in_per_group * self.kernel_numel

    @property
    def dense_params(self) -> int:
        """Parameters of the original layer, bias included."""
        return self.weight_numel + (self.out_channels if self.bias else 0)

    def conv_kwargs(self) -> dict[str, Any]:
        """Keyword arguments that give a Conv2d this layer's spatial behaviour."""
        return {
            "stride": self.stride,
            "padding": self.padding,
            "dilation": self.dilation,
            "padding_mode": self.padding_mode,
        }

    def grouped_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """View a module weight as ``(groups, out/g, in/g, kh, kw)``."""
        return weight.reshape(self.groups, self.out_per_group, self.in_per_group, *self.kernel_size)

    def module_weight(self, grouped: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`grouped_weight`: back to the module's own weight layout."""
        return grouped.reshape(self.weight_shape)

    def build_dense(
        self, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ) -> nn.Linear | nn.Conv2d | nn.Conv1d:
        """A fresh nn.Linear, nn.Conv2d or nn.Conv1d with this geometry (default initialisation).

        A Hugging Face ``Conv1D`` comes back as the nn.Linear it is equivalent to.
        """
        if self.kind == "linear":
            return nn.Linear(
                self.in_channels, self.out_channels, bias=self.bias, device=device, dtype=dtype
            )
        if self.kind == "conv1d":
            padding = self.padding if isinstance(self.padding, str) else self.padding[1]
            return nn.Conv1d(
                self.in_channels,
                self.out_channels,
                self.kernel_size[1],
                stride=self.stride[1],
                padding=padding,
                dilation=self.dilation[1],
                groups=self.groups,
                bias=self.bias,
                padding_mode=self.padding_mode,  # type: ignore[arg-type]
                device=device,
                dtype=dtype,
            )
        return nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            groups=self.groups,
            bias=self.bias,
            device=device,
            dtype=dtype,
            **self.conv_kwargs(),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready description (tuples become lists)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LayerShape:
        """The shape ``to_dict`` wrote, every value checked (a recipe may be damaged).

        Raises:
            ValueError: a value of the wrong type or out of range, naming it.
        """
        if not isinstance(data, dict):
            raise ValueError(f"a layer shape is a table, got {type(data).__name__}")
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown layer shape keys {sorted(unknown)}")
        padding = data.get("padding", (0, 0))
        bias = data.get("bias", True)
        if not isinstance(bias, bool):
            raise ValueError(f"bias {bias!r} is not true or false")
        kind, mode = data.get("kind"), data.get("padding_mode", "zeros")
        if not isinstance(kind, str) or not isinstance(mode, str):
            raise ValueError(f"kind {kind!r} and padding_mode {mode!r} must be strings")
        shape = cls(
            kind=kind,
            in_channels=_count(data.get("in_channels"), "in_channels", 1),
            out_channels=_count(data.get("out_channels"), "out_channels", 1),
            kernel_size=_checked_pair(data.get("kernel_size", (1, 1)), "kernel_size", 1),
            stride=_checked_pair(data.get("stride", (1, 1)), "stride", 1),
            padding=padding
            if padding in ("same", "valid")
            else _checked_pair(padding, "padding", 0),
            dilation=_checked_pair(data.get("dilation", (1, 1)), "dilation", 1),
            groups=_count(data.get("groups", 1), "groups", 1),
            bias=bias,
            padding_mode=mode,
        )
        if shape.in_channels % shape.groups or shape.out_channels % shape.groups:
            raise ValueError(
                f"groups={shape.groups} does not divide in_channels={shape.in_channels} "
                f"and out_channels={shape.out_channels}"
            )
        if kind == "linear" and (shape.kernel_size != (1, 1) or shape.groups != 1):
            raise ValueError("a linear layer has a 1x1 kernel and one group")
        return shape

    def __post_init__(self) -> None:
        if self.kind not in ("linear", "conv2d", "conv1d"):
            raise UnsupportedLayerError(
                f"layer kind {self.kind!r}: allowed 'linear', 'conv2d', 'conv1d'"
            )
        if self.padding_mode not in _PADDING_MODES:
            raise UnsupportedLayerError(
                f"padding_mode {self.padding_mode!r}: allowed {', '.join(_PADDING_MODES)}"
            )
