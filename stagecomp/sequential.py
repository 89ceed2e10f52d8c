"""Memory-bounded calibration: statistics one block at a time, from cached block inputs.

Hooking every layer of a large model at once keeps every layer's second moments (and,
for ``"gradient"``, every layer's output and the whole autograd graph) alive together:
on a 97M-parameter Llama-like model 1.9x the model for ``"whiten"`` and 9x for
``"gradient"``. Here the inputs of the blocks (transformer layers) are cached once and
each block's statistics come from running that block alone (the SVD-LLM pipeline):

- ``SequentialStatistics`` serves a Compressor. It keeps the inputs of one block per
  batch; a step over a block's layers runs that block on them, and the next step first
  moves the cache on through the block as it now is, compressed, so input and output
  moments are the ones the unbounded path would collect on the model at that step.
  Gradient moments need the gradient at the block's output, which depends on every
  block after it: the first step that needs them takes every block's output gradient
  (per batch and probe) in one sweep, last block to first, as ``sweep_statistics``
  does, and keeps those of every other block (in ``DELTA_DTYPE``: half the memory
  of keeping all, in float32 a quarter); each later step backpropagates its block's
  kept gradients through that block alone, or the next block's through both (the
  next run on what this one returns now), run on its current inputs. So the first
  block's moments (and the last two blocks', which run to the output) are exact, and
  a block in between gets the gradients through the blocks after it as they were
  before the blocks before it were compressed: the SVD-LLM approximation, which costs
  one sweep plus one or two blocks per step (against ``(N + 1) / 2``
  forward-and-backward passes over the model for ``N`` blocks when each step
  backpropagated from the model's output). On a tiny random Llama-like model at 2x
  fewer parameters per block, those moments are within 10% (Frobenius, relative) of
  the exact ones.
  The cache is taken again, by one forward pass, when anything before the cached block
  changed since (a fine-tuning step between compression steps), or a step goes back to
  an earlier block; the kept gradients are taken again by a new sweep then, and when
  anything but the blocks compressed so far changed (a block ahead was fine-tuned).
- ``sweep_statistics`` serves ``allocate_ranks``, which measures the model as it is and
  changes nothing: it caches every block's inputs, then walks the blocks from the last
  to the first, backpropagating each probe's output gradient one block at a time (the
  gradient at a block's input is the next one's output gradient), so every layer's
  gradient moment costs one forward and ``probes`` backward passes over the model in
  all, while only one block's moments are alive.

Peak memory is the model, the cached hidden states (tokens x hidden per batch, per block
for the sweeps), the kept output gradients (tokens x hidden per batch, probe and block
ahead), one block's moments and one batch's autograd graph through one block.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from stagecomp.blocks import (
    BlockCall,
    BlockInputs,
    block_index,
    capture_inputs,
    propagate,
    starting_at,
)
from stagecomp.calibration import (
    GRADIENT_PROBES,
    Forward,
    LayerStatistics,
    MaskFn,
    OutputFn,
    collect_gradient_moments,
    collect_statistics,
    gradient_dtype,
    gradients_only_from,
    main_output,
    output_probe,
    run_batch,
    sample_rows,
)
from stagecomp.layer_shape import LayerShape
from stagecomp.memory import release_free_memory
from stagecomp.surgery import eval_mode, get_module

logger = logging.getLogger(__name__)

DELTA_DTYPE = torch.bfloat16
"""How ``SequentialStatistics`` keeps the output gradients of the blocks ahead: half
the memory of float32; against float32 it moves the gradient moments by 0.15% at most
(Frobenius, relative; the 25M-parameter model of bench_lm.py, blocks 1-2), far below
what the approximation itself moves them (5-10% on a tiny random model)."""


def _fingerprint(model: nn.Module, after: Sequence[str]) -> tuple[Any, ...]:
    """What the inputs of the first of ``after`` depend on: every parameter and buffer
    outside those blocks, by identity, in-place version and content sum."""
    prefixes = tuple(name + "." for name in after)
    items = []
    tensors = [*model.named_parameters(), *model.named_buffers()]
    with torch.no_grad():
        for name, tensor in tensors:
            if name.startswith(prefixes):
                continue
            total = float(tensor.sum(dtype=torch.float64)) if tensor.is_floating_point() else 0.0
            items.append((name, id(tensor), tensor._version, tensor.data_ptr(), total))
    return tuple(items)


@dataclass
class _Replay:
    """One batch's cached call of a block, as a batch for ``collect_statistics``."""

    call: BlockCall
    hidden: torch.Tensor
    mask: torch.Tensor | None


