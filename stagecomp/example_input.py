"""Feeding ``example_input`` to a model: a tensor, a tuple of arguments, or a dict of keywords.

A Hugging Face tokenizer returns a dict (``input_ids``, ``attention_mask``, ...) that the
model takes as keyword arguments, as calibration batches are taken. Counting MACs with
fvcore traces the model with positional tensors only, so a dict is bound to a small
wrapper module whose positional inputs are the dict's tensors.

Causal language models return a key/value cache (``DynamicCache``) that fvcore's tracer
cannot follow; caches are of no use for one forward pass, so they are turned off while
stagecomp runs the example input (``config.use_cache = False``, restored afterwards).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from stagecomp.errors import StagecompError


def call_model(model: nn.Module, example_input: Any) -> Any:
    """``model(x)`` for a tensor, ``model(*x)`` for a tuple, ``model(**x)`` for a dict."""
    if isinstance(example_input, Mapping):
        return model(**example_input)
    if isinstance(example_input, tuple):
        return model(*example_input)
    return model(example_input)


@contextmanager
def caches_off(model: nn.Module) -> Iterator[None]:
    """Turn a Hugging Face model's key/value cache off for the block, then restore it.

    Any submodule with a ``config.use_cache`` (encoder-decoder models have several)
    is switched; models without one are untouched.
    """
    saved: list[tuple[Any, Any]] = []
    for module in model.modules():
        config = getattr(module, "config", None)
        if (
            config is not None
            and getattr(config, "use_cache", None)
            and config not in (c for c, _ in saved)
        ):
            saved.append((config, config.use_cache))
            config.use_cache = False
    try:
        yield
    finally:
        for config, value in saved:
            config.use_cache = value


class KeywordCall(nn.Module):
    """``model(**inputs)`` as a module of positional tensors, for tracers such as fvcore.

    The model is registered as the child ``model``, so the module names fvcore reports
    carry a ``model.`` prefix that :func:`strip_prefix` removes.
    """

    def __init__(self, model: nn.Module, inputs: Mapping[str, Any]) -> None:
        super().__init__()
        self.model = model
        self.tensor_keys = [k for k, v in inputs.items() if isinstance(v, torch.Tensor)]
        self.constants = {k: v for k, v in inputs.items() if not isinstance(v, torch.Tensor)}

    def forward(self, *tensors: torch.Tensor) -> Any:
        kwargs = dict(zip(self.tensor_keys, tensors, strict=True))
        return self.model(**kwargs, **self.constants)


def traceable(model: nn.Module, example_input: Any) -> tuple[nn.Module, tuple[Any, ...], str]:
    """The module, positional inputs and name prefix a tracer should use for ``example_input``."""
    if isinstance(example_input, Mapping):
        if not all(isinstance(k, str) for k in example_input):
            raise StagecompError(
                "example_input is a dict with non-string keys; a dict is passed as keyword "
                "arguments (model(**example_input)), so its keys must be argument names"
            )
        wrapper = KeywordCall(model, example_input)
        return wrapper, tuple(example_input[k] for k in wrapper.tensor_keys), "model."
    inputs = example_input if isinstance(example_input, tuple) else (example_input,)
    return model, inputs, ""


def strip_prefix(counts: Mapping[str, int], prefix: str) -> dict[str, int]:
    """Per-module counts of the wrapped model under the model's own names."""
    if not prefix:
        return dict(counts)
    out: dict[str, int] = {}
    for name, value in counts.items():
        if name == prefix[:-1]:
            out[""] = value
        elif name.startswith(prefix):
            out[name[len(prefix) :]] = value
    return out


__all__ = ["KeywordCall", "caches_off", "call_model", "strip_prefix", "traceable"]
