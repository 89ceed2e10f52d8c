"""The table of a folder written by ``stagecomp.save``, read from its recipe alone.

Parameter counts come from the layer classes' ``param_count``, so no model is built;
:func:`stagecomp.report.format_saved_table` renders what this module reads.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from stagecomp.errors import RecipeError, StagecompError
from stagecomp.layer_shape import LayerShape
from stagecomp.options import DecomposeOptions
from stagecomp.registry import layer_class
from stagecomp.report import SavedLayer, format_saved_table
from stagecomp.serialization import read_recipe


def saved_layer(name: str, entry: Mapping[str, Any]) -> SavedLayer:
    """One recipe entry as a table row; a damaged entry is a ``RecipeError`` naming the layer."""
    try:
        shape = LayerShape.from_dict(entry["original"])
        structure = {
            k: tuple(v) if isinstance(v, list) else v
            for k, v in dict(entry.get("structure", {})).items()
        }
        options = DecomposeOptions().updated(structure)
        cls = layer_class(str(entry["method"]), shape, name)
        ranks = tuple(int(r) for r in entry["ranks"])
        return SavedLayer(name, cls.method, ranks, shape, cls.param_count(shape, ranks, options))
    except StagecompError:
        raise
    except (KeyError, TypeError, ValueError) as error:
        raise RecipeError(f"recipe entry for layer {name!r} is invalid: {error}") from None


def format_saved_report(path: str | os.PathLike[str]) -> str:
    """The table of a folder written by ``stagecomp.save``, from its recipe alone.

    Whole-model totals and MACs appear when the save records them
    (``stagecomp compress`` and ``stagecomp demo --out`` do).
    """
    recipe = read_recipe(path)
    layers = [saved_layer(name, entry) for name, entry in recipe["layers"].items()]
    return format_saved_table(path, recipe, layers)


__all__ = ["format_saved_report", "saved_layer"]
