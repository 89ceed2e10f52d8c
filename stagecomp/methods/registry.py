"""The table of method handlers, filled by the ``register_method`` decorator.

Handlers register themselves when their module is imported (``stagecomp.methods``
imports the built-in ones), the way torchao registers one handler per config type,
so nothing else needs a list of methods or switches on their names.
"""

from __future__ import annotations

import difflib
from typing import TypeVar

from torch import nn

from stagecomp.errors import MethodRegistrationError, UnknownMethodError, UnsupportedLayerError
from stagecomp.layer_shape import LayerShape
from stagecomp.layers.base import DecomposedLayer, describe
from stagecomp.methods.base import MethodHandler

_HandlerT = TypeVar("_HandlerT", bound=type[MethodHandler])

_HANDLERS: dict[str, MethodHandler] = {}
_BY_LAYER_CLASS: dict[type[DecomposedLayer], MethodHandler] = {}


def register_method(cls: _HandlerT) -> _HandlerT:
    """Class decorator: instantiate the handler ``cls`` and make its method known.

    Registration order is the order users see methods in (``METHODS``, messages).

    Raises:
        MethodRegistrationError: when the name or one of the layer classes already
            belongs to a registered method, or a layer class names another method;
            nothing is registered then.
    """
    handler = cls()
    name = handler.name
    if name in _HANDLERS:
        raise MethodRegistrationError(
            f"method {name!r} is already registered by {type(_HANDLERS[name]).__name__}; "
            f"{cls.__name__} needs another name"
        )
    for layer in handler.layer_classes:
        if layer.method != name:
            raise MethodRegistrationError(
                f"{cls.__name__} ({name!r}) lists {layer.__name__}, whose method is "
                f"{layer.method!r}"
            )
        if layer in _BY_LAYER_CLASS:
            raise MethodRegistrationError(
                f"{layer.__name__} already belongs to method {_BY_LAYER_CLASS[layer].name!r}"
            )
    _HANDLERS[name] = handler
    for layer in handler.layer_classes:
        _BY_LAYER_CLASS[layer] = handler
    return cls


def registered_methods() -> tuple[str, ...]:
    """Every registered method name, in registration order."""
    return tuple(_HANDLERS)


def check_method(name: str) -> str:
    """Return ``name`` if it is a registered method, else raise with the closest names."""
    if isinstance(name, str) and name in _HANDLERS:
        return name
    known = registered_methods()
    close = difflib.get_close_matches(str(name), known, n=2)
    hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
    raise UnknownMethodError(
        f"unknown decomposition method {name!r}{hint}; allowed: {', '.join(known)}"
    )


def get_method(name: str) -> MethodHandler:
    """The handler of method ``name``; ``UnknownMethodError`` suggests close names."""
    return _HANDLERS[check_method(name)]


def handler_of(layer: nn.Module) -> MethodHandler:
    """The handler whose method built ``layer`` (a subclass of one of its layer classes too).

    Raises:
        UnsupportedLayerError: when ``layer`` is not a layer of any registered method.
    """
    for cls in type(layer).__mro__:
        if cls in _BY_LAYER_CLASS:
            return _BY_LAYER_CLASS[cls]
    raise UnsupportedLayerError(
        f"{type(layer).__name__} is not a layer class of any registered method"
    )


def layer_class(method: str, shape: LayerShape, name: str | None = None) -> type[DecomposedLayer]:
    """The class that decomposes a layer of ``shape`` with ``method``."""
    return get_method(method).layer_class(shape, name)


def methods_for(shape: LayerShape) -> tuple[str, ...]:
    """The methods that can decompose a layer of ``shape``'s kind."""
    return tuple(name for name, h in _HANDLERS.items() if shape.kind in h.kinds)


def methods_for_kind(kind: str) -> tuple[str, ...]:
    """The methods that apply to layers of ``kind`` (``"linear"``, ``"conv2d"``)."""
    return tuple(name for name, h in _HANDLERS.items() if kind in h.kinds)


def default_method(shape: LayerShape, name: str | None = None) -> str:
    """The method used for ``shape`` when the user names none: the first handler that
    claims it as its default (``svd`` for Linear and 1x1 conv, ``tucker2`` for kxk conv).

    Raises:
        UnsupportedLayerError: when no registered method is the default for ``shape``.
    """
    for method, handler in _HANDLERS.items():
        if shape.kind in handler.kinds and handler.is_default_for(shape):
            return method
    raise UnsupportedLayerError(f"{describe(shape, name)}: no method is the default for it")
