"""The structure of a decomposed model as plain data, and its replay on a fresh model.

A recipe lists, per decomposed layer, its qualified name, method, ranks, the
original layer's geometry and the options that fix its structure (TT modes).
Replaying it builds empty decomposed layers in place of the original ones, so
a state dict saved from the compressed model loads without decomposing again.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from stagecomp.decompose import empty_layer
from stagecomp.errors import RecipeError
from stagecomp.layer_shape import LayerShape
from stagecomp.layers.base import DecomposedLayer
from stagecomp.options import DecomposeOptions
from stagecomp.surgery import replace_module


def layer_entry(layer: DecomposedLayer) -> dict[str, Any]:
    """The recipe entry of one decomposed layer."""
    return {
        "method": layer.method,
        "ranks": list(layer.ranks),
        "original": layer.shape.to_dict(),
        "structure": {
            k: list(v) if isinstance(v, tuple) else v for k, v in layer.structure().items()
        },
    }


def model_recipe(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Recipe entries of every decomposed layer of ``model``, by qualified name."""
    return {
        name: layer_entry(module)
        for name, module in model.named_modules()
        if isinstance(module, DecomposedLayer)
    }


def apply_recipe(
    model: nn.Module, recipe: dict[str, dict[str, Any]], options: DecomposeOptions | None = None
) -> list[tuple[str, nn.Module]]:
    """Build the recipe's empty layers in ``model``; on any mismatch ``model`` is left as it was.

    Every entry is checked and built before the first replacement, so a recipe
    that does not fit raises ``RecipeError`` with the model untouched.

    Returns:
        ``(name, replaced module)`` pairs, so a caller can undo the replay.
    """
    options = options or DecomposeOptions()
    planned: list[tuple[str, nn.Module]] = []
    for name, entry in recipe.items():
        try:
            current = model.get_submodule(name)
        except AttributeError:
            raise RecipeError(f"recipe layer {name!r} does not exist in the model") from None
        try:
            original = LayerShape.from_dict(entry["original"])
            actual = LayerShape.from_module(current, name)
            if actual != original:
                raise RecipeError(
                    f"recipe layer {name!r} was {original}, but the model has {actual}"
                )
            structure = {
                k: tuple(v) if isinstance(v, list) else v
                for k, v in dict(entry.get("structure", {})).items()
            }
            layer = empty_layer(
                original,
                str(entry["method"]),
                tuple(int(r) for r in entry["ranks"]),
                options=options.updated(structure),
                name=name,
            )
        except RecipeError:
            raise
        except (KeyError, TypeError, ValueError) as error:
            raise RecipeError(f"recipe entry for layer {name!r} is invalid: {error}") from None
        reference = next(current.parameters(), None)
        if reference is not None:
            layer.to(device=reference.device, dtype=reference.dtype)
        planned.append((name, layer))
    return [(name, replace_module(model, name, layer)) for name, layer in planned]


def undo_recipe(model: nn.Module, replaced: list[tuple[str, nn.Module]]) -> None:
    """Put back the modules :func:`apply_recipe` replaced."""
    for name, old in reversed(replaced):
        replace_module(model, name, old)
