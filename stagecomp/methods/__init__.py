"""One handler per decomposition method, and the registry that finds them.

Everything the package knows about a method lives in its handler (see
``stagecomp.methods.base.MethodHandler``); everything else asks the registry here,
so adding a method is one handler file, not edits all over the package.
"""

from __future__ import annotations

# isort: off
# The import order is the registration order, which is the order users see methods
# in: METHODS, the CLI's choices, error messages.
from stagecomp.methods import svd, svd_id, tucker2, cp3, cp4, tt, ht  # noqa: F401

# isort: on
from stagecomp.layers.base import DecomposedLayer
from stagecomp.methods.base import DATA_AWARE_VARIANTS, MethodHandler
from stagecomp.methods.registry import (
    check_method,
    default_method,
    get_method,
    handler_of,
    layer_class,
    methods_for,
    methods_for_kind,
    register_method,
    registered_methods,
)

METHODS: tuple[str, ...] = registered_methods()
"""Every built-in method name, in the order users see them."""

LAYER_CLASSES: tuple[type[DecomposedLayer], ...] = tuple(
    cls for method in METHODS for cls in get_method(method).layer_classes
)
"""Every built-in layer class, from the handlers (contract tests run over them)."""

__all__ = [
    "DATA_AWARE_VARIANTS",
    "LAYER_CLASSES",
    "METHODS",
    "MethodHandler",
    "check_method",
    "default_method",
    "get_method",
    "handler_of",
    "layer_class",
    "methods_for",
    "methods_for_kind",
    "register_method",
    "registered_methods",
]
