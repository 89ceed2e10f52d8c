"""Loading a compressed Hugging Face model: build it from its config, then ``stagecomp.load``.

``from_pretrained`` cannot load a compressed checkpoint: the decomposed layers are not
in the model it builds, and it initialises them at random with only a log line. The
working path is to build the original architecture from its config (random
initialisation skipped, since every weight is loaded next) and replay the recipe on it,
which is what :func:`load_pretrained` does. transformers is imported only when it is
called.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from pathlib import Path
from typing import Any

from torch import nn

from stagecomp.errors import RecipeError
from stagecomp.serialization import load


def _no_init() -> contextlib.AbstractContextManager[Any]:
    """transformers' context that skips random initialisation, where this version has it."""
    for module in ("transformers.initialization", "transformers.modeling_utils"):
        try:
            return importlib.import_module(module).no_init_weights()
        except (ImportError, AttributeError):
            continue
    return contextlib.nullcontext()


def _model_class(config: Any, folder: Path) -> Any:
    """The class named first in ``config.architectures`` (``save_pretrained`` records it)."""
    architectures = getattr(config, "architectures", None) or []
    if not architectures:
        raise RecipeError(
            f"the config of {folder} names no architecture; pass the model class instead, "
            "e.g. load_pretrained(GPT2LMHeadModel, folder)"
        )
    transformers = importlib.import_module("transformers")
    cls = getattr(transformers, architectures[0], None)
    if cls is None:
        raise RecipeError(
            f"transformers has no class {architectures[0]!r} (named in the config of {folder})"
        )
    return cls


def load_pretrained(model_cls_or_config: Any, path: str | os.PathLike[str]) -> nn.Module:
    """Build a Hugging Face model from its config and load a compressed save into it.

    Args:
        model_cls_or_config: A ``PreTrainedModel`` class (its config is read from
            ``path/config.json``, as ``save_pretrained`` wrote it), or a config object
            (the class is the first of ``config.architectures``).
        path: A folder holding ``stagecomp.save``'s files (and usually
            ``save_pretrained``'s ``config.json`` beside them).

    Returns:
        The compressed model with the saved weights, in eval mode (as
        ``from_pretrained`` returns it).

    Raises:
        RecipeError: the folder, the config or the recipe does not fit.
    """
    folder = Path(path)
    if isinstance(model_cls_or_config, type):
        cls = model_cls_or_config
        config_class = getattr(cls, "config_class", None)
        if config_class is None:
            raise RecipeError(
                f"{cls.__name__} has no config_class; pass a transformers model class or config"
            )
        if not (folder / "config.json").is_file():
            raise RecipeError(
                f"{folder / 'config.json'} does not exist: call model.config.save_pretrained"
                f"({str(folder)!r}) (or model.save_pretrained) when saving, or pass the config"
            )
        config = config_class.from_pretrained(str(folder))
    else:
        config = model_cls_or_config
        cls = _model_class(config, folder)
    with _no_init():
        model = cls._from_config(config) if hasattr(cls, "_from_config") else cls(config)
    tie = getattr(model, "tie_weights", None)
    if callable(tie):
        tie()  # tying is skipped with the initialisation in some transformers versions
    load(model, folder)
    return model.eval()


__all__ = ["load_pretrained"]
