"""The repeated blocks of a model (transformer layers), and running it block by block.

Memory-bounded calibration (``Calibration(blocks=...)``, ``allocate_ranks(blocks=...)``)
collects the statistics of one block at a time from that block's cached inputs instead
of hooking every layer of the model at once. This module holds the mechanics:

- which modules are the blocks: a name pattern (``"model.layers.*"``; modules nested in
  a matched one are not blocks themselves), or ``"auto"``: the children of the
  ``nn.ModuleList`` of modules of one class that holds the most parameters;
- what each block is called with, per batch (``capture_inputs``): one forward pass
  records every block's arguments (the hidden state is cloned; masks and position
  embeddings are kept by reference, usually one tensor shared by all blocks), checking
  that each block's output is the next block's input. Key/value caches are dropped and
  ``use_cache`` turned off, so a block can run again on the same inputs;
- running one block on its recorded inputs (``BlockCall.run``), and running the whole
  model from one block on (``starting_at``: the blocks before it pass their input
  through, and the block takes its cached input instead), which gives the model's own
  output, for gradients and probes, without computing the blocks before it again.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from stagecomp.calibration import Forward, MaskFn, batch_mask, run_batch
from stagecomp.errors import NoMatchingLayerError, StagecompError
from stagecomp.matching import check_keys, select
from stagecomp.surgery import eval_mode, get_module, replace_module

logger = logging.getLogger(__name__)

AUTO = "auto"
"""``blocks="auto"``: detect the repeated blocks (see ``find_blocks``)."""

_HIDDEN_KEY = "hidden_states"


def find_blocks(model: nn.Module, pattern: str) -> list[str]:
    """The qualified names of the blocks, in module order.

    Args:
        model: The model.
        pattern: A name, glob or ``re:`` pattern selecting the blocks (the outermost
            matched modules are the blocks), or ``"auto"``.

    Raises:
        NoMatchingLayerError: the pattern matches no module, or ``"auto"`` finds no
            list of repeated blocks.
    """
    names = [name for name, _ in model.named_modules() if name]
    if pattern == AUTO:
        return _detect(model)
    check_keys([pattern], names, "Calibration blocks")
    chosen = select(names, [pattern])
    return [n for n in chosen if not any(n.startswith(other + ".") for other in chosen)]


def _detect(model: nn.Module) -> list[str]:
    best: tuple[int, str, int] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) < 2:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        if not any(isinstance(m, (nn.Linear, nn.Conv2d)) for m in module[0].modules()):
            continue
        size = sum(p.numel() for p in module.parameters())
        if best is None or size > best[0]:
            best = (size, name, len(module))
    if best is None:
        raise NoMatchingLayerError(
            "Calibration blocks='auto' found no nn.ModuleList of repeated blocks holding "
            "Linear or Conv2d layers; name the blocks, e.g. blocks='model.layers.*'"
        )
    _, name, count = best
    prefix = f"{name}." if name else ""
    return [f"{prefix}{i}" for i in range(count)]


def block_index(blocks: Sequence[str], name: str) -> int | None:
    """The index of the block holding layer ``name``, or None (outside every block)."""
    for index, block in enumerate(blocks):
        if name.startswith(block + "."):
            return index
    return None


def _is_cache(value: Any) -> bool:
    """A key/value cache object (transformers' ``Cache`` and its subclasses)."""
    return any(cls.__name__ == "Cache" for cls in type(value).__mro__)


def _without_cache(value: Any) -> Any:
    return None if _is_cache(value) else value


@dataclass
class BlockCall:
    """How one block was called for one batch, less the hidden state.

    Attributes:
        key: ``None`` when the hidden state was the first positional argument, else the
            keyword it was passed as.
        args: The other positional arguments.
        kwargs: The keyword arguments (caches dropped, ``use_cache=False``).
    """

    key: str | None
    args: tuple[Any, ...]
    kwargs: dict[str, Any]

    def run(self, block: nn.Module, hidden: torch.Tensor, name: str = "") -> torch.Tensor:
        """The block's output hidden state for ``hidden``."""
        if self.key is None:
            output = block(hidden, *self.args, **self.kwargs)
        else:
            output = block(*self.args, **{**self.kwargs, self.key: hidden})
        return hidden_of(output, name)


def hidden_slot(args: tuple[Any, ...], kwargs: dict[str, Any], name: str) -> str | None:
    """Where a block's hidden state is: ``None`` for the first positional argument, else
    the keyword (``hidden_states``)."""
    if args and isinstance(args[0], torch.Tensor):
        return None
    if isinstance(kwargs.get(_HIDDEN_KEY), torch.Tensor):
        return _HIDDEN_KEY
    raise StagecompError(
        f"block {name!r} was called without a tensor as its first argument or as "
        f"{_HIDDEN_KEY}=; blocks must take the hidden state so"
    )


def hidden_of(output: Any, name: str) -> torch.Tensor:
    """The hidden state a block returns: the output itself, or the first of a tuple."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise StagecompError(
        f"block {name!r} returned a {type(output).__name__}; expected a tensor or a tuple "
        "whose first item is the hidden state"
    )


@dataclass
class BlockInputs:
    """Per batch, how every block is called, and the cached hidden states.

    Attributes:
        blocks: The block names.
        calls: ``calls[batch][block]``.
        hidden: ``hidden[block][batch]``: the cached input hidden state of a block, or
            None where not kept.
        masks: Per batch, the sample mask (``stagecomp.calibration.batch_mask``).
        outputs: Per block, 0 when it returns a tensor, else the length of its tuple.
    """

    blocks: list[str]
    calls: list[list[BlockCall]]
    hidden: list[list[torch.Tensor | None]]
    masks: list[torch.Tensor | None]
    outputs: list[int] = field(default_factory=list)

    @property
    def batches(self) -> int:
        return len(self.calls)


@torch.no_grad()
def capture_inputs(
    model: nn.Module,
    batches: Sequence[Any],
    blocks: Sequence[str],
    *,
    keep: Callable[[int], bool],
    forward: Forward | None = None,
    mask: MaskFn | None = None,
    progress: bool = True,
) -> BlockInputs:
    """Run every batch once and record how each block is called.

    Args:
        keep: Which blocks' input hidden states to cache (cloned; the others are None).

    Raises:
        StagecompError: a block did not run, ran twice, or its input is not the
            previous block's output (the blocks are not a chain).
    """
    modules = [get_module(model, name) for name in blocks]
    count = len(blocks)
    calls: list[list[BlockCall]] = []
    hidden: list[list[torch.Tensor | None]] = [[] for _ in range(count)]
    masks: list[torch.Tensor | None] = []
    outputs = [0] * count
    current: list[BlockCall | None] = [None] * count
    produced: list[torch.Tensor | None] = [None] * count

    def before(index: int, _m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        name = blocks[index]
        if current[index] is not None:
            raise StagecompError(
                f"block {name!r} ran more than once in one forward pass; blocks must be "
                "distinct modules called once each, in order"
            )
        key = hidden_slot(args, kwargs, name)
        state = args[0] if key is None else kwargs[key]
        if index > 0 and state is not produced[index - 1]:
            raise StagecompError(
                f"the input of block {name!r} is not the output of block "
                f"{blocks[index - 1]!r}: the model changes it in between (or calls the "
                "blocks in another order); choose blocks whose outputs feed the next one"
            )
        rest = tuple(_without_cache(a) for a in (args[1:] if key is None else args))
        named = {k: _without_cache(v) for k, v in kwargs.items() if k != key}
        if "use_cache" in named:
            named["use_cache"] = False
        current[index] = BlockCall(key, rest, named)
        hidden[index].append(state.detach().clone() if keep(index) else None)

    def after(index: int, _m: nn.Module, _a: Any, _k: Any, output: Any) -> None:
        produced[index] = hidden_of(output, blocks[index])
        outputs[index] = 0 if isinstance(output, torch.Tensor) else len(output)

    handles = []
    try:
        for index, module in enumerate(modules):
            handles.append(
                module.register_forward_pre_hook(
                    lambda m, a, k, index=index: before(index, m, a, k), with_kwargs=True
                )
            )
            handles.append(
                module.register_forward_hook(
                    lambda m, a, k, o, index=index: after(index, m, a, k, o), with_kwargs=True
                )
            )
        with eval_mode(model):
            for batch in tqdm(batches, desc="block inputs", disable=not progress):
                current[:] = [None] * count
                produced[:] = [None] * count
                run_batch(model, batch, forward)
                missing = [blocks[i] for i, c in enumerate(current) if c is None]
                if missing:
                    raise StagecompError(
                        f"blocks {missing} did not run during calibration; every block must "
                        "run on every batch"
                    )
                calls.append([c for c in current if c is not None])
                masks.append(batch_mask(batch, mask))
    finally:
        for handle in handles:
            handle.remove()
        produced[:] = [None] * count
    return BlockInputs(list(blocks), calls, hidden, masks, outputs)


@torch.no_grad()
def propagate(
    model: nn.Module, inputs: BlockInputs, index: int, hidden: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """The outputs of block ``index`` (as it is now) for each batch's ``hidden`` input."""
    name = inputs.blocks[index]
    block = get_module(model, name)
    with eval_mode(block):
        return [
            inputs.calls[batch][index].run(block, hidden[batch], name)
            for batch in range(inputs.batches)
        ]


class _PassThrough(nn.Module):
    """Stands in for a block before the starting one: returns its hidden state unchanged,
    in the block's output format; other attributes are read from the block."""

    def __init__(self, block: nn.Module, outputs: int, name: str) -> None:
        super().__init__()
        self.__dict__["_block"] = block
        self._outputs = outputs
        self._name = name

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        key = hidden_slot(args, kwargs, self._name)
        state = args[0] if key is None else kwargs[key]
        return state if self._outputs == 0 else (state, *([None] * (self._outputs - 1)))

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["_block"], name)


