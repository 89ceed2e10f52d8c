"""Compression under torch.distributed: shared steps, identical ranks, checks.

Two uses. Under DDP every rank must hold the same model after a compression
step, so the step either runs identically everywhere or is computed once and
broadcast. And decomposing a large model is work several processes can share:
:func:`shared_step` gives each rank a share of a step's layers (balanced by an
estimate of their cost), then every decomposed layer is sent from the rank
that computed it to all others, so all ranks end with the same modules.

Nothing here starts or configures a process group; the caller does, as for DDP.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from stagecomp.changes import LayerChange
from stagecomp.errors import DistributedError, StagecompError
from stagecomp.layer_shape import LayerShape
from stagecomp.layers.base import DecomposedLayer
from stagecomp.options import DecomposeOptions
from stagecomp.recipe import apply_recipe, layer_entry, undo_recipe
from stagecomp.surgery import get_module, replace_module

logger = logging.getLogger(__name__)

ProcessGroup = Any
"""A ``torch.distributed`` process group, or ``None`` for the default group."""


def is_distributed(group: ProcessGroup = None) -> bool:
    """True when a process group is initialised with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def use_distributed(distributed: bool | None, group: ProcessGroup = None) -> bool:
    """Resolve the Compressor's ``distributed`` option (None: automatic).

    Raises:
        StagecompError: ``distributed=True`` without an initialised process group.
    """
    if distributed is None:
        return is_distributed(group)
    if distributed and not (dist.is_available() and dist.is_initialized()):
        raise StagecompError(
            "distributed=True needs an initialised process group "
            "(torch.distributed.init_process_group); allowed without one: False or None"
        )
    return bool(distributed) and dist.get_world_size(group) > 1


# ---------------------------------------------------------------------- checks
def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes()


def parameters_digest(module: nn.Module) -> dict[str, str]:
    """SHA-256 of every parameter and buffer (name, dtype, shape and exact bits).

    Equal digests mean bit-identical tensors, which ``torch.allclose`` cannot
    tell apart from nearly equal ones.
    """
    digests: dict[str, str] = {}
    for name, tensor in module.state_dict().items():
        h = hashlib.sha256(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
        h.update(_tensor_bytes(tensor))
        digests[name] = h.hexdigest()
    return digests


def assert_same_parameters(module: nn.Module, group: ProcessGroup = None) -> None:
    """Raise on every rank unless all ranks hold bit-identical parameters and buffers.

    A collective: every rank of ``group`` must call it. Use it after a
    compression step or a fine-tune to prove that the ranks did not drift.

    Raises:
        DistributedError: naming the ranks and the first tensors that differ.
    """
    mine = parameters_digest(module)
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, mine, group=group)
    reference = gathered[0]
    problems = []
    for rank, digests in enumerate(gathered[1:], start=1):
        if digests == reference:
            continue
        names = sorted(set(reference) ^ set(digests)) or [
            n for n in reference if reference[n] != digests[n]
        ]
        problems.append(f"rank {rank} differs from rank 0 in {', '.join(names[:5])}")
    if problems:
        raise DistributedError(
            "the ranks do not hold the same parameters: "
            + "; ".join(problems)
            + " (expected bit-identical tensors on every rank)"
        )


@torch.no_grad()
def broadcast_module_(module: nn.Module, src: int = 0, group: ProcessGroup = None) -> nn.Module:
    """Copy rank ``src``'s parameters and buffers into ``module`` on every rank, in place.

    For models that are not wrapped in DDP (whose constructor already does this).
    Tensors stay on their device, so it works with gloo (CPU) and nccl (CUDA).
    """
    _broadcast_tensors(list(module.state_dict().values()), src, group)
    return module


def _broadcast_tensors(tensors: Sequence[torch.Tensor], src: int, group: ProcessGroup) -> None:
    for tensor in tensors:
        if tensor.is_contiguous():
            dist.broadcast(tensor, src=_global_rank(src, group), group=group)
        else:
            buffer = tensor.contiguous()
            dist.broadcast(buffer, src=_global_rank(src, group), group=group)
            tensor.copy_(buffer)