def _replays(inputs: BlockInputs, index: int, hidden: Sequence[torch.Tensor]) -> list[_Replay]:
    return [
        _Replay(inputs.calls[batch][index], hidden[batch], inputs.masks[batch])
        for batch in range(inputs.batches)
    ]


def _replay(block: nn.Module, replay: _Replay) -> torch.Tensor:
    return replay.call.run(block, replay.hidden)


def _replay_mask(replay: _Replay) -> torch.Tensor | None:
    return replay.mask


def _block_input_statistics(
    model: nn.Module,
    inputs: BlockInputs,
    index: int,
    hidden: Sequence[torch.Tensor],
    names: Sequence[str],
    outputs: Sequence[str],
    progress: bool,
) -> dict[str, LayerStatistics]:
    """Input (and output) moments of layers of block ``index``, from its cached inputs."""
    prefix = inputs.blocks[index] + "."
    block = get_module(model, inputs.blocks[index])
    local = [n[len(prefix) :] for n in names]
    found = collect_statistics(
        block,
        _replays(inputs, index, hidden),
        local,
        outputs=[n[len(prefix) :] for n in outputs if n in names],
        forward=_replay,
        progress=progress,
        mask=_replay_mask,
    )
    return {prefix + n: stats for n, stats in found.items()}


