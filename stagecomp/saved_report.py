"""The table of a folder written by ``stagecomp.save``, read from its recipe alone.

Parameter counts come from the layer classes' ``param_count``, so no model is built;
:func:`stagecomp.report.format_saved_table` renders what this module reads.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from stagecomp.errors import RecipeError
from stagecomp.recipe import read_entry
from stagecomp.report import SavedLayer, format_saved_table
from stagecomp.serialization import saved_recipe


def saved_layer(name: str, entry: Mapping[str, Any]) -> SavedLayer:
    """One recipe entry as a table row; a damaged entry is a ``RecipeError`` naming the layer.

    The entry is checked as a load checks it (geometry, method, ranks within the full
    ranks, structure keys), so the table never shows a layer that cannot exist.
    """
    checked = read_entry(name, entry)
    return SavedLayer(name, checked.cls.method, checked.ranks, checked.shape, checked.param_count())


def format_saved_report(path: str | os.PathLike[str]) -> str:
    """The table of a folder written by ``stagecomp.save``, from its recipe alone.

    Read-only, and bounded: the recipe file is at most ``MAX_RECIPE_BYTES`` and every
    entry is checked without building anything. Whole-model totals and MACs appear
    when the save records them (``stagecomp compress`` and ``stagecomp demo --out`` do).

    Raises:
        RecipeError: the folder is not a complete, undamaged save.
    """
    recipe = saved_recipe(path)
    layers = [saved_layer(name, entry) for name, entry in recipe["layers"].items()]
    try:
        return format_saved_table(path, recipe, layers)
    except Exception as error:  # a damaged "extra" table (the summary the CLI records)
        raise RecipeError(f"the summary saved in {path} is damaged: {error!r}") from None


__all__ = ["format_saved_report", "saved_layer"]
