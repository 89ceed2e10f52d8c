"""Which layers other code reads by attribute, so a decomposed replacement would break them.

Some models do not call a layer, they read its weight: torchvision's Swin attention calls
``F.linear(x, self.qkv.weight)``, Hugging Face ViT reads ``projection.weight.dtype``, T5
reads ``wo.weight.dtype``. A decomposed layer has no ``weight``, so replacing such a layer
breaks the forward pass (or, when the forward never calls the layer, changes nothing).

Rather than keeping a list of such classes, the example input is run once with every
candidate watched: a read of ``.weight`` while the layer's own forward is not running is
recorded, with the function that made it. Output embedding heads are found separately:
their weight is the vocabulary (``get_output_embeddings()``, or shaped like an input
embedding) and other code (``resize_token_embeddings``, weight tying) reads it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from stagecomp.example_input import caches_off, call_model
from stagecomp.layer_kinds import plain_weight
from stagecomp.layers.base import DecomposedLayer
from stagecomp.surgery import eval_mode

NOT_CHECKED = (
    "weight reads were not checked (no example_input): a layer whose weight the model "
    "reads by attribute (e.g. Swin attention) would break once replaced"
)


class _Watch:
    """The state shared by the watched layers' hooks and attribute reads."""

    def __init__(self, names: dict[int, str]) -> None:
        self.names = names
        self.running: dict[int, int] = {}
        self.ran: set[str] = set()
        self.reads: dict[str, str] = {}

    def read(self, module: nn.Module) -> None:
        key = id(module)
        name = self.names.get(key)
        if name is None or self.running.get(key, 0) or name in self.reads:
            return
        frame = sys._getframe(2)  # the caller of the attribute read
        code = frame.f_code
        function = getattr(code, "co_qualname", code.co_name)  # qualified names: Python 3.11+
        where = f"{function} ({os.path.basename(code.co_filename)}:{frame.f_lineno})"
        self.reads[name] = where


def _watched_class(cls: type[nn.Module], watch: _Watch) -> type[nn.Module]:
    original = cls.__getattr__

    def __getattr__(self: nn.Module, attr: str) -> Any:
        if attr == "weight":
            watch.read(self)
        return original(self, attr)

    return type(cls.__name__, (cls,), {"__getattr__": __getattr__})


def weights_read_elsewhere(
    model: nn.Module, names: Sequence[str], example_input: Any
) -> dict[str, str]:
    """Layers among ``names`` whose weight is read outside their own forward, with the reason.

    Runs ``example_input`` once (eval mode, no gradients, caches off); the model's
    classes, modes and hooks are restored afterwards.
    """
    modules = {name: model.get_submodule(name) for name in names}
    watched = {
        name: module
        for name, module in modules.items()
        if not isinstance(module, DecomposedLayer)
        and isinstance(module._parameters.get("weight"), torch.Tensor)
    }
    watch = _Watch({id(m): n for n, m in watched.items()})
    classes: dict[type[nn.Module], type[nn.Module]] = {}
    originals: list[tuple[nn.Module, type[nn.Module]]] = []
    handles = []

    def enter(module: nn.Module, args: Any) -> None:
        watch.running[id(module)] = watch.running.get(id(module), 0) + 1
        watch.ran.add(watch.names[id(module)])

    def leave(module: nn.Module, args: Any, output: Any) -> None:
        watch.running[id(module)] -= 1

    try:
        for module in watched.values():
            cls = type(module)
            if cls not in classes:
                classes[cls] = _watched_class(cls, watch)
            originals.append((module, cls))
            module.__class__ = classes[cls]
            handles.append(module.register_forward_pre_hook(enter))
            handles.append(module.register_forward_hook(leave, always_call=True))
        with eval_mode(model), torch.no_grad(), caches_off(model):
            call_model(model, example_input)
    finally:
        for handle in handles:
            handle.remove()
        for module, cls in originals:
            module.__class__ = cls
    reasons: dict[str, str] = {}
    for name, where in watch.reads.items():
        if name in watch.ran:
            reasons[name] = (
                f"the model reads its weight outside its forward, in {where}; a decomposed "
                "layer has no .weight"
            )
        else:
            reasons[name] = (
                f"its forward never runs: the model reads its weight directly, in {where}"
            )
    return reasons


def output_heads(model: nn.Module, names: Sequence[str]) -> dict[str, str]:
    """Output embedding heads among ``names``: their weight is the vocabulary.

    A head is what ``model.get_output_embeddings()`` returns (Hugging Face), or a layer
    whose weight has the shape of an input ``nn.Embedding``'s.
    """
    reasons: dict[str, str] = {}
    by_id = {id(model.get_submodule(n)): n for n in names}
    getter = getattr(model, "get_output_embeddings", None)
    if callable(getter):
        try:
            head = getter()
        except Exception:  # a model's own getter may not apply to it
            head = None
        if isinstance(head, nn.Module) and id(head) in by_id:
            reasons[by_id[id(head)]] = "the model's get_output_embeddings()"
    embeddings = {
        tuple(m.weight.shape): n for n, m in model.named_modules() if isinstance(m, nn.Embedding)
    }
    for name in names:
        module = model.get_submodule(name)
        if name in reasons or isinstance(module, DecomposedLayer):
            continue
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or isinstance(
            weight, nn.parameter.UninitializedParameter
        ):
            continue
        shape = tuple(plain_weight(module).shape)
        if shape in embeddings:
            reasons[name] = f"shaped like the input embedding {embeddings[shape]!r}"
    return {
        name: (
            f"output embedding head ({why}): left dense by default; name it exactly in "
            "ranks= or methods= to compress it"
        )
        for name, why in reasons.items()
    }


__all__ = ["NOT_CHECKED", "output_heads", "weights_read_elsewhere"]