class SequentialStatistics:
    """The statistics of a Compressor's steps, block by block (see the module docstring).

    Args:
        model: The model being compressed (left as it was: blocks are replaced only
            while a gradient pass runs).
        batches: The calibration batches (kept as a list: each is fed again with its
            cached block inputs).
        blocks: The block names, in order (``stagecomp.blocks.find_blocks``).
        forward, output, mask: As for ``stagecomp.Calibration``.
    """

    def __init__(
        self,
        model: nn.Module,
        batches: Sequence[Any],
        blocks: Sequence[str],
        *,
        forward: Forward | None = None,
        output: OutputFn | None = None,
        mask: MaskFn | None = None,
    ) -> None:
        self.model = model
        self.batches = list(batches)
        self.blocks = list(blocks)
        self.forward, self.output, self.mask = forward, output, mask
        self._inputs: BlockInputs | None = None
        self._index = -1
        self._hidden: list[torch.Tensor] = []
        self._fingerprint: tuple[Any, ...] | None = None
        # Kept output gradients: ``_deltas[block][batch][probe]`` (DELTA_DTYPE), for the
        # blocks after the last one collected (``_delta_after``), and what the model
        # outside the blocks collected so far looked like when they were taken.
        self._deltas: dict[int, list[list[torch.Tensor | None]]] = {}
        self._delta_after = -1
        self._delta_mark: tuple[Any, ...] | None = None

    def block_of(self, name: str) -> int | None:
        """The index of the block holding ``name``, or None."""
        return block_index(self.blocks, name)

    def _cache_valid(self, index: int) -> bool:
        """Whether the cached inputs can be moved on to block ``index``: nothing before
        the cached block changed since, and ``index`` is not behind it."""
        return (
            self._inputs is not None
            and self._index <= index
            and self._fingerprint == _fingerprint(self.model, self.blocks[self._index :])
        )

    def _keep(self, inputs: BlockInputs, index: int) -> None:
        """Make ``inputs`` the cache, at block ``index`` (its other hidden states freed)."""
        self._inputs, self._index = inputs, index
        self._hidden = [h for h in inputs.hidden[index] if h is not None]
        inputs.hidden = [[] for _ in self.blocks]
        release_free_memory()

    def _at(self, index: int, progress: bool) -> BlockInputs:
        """The cache moved to block ``index``: moved on through the blocks as they are now
        when it is still valid, else taken again."""
        inputs = self._inputs
        if not self._cache_valid(index) or inputs is None:
            inputs = capture_inputs(
                self.model,
                self.batches,
                self.blocks,
                keep=lambda i: i == index,
                forward=self.forward,
                mask=self.mask,
                progress=progress,
            )
            self._keep(inputs, index)
        while self._index < index:
            self._hidden = propagate(self.model, inputs, self._index, self._hidden)
            self._index += 1
        self._fingerprint = _fingerprint(self.model, self.blocks[self._index :])
        return inputs

    def _deltas_valid(self, order: Sequence[int]) -> bool:
        """Whether the kept output gradients serve the blocks of ``order``: the cache is
        valid, the steps went forward, and nothing but the blocks collected before (the
        ones the steps compressed) changed since they were taken."""
        return (
            self._cache_valid(order[0])
            and self._delta_after < order[0]
            and all(self._kept_for(i) is not None for i in order)
            and self._delta_mark == _fingerprint(self.model, self.blocks[: self._delta_after + 1])
        )

    def _kept_for(self, index: int) -> tuple[list[list[torch.Tensor | None]] | None, int] | None:
        """The kept output gradients block ``index`` starts from and how many blocks after
        it they were taken after (None and 0: the last two blocks start from the model's
        output), or None when there are none."""
        if index >= len(self.blocks) - 2:
            return None, 0
        for through in (0, 1):
            if index + through in self._deltas:
                return self._deltas[index + through], through
        return None

    def _keeps(self, index: int, after: int) -> bool:
        """Whether a sweep keeps the output gradients of block ``index``: every other
        block after ``after``, counted from the last but one (the last two are exact)."""
        last = len(self.blocks) - 1
        return after < index < last - 1 and (last - index) % 2 == 0

    def collect(
        self,
        names: Sequence[str],
        outputs: Sequence[str],
        weighted: Sequence[str],
        *,
        probes: int = GRADIENT_PROBES,
        progress: bool = True,
    ) -> dict[str, LayerStatistics]:
        """Statistics of ``names`` on the model as it is now (output moments for
        ``outputs``, gradient moments for ``weighted``).

        Input and output moments are those of ``collect_statistics`` on the whole model.
        Gradient moments are those of ``collect_gradient_moments`` on the first step
        that needs them (and after the model changed outside the steps); later blocks'
        come from output gradients kept from then (see the module docstring).

        A step whose layers span several blocks sees all of them before any is
        compressed, as the unbounded path does (the cache itself stays at the first)."""
        release_free_memory()  # what the last step's decompositions freed
        by_block: dict[int, list[str]] = {}
        outside: list[str] = []
        for name in names:
            index = self.block_of(name)
            if index is None:
                outside.append(name)
            else:
                by_block.setdefault(index, []).append(name)
        statistics: dict[str, LayerStatistics] = {}
        if outside:
            statistics.update(
                collect_statistics(
                    self.model,
                    self.batches,
                    outside,
                    outputs=[n for n in outputs if n in outside],
                    forward=self.forward,
                    progress=progress,
                    mask=self.mask,
                )
            )
            self._add_gradients(statistics, [n for n in weighted if n in outside], progress)
        if not by_block:
            return statistics
        order = sorted(by_block)
        chosen = {i: [n for n in weighted if n in by_block[i]] for i in order}
        swept: dict[str, torch.Tensor] | None = None
        if any(chosen.values()) and not self._deltas_valid(order):
            swept = self._sweep(order, chosen, probes, progress)
        inputs = self._at(order[0], progress)
        hidden, position = self._hidden, order[0]
        for index in order:
            while position < index:
                hidden = propagate(self.model, inputs, position, hidden)
                position += 1
            statistics.update(
                _block_input_statistics(
                    self.model, inputs, index, hidden, by_block[index], outputs, progress
                )
            )
            if swept is not None:
                _attach(statistics, {n: swept.pop(n) for n in chosen[index] if n in swept})
            elif chosen[index]:
                _attach(
                    statistics,
                    self._kept_gradients(inputs, index, hidden, chosen[index], probes, progress),
                )
            release_free_memory()
        for index in [i for i in self._deltas if i <= order[-1]]:
            del self._deltas[index]
        self._delta_after = order[-1]
        self._delta_mark = _fingerprint(self.model, self.blocks[: order[-1] + 1])
        return statistics

    def _sweep(
        self, order: Sequence[int], chosen: dict[int, list[str]], probes: int, progress: bool
    ) -> dict[str, torch.Tensor]:
        """Take the block inputs again and walk the blocks from the last to ``order[0]``,
        backpropagating each probe one block at a time (as ``sweep_statistics``): the
        gradient moments of the layers of ``order`` (exact), and the output gradients
        of every other block after ``order[-1]`` (``_keeps``), kept for later steps."""
        first, after, last = order[0], order[-1], len(self.blocks) - 1
        self._deltas.clear()
        self._inputs = None
        inputs = capture_inputs(
            self.model,
            self.batches,
            self.blocks,
            keep=lambda i: i >= first,
            forward=self.forward,
            mask=self.mask,
            progress=progress,
        )
        sweep = self._gradient_sweep(inputs, probes)
        moments: dict[str, torch.Tensor] = {}
        for index in range(last, first - 1, -1):
            if self._keeps(index, after) and sweep.delta is not None:
                self._deltas[index] = [
                    [None if d is None else d.to(DELTA_DTYPE) for d in per_batch]
                    for per_batch in sweep.delta
                ]
            hidden = [h for h in inputs.hidden[index] if h is not None]
            names = chosen.get(index, [])
            moments.update(sweep.step(index, hidden, names, progress, to_input=index > first))
            if index > first:
                inputs.hidden[index] = []
            release_free_memory()
        self._keep(inputs, first)
        self._fingerprint = _fingerprint(self.model, self.blocks[first:])
        return moments

    def _gradient_sweep(self, inputs: BlockInputs, probes: int) -> _GradientSweep:
        """A sweep over ``inputs`` with this calibration's forward, output and seed."""
        return _GradientSweep(
            self.model,
            self.batches,
            inputs,
            self.forward,
            self.output or main_output,
            probes,
            seed=0,
        )

    def _kept_gradients(
        self,
        inputs: BlockInputs,
        index: int,
        hidden: Sequence[torch.Tensor],
        names: Sequence[str],
        probes: int,
        progress: bool,
    ) -> dict[str, torch.Tensor]:
        """Gradient moments of ``names`` in block ``index``: its kept output gradients
        (or the next block's, that block run too on what this one returns now)
        backpropagated through it, run on its current inputs. The last two blocks run
        to the model's output: exact."""
        kept = self._kept_for(index)
        sweep = self._gradient_sweep(inputs, probes)
        if kept is not None:
            sweep.delta, sweep.through = kept
        return sweep.step(index, hidden, names, progress, to_input=False)

    def _add_gradients(
        self, statistics: dict[str, LayerStatistics], names: Sequence[str], progress: bool
    ) -> None:
        """Gradient moments of ``names``, layers outside every block, on the whole model."""
        if not names:
            return
        moments = collect_gradient_moments(
            self.model,
            self.batches,
            names,
            forward=self.forward,
            output=self.output,
            progress=progress,
            mask=self.mask,
        )
        for name, moment in moments.items():
            statistics[name].gradient_moment = moment


