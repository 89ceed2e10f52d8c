"""The weights file of a save, and loading it with the state-dict metadata modules read.

``save_pretrained`` (Hugging Face) writes ``model.safetensors``; stagecomp writes
``stagecomp.safetensors`` so both fit in one folder. Folders written before the rename
hold ``model.safetensors``, which is still read.

A safetensors file keeps tensors only. ``load_state_dict`` also hands each module its
``version`` from the state dict's ``_metadata``, and some modules refuse to load without
it (torchvision's MNASNet: "version should be set to 1 or 2 instead of None"). The
versions are saved in the recipe and given back on load.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from stagecomp.errors import RecipeError

WEIGHTS_FILE = "stagecomp.safetensors"
OLD_WEIGHTS_FILE = "model.safetensors"


def weights_path(folder: Path) -> Path:
    """The weights file in ``folder``: the current name, else the name older saves used."""
    current = folder / WEIGHTS_FILE
    old = folder / OLD_WEIGHTS_FILE
    return old if not current.is_file() and old.is_file() else current


def module_versions(model: nn.Module) -> dict[str, int]:
    """``{module name: version}`` for modules whose state-dict version is not the default 1."""
    return {
        name: int(module._version)
        for name, module in model.named_modules()
        if getattr(module, "_version", 1) not in (None, 1)
    }


def check_versions(value: Any, file: str) -> dict[str, int]:
    """The recipe's ``module_versions`` table, or ``RecipeError`` when it is malformed."""
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(
        isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool)
        for k, v in value.items()
    ):
        raise RecipeError(f"{file}: module_versions must map module names to integers")
    return dict(value)


def quantized_layers(model: nn.Module) -> list[str]:
    """Modules quantized by torch.ao (``quantize_dynamic``) or holding torchao tensor
    subclasses: their packed weights are not plain tensors, so safetensors cannot store them."""
    found = []
    for name, module in model.named_modules():
        if type(module).__module__.startswith(("torch.ao.nn.quantized", "torch.nn.quantized")):
            found.append(name or type(module).__name__)
            continue
        tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        if any(t.is_quantized or type(t) not in (torch.Tensor, nn.Parameter) for t in tensors):
            found.append(name or type(module).__name__)
    return found


def clone_state(model: nn.Module) -> OrderedDict[str, torch.Tensor]:
    """A copy of ``model.state_dict()`` that keeps its ``_metadata`` (module versions), so
    it loads back into modules that read their version."""
    state = model.state_dict()
    copy = OrderedDict((k, v.detach().clone()) for k, v in state.items())
    copy._metadata = getattr(state, "_metadata", OrderedDict())  # type: ignore[attr-defined]
    return copy


def load_weights(model: nn.Module, file: Path, device: str, versions: Mapping[str, int]) -> None:
    """Load ``file`` into ``model`` strictly, with each module's saved state-dict version.

    Modules not in ``versions`` get their own class's version (the model was built by
    the same code). Tensors the file stores once for several names (shared storage, as
    safetensors saves them) are given to every name.
    """
    state: OrderedDict[str, torch.Tensor] = OrderedDict(load_file(str(file), device=device))
    expected = model.state_dict()
    by_storage: dict[tuple[int, tuple[int, ...]], str] = {}
    for key, tensor in expected.items():
        if key in state:
            by_storage.setdefault((tensor.data_ptr(), tuple(tensor.shape)), key)
    for key, tensor in expected.items():
        twin = by_storage.get((tensor.data_ptr(), tuple(tensor.shape)))
        if key not in state and twin is not None and tensor.numel() > 0:
            state[key] = state[twin]
    metadata: OrderedDict[str, dict[str, Any]] = OrderedDict(
        getattr(expected, "_metadata", OrderedDict())
    )
    for name, version in versions.items():
        metadata[name] = {**metadata.get(name, {}), "version": version}
    state._metadata = metadata  # type: ignore[attr-defined]
    model.load_state_dict(state, strict=True)


__all__ = [
    "OLD_WEIGHTS_FILE",
    "WEIGHTS_FILE",
    "check_versions",
    "clone_state",
    "load_weights",
    "module_versions",
    "quantized_layers",
    "weights_path",
]
