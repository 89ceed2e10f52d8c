"""The one table of decomposition methods: method name -> layer class per layer kind."""

from __future__ import annotations

import difflib

from stagecomp.errors import UnknownMethodError
from stagecomp.layer_shape import LayerShape
from stagecomp.layers.base import DecomposedLayer, describe
from stagecomp.layers.cp3_conv2d import CP3Conv2d
from stagecomp.layers.cp4_conv2d import CP4Conv2d
from stagecomp.layers.interpolative import InterpolativeLayer
from stagecomp.layers.svd_conv2d import SVDConv2d
from stagecomp.layers.svd_linear import SVDLinear
from stagecomp.layers.tt_conv2d import TTConv2d
from stagecomp.layers.tt_linear import TTLinear
from stagecomp.layers.tucker2_conv2d import Tucker2Conv2d

LAYER_CLASSES: tuple[type[DecomposedLayer], ...] = (
    SVDLinear,
    SVDConv2d,
    InterpolativeLayer,
    Tucker2Conv2d,
    CP3Conv2d,
    CP4Conv2d,
    TTLinear,
    TTConv2d,
)

METHODS: tuple[str, ...] = tuple(dict.fromkeys(cls.method for cls in LAYER_CLASSES))
"""Every method name, in the order users see them."""


def check_method(method: str) -> str:
    """Return ``method`` if it is known, else raise with the closest names."""
    if method in METHODS:
        return method
    close = difflib.get_close_matches(str(method), METHODS, n=2)
    hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
    raise UnknownMethodError(
        f"unknown decomposition method {method!r}{hint}; allowed: {', '.join(METHODS)}"
    )


def layer_class(method: str, shape: LayerShape, name: str | None = None) -> type[DecomposedLayer]:
    """The class that decomposes a layer of ``shape`` with ``method``."""
    check_method(method)
    for cls in LAYER_CLASSES:
        if cls.method == method and shape.kind in cls.kinds:
            return cls
    kinds = sorted({k for cls in LAYER_CLASSES if cls.method == method for k in cls.kinds})
    from stagecomp.errors import UnsupportedLayerError

    raise UnsupportedLayerError(
        f"{describe(shape, name)}: method {method!r} applies only to {', '.join(kinds)} layers"
    )


def methods_for(shape: LayerShape) -> tuple[str, ...]:
    """The methods that can decompose a layer of ``shape``."""
    return tuple(dict.fromkeys(c.method for c in LAYER_CLASSES if shape.kind in c.kinds))