def sweep_statistics(
    model: nn.Module,
    batches: Sequence[Any],
    names: Sequence[str],
    blocks: Sequence[str],
    *,
    gradients: bool,
    forward: Forward | None = None,
    output: OutputFn | None = None,
    mask: MaskFn | None = None,
    probes: int = GRADIENT_PROBES,
    seed: int = 0,
    progress: bool = True,
) -> Iterator[tuple[BlockInputs, int | None, dict[str, LayerStatistics]]]:
    """Statistics of ``names`` on the unchanged model, one block at a time, last block first.

    Yields ``(inputs, block, statistics)``: the cached block inputs, the block's index
    (None for the layers outside every block, yielded first) and the statistics of its
    named layers, with gradient moments when ``gradients`` (the same numbers as
    ``collect_gradient_moments`` with the same ``seed``; layers no gradient reaches have
    none). Only one block's statistics are alive at a time when the caller drops them.
    """
    by_block: dict[int, list[str]] = {}
    outside: list[str] = []
    for name in names:
        index = block_index(blocks, name)
        if index is None:
            outside.append(name)
        else:
            by_block.setdefault(index, []).append(name)
    first = min(by_block) if by_block else len(blocks)
    inputs = capture_inputs(
        model,
        batches,
        blocks,
        keep=lambda i: i >= first,
        forward=forward,
        mask=mask,
        progress=progress,
    )
    release_free_memory()
    if outside:
        stats = collect_statistics(
            model, batches, outside, forward=forward, progress=progress, mask=mask
        )
        if gradients:
            moments = collect_gradient_moments(
                model,
                batches,
                outside,
                forward=forward,
                output=output,
                probes=probes,
                seed=seed,
                progress=progress,
                mask=mask,
            )
            for name, moment in moments.items():
                stats[name].gradient_moment = moment
        yield inputs, None, stats
    if not by_block:
        return
    sweep = _GradientSweep(model, batches, inputs, forward, output or main_output, probes, seed)
    last = len(blocks) - 1
    for index in range(last, first - 1, -1):
        hidden = [h for h in inputs.hidden[index] if h is not None]
        layers = by_block.get(index, [])
        stats = (
            _block_input_statistics(model, inputs, index, hidden, layers, [], progress)
            if layers
            else {}
        )
        if gradients:
            release_free_memory()  # what running the block for the input moments left
            # Attached in a call, so that only the caller holds this block's moments.
            _attach(stats, sweep.step(index, hidden, layers, progress))
        release_free_memory()
        if layers:
            yield inputs, index, stats
        inputs.hidden[index] = []  # this block's inputs are not needed again
        release_free_memory()  # and neither is what the caller freed


