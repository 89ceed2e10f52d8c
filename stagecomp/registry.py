"""Compatibility: the method table now lives in ``stagecomp.methods`` (one handler each)."""

from __future__ import annotations

from stagecomp.methods import LAYER_CLASSES, METHODS, check_method, layer_class, methods_for

__all__ = ["LAYER_CLASSES", "METHODS", "check_method", "layer_class", "methods_for"]
