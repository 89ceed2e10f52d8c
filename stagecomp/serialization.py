"""Save and load compressed models: a JSON recipe plus a safetensors weights file.

Nothing is pickled, so loading never runs code from the file. Loading replays
the recipe on a freshly built original model (empty decomposed layers, no
decomposition), then loads the weights; when anything does not fit, the model
is given back exactly as it was passed in.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_model
from torch import nn

from stagecomp.errors import RecipeError, StagecompError
from stagecomp.recipe import apply_recipe, model_recipe, undo_recipe
from stagecomp.version import __version__
from stagecomp.weights_file import (
    WEIGHTS_FILE,
    check_versions,
    clone_state,
    load_weights,
    module_versions,
    quantized_layers,
    weights_path,
)

FORMAT_VERSION = 1
RECIPE_FILE = "stagecomp.json"


def _version() -> str:
    return __version__


def save(
    model: nn.Module, path: str | os.PathLike[str], extra: dict[str, Any] | None = None
) -> Path:
    """Write ``path/stagecomp.json`` and ``path/stagecomp.safetensors`` for ``model``.

    The names differ from Hugging Face's ``model.safetensors`` and ``config.json``, so
    ``save_pretrained`` may write into the same folder.

    Args:
        model: A model (compressed or not) whose decomposed layers are recorded.
        path: A directory; created if needed.
        extra: JSON-ready data stored alongside (e.g. the report or training notes).

    Returns:
        The directory written.
    """
    quantized = quantized_layers(model)
    if quantized:
        raise StagecompError(
            f"cannot save: layer {quantized[0]!r} is quantized"
            f"{f' (and {len(quantized) - 1} more)' if len(quantized) > 1 else ''}; "
            "stagecomp.save stores plain float weights. Save before quantizing and quantize "
            "again after stagecomp.load"
        )
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    recipe = {
        "format_version": FORMAT_VERSION,
        "stagecomp_version": _version(),
        "torch_version": torch.__version__,
        "layers": model_recipe(model),
        "module_versions": module_versions(model),
        "extra": extra or {},
    }
    save_model(model, str(folder / WEIGHTS_FILE))
    (folder / RECIPE_FILE).write_text(json.dumps(recipe, indent=2, sort_keys=True) + "\n")
    return folder


def read_recipe(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The recipe saved in ``path``, checked for format and version."""
    file = Path(path) / RECIPE_FILE
    try:
        recipe = json.loads(file.read_text())
    except FileNotFoundError:
        raise RecipeError(
            f"{file} does not exist: is {path} a folder written by stagecomp.save?"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RecipeError(f"{file} is not valid JSON ({error}); the file is damaged") from None
    if not isinstance(recipe, dict) or not isinstance(recipe.get("layers"), dict):
        raise RecipeError(f"{file} is not a stagecomp recipe (no 'layers' table)")
    version = recipe.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise RecipeError(f"{file} has no valid format_version ({version!r})")
    if version > FORMAT_VERSION:
        raise RecipeError(
            f"{file} has format version {version}, newer than this stagecomp reads "
            f"({FORMAT_VERSION}); upgrade stagecomp (it was written by "
            f"{recipe.get('stagecomp_version', 'an unknown version')})"
        )
    return recipe


def load(model: nn.Module, path: str | os.PathLike[str]) -> nn.Module:
    """Rebuild the saved compressed model on ``model`` (a freshly built original) and load weights.

    Returns:
        ``model`` itself, now compressed, with the saved weights on its device.

    Raises:
        RecipeError: the recipe does not fit the model, or a file is missing,
            damaged or from a newer stagecomp; ``model`` is then left unchanged.
    """
    folder = Path(path)
    recipe = read_recipe(folder)
    weights = weights_path(folder)
    versions = check_versions(recipe.get("module_versions"), str(folder / RECIPE_FILE))
    if not weights.is_file():
        raise RecipeError(f"{weights} does not exist; the save is incomplete")
    reference = next(model.parameters(), None)
    device = str(reference.device) if reference is not None else "cpu"
    # load_state_dict copies every tensor that fits before it reports the ones that
    # do not, so keep the original values to put back if the load fails.
    backup = clone_state(model)
    replaced = apply_recipe(model, recipe["layers"])
    try:
        load_weights(model, weights, device, versions)
    except Exception as error:  # any failure leaves the model as it was, as a RecipeError
        undo_recipe(model, replaced)
        model.load_state_dict(backup)
        first_line = (
            str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        )
        raise RecipeError(f"cannot load {weights} into the model: {first_line}") from None
    return model