def _global_rank(rank: int, group: ProcessGroup) -> int:
    return rank if group is None else dist.get_global_rank(group, rank)


# ---------------------------------------------------------------------- sharing
def layer_cost(shape: LayerShape) -> int:
    """Rough cost of decomposing a layer: an SVD of its ``m x n`` unfolding, ``m n min(m, n)``."""
    rows = shape.out_per_group
    cols = shape.in_per_group * shape.kernel_numel
    return shape.groups * rows * cols * min(rows, cols)


def assign_layers(costs: Sequence[float], world_size: int) -> list[int]:
    """The rank that computes each item: largest cost first, to the least loaded rank.

    Deterministic (ties go to the earlier item and the lower rank), so every rank
    computes the same assignment without talking to the others.
    """
    if world_size < 1:
        raise StagecompError(f"world_size={world_size} is not allowed; expected >= 1")
    load = [0.0] * world_size
    owner = [0] * len(costs)
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owner[index] = rank
        load[rank] += costs[index]
    return owner


Compress = Callable[[int, Any], "tuple[LayerChange, nn.Module | None]"]


def shared_step(
    model: nn.Module,
    chunk: Sequence[tuple[int, Any]],
    compress: Compress,
    *,
    options: DecomposeOptions,
    step: int,
    desc: str = "stagecomp step",
    progress: bool = True,
    group: ProcessGroup = None,
) -> tuple[list[LayerChange], dict[str, tuple[nn.Module, nn.Module]]]:
    """Run one compression step with its layers shared among the ranks of ``group``.

    Each rank decomposes its share (``compress(stage, target)``, as in a single
    process), then the ranks exchange what they did; if any rank failed, every
    rank puts its model back as it was and raises. Otherwise each new layer's
    recipe entry and tensors go from the rank that computed it to all others,
    which build the empty layer from the recipe and receive the weights.

    Returns:
        The changes in plan order and ``{name: (old, new)}`` of the replaced layers.

    Raises:
        DistributedError: on the ranks where nothing failed, when another rank
            failed (naming it, the layer and the error), or when the ranks
            disagree on the step.
    """
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    names = [target.name for _, target in chunk]
    # Agree on the step before any work: a rank with other arguments would mix models.
    plans: list[Any] = [None] * world
    dist.all_gather_object(plans, (step, names), group=group)
    if any(plan != (step, names) for plan in plans):
        raise DistributedError(
            f"the ranks disagree on step {step}: "
            + "; ".join(f"rank {r}: step {s} {n}" for r, (s, n) in enumerate(plans))
            + " (expected the same Compressor arguments, model and progress on every rank)"
        )
    # One layer may appear twice in a step (two stages in one step): keep it on one rank.
    first = {name: names.index(name) for name in names}
    costs = [0.0] * len(chunk)
    for name in names:
        shape = LayerShape.from_module(get_module(model, name), name)
        costs[first[name]] += float(layer_cost(shape))
    owner_of_first = assign_layers(costs, world)
    owners = [owner_of_first[first[name]] for name in names]

    replaced_here: list[tuple[str, nn.Module, nn.Module]] = []
    built: list[tuple[str, nn.Module]] = []
    try:
        local: dict[int, tuple[dict[str, Any], dict[str, Any] | None, list[str]]] = {}
        error: tuple[str, str] | None = None
        local_error: Exception | None = None
        mine = [i for i, o in enumerate(owners) if o == rank]
        bar = tqdm(mine, desc=f"{desc} (rank {rank})", disable=not progress, leave=False)
        try:
            for index in bar:
                stage, target = chunk[index]
                bar.set_postfix_str(target.name, refresh=False)
                try:
                    change, new = compress(stage, target)
                except Exception as exc:
                    error = (target.name, f"{type(exc).__name__}: {exc}")
                    for name, old, _ in reversed(replaced_here):
                        replace_module(model, name, old)
                    replaced_here.clear()
                    local_error = exc
                    break
                entry, signature = None, []
                if new is not None:
                    replaced_here.append(
                        (target.name, replace_module(model, target.name, new), new)
                    )
                    entry, signature = layer_entry(new), _signature(new)  # type: ignore[arg-type]
                local[index] = (change.to_dict(), entry, signature)
        finally:
            bar.close()

        # Every rank reports, even a failed one, so no rank waits forever for another.
        report = {"error": error, "local": local}
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, report, group=group)
        failures = [(r, g["error"]) for r, g in enumerate(gathered) if g["error"] is not None]
        if failures:
            for name, old, _ in reversed(replaced_here):
                replace_module(model, name, old)
            if local_error is not None:
                raise local_error
            failed_rank, (layer, message) = failures[0]
            raise DistributedError(
                f"step {step} failed on rank {failed_rank} at layer {layer!r}: {message}; "
                "every rank left its model as it was before the step"
            )

        # Owners' results, in plan order.
        results: list[tuple[dict[str, Any], dict[str, Any] | None, list[str]]] = [
            gathered[owners[i]]["local"][i] for i in range(len(chunk))
        ]
        # The last new module of each layer is what the model holds after the step.
        final_index = {name: i for i, name in enumerate(names) if results[i][1] is not None}
        try:
            for name, index in final_index.items():
                _, entry, signature = results[index]
                if entry is None or owners[index] == rank:
                    continue
                built += _build_from_entry(model, name, entry, options)
                if _signature(get_module(model, name)) != signature:
                    raise DistributedError(
                        f"layer {name!r} built from its recipe has tensors "
                        f"{_signature(get_module(model, name))}, but rank {owners[index]} "
                        f"computed {signature}; expected the same names, shapes and dtypes"
                    )
            build_error = None
        except StagecompError as exc:
            undo_recipe(model, built)
            built = []
            build_error = f"{type(exc).__name__}: {exc}"
        errors: list[Any] = [None] * world
        dist.all_gather_object(errors, build_error, group=group)
        if any(e is not None for e in errors):
            undo_recipe(model, built)
            for name, old, _ in reversed(replaced_here):
                replace_module(model, name, old)
            failed = next(r for r, e in enumerate(errors) if e is not None)
            raise DistributedError(
                f"step {step}: rank {failed} could not rebuild a layer from its recipe: "
                f"{errors[failed]}; every rank left its model as it was before the step"
            )

        for name, index in final_index.items():
            tensors = list(get_module(model, name).state_dict().values())
            _broadcast_tensors(tensors, owners[index], group)

        # Old and new module per replaced layer: the module before the step, the one after.
        replaced: dict[str, tuple[nn.Module, nn.Module]] = {}
        originals = {name: old for name, old in built}
        for name, old, _ in replaced_here:
            originals.setdefault(name, old)
        for name in final_index:
            replaced[name] = (originals[name], get_module(model, name))
        changes = [LayerChange.from_dict(change) for change, _, _ in results]
        logger.debug(
            "step %d: rank %d decomposed %d of %d layers", step, rank, len(mine), len(chunk)
        )
        return changes, replaced
    except BaseException:
        # Whatever fails (a KeyboardInterrupt while receiving tensors too), the step is
        # one unit: put back every layer this rank swapped. Putting a module back is
        # idempotent, so the paths above that already did it are not hurt.
        undo_recipe(model, built)
        for name, old, _ in reversed(replaced_here):
            replace_module(model, name, old)
        raise


def _signature(module: nn.Module) -> list[str]:
    """Name, shape and dtype of every tensor a layer's broadcast sends, in order."""
    return [f"{k}:{tuple(v.shape)}:{v.dtype}" for k, v in module.state_dict().items()]


def _build_from_entry(
    model: nn.Module, name: str, entry: dict[str, Any], options: DecomposeOptions
) -> list[tuple[str, nn.Module]]:
    """Replace ``name`` by an empty layer of ``entry``, matched to the module it replaces."""
    old = get_module(model, name)
    built = apply_recipe(model, {name: entry}, options)
    new = get_module(model, name)
    if isinstance(new, DecomposedLayer):
        new.take_requires_grad(old)
    return built


__all__ = [
    "assert_same_parameters",
    "assign_layers",
    "broadcast_module_",
    "is_distributed",
    "layer_cost",
    "parameters_digest",
    "shared_step",
    "use_distributed",
]
