"""The structure of a decomposed model as plain data, and its replay on a fresh model.

A recipe lists, per decomposed layer, its qualified name, method, ranks, the
original layer's geometry and the options that fix its structure (TT modes).
Replaying it builds empty decomposed layers in place of the original ones, so
a state dict saved from the compressed model loads without decomposing again.

A recipe is read from a file someone else may have written: every entry is checked
against the layer it describes before anything is allocated (the geometry must be the
model's, the ranks within the layer's full ranks, the structure only the keys the
method's layer class records), and every fault is a ``RecipeError`` naming the layer.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn

from stagecomp.errors import RecipeError, StagecompError
from stagecomp.layer_shape import LayerShape
from stagecomp.layers.base import DecomposedLayer
from stagecomp.methods import layer_class
from stagecomp.options import DecomposeOptions
from stagecomp.surgery import replace_module

_ENTRY_KEYS = frozenset({"method", "ranks", "original", "structure"})
_MAX_STRUCTURE_ITEMS = 64
"""Longest list a structure value may be (TT modes: at most 32 per side), checked before
any of its entries is read."""


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
    """Recipe entries of every decomposed layer of ``model``, by qualified name.

    Raises:
        StagecompError: ``model`` is itself a decomposed layer: a recipe replays layers
            inside a model, and a load cannot replace the object it is given (wrap the
            layer, e.g. ``nn.Sequential(layer)``).
    """
    if isinstance(model, DecomposedLayer):
        raise StagecompError(
            f"the model is itself a decomposed layer ({type(model).__name__}); a saved "
            "recipe rebuilds layers inside a model, and loading cannot replace the object "
            "it is given: wrap the layer, e.g. nn.Sequential(layer), and save that"
        )
    return {
        name: layer_entry(module)
        for name, module in model.named_modules()
        if isinstance(module, DecomposedLayer)
    }


def same_entry(layer: DecomposedLayer, entry: Mapping[str, Any]) -> bool:
    """Whether ``layer`` is what ``entry`` records (compared as JSON)."""
    try:
        return json.loads(json.dumps(layer_entry(layer))) == json.loads(json.dumps(entry))
    except (TypeError, ValueError):
        return False


def get_submodule_or_none(model: nn.Module, name: str) -> nn.Module | None:
    """The submodule called ``name``, or ``None`` when the model has none."""
    if not isinstance(name, str):
        return None
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


@dataclass(frozen=True)
class RecipeEntry:
    """One recipe entry, checked: what it takes to build the layer it records.

    Attributes:
        name: The layer's qualified name.
        cls: The layer class of the entry's method for the entry's geometry.
        shape: The geometry of the layer it replaced.
        ranks: One integer per rank, each within the full ranks.
        structure: The structure options, only keys ``cls.structure_keys`` lists.
    """

    name: str
    cls: type[DecomposedLayer]
    shape: LayerShape
    ranks: tuple[int, ...]
    structure: dict[str, Any]

    def options(self, base: DecomposeOptions | None = None) -> DecomposeOptions:
        """``base`` with this entry's structure options."""
        return (base or DecomposeOptions()).updated(self.structure)

    def param_count(self) -> int:
        """Parameters of the layer this entry builds (from shapes alone)."""
        return self.cls.param_count(self.shape, self.ranks, self.options())