@contextlib.contextmanager
def starting_at(
    model: nn.Module, inputs: BlockInputs, index: int, hidden: Sequence[torch.Tensor]
) -> Iterator[Callable[[int], None]]:
    """Run the model from block ``index`` on, with each batch's cached input.

    Yields ``select(batch)``: call it before running batch ``batch`` through the model
    (with its own forward); block ``index`` then gets ``hidden[batch]`` instead of what
    the (passed-through) blocks before it return.
    """
    chosen = [0]
    name = inputs.blocks[index]

    def substitute(
        _m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        state = hidden[chosen[0]]
        key = hidden_slot(args, kwargs, name)
        if key is None:
            return (state, *args[1:]), kwargs
        return args, {**kwargs, key: state}

    def select(batch: int) -> None:
        chosen[0] = batch

    originals: list[tuple[str, nn.Module]] = []
    handle = get_module(model, name).register_forward_pre_hook(substitute, with_kwargs=True)
    try:
        for before in range(index):
            block_name = inputs.blocks[before]
            block = get_module(model, block_name)
            stand_in = _PassThrough(block, inputs.outputs[before], block_name)
            originals.append((block_name, replace_module(model, block_name, stand_in)))
        yield select
    finally:
        handle.remove()
        for block_name, block in reversed(originals):
            replace_module(model, block_name, block)


__all__ = [
    "AUTO",
    "BlockCall",
    "BlockInputs",
    "block_index",
    "capture_inputs",
    "find_blocks",
    "hidden_of",
    "hidden_slot",
    "propagate",
    "starting_at",
]
