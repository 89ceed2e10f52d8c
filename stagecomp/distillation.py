"""Local knowledge distillation: a step's new layers learn what the layers they replaced computed.

A decomposition fits the weight (or, data-aware, the layer's output on its inputs) in one
closed form. It does not see the nonlinearities after the layer, nor that the layers
decomposed earlier in the same step changed the inputs. A short training run on real
calibration inputs, without labels, repairs part of both: each new layer (or each block
holding new layers) is trained to reproduce the replaced layer's (block's) output, with
the relative mean squared error as the loss. Only the new layers' parameters change.

Each iteration takes one calibration batch, runs the model only as far as the last
layer (block) being trained (``stagecomp.capture``), and trains all of the step's new
layers on what they received. Memory stays at the model plus one batch of those layers'
activations; the replaced modules of the step (which the step holds anyway for its
rollback) give the targets, never a copy of the model.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from stagecomp.calibration import Forward, MaskFn, OutputFn, batch_mask, main_output
from stagecomp.capture import Call, batch_stream, capture, swapped
from stagecomp.changes import LayerChange
from stagecomp.distributed import broadcast_module_
from stagecomp.errors import DistributedError, StagecompError
from stagecomp.matching import check_keys, key_matches
from stagecomp.surgery import eval_mode, get_module

logger = logging.getLogger(__name__)

GRANULARITIES = ("layer", "block")
TARGETS = ("now", "before")


@dataclass(frozen=True)
class LocalDistillation:
    """Train each step's new layers to reproduce the replaced ones (``Calibration(refine=...)``).

    The defaults are a short, cautious run: a data-aware fit is already close to each
    layer's least-squares optimum on the calibration inputs, and larger learning rates
    did not fit the calibration data better but worse: the fit starts near each layer's
    optimum, and Adam's first steps (about lr times each tensor's RMS per entry) overshoot
    it (``docs/howto/data-aware.md`` has the figures). A step whose calibration error
    training raised keeps its fitted factors, with a warning.

    Attributes:
        steps: Training iterations per compression step (one calibration batch each;
            all of the step's new layers train in the same iteration).
        lr: Adam's learning rate relative to each parameter tensor's RMS (``1e-3``: each
            step moves an entry by at most about 0.1% of its tensor's typical size),
            decayed to zero over the steps along a cosine.
        batch_size: Samples drawn from each calibration batch per iteration (every
            tensor of the batch is indexed alike along its first dimension); ``None``
            uses whole batches. Small draws keep the iterations cheap and vary them.
        granularity: ``"layer"``: each new layer against the replaced layer's output;
            ``"block"``: the new layers inside a module matched by ``blocks`` train
            together against that block's output with the replaced layers in it.
        blocks: Names or patterns (``"encoder.layer.*"``, ``"layer1.0"``) of the blocks
            of ``granularity="block"``; a new layer in no matched block trains alone.
            A layer inside two matched blocks belongs to the outer one.
        seed: Seeds the order of the batches and the samples drawn from them.
        target: What the replaced layer (block) is run on to give the target:
            ``"before"``: the inputs the model gave it before this step (a second partial
            forward with the replaced layers put back), so a new layer also makes up
            for the error of the step's earlier layers; ``"now"``: the inputs it
            receives now, the same as the new layer's.
    """

    steps: int = 50
    lr: float = 1e-3
    batch_size: int | None = 16
    granularity: str = "layer"
    blocks: tuple[str, ...] | None = field(default=None)
    seed: int = 0
    target: str = "before"

    def __post_init__(self) -> None:
        for label, value, low in (("steps", self.steps, 1), ("seed", self.seed, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise StagecompError(
                    f"LocalDistillation {label}={value!r} is not allowed; expected an "
                    f"integer >= {low}"
                )
        lr = self.lr
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 < lr < math.inf:
            raise StagecompError(
                f"LocalDistillation lr={lr!r} is not allowed; expected a finite number > 0"
            )
        size = self.batch_size
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
            raise StagecompError(
                f"LocalDistillation batch_size={size!r} is not allowed; expected an "
                "integer >= 1 or None (whole calibration batches)"
            )
        if self.granularity not in GRANULARITIES:
            raise StagecompError(
                f"LocalDistillation granularity={self.granularity!r} is not allowed; "
                f"expected one of {GRANULARITIES}"
            )
        if self.target not in TARGETS:
            raise StagecompError(
                f"LocalDistillation target={self.target!r} is not allowed; expected one "
                f"of {TARGETS}"
            )
        blocks = self.blocks
        if isinstance(blocks, str):
            blocks = (blocks,)
        if blocks is not None:
            blocks = tuple(blocks)
            if not blocks or not all(isinstance(b, str) and b for b in blocks):
                raise StagecompError(
                    f"LocalDistillation blocks={self.blocks!r} is not allowed; expected "
                    "module names or patterns such as 'encoder.layer.*'"
                )
            object.__setattr__(self, "blocks", blocks)
        if (self.granularity == "block") != (blocks is not None):
            raise StagecompError(
                f"LocalDistillation granularity={self.granularity!r} with blocks="
                f"{self.blocks!r} is not allowed: granularity='block' needs blocks= (the "
                "names or patterns of the blocks), granularity='layer' takes none"
            )

    def check_model(self, model: nn.Module) -> None:
        """Raise ``NoMatchingLayerError`` when a block name or pattern matches no module."""
        if self.blocks is not None:
            names = [n for n, _ in model.named_modules() if n]
            check_keys(self.blocks, names, "LocalDistillation blocks")

    def to_dict(self) -> dict[str, Any]:
        """JSON description (``from_dict`` reads it back)."""
        return {
            "steps": self.steps,
            "lr": self.lr,
            "batch_size": self.batch_size,
            "granularity": self.granularity,
            "blocks": None if self.blocks is None else list(self.blocks),
            "seed": self.seed,
            "target": self.target,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LocalDistillation:
        """The settings ``to_dict`` wrote."""
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise StagecompError(
                f"LocalDistillation has no setting {unknown[0]!r}; allowed: "
                f"{sorted(cls.__dataclass_fields__)}"
            )
        values = dict(data)
        if values.get("blocks") is not None:
            values["blocks"] = tuple(values["blocks"])
        return cls(**values)


@dataclass
class _Unit:
    """What one loss compares: a layer, or a block with the new layers inside it."""

    name: str
    layers: list[str]


def _units(model: nn.Module, names: Sequence[str], settings: LocalDistillation) -> list[_Unit]:
    """The step's new layers grouped by the outermost matched block holding them."""
    blocks: list[str] = []
    if settings.blocks is not None:
        blocks = [
            n
            for n, _ in model.named_modules()
            if n and any(key_matches(k, n) for k in settings.blocks)
        ]
    units: dict[str, _Unit] = {}
    for name in names:
        holders = [b for b in blocks if name.startswith(b + ".")]
        owner = min(holders, key=len) if holders else name
        units.setdefault(owner, _Unit(owner, [])).layers.append(name)
    return list(units.values())


class _Targets:
    """The replaced layers' (blocks') outputs for one batch, as ``settings.target`` says."""

    def __init__(
        self,
        model: nn.Module,
        units: Sequence[_Unit],
        previous: Mapping[str, nn.Module],
        settings: LocalDistillation,
        forward: Forward | None,
        pick: OutputFn,
        mask: MaskFn | None = None,
    ) -> None:
        self.model, self.units, self.previous = model, units, previous
        self.before = settings.target == "before"
        self.forward, self.pick, self.mask = forward, pick, mask

    @torch.no_grad()
    def compute(self, batch: Any, calls: Mapping[str, Call]) -> dict[str, torch.Tensor]:
        names = [u.name for u in self.units]
        if self.before:
            with swapped(self.model, self.previous):
                outputs = capture(self.model, batch, names, outputs=True, forward=self.forward)
            return {n: self.pick(out) for n, out in outputs.items()}
        targets = {}
        for unit in self.units:
            with swapped(self.model, {n: self.previous[n] for n in unit.layers}):
                module = get_module(self.model, unit.name)
                targets[unit.name] = self.pick(calls[unit.name](module))
        return targets


def _relative_error(output: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``sum((y - t)^2)`` (differentiable) and ``sum(t^2)``, in float32 or wider."""
    dtype = torch.promote_types(output.dtype, torch.float32)
    diff = output.to(dtype) - target.to(dtype)
    return diff.square().sum(), float(target.to(dtype).square().sum())


class CalibrationLike(Protocol):
    """What ``refine_step`` reads of a ``stagecomp.Calibration`` (which imports this module)."""

    @property
    def batches(self) -> Iterable[Any]: ...
    @property
    def forward(self) -> Forward | None: ...
    @property
    def output(self) -> OutputFn | None: ...
    @property
    def refine(self) -> LocalDistillation | None: ...
    @property
    def mask(self) -> MaskFn | None: ...


def refine_step(
    model: nn.Module,
    calibration: CalibrationLike,
    replaced: Mapping[str, nn.Module],
    previous: Mapping[str, nn.Module],
    changes: Sequence[LayerChange],
    *,
    progress: bool = True,
    distributed: bool = False,
) -> None:
    """Train the step's new layers (``replaced``, already in ``model``) to reproduce the
    modules they replaced (``previous``), and record their errors before and after in
    ``changes`` (``refined_error_before`` / ``refined_error_after``).

    Under ``distributed`` every rank trains identically (same statistics, batches and
    seed), then rank 0's layers are broadcast so the ranks stay bit-identical even on
    kernels that are not; a failure on any rank raises on every rank.
    """
    settings = calibration.refine
    if settings is None or not replaced:
        return
    batches, forward, output = calibration.batches, calibration.forward, calibration.output
    # Padded positions are not samples: the loss and the errors skip them, as the
    # calibration statistics do (a dict batch's attention_mask, or Calibration(mask=...)).
    io = (forward, output, calibration.mask)
    if distributed:
        _refine_everywhere(model, replaced, previous, changes, settings, batches, io, progress)
    else:
        _refine(model, replaced, previous, changes, settings, batches, io, progress)


def _refine_everywhere(
    model: nn.Module,
    replaced: Mapping[str, nn.Module],
    previous: Mapping[str, nn.Module],
    changes: Sequence[LayerChange],
    settings: LocalDistillation,
    batches: Any,
    io: tuple[Forward | None, OutputFn | None, MaskFn | None],
    progress: bool,
) -> None:
    error: str | None = None
    try:
        _refine(model, replaced, previous, changes, settings, batches, io, progress)
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
        local: Exception | None = exc
    else:
        local = None
    errors: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    failed = [(r, e) for r, e in enumerate(errors) if e is not None]
    if failed:
        if local is not None:
            raise local
        raise DistributedError(
            f"local distillation failed on rank {failed[0][0]}: {failed[0][1]}; every rank "
            "left its model as it was before the step"
        )
    for module in replaced.values():
        broadcast_module_(module, src=0)
    records = [[(c.refined_error_before, c.refined_error_after) for c in changes]]
    dist.broadcast_object_list(records, src=0)
    for change, (before, after) in zip(changes, records[0], strict=True):
        change.refined_error_before, change.refined_error_after = before, after


def _refine(
    model: nn.Module,
    replaced: Mapping[str, nn.Module],
    previous: Mapping[str, nn.Module],
    changes: Sequence[LayerChange],
    settings: LocalDistillation,
    batches: Any,
    io: tuple[Forward | None, OutputFn | None, MaskFn | None],
    progress: bool,
) -> None:
    forward, output, mask = io
    units = _units(model, list(replaced), settings)
    targets = _Targets(model, units, previous, settings, forward, output or main_output, mask)
    params = list(dict.fromkeys(p for m in replaced.values() for p in m.parameters()))
    flags = [(p, p.requires_grad, p.grad) for p in params]
    with contextlib.ExitStack() as stack:
        stack.enter_context(eval_mode(model))
        for module in previous.values():
            stack.enter_context(eval_mode(module))
        try:
            for param in params:
                param.requires_grad_(True)
                param.grad = None
            before = _errors(model, units, targets, batches)
            start = [param.detach().clone() for param in params]
            _train(
                model,
                units,
                targets,
                params,
                _scales(replaced.values()),
                settings,
                batches,
                progress,
            )
            after = _errors(model, units, targets, batches)
            if _worse(after, before):
                # The data-aware fit starts close to each unit's optimum: steps too large
                # for that distance (lr) leave it worse. Training must not make it worse.
                with torch.no_grad():
                    for param, value in zip(params, start, strict=True):
                        param.copy_(value)
                logger.warning(
                    "local distillation raised the calibration error of %s (lr=%g), so "
                    "those layers keep their fitted factors; a lower lr may help",
                    ", ".join(u.name for u in units),
                    settings.lr,
                )
                after = dict(before)
        finally:
            for param, flag, grad in flags:
                param.requires_grad_(flag)
                param.grad = grad
    owner = {layer: unit.name for unit in units for layer in unit.layers}
    for change in changes:
        if change.name in owner and change.skipped is None:
            change.refined_error_before = before[owner[change.name]]
            change.refined_error_after = after[owner[change.name]]
    logger.info(
        "local distillation: %s",
        ", ".join(f"{u.name} {before[u.name]:.4f} -> {after[u.name]:.4f}" for u in units),
    )


def _worse(after: Mapping[str, float], before: Mapping[str, float]) -> bool:
    """Whether the step's loss (the sum of its units' squared relative errors) rose."""
    return sum(e * e for e in after.values()) > sum(e * e for e in before.values())


def _outputs(
    model: nn.Module, units: Sequence[_Unit], targets: _Targets, batch: Any
) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """Per unit: its output now (differentiable when grad is on) and its target."""
    calls = capture(model, batch, [u.name for u in units], forward=targets.forward)
    wanted = targets.compute(batch, calls)
    rows = batch_mask(batch, targets.mask)
    return [
        (
            u.name,
            _samples(targets.pick(calls[u.name](get_module(model, u.name))), rows),
            _samples(wanted[u.name], rows),
        )
        for u in units
    ]


def _samples(output: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """The positions of ``output`` that are samples (all when the mask does not fit)."""
    if rows is None or tuple(output.shape[: rows.ndim]) != tuple(rows.shape):
        return output
    return output[rows.to(output.device)]


@torch.no_grad()
def _errors(
    model: nn.Module,
    units: Sequence[_Unit],
    targets: _Targets,
    batches: Any,
) -> dict[str, float]:
    """Each unit's relative output error over all calibration batches."""
    errors = dict.fromkeys((u.name for u in units), 0.0)
    norms = dict.fromkeys((u.name for u in units), 0.0)
    for batch in batches:
        for name, out, target in _outputs(model, units, targets, batch):
            error, norm = _relative_error(out, target)
            errors[name] += float(error)
            norms[name] += norm
    return {n: math.sqrt(errors[n] / norms[n]) if norms[n] > 0 else 0.0 for n in errors}


def _rms(param: torch.Tensor) -> float:
    return float(param.detach().float().square().mean().sqrt()) if param.numel() else 0.0


def _scales(modules: Iterable[nn.Module]) -> dict[nn.Parameter, float]:
    """Each trained tensor's RMS, the size its Adam steps are relative to.

    An all-zero tensor (a bias initialised to zero) has no size of its own; it takes the
    smallest RMS among its layer's other tensors, a cautious guess on the layer's scale
    (a fixed 1.0 would move it by the whole lr per step, on BERT's ~0.04 weights 25 times
    the factors' steps).
    """
    scales: dict[nn.Parameter, float] = {}
    for module in modules:
        own = {p: _rms(p) for p in module.parameters()}
        sized = [v for v in own.values() if v > 0]
        fallback = min(sized) if sized else 1.0
        for param, value in own.items():
            scales.setdefault(param, value if value > 0 else fallback)
    return scales


def _train(
    model: nn.Module,
    units: Sequence[_Unit],
    targets: _Targets,
    params: list[nn.Parameter],
    scales: Mapping[nn.Parameter, float],
    settings: LocalDistillation,
    batches: Any,
    progress: bool,
) -> None:
    generator = torch.Generator().manual_seed(settings.seed)
    # Adam moves every entry by about lr per step whatever its gradient's scale: scaled by
    # each tensor's RMS, one lr suits factors of any magnitude (BERT's weights are ~0.04).
    optimizer = torch.optim.Adam(
        [{"params": [p], "lr": settings.lr * scales[p]} for p in params], lr=settings.lr
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda t: 0.5 * (1.0 + math.cos(math.pi * t / settings.steps))
    )
    layers = sum(len(u.layers) for u in units)
    bar = tqdm(
        batch_stream(batches, settings.steps, settings.batch_size, generator),
        total=settings.steps,
        desc=f"distillation ({layers} layer{'s' if layers > 1 else ''})",
        disable=not progress,
        leave=False,
    )
    try:
        for batch in bar:
            with torch.enable_grad():
                losses = []
                for _, out, target in _outputs(model, units, targets, batch):
                    error, norm = _relative_error(out, target)
                    losses.append(error / max(norm, 1e-30))
                loss = torch.stack(losses).sum()
                if not torch.isfinite(loss):
                    raise StagecompError(
                        f"local distillation of {', '.join(u.name for u in units)} diverged "
                        f"(loss {float(loss)}); lower LocalDistillation lr={settings.lr}"
                    )
                grads = torch.autograd.grad(loss, params, allow_unused=True)
            for param, grad in zip(params, grads, strict=True):
                param.grad = grad
            optimizer.step()
            schedule.step()
            bar.set_postfix_str(f"loss {float(loss.detach()) / len(units):.4g}", refresh=False)
    finally:
        bar.close()
        for param in params:
            param.grad = None


__all__ = ["GRANULARITIES", "TARGETS", "CalibrationLike", "LocalDistillation", "refine_step"]
