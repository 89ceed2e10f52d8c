"""Save and load compressed models: a JSON recipe plus a safetensors weights file.

Nothing is pickled, so loading never runs code from the file. Loading replays
the recipe on a freshly built original model (empty decomposed layers, no
decomposition), then loads the weights; when anything does not fit, or anything at
all interrupts the load, the model is given back exactly as it was passed in.

A save is atomic: both files are written to temporaries in the folder, flushed to
disk, then renamed over the old ones, the recipe last. The weights file also holds
its recipe (in its safetensors metadata), so a save interrupted between the two
renames still loads: the folder always holds the old save or the complete new one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
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

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
RECIPE_FILE = "stagecomp.json"
MAX_RECIPE_BYTES = 64 << 20
"""Largest recipe file read (a recipe is about 1 kB per layer): a bound on what a
damaged or hostile file can make ``load`` or ``stagecomp report`` parse."""
_METADATA_KEY = "__stagecomp_recipe__"
_TEMPORARY = ".stagecomp-partial-"

_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _version() -> str:
    return __version__


def save(
    model: nn.Module, path: str | os.PathLike[str], extra: dict[str, Any] | None = None
) -> Path:
    """Write ``path/stagecomp.json`` and ``path/stagecomp.safetensors`` for ``model``, atomically.

    The names differ from Hugging Face's ``model.safetensors`` and ``config.json``, so
    ``save_pretrained`` may write into the same folder.

    Everything is checked before a byte is written; then both files go to temporaries
    in the folder, are flushed to disk and renamed over the old ones (the recipe
    last), so an interrupted or failed save leaves the folder's previous save intact.

    Args:
        model: A model (compressed or not) whose decomposed layers are recorded; not
            a bare decomposed layer (wrap it, e.g. ``nn.Sequential(layer)``).
        path: A directory; created if needed.
        extra: JSON data stored alongside (e.g. the report or training notes): a table
            with string keys, and finite numbers (NaN is not JSON).

    Returns:
        The directory written.

    Raises:
        StagecompError: ``extra`` is not JSON data, ``path`` is a file, or ``model``
            is a bare decomposed layer.
    """
    if extra is not None and not isinstance(extra, Mapping):
        raise StagecompError(f"extra={type(extra).__name__} is not allowed; expected a dict")
    quantized = quantized_layers(model)
    if quantized:
        raise StagecompError(
            f"cannot save: layer {quantized[0]!r} is quantized"
            f"{f' (and {len(quantized) - 1} more)' if len(quantized) > 1 else ''}; "
            "stagecomp.save stores plain float weights. Save before quantizing and quantize "
            "again after stagecomp.load"
        )
    save_id = uuid.uuid4().hex
    recipe = {
        "format_version": FORMAT_VERSION,
        "stagecomp_version": _version(),
        "torch_version": torch.__version__,
        "save_id": save_id,
        "layers": model_recipe(model),
        "module_versions": module_versions(model),
        "extra": dict(extra or {}),
    }
    try:
        text = json.dumps(recipe, indent=2, sort_keys=True, allow_nan=False) + "\n"
    except (TypeError, ValueError) as error:
        raise StagecompError(
            f"extra= is not JSON data ({error}); expected a dict of strings, finite numbers, "
            "booleans, None, lists and dicts with string keys"
        ) from None
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise StagecompError(f"{folder} is a file; stagecomp.save writes a folder")
    folder.mkdir(parents=True, exist_ok=True)
    weights_tmp = folder / f"{_TEMPORARY}{save_id}.safetensors"
    recipe_tmp = folder / f"{_TEMPORARY}{save_id}.json"
    try:
        save_model(model, str(weights_tmp), metadata={_METADATA_KEY: text})
        _sync(weights_tmp)
        with open(recipe_tmp, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(weights_tmp, folder / WEIGHTS_FILE)
        os.replace(recipe_tmp, folder / RECIPE_FILE)
        _sync(folder)
    finally:
        for temporary in (weights_tmp, recipe_tmp):
            with contextlib.suppress(OSError):
                temporary.unlink()
    return folder


def _sync(path: Path) -> None:
    """Flush ``path`` (a file or a folder's entries) to disk, where the system allows it."""
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:  # some file systems cannot sync a folder
        pass
    finally:
        os.close(descriptor)


def read_recipe(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The recipe saved in ``path``, checked for format and version.

    Raises:
        RecipeError: the file is missing, unreadable, too large, not JSON or not a recipe.
    """
    file = Path(path) / RECIPE_FILE
    try:
        size = file.stat().st_size
        if not file.is_file():
            raise RecipeError(f"{file} is not a file; the save is damaged")
        if size > MAX_RECIPE_BYTES:
            raise RecipeError(
                f"{file} holds {size} bytes, more than a recipe can ({MAX_RECIPE_BYTES})"
            )
        recipe = json.loads(file.read_text(encoding="utf-8"))
    except RecipeError:
        raise
    except FileNotFoundError:
        raise RecipeError(
            f"{file} does not exist: is {path} a folder written by stagecomp.save?"
        ) from None
    except (ValueError, RecursionError) as error:  # bad JSON, bad UTF-8, nesting too deep
        raise RecipeError(
            f"{file} is not valid JSON ({type(error).__name__}); the file is damaged"
        ) from None
    except OSError as error:
        raise RecipeError(f"{file} cannot be read: {error}") from None
    return _checked_recipe(recipe, str(file))


def _checked_recipe(recipe: Any, where: str) -> dict[str, Any]:
    if not isinstance(recipe, dict) or not isinstance(recipe.get("layers"), dict):
        raise RecipeError(f"{where} is not a stagecomp recipe (no 'layers' table)")
    version = recipe.get("format_version")
    if type(version) is not int or version < 1:
        raise RecipeError(f"{where} has no valid format_version ({version!r})")
    if version > FORMAT_VERSION:
        raise RecipeError(
            f"{where} has format version {version}, newer than this stagecomp reads "
            f"({FORMAT_VERSION}); upgrade stagecomp (it was written by "
            f"{recipe.get('stagecomp_version', 'an unknown version')})"
        )
    return recipe


def saved_recipe(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The recipe of the save in ``path``, as its weights file holds it.

    ``stagecomp.json`` normally; the copy inside the weights file when a save
    was interrupted after the weights were renamed into place but before the recipe
    was (the weights file is then the newer, complete save).
    """
    recipe = read_recipe(path)
    weights = weights_path(Path(path))
    embedded = _header(weights)[0].get(_METADATA_KEY)
    if embedded is None:  # written before saves were atomic
        return recipe
    if recipe.get("save_id") == _embedded_id(embedded):
        return recipe
    logger.warning(
        "%s is older than %s (a save was interrupted); using the recipe stored in the weights",
        Path(path) / RECIPE_FILE,
        weights,
    )
    try:
        return _checked_recipe(json.loads(embedded), f"the recipe inside {weights}")
    except (ValueError, RecursionError):
        raise RecipeError(f"the recipe inside {weights} is not valid JSON") from None


def _embedded_id(text: str) -> Any:
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return data.get("save_id") if isinstance(data, dict) else None


def _header(weights: Path) -> tuple[dict[str, str], dict[str, str]]:
    """``(metadata, {tensor name: safetensors dtype})`` of a weights file, read from its
    header alone."""
    if not weights.is_file():
        raise RecipeError(f"{weights} does not exist; the save is incomplete")
    try:
        with safe_open(str(weights), "pt") as file:
            metadata = file.metadata() or {}
            dtypes = {key: file.get_slice(key).get_dtype() for key in file.keys()}  # noqa: SIM118
    except Exception as error:  # safetensors raises its own error types for a bad header
        raise RecipeError(
            f"{weights} is not a valid safetensors file: {_first_line(error)}"
        ) from None
    return dict(metadata), dtypes


def _check_dtypes(model: nn.Module, file_dtypes: Mapping[str, str], weights: Path) -> None:
    """Refuse tensors whose kind differs from the model's; say where floats are converted.

    A floating tensor of another precision is converted to the model's dtype (the
    model's dtype asks for it: a model built in float16 loads a float32 save), and
    the conversion is logged; an integer or boolean tensor where the model holds a
    floating one (or the reverse, or another integer width) is refused.
    """
    expected = {k: v.dtype for k, v in model.state_dict().items()}
    converted: dict[tuple[str, str], int] = {}
    for key, code in file_dtypes.items():
        want = expected.get(key)
        if want is None:
            continue  # an unexpected key is reported by the strict load
        found = _DTYPES.get(code)
        if found == want:
            continue
        if found is not None and found.is_floating_point and want.is_floating_point:
            pair = (str(found).removeprefix("torch."), str(want).removeprefix("torch."))
            converted[pair] = converted.get(pair, 0) + 1
            continue
        raise RecipeError(
            f"{weights}: tensor {key!r} is stored as {code}, but the model holds "
            f"{str(want).removeprefix('torch.')}; a weights file of another kind of dtype "
            "is not converted"
        )
    for (stored, held), count in converted.items():
        logger.warning(
            "%s: converting %d tensor(s) from %s to the model's %s", weights, count, stored, held
        )


def load(model: nn.Module, path: str | os.PathLike[str]) -> nn.Module:
    """Rebuild the saved compressed model on ``model`` (a freshly built original) and load weights.

    Floating tensors saved in another precision are converted to the model's dtype
    (with a warning); tensors of another kind (an integer where the model holds a
    float) are refused.

    Returns:
        ``model`` itself, now compressed, with the saved weights on its device.

    Raises:
        RecipeError: the recipe does not fit the model, or a file is missing,
            damaged or from a newer stagecomp; ``model`` is then left unchanged. Any
            other interruption (``KeyboardInterrupt``, ``MemoryError``) also leaves it
            unchanged, and is raised as it is.
    """
    folder = Path(path)
    recipe = saved_recipe(folder)
    weights = weights_path(folder)
    versions = check_versions(recipe.get("module_versions"), str(folder / RECIPE_FILE))
    file_dtypes = _header(weights)[1]
    reference = next(model.parameters(), None)
    device = str(reference.device) if reference is not None else "cpu"
    # load_state_dict copies every tensor that fits before it reports the ones that
    # do not, so keep the original values to put back if the load fails.
    backup = clone_state(model)
    replaced = apply_recipe(model, recipe["layers"])
    try:
        _check_dtypes(model, file_dtypes, weights)
        load_weights(model, weights, device, versions)
    except BaseException as error:
        undo_recipe(model, replaced)
        model.load_state_dict(backup)
        if isinstance(error, RecipeError) or not isinstance(error, Exception):
            raise
        if isinstance(error, MemoryError):
            raise
        raise RecipeError(f"cannot load {weights} into the model: {_first_line(error)}") from None
    return model


def _first_line(error: BaseException, limit: int = 500) -> str:
    """The error's message on one line, shortened to ``limit`` characters."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


__all__ = [
    "FORMAT_VERSION",
    "MAX_RECIPE_BYTES",
    "RECIPE_FILE",
    "WEIGHTS_FILE",
    "load",
    "read_recipe",
    "save",
    "saved_recipe",
]