def read_entry(name: str, entry: Any, actual: LayerShape | None = None) -> RecipeEntry:
    """Check one recipe entry; ``actual`` is the model's layer to compare its geometry with.

    The checks run from the cheapest to the ones that depend on the others, and nothing
    is allocated: the geometry (the model's own when given), the method, the ranks'
    count and range, then the structure keys the layer class records and their values.

    Raises:
        RecipeError: naming the layer and what is wrong.
    """
    try:
        if not isinstance(entry, Mapping):
            raise ValueError(f"an entry is a table, got {type(entry).__name__}")
        unknown = set(entry) - _ENTRY_KEYS
        if unknown:
            raise ValueError(f"unknown keys {sorted(map(str, unknown))}")
        shape = LayerShape.from_dict(dict(entry["original"]))
        if actual is not None and actual != shape:
            raise RecipeError(f"recipe layer {name!r} was {shape}, but the model has {actual}")
        method = entry["method"]
        if not isinstance(method, str):
            raise ValueError(f"method {method!r} is not a name")
        cls = layer_class(method, shape, name)
        structure = _structure(cls, entry.get("structure", {}))
        options = DecomposeOptions().updated(structure)
        cls.check_supported(shape, options, name)
        full = cls.full_rank(shape, options)
        ranks = entry["ranks"]
        if not isinstance(ranks, list) or len(ranks) != len(full):
            raise ValueError(f"ranks {ranks!r} is not a list of {len(full)} integers")
        checked = cls.normalize_rank(shape, ranks, options, name)
        return RecipeEntry(name, cls, shape, checked, structure)
    except RecipeError:
        raise
    except (StagecompError, Exception) as error:  # any damage: type, key, size, recursion
        text = " ".join(str(error).split()) or type(error).__name__
        raise RecipeError(f"recipe entry for layer {name!r} is invalid: {text}") from None


def _structure(cls: type[DecomposedLayer], data: Any) -> dict[str, Any]:
    """The entry's structure options: only the keys ``cls`` records, lists as tuples."""
    if not isinstance(data, Mapping):
        raise ValueError(f"structure {data!r} is not a table")
    allowed = cls.structure_keys
    unknown = [str(k) for k in data if k not in allowed]
    if unknown:
        raise ValueError(
            f"structure keys {unknown} are not recorded by method {cls.method!r} "
            f"(it records {list(allowed) or 'none'})"
        )
    long = [
        str(k) for k, v in data.items() if isinstance(v, list) and len(v) > _MAX_STRUCTURE_ITEMS
    ]
    if long:
        raise ValueError(f"structure values {long} hold more than {_MAX_STRUCTURE_ITEMS} entries")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}


def apply_recipe(
    model: nn.Module,
    recipe: Mapping[str, Any],
    options: DecomposeOptions | None = None,
) -> list[tuple[str, nn.Module]]:
    """Build the recipe's empty layers in ``model``; on any fault ``model`` is left as it was.

    Every entry is checked against the model's layer and built before the first
    replacement, so a recipe that does not fit raises ``RecipeError`` with the model
    untouched; an interruption while swapping puts back what was swapped.

    Returns:
        ``(name, replaced module)`` pairs, so a caller can undo the replay.
    """
    if not isinstance(recipe, Mapping):
        raise RecipeError(f"a recipe is a table of layers, got {type(recipe).__name__}")
    options = options or DecomposeOptions()
    planned: list[tuple[str, DecomposedLayer]] = []
    for name, entry in recipe.items():
        current = get_submodule_or_none(model, name)
        if current is None or current is model:
            raise RecipeError(f"recipe layer {name!r} does not exist in the model")
        try:
            actual = LayerShape.from_module(current, name)
        except StagecompError as error:
            raise RecipeError(f"recipe layer {name!r} cannot be rebuilt here: {error}") from None
        checked = read_entry(name, entry, actual)
        reference = next(current.parameters(), None)
        layer = checked.cls(
            checked.shape,
            checked.ranks,
            checked.options(options),
            device=None if reference is None else reference.device,
            dtype=None if reference is None else reference.dtype,
        )
        planned.append((name, layer))
    replaced: list[tuple[str, nn.Module]] = []
    try:
        for name, new in planned:
            replaced.append((name, replace_module(model, name, new)))
    except BaseException:
        undo_recipe(model, replaced)
        raise
    return replaced


def undo_recipe(model: nn.Module, replaced: list[tuple[str, nn.Module]]) -> None:
    """Put back the modules :func:`apply_recipe` replaced."""
    for name, old in reversed(replaced):
        replace_module(model, name, old)


__all__ = [
    "RecipeEntry",
    "apply_recipe",
    "get_submodule_or_none",
    "layer_entry",
    "model_recipe",
    "read_entry",
    "same_entry",
    "undo_recipe",
]
