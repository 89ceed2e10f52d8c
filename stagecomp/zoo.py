"""Models for the command line: torchvision classifiers by name, and users' weights files.

torchvision is imported inside the functions that use it: importing it takes about 2 s,
which ``stagecomp --help`` and ``stagecomp report`` should not pay.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from stagecomp.errors import RecipeError, UnknownModelError
from stagecomp.weights_file import state_mismatch


def classification_models() -> list[str]:
    """The names of torchvision's image classifiers."""
    import torchvision

    return list(torchvision.models.list_models(module=torchvision.models))


def build_torchvision_model(name: str, num_classes: int | None = None) -> nn.Module:
    """A torchvision classifier with random weights, or an error that names close names."""
    import torchvision

    names = classification_models()
    if name not in names:
        if name in set(torchvision.models.list_models()):
            raise UnknownModelError(
                f"{name!r} is not an image classification model; stagecomp compress "
                "builds torchvision classifiers (e.g. resnet18, resnet50, vgg16, mobilenet_v2)"
            )
        close = difflib.get_close_matches(name.lower(), names, n=4, cutoff=0.5)
        hint = f"; closest names: {', '.join(close)}" if close else ""
        raise UnknownModelError(
            f"unknown torchvision model {name!r}{hint} "
            "(all names: python -c 'import torchvision; print(torchvision.models.list_models())')"
        )
    kwargs: dict[str, Any] = {}
    if num_classes is not None:
        if num_classes < 1:
            raise UnknownModelError(
                f"num_classes {num_classes} is not allowed for {name}; expected an integer >= 1"
            )
        kwargs["num_classes"] = num_classes
    if name in ("googlenet", "inception_v3"):
        kwargs["init_weights"] = True  # silences torchvision's warning about the default
    model: nn.Module = torchvision.models.get_model(name, weights=None, **kwargs)
    return model


def load_weights_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A state dict from a safetensors file or a ``torch.save`` file, never running pickled code.

    Checkpoints that wrap the state dict (``{"state_dict": ...}`` or ``{"model": ...}``)
    are unwrapped, and a ``module.`` prefix left by DataParallel/DDP is removed.
    """
    file = Path(path)
    if not file.is_file():
        raise RecipeError(f"weights file {file} does not exist")
    if file.suffix == ".safetensors":
        try:
            state: Any = load_file(str(file), device="cpu")
        except (SafetensorError, OSError, ValueError) as error:
            raise RecipeError(f"cannot read {file} as safetensors: {error}") from None
    else:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as error:  # any unpickling failure is the file's fault
            raise RecipeError(
                f"cannot read {file} as a weights-only torch.save file: {error} "
                "(stagecomp never unpickles arbitrary objects; save model.state_dict() "
                "or use safetensors)"
            ) from None
    for key in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise RecipeError(f"{file} does not hold a state dict (a mapping of names to tensors)")
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return dict(state)


def _last_weight(state: dict[str, Any]) -> str:
    """The classifier's weight: the last weight of the state dict."""
    weights = [k for k in state if k.endswith(".weight")]
    return weights[-1] if weights else ""


def load_into(model: nn.Module, state: dict[str, Any], file: str, name: str) -> None:
    """Load ``state`` (read from ``file``) into ``model`` (called ``name`` in messages), or
    raise one error that says which keys or shapes do not fit."""
    own = model.state_dict()
    mismatch = state_mismatch(own, state)
    if mismatch is not None:
        text, wrong = mismatch
        hint = (
            " (try num_classes: --num-classes on the command line)"
            if wrong is not None and wrong.endswith(".weight") and wrong == _last_weight(own)
            else ""
        )
        raise RecipeError(f"weights file {file} does not fit {name}: {text}{hint}")
    model.load_state_dict(state)


__all__ = ["build_torchvision_model", "classification_models", "load_into", "load_weights_file"]