def _attach(stats: dict[str, LayerStatistics], moments: dict[str, torch.Tensor]) -> None:
    for name, moment in moments.items():
        stats[name].gradient_moment = moment


class _GradientSweep:
    """Backpropagates each probe's output gradient block by block, last to first.

    ``delta[batch][probe]`` is the gradient of ``r . f`` with respect to the output of
    the block handled next (its input's gradient after ``step``), or, with ``through``
    set, of the block that many blocks after it (``step`` then runs those too).
    """

    def __init__(
        self,
        model: nn.Module,
        batches: Sequence[Any],
        inputs: BlockInputs,
        forward: Forward | None,
        pick: OutputFn,
        probes: int,
        seed: int,
    ) -> None:
        self.model, self.batches, self.inputs = model, batches, inputs
        self.forward, self.pick, self.probes = forward, pick, probes
        self.generator = torch.Generator().manual_seed(seed)
        self.delta: list[list[torch.Tensor | None]] | None = None
        self.through = 0  # how many blocks after the one handled ``delta`` is taken after

    def step(
        self,
        index: int,
        hidden: Sequence[torch.Tensor],
        names: Sequence[str],
        progress: bool,
        to_input: bool = True,
    ) -> dict[str, torch.Tensor]:
        """Gradient moments of ``names`` in block ``index``; moves ``delta`` to its input
        (to None when not ``to_input``: the last block to run needs no input gradient)."""
        block_name = self.inputs.blocks[index]
        modules = {n: get_module(self.model, n) for n in names}
        shapes = {n: LayerShape.from_module(m, n) for n, m in modules.items()}
        captured: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        handles = [
            module.register_forward_hook(lambda _m, _i, out, n=n: captured[n].append(out))
            for n, module in modules.items()
        ]
        sums: dict[str, torch.Tensor] = {}
        deltas: list[list[torch.Tensor | None]] = []
        try:
            with eval_mode(self.model), gradients_only_from(self.model, []):
                for batch in tqdm(
                    range(self.inputs.batches), desc=f"gradients {block_name}", disable=not progress
                ):
                    for values in captured.values():
                        values.clear()
                    start = hidden[batch].detach().clone().requires_grad_(True)
                    deltas.append(
                        self._batch(index, batch, start, names, captured, shapes, sums, to_input)
                    )
                    if to_input and self.delta is not None:
                        self.delta[batch] = []  # replaced by this block's input gradient
                    release_free_memory()  # this batch's graph, before the next one's
        finally:
            for handle in handles:
                handle.remove()
            for values in captured.values():
                values.clear()
        self.delta = deltas if to_input else None
        count = self.inputs.batches * self.probes
        for name in names:
            if name not in sums:
                logger.info("layer %r: no gradient of the model's output reaches it", name)
        return {n: sums[n] / count for n in names if n in sums}

    def _batch(
        self,
        index: int,
        batch: int,
        start: torch.Tensor,
        names: Sequence[str],
        captured: dict[str, list[torch.Tensor]],
        shapes: dict[str, LayerShape],
        sums: dict[str, torch.Tensor],
        to_input: bool,
    ) -> list[torch.Tensor | None]:
        mask = self.inputs.masks[batch]
        with torch.enable_grad():
            if self.delta is None:
                # The last block: run the model from it to its output.
                with starting_at(self.model, self.inputs, index, [start]) as select:
                    select(0)
                    final = self.pick(run_batch(self.model, self.batches[batch], self.forward))
                seeds: list[torch.Tensor | None] = [
                    output_probe(final, self.generator, mask) for _ in range(self.probes)
                ]
                target = final
            else:
                target = start
                for block in range(index, index + self.through + 1):
                    call = self.inputs.calls[batch][block]
                    target = call.run(get_module(self.model, self.inputs.blocks[block]), target)
                seeds = self.delta[batch]
            outs = [o for n in names for o in captured[n]]
            owners = [n for n in names for _ in captured[n]]
            result: list[torch.Tensor | None] = []
            for probe, seed in enumerate(seeds):
                if seed is None or not target.requires_grad:
                    result.append(None)
                    continue
                if self.delta is None:
                    # A random projection of the model's output (as collect_gradient_moments).
                    scalar, gradient = (target * seed).sum(), None
                else:
                    # The gradient at this block's output, from the block after it.
                    scalar, gradient = target, seed.to(target.dtype)
                wanted = [*outs, start] if to_input else outs
                if not wanted:
                    result.append(None)
                    continue
                grads = torch.autograd.grad(
                    scalar,
                    wanted,
                    grad_outputs=gradient,
                    retain_graph=probe + 1 < len(seeds),
                    allow_unused=True,
                )
                for name, grad in zip(owners, grads[: len(outs)], strict=True):
                    if grad is None:
                        continue
                    rows = sample_rows(
                        grad,
                        shapes[name],
                        shapes[name].out_channels,
                        name,
                        mask,
                        gradient_dtype(grad),
                    )
                    if name not in sums:
                        sums[name] = rows.T @ rows
                    else:
                        sums[name].addmm_(rows.T, rows)
                tail = grads[-1] if to_input else None
                result.append(None if tail is None else tail.detach())
        return result


__all__ = ["SequentialStatistics", "sweep_statistics"]
