"""Exceptions raised by stagecomp.

Every error is a ``StagecompError`` and also the built-in type a caller would
naturally catch (``ValueError``, ``TypeError``, ``RuntimeError``), so code that
does not know stagecomp still handles them sensibly.
"""

from __future__ import annotations


class StagecompError(Exception):
    """Base class of every error stagecomp raises on purpose."""


class RankError(StagecompError, ValueError):
    """A rank is not valid for a layer and a decomposition method."""


class UnsupportedLayerError(StagecompError, TypeError):
    """The module (or its configuration) cannot be decomposed by the method asked for."""


class UnknownMethodError(StagecompError, ValueError):
    """The decomposition method name is not one stagecomp knows."""


class NonFiniteWeightError(StagecompError, ValueError):
    """The layer's weights contain NaN or infinity, so no factorisation is meaningful, or are
    so large (near the dtype's maximum) that its factors would not be finite."""


class NoMatchingLayerError(StagecompError, ValueError):
    """A layer name or pattern given by the user matches no layer of the model."""


class CompressionFinishedError(StagecompError, RuntimeError):
    """``compression_step()`` was called after the last planned step had run."""


class RecipeError(StagecompError, ValueError):
    """A saved recipe or weights file does not fit the model, or is damaged."""


class DistributedError(StagecompError, RuntimeError):
    """Another rank failed a shared step, or the ranks do not hold the same model."""


class MethodRegistrationError(StagecompError, ValueError):
    """A method handler cannot be registered: its name or one of its layer classes is taken."""


class UnknownModelError(StagecompError, ValueError):
    """A model name (or an option of it) that stagecomp's model zoo cannot build."""
