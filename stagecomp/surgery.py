"""Replace a submodule by its qualified name, in place."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from stagecomp.errors import NoMatchingLayerError


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The submodule called ``name`` (``""`` is the model itself)."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise NoMatchingLayerError(f"the model has no submodule named {name!r}") from None


_CALL_HOOKS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
    "_is_full_backward_hook",
)
"""What ``register_forward_hook`` and its kin record on a module."""


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` where ``name`` is and return the module it replaced.

    The new module takes the old one's train/eval mode and its forward, pre-forward
    and backward hooks: they see the layer's inputs and outputs, which the new module
    keeps. The hook tables are shared, not copied, so a handle the user holds still
    removes its hook, and putting the old module back (a rollback) gives it the same
    hooks. Device and dtype are the caller's business (``stagecomp.decompose`` already
    matches them).
    """
    if not name:
        raise NoMatchingLayerError("cannot replace the model itself; name a submodule")
    parent_name, _, child = name.rpartition(".")
    parent = get_module(model, parent_name)
    old = get_module(model, name)
    new.train(old.training)
    if new is not old:
        for table in _CALL_HOOKS:
            if hasattr(old, table):
                setattr(new, table, getattr(old, table))
    if isinstance(parent, (nn.Sequential, nn.ModuleList)) and child.isdigit():
        parent[int(child)] = new
    else:
        setattr(parent, child, new)
    return old


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Run the block in eval mode, then give every submodule back its own mode."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, mode in modes.items():
            module.train(mode)
