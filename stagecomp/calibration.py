"""A calibration pass: per-layer input and output second moments from real batches.

Data-aware factorisations need to know where a layer's inputs (and outputs)
actually live. One pass over a few batches, with forward hooks on the named
layers, accumulates ``sum x x^T`` and ``sum x`` in float64 on the model's
device: memory stays at one ``d x d`` matrix per layer whatever the number of
batches. Linear layers see every leading dimension (batch, tokens) as samples;
convolutions see every batch x spatial position as a sample of its channels.

Padding is not a sample: when a batch is a dict with an ``attention_mask`` (batch x
tokens, 0 at padded positions), or a ``mask=`` function gives one, the rows of every
layer whose activations are batch x tokens x features are taken only where the mask is
set, in the statistics and in the gradient moments alike.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from stagecomp.errors import NoMatchingLayerError, StagecompError, UnsupportedLayerError
from stagecomp.layer_shape import LayerShape
from stagecomp.matching import check_keys
from stagecomp.surgery import eval_mode

logger = logging.getLogger(__name__)

GRADIENT_PROBES = 4
"""Random output projections per batch in ``collect_gradient_moments``: one gives a
noisy moment (on MiniLM at 2x fewer parameters, 0.852 mean cosine against 0.862 with
eight), four is most of the gain for a quarter of the backward passes of eight."""

Forward = Callable[[nn.Module, Any], Any]
"""How one batch is fed to the model: ``forward(model, batch) -> output``."""

MaskFn = Callable[[Any], "torch.Tensor | None"]
"""Which positions of a batch are samples: ``mask(batch) -> bool tensor`` shaped like the
leading dimensions of the activations (e.g. batch x tokens), or None for all of them."""

NO_GRADIENT = (
    "no gradient of the model's output reaches this layer (it is off the output path, "
    "e.g. an unused pooler): nothing to weight its factors by"
)
"""Why a layer gets no gradient moment (``collect_gradient_moments`` leaves it out)."""


def attention_mask(batch: Any) -> torch.Tensor | None:
    """The default ``MaskFn``: a dict batch's ``attention_mask``, else None (every position).

    Hugging Face tokenizers give ``attention_mask`` as batch x tokens with 0 at padding,
    the layout of the activations of every Linear layer in a transformer block.
    """
    if isinstance(batch, Mapping):
        value = batch.get("attention_mask")
        if isinstance(value, torch.Tensor):
            return value
    return None


def batch_mask(batch: Any, mask: MaskFn | None) -> torch.Tensor | None:
    """The sample mask of one batch as a bool tensor (``mask`` or ``attention_mask``)."""
    value = (mask or attention_mask)(batch)
    if value is None:
        return None
    if not isinstance(value, torch.Tensor):
        raise StagecompError(
            f"calibration mask returned a {type(value).__name__}; expected a bool tensor "
            "shaped like the activations' leading dimensions (e.g. batch x tokens) or None"
        )
    return value.to(torch.bool)


def sample_rows(
    tensor: torch.Tensor,
    shape: LayerShape,
    channels: int,
    name: str,
    mask: torch.Tensor | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """The samples of one activation as rows of ``channels`` features (float64 unless
    ``dtype`` says otherwise).

    Linear: every leading position is a sample, except where ``mask`` (shaped like the
    leading dimensions) is False; convolutions: every batch x spatial position.
    """
    if shape.kind == "linear":
        if mask is not None and tuple(tensor.shape[:-1]) == tuple(mask.shape):
            rows = tensor[mask.to(tensor.device)]
        else:
            rows = tensor.reshape(-1, tensor.shape[-1])
    else:
        rows = tensor.movedim(1, -1).reshape(-1, tensor.shape[1])
    if rows.shape[1] != channels:
        raise StagecompError(
            f"layer {name!r}: calibration saw {rows.shape[1]} features, expected {channels}"
        )
    return rows.detach().to(dtype)


def gradient_dtype(gradient: torch.Tensor) -> torch.dtype:
    """What gradient moments are summed in: float32, or float64 for a float64 model.

    A gradient moment is a Monte-Carlo estimate from a few random probes per batch:
    its sampling noise is orders of magnitude above float32 rounding, and a float32
    sum takes half the memory (a 2048-wide moment: 16 MiB, not 32) and about half the
    time of a float64 one. Input moments stay float64: whitening inverts them.
    """
    return torch.float64 if gradient.dtype == torch.float64 else torch.float32


@dataclass
class LayerStatistics:
    """Second moments of one layer's inputs (and outputs), over every sample seen.

    Attributes:
        count: Number of samples (rows for Linear, batch x positions for Conv2d).
        input_moment: ``E[x x^T]`` over input features / channels, float64.
        input_mean: ``E[x]``, float64.
        output_moment: ``E[y y^T]`` over output channels (bias included), or None.
        output_mean: ``E[y]``, or None.
        cross_moment: ``E[x_ref x^T]`` between the inputs the same layer of a reference
            model (the original, uncompressed one) saw and the inputs it sees now, or
            None. With it the factors can undo the drift of earlier compressed layers.
        gradient_moment: ``sum g g^T`` per batch, ``g`` the gradient of a random
            projection of the model's output with respect to this layer's output
            (see ``collect_gradient_moments``), or None.
    """

    count: int
    input_moment: torch.Tensor
    input_mean: torch.Tensor
    output_moment: torch.Tensor | None = None
    output_mean: torch.Tensor | None = None
    cross_moment: torch.Tensor | None = None
    gradient_moment: torch.Tensor | None = None

    def input_covariance(self) -> torch.Tensor:
        """``E[(x - m)(x - m)^T]``: the centred input covariance."""
        return self.input_moment - torch.outer(self.input_mean, self.input_mean)

    def output_covariance(self) -> torch.Tensor | None:
        """Centred output covariance (bias-free by construction), or None if not collected."""
        if self.output_moment is None or self.output_mean is None:
            return None
        return self.output_moment - torch.outer(self.output_mean, self.output_mean)


class _Accumulator:
    """Running float64 sums for one layer; rows of ``samples`` are samples.

    ``mask`` is the sample mask of the batch being run (set before each batch).
    """

    def __init__(self, name: str, shape: LayerShape, outputs: bool, cross: bool = False) -> None:
        self.name = name
        self.shape = shape
        self.outputs = outputs
        self.cross = cross
        self.mask: torch.Tensor | None = None
        self.pending: list[torch.Tensor] = []
        self.cross_sum: torch.Tensor | None = None
        self.count = 0
        self.x_sum: torch.Tensor | None = None
        self.xx_sum: torch.Tensor | None = None
        self.y_sum: torch.Tensor | None = None
        self.yy_sum: torch.Tensor | None = None

    def _rows(self, tensor: torch.Tensor, channels: int) -> torch.Tensor:
        return sample_rows(tensor, self.shape, channels, self.name, self.mask)

    def add(self, inputs: tuple[Any, ...], output: Any) -> None:
        x = self._rows(inputs[0], self.shape.in_channels)
        if self.xx_sum is None:
            d = x.shape[1]
            self.xx_sum = torch.zeros(d, d, dtype=torch.float64, device=x.device)
            self.x_sum = torch.zeros(d, dtype=torch.float64, device=x.device)
        assert self.x_sum is not None
        self.xx_sum.addmm_(x.T, x)
        self.x_sum += x.sum(dim=0)
        self.count += x.shape[0]
        if self.cross:
            if not self.pending:
                raise StagecompError(
                    f"layer {self.name!r} ran more often in the model than in the reference"
                )
            ref = self.pending.pop(0)
            if ref.shape != x.shape:
                raise StagecompError(
                    f"layer {self.name!r} saw inputs of shape {tuple(x.shape)} but the "
                    f"reference layer saw {tuple(ref.shape)}; the reference must be the "
                    "same architecture fed the same batches"
                )
            if self.cross_sum is None:
                self.cross_sum = torch.zeros_like(self.xx_sum)
            self.cross_sum.addmm_(ref.T, x)
        if self.outputs and isinstance(output, torch.Tensor):
            y = self._rows(output, self.shape.out_channels)
            if self.yy_sum is None:
                d = y.shape[1]
                self.yy_sum = torch.zeros(d, d, dtype=torch.float64, device=y.device)
                self.y_sum = torch.zeros(d, dtype=torch.float64, device=y.device)
            assert self.y_sum is not None
            self.yy_sum.addmm_(y.T, y)
            self.y_sum += y.sum(dim=0)

    def add_reference(self, inputs: tuple[Any, ...]) -> None:
        self.pending.append(self._rows(inputs[0], self.shape.in_channels))

    def result(self) -> LayerStatistics:
        if self.xx_sum is None or self.x_sum is None or self.count == 0:
            raise StagecompError(
                f"layer {self.name!r} saw no input during calibration; "
                "check that the batches run through it"
            )
        for label, total in (("inputs", self.xx_sum), ("outputs", self.yy_sum)):
            if total is not None and not bool(torch.isfinite(total).all()):
                raise StagecompError(
                    f"layer {self.name!r}: its calibration {label} hold NaN or infinity; "
                    "check the calibration batches (and the layers before this one)"
                )
        if self.cross_sum is not None and not bool(torch.isfinite(self.cross_sum).all()):
            raise StagecompError(
                f"layer {self.name!r}: the reference model's inputs to it hold NaN or infinity"
            )
        n = float(self.count)
        stats = LayerStatistics(self.count, self.xx_sum / n, self.x_sum / n)
        if self.yy_sum is not None and self.y_sum is not None:
            stats.output_moment = self.yy_sum / n
            stats.output_mean = self.y_sum / n
        if self.cross_sum is not None:
            stats.cross_moment = self.cross_sum / n
        return stats


def run_batch(model: nn.Module, batch: Any, forward: Forward | None = None) -> Any:
    """Feed one batch: ``model(b)``, ``model(*b)`` for a tuple, ``model(**b)`` for a dict.

    Tensors are moved to the model's device first. Models that take a dict as
    one argument (sentence-transformers) need ``forward=lambda m, b: m(b)``.
    """
    device = _device(model)
    batch = _to_device(batch, device)
    if forward is not None:
        return forward(model, batch)
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    if isinstance(batch, Mapping):
        return model(**batch)
    raise StagecompError(
        f"calibration batch of type {type(batch).__name__} is not allowed; expected a tensor, "
        "a tuple/list (model(*batch)), a dict (model(**batch)) or a forward= callable"
    )


@torch.no_grad()
def collect_statistics(
    model: nn.Module,
    batches: Iterable[Any],
    names: Sequence[str],
    *,
    outputs: Sequence[str] | bool = False,
    forward: Forward | None = None,
    max_batches: int | None = None,
    progress: bool = True,
    reference: nn.Module | None = None,
    mask: MaskFn | None = None,
) -> dict[str, LayerStatistics]:
    """Input (and optionally output) second moments of the named layers, in one pass.

    Args:
        model: The model as it is now (earlier compression steps included); it is
            run in eval mode and its mode is restored afterwards.
        batches: An iterable of batches (a DataLoader, a list of tensors, ...).
        names: Qualified names of Linear, Conv2d or decomposed layers.
        outputs: Also collect output moments, for every layer (True) or the named ones.
        forward: ``forward(model, batch)``, for models not called as ``run_batch`` does.
        max_batches: Stop after this many batches.
        progress: Show a tqdm bar over the batches.
        reference: The same architecture before compression; when given, each batch
            also runs through it and ``cross_moment`` is collected (see ``LayerStatistics``).
        mask: Which positions of a batch are samples (default: a dict batch's
            ``attention_mask``; see ``MaskFn``).

    Returns:
        One ``LayerStatistics`` per name.
    """
    modules = dict(model.named_modules())
    check_keys(dict.fromkeys(names), list(modules), "calibration layers")
    missing = [n for n in names if n not in modules]
    if missing:
        raise NoMatchingLayerError(f"calibration layers {missing} are not layers of the model")
    want_outputs = set(names) if outputs is True else set(outputs or ())
    accumulators: dict[str, _Accumulator] = {}
    for name in names:
        try:
            shape = LayerShape.from_module(modules[name], name)
        except UnsupportedLayerError as error:
            raise UnsupportedLayerError(f"calibration: {error}") from None
        accumulators[name] = _Accumulator(
            name, shape, name in want_outputs, cross=reference is not None
        )
    reference_modules = dict(reference.named_modules()) if reference is not None else {}
    handles = []
    try:
        for name, acc in accumulators.items():
            handles.append(
                modules[name].register_forward_hook(
                    lambda _m, inputs, output, acc=acc: acc.add(inputs, output)
                )
            )
            if reference is not None:
                if name not in reference_modules:
                    raise NoMatchingLayerError(f"the reference model has no layer {name!r}")
                handles.append(
                    reference_modules[name].register_forward_hook(
                        lambda _m, inputs, _output, acc=acc: acc.add_reference(inputs)
                    )
                )
        source = itertools.islice(batches, max_batches) if max_batches else batches
        total = max_batches if max_batches else _length(batches)
        with contextlib.ExitStack() as modes:
            for module in (model, reference):
                if module is not None:
                    modes.enter_context(eval_mode(module))
            for batch in tqdm(source, desc="calibration", total=total, disable=not progress):
                rows = batch_mask(batch, mask)
                for acc in accumulators.values():
                    acc.mask = rows
                if reference is not None:
                    run_batch(reference, batch, forward)
                run_batch(model, batch, forward)
                for acc in accumulators.values():
                    acc.pending.clear()
    finally:
        for handle in handles:
            handle.remove()
    return {name: acc.result() for name, acc in accumulators.items()}


OutputFn = Callable[[Any], torch.Tensor]
"""Picks the tensor to compare from what the model returns."""


def main_output(output: Any) -> torch.Tensor:
    """The tensor to compare: the output itself, the first of a tuple, or a known dict key.

    Dicts are searched for ``sentence_embedding`` (sentence-transformers),
    ``logits`` and ``last_hidden_state`` (Hugging Face); pass ``output=`` otherwise.
    """
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        for key in ("sentence_embedding", "logits", "last_hidden_state"):
            if isinstance(output.get(key), torch.Tensor):
                return output[key]
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise StagecompError(
        f"cannot tell which part of a {type(output).__name__} model output to compare; "
        "pass output=lambda out: ... returning a tensor"
    )


@contextlib.contextmanager
def gradients_only_from(model: nn.Module, roots: Sequence[nn.Module]) -> Iterator[None]:
    """Let only the parameters of ``roots`` require gradients while the block runs.

    The backward passes here differentiate activations, never weights: with the other
    parameters frozen, autograd saves no layer input for a weight gradient nobody
    asks for, which halves the memory a forward pass with gradients keeps.
    """
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for param, _ in flags:
            param.requires_grad_(False)
        for root in roots:
            for param in root.parameters():
                param.requires_grad_(True)
        yield
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)


def output_probe(
    final: torch.Tensor, generator: torch.Generator, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """A random Gaussian projection of the final output, zero at masked positions.

    A padded position's output is no sample either: when the output's leading
    dimensions are the mask's (logits of batch x tokens), its probe is zero there, so
    no gradient comes from it.
    """
    probe = torch.randn(final.shape, generator=generator).to(final)
    if mask is not None and tuple(final.shape[: mask.ndim]) == tuple(mask.shape):
        keep = mask.to(final.device).reshape(*mask.shape, *([1] * (final.ndim - mask.ndim)))
        probe = probe * keep
    return probe


def collect_gradient_moments(
    model: nn.Module,
    batches: Iterable[Any],
    names: Sequence[str],
    *,
    forward: Forward | None = None,
    output: OutputFn | None = None,
    probes: int = GRADIENT_PROBES,
    seed: int = 0,
    progress: bool = True,
    mask: MaskFn | None = None,
    before_batch: Callable[[int], None] | None = None,
) -> dict[str, torch.Tensor]:
    """How much an error in each layer's output moves the model's final output.

    For a random Gaussian ``r`` over the final output ``f``, ``g = d(r . f)/dy`` at a
    layer output ``y`` has ``E[g g^T] = J^T J`` (Gauss-Newton), so an output error
    ``dy`` changes ``f`` by about ``dy^T E[g g^T] dy``. Summed over the rows of a
    batch and averaged over batches and probes, the moments of different layers
    are in the same units and can be compared. No parameter's ``.grad`` is touched.

    Args:
        mask: Which positions of a batch are samples (default: a dict batch's
            ``attention_mask``): masked rows of a layer's output gradient are left out,
            and the random projection is zero at masked positions of the output.
        before_batch: Called with each batch's index before it runs (e.g. to start the
            model at a block from cached inputs with ``stagecomp.blocks.starting_at``).

    Returns:
        ``{name: (out, out) matrix}`` (``gradient_dtype``: float32, float64 for a float64
        model) for every layer some gradient reaches; a
        layer off the path to the output (an unused pooler) is left out, with a log line
        (``NO_GRADIENT``).
    """
    pick = output or main_output
    modules = dict(model.named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise NoMatchingLayerError(f"layers {missing} are not layers of the model")
    shapes = {n: LayerShape.from_module(modules[n], n) for n in names}
    sums: dict[str, torch.Tensor] = {}
    captured: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    handles = []
    generator = torch.Generator().manual_seed(seed)
    batches_seen = 0
    try:
        for name in names:
            handles.append(
                modules[name].register_forward_hook(
                    lambda _m, _i, out, name=name: captured[name].append(out)
                )
            )
        with eval_mode(model), gradients_only_from(model, [modules[n] for n in names]):
            for index, batch in enumerate(tqdm(batches, desc="gradients", disable=not progress)):
                for values in captured.values():
                    values.clear()
                if before_batch is not None:
                    before_batch(index)
                rows_mask = batch_mask(batch, mask)
                with torch.enable_grad():
                    final = pick(run_batch(model, batch, forward))
                    outs = [o for n in names for o in captured[n]]
                    owners = [n for n in names for _ in captured[n]]
                    # None when no layer ran, or none is on the path to the output.
                    probes_run = probes if outs and final.requires_grad else 0
                    for probe in range(probes_run):
                        r = output_probe(final, generator, rows_mask)
                        grads = torch.autograd.grad(
                            (final * r).sum(),
                            outs,
                            retain_graph=probe + 1 < probes_run,
                            allow_unused=True,
                        )
                        for name, grad in zip(owners, grads, strict=True):
                            if grad is None:
                                continue
                            rows = sample_rows(
                                grad,
                                shapes[name],
                                shapes[name].out_channels,
                                name,
                                rows_mask,
                                gradient_dtype(grad),
                            )
                            if name not in sums:
                                sums[name] = rows.T @ rows
                            else:
                                sums[name].addmm_(rows.T, rows)
                    del final, outs
                batches_seen += 1
    finally:
        for handle in handles:
            handle.remove()
        for values in captured.values():
            values.clear()
    for name in names:
        if name not in sums:
            logger.info("layer %r: %s", name, NO_GRADIENT)
    broken = [n for n in sums if not bool(torch.isfinite(sums[n]).all())]
    if broken:
        raise StagecompError(
            f"the output gradients at layers {broken} hold NaN or infinity; check the "
            "calibration batches and the model's output on them"
        )
    return {n: sums[n] / (batches_seen * probes) for n in names if n in sums}


def _length(batches: Iterable[Any]) -> int | None:
    try:
        return len(batches)  # type: ignore[arg-type]
    except TypeError:
        return None


def _device(model: nn.Module) -> torch.device:
    for param in model.parameters():
        return param.device
    return torch.device("cpu")


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, tuple):
        return tuple(_to_device(b, device) for b in batch)
    if isinstance(batch, list):
        return [_to_device(b, device) for b in batch]
    if isinstance(batch, Mapping):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch


__all__ = [
    "GRADIENT_PROBES",
    "NO_GRADIENT",
    "Forward",
    "LayerStatistics",
    "MaskFn",
    "OutputFn",
    "attention_mask",
    "batch_mask",
    "collect_gradient_moments",
    "collect_statistics",
    "gradient_dtype",
    "gradients_only_from",
    "main_output",
    "output_probe",
    "run_batch",
    "sample_rows",
]
