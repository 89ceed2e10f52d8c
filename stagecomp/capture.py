"""What modules receive and return inside a model, one batch at a time, stopping early.

Local distillation trains a few layers on what they see in the model. Running the whole
model for that wastes the part after the last of them, and keeping every batch's
activations costs memory proportional to the data: here one batch runs only until every
watched module has been reached (a hook raises a private exception that ends the forward
pass), and only that batch's tensors are kept.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from stagecomp.calibration import Forward, run_batch
from stagecomp.errors import StagecompError
from stagecomp.surgery import get_module, replace_module


class _Reached(Exception):
    """Raised by a hook once every watched module has run: the rest of the forward is
    not needed. Private, so no user code catches it by accident."""


@dataclass
class Call:
    """The arguments one module was called with (cloned: later in-place ops cannot change
    them), so it can be called again: ``call(module)``."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    def __call__(self, module: nn.Module) -> Any:
        return module(*self.args, **self.kwargs)


def _clone(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, tuple):
        return tuple(_clone(v) for v in value)
    if isinstance(value, list):
        return [_clone(v) for v in value]
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    return value


@torch.no_grad()
def capture(
    model: nn.Module,
    batch: Any,
    names: Sequence[str],
    *,
    outputs: bool = False,
    forward: Forward | None = None,
) -> dict[str, Any]:
    """Run ``batch`` until each named module has been called once; keep what it got.

    Args:
        model: The model; the modules are looked up by name now, so a module swapped in
            just before is the one watched.
        batch: One calibration batch (fed as ``stagecomp.calibration.run_batch`` does).
        names: Qualified names of the modules to watch.
        outputs: Keep each module's output instead of its arguments (a ``Call``).
        forward: ``forward(model, batch)`` for models not called as ``run_batch`` does.

    Returns:
        ``{name: Call}``, or ``{name: output}`` with ``outputs=True``; a module called
        more than once per batch is recorded at its first call.

    Raises:
        StagecompError: the batch ran through the whole model without reaching a module.
    """
    found: dict[str, Any] = {}
    pending = set(names)

    def record(name: str, value: Any) -> None:
        if name in pending:
            found[name] = value
            pending.discard(name)
            if not pending:
                raise _Reached

    handles = []
    try:
        for name in names:
            module = get_module(model, name)
            if outputs:
                handles.append(
                    module.register_forward_hook(
                        lambda _m, _a, out, name=name: record(name, _clone(out))
                    )
                )
            else:
                handles.append(
                    module.register_forward_pre_hook(
                        lambda _m, args, kwargs, name=name: record(
                            name, Call(_clone(args), _clone(kwargs))
                        ),
                        with_kwargs=True,
                    )
                )
        with contextlib.suppress(_Reached):
            run_batch(model, batch, forward)
    finally:
        for handle in handles:
            handle.remove()
    if pending:
        missing = ", ".join(repr(n) for n in names if n in pending)
        raise StagecompError(
            f"the calibration batch ran through the whole model without reaching {missing}; "
            "every refined layer (and block) must run on the calibration batches"
        )
    return found


@contextlib.contextmanager
def swapped(model: nn.Module, modules: Mapping[str, nn.Module]) -> Iterator[None]:
    """Put ``modules`` at their names for the block, then put back what was there.

    Train/eval modes are left as the caller set them (``replace_module`` copies the mode
    of the module it replaces; inside ``eval_mode`` every module is in eval mode).
    """
    previous: list[tuple[str, nn.Module]] = []
    try:
        for name, module in modules.items():
            previous.append((name, replace_module(model, name, module)))
        yield
    finally:
        for name, module in reversed(previous):
            replace_module(model, name, module)


def batch_stream(
    batches: Iterable[Any], count: int, batch_size: int | None, generator: torch.Generator
) -> Iterator[Any]:
    """``count`` batches: a list's batches in a fresh seeded order per pass (any other
    iterable in its own order, iterated again as needed), each cut to ``batch_size``
    samples drawn with ``generator`` when it holds more."""
    produced = 0
    while produced < count:
        if isinstance(batches, Sequence):
            order = torch.randperm(len(batches), generator=generator).tolist()
            source: Iterable[Any] = (batches[i] for i in order)
        else:
            source = batches
        empty = True
        for batch in source:
            empty = False
            yield subsample(batch, batch_size, generator)
            produced += 1
            if produced >= count:
                return
        if empty:
            raise StagecompError("the calibration batches are empty; expected at least one")


def subsample(batch: Any, batch_size: int | None, generator: torch.Generator) -> Any:
    """``batch_size`` samples of ``batch`` (every tensor of the batch that has its first
    tensor's leading size is indexed along dim 0 alike), or the batch as it is."""
    size = _leading_size(batch)
    if batch_size is None or size is None or size <= batch_size:
        return batch
    index = torch.randperm(size, generator=generator)[:batch_size].sort().values
    return _take(batch, index, size)


def _leading_size(batch: Any) -> int | None:
    if isinstance(batch, torch.Tensor):
        return batch.shape[0] if batch.dim() else None
    values = batch.values() if isinstance(batch, Mapping) else batch
    if isinstance(values, (tuple, list)) or isinstance(batch, Mapping):
        for value in values:
            size = _leading_size(value)
            if size is not None:
                return size
    return None


def _take(batch: Any, index: torch.Tensor, size: int) -> Any:
    if isinstance(batch, torch.Tensor):
        if batch.dim() and batch.shape[0] == size:
            return batch[index.to(batch.device)]
        return batch
    if isinstance(batch, tuple):
        return tuple(_take(b, index, size) for b in batch)
    if isinstance(batch, list):
        return [_take(b, index, size) for b in batch]
    if isinstance(batch, Mapping):
        return {k: _take(v, index, size) for k, v in batch.items()}
    return batch


__all__ = ["Call", "batch_stream", "capture", "subsample", "swapped"]
