"""The contract every decomposed layer follows.

A decomposed layer replaces one nn.Linear or nn.Conv2d. It knows the geometry
of the layer it replaced (``shape``), the ranks it was built with, and how to
give the dense layer back (``to_dense``). Class methods answer questions a
rank strategy needs before decomposing anything: which rank is exact, and how
many parameters a rank costs.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from stagecomp.errors import (
    NonFiniteWeightError,
    RankError,
    StagecompError,
    UnsupportedLayerError,
)
from stagecomp.layer_kinds import plain_weight
from stagecomp.layer_shape import LayerShape
from stagecomp.layers.factory import Factory
from stagecomp.options import DecomposeOptions

Rank = int | Sequence[int]
"""A rank as users give it: one int (a cap on every rank) or one int per rank."""

_LayerT = TypeVar("_LayerT", bound="DecomposedLayer")

# Below this many weights the factorisation runs in float64: it costs little and
# keeps full-rank reconstructions exact to ~1e-12.
_FLOAT64_MAX_NUMEL = 1 << 18
# Beyond this magnitude float32 sums of squares (norms, Gram matrices) overflow.
_HUGE = 2.0**60


def describe(shape: LayerShape, name: str | None) -> str:
    """Short human description of a layer for error messages."""
    label = f"layer {name!r}" if name else "layer"
    if shape.kind == "linear":
        return f"{label} (Linear {shape.in_channels}->{shape.out_channels})"
    kh, kw = shape.kernel_size
    if shape.kind == "conv1d":
        groups = f", groups={shape.groups}" if shape.groups > 1 else ""
        return f"{label} (Conv1d {shape.in_channels}->{shape.out_channels}, {kw}{groups})"
    groups = f", groups={shape.groups}" if shape.groups > 1 else ""
    return f"{label} (Conv2d {shape.in_channels}->{shape.out_channels}, {kh}x{kw}{groups})"


def math_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype the factorisation runs in: float64 for small layers, else float32.

    Weights so large that float32 sums of their squares overflow (beyond ``2**60``)
    are factorised in float64 too, whatever the layer's size, so their factors stay
    finite where the layer's dtype can hold them.
    """
    if weight.dtype == torch.float64 or weight.numel() <= _FLOAT64_MAX_NUMEL:
        return torch.float64
    if weight.device.type != "meta" and float(weight.detach().abs().max()) > _HUGE:
        return torch.float64
    return torch.float32


def _largest(tensor: torch.Tensor) -> float:
    return float(tensor.detach().abs().max()) if tensor.numel() else 0.0


def factorisation_failed(
    shape: LayerShape, name: str | None, weight: torch.Tensor, error: Exception
) -> StagecompError:
    """The error to raise when the linear algebra of a factorisation fails (``LinAlgError``).

    With weights of huge magnitude it is a ``NonFiniteWeightError`` (their squares
    overflow); otherwise a ``StagecompError`` naming the layer and the cause.
    """
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    largest = _largest(weight)
    text = (
        f"{describe(shape, name)}: the factorisation failed ({first}); largest |w| = {largest:.3g}"
    )
    if not math.isfinite(largest) or largest > _HUGE:
        return NonFiniteWeightError(f"{text}: weights this large cannot be factorised")
    return StagecompError(text)


def _check_finite(shape: LayerShape, name: str | None, tensors: Sequence[torch.Tensor]) -> None:
    """Raise ``NonFiniteWeightError`` unless every entry is finite: no factorisation is defined."""
    if not all(bool(torch.isfinite(t).all()) for t in tensors):
        raise NonFiniteWeightError(
            f"{describe(shape, name)} has NaN or infinite weights; "
            "only finite weights can be decomposed"
        )


def _roles(module: nn.Module) -> tuple[bool, bool | None, torch.Tensor]:
    """``(weight trained, bias trained or None, a weight tensor)`` of a layer.

    The weight of a Linear / Conv2d, or the factors of a decomposed layer (trained when
    any factor is); the tensor gives the device and dtype to match.
    """
    if isinstance(module, DecomposedLayer):
        bias = module.bias_parameter()
        factors = [p for p in module.parameters() if p is not bias]
        if not factors:
            raise UnsupportedLayerError(f"{type(module).__name__} has no factors")
        trained = any(p.requires_grad for p in factors)
        reference = next((p for p in factors if p.requires_grad), factors[0])
        return trained, None if bias is None else bias.requires_grad, reference
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise UnsupportedLayerError(f"{type(module).__name__} has no weight tensor")
    bias = getattr(module, "bias", None)
    return (
        weight.requires_grad,
        bias.requires_grad if isinstance(bias, torch.Tensor) else None,
        weight,
    )


class DecomposedLayer(nn.Module):
    """Base class of the modules that replace a decomposed Linear or Conv2d.

    Subclasses implement ``full_rank``, ``param_count``, ``dense_weight``,
    ``dense_bias``, ``_decompose`` and ``_assign``, and build their submodules
    in ``_build`` from ``(shape, ranks, options)`` alone, with an initialisation
    fit for training from scratch, so that loading a saved model needs no
    decomposition. Those that can re-factorise their own factors override
    ``_refactored``.
    """

    method: ClassVar[str]
    """The name users pass to ``stagecomp.decompose`` ("svd", "tucker2", ...)."""
    kinds: ClassVar[tuple[str, ...]]
    """The ``LayerShape.kind`` values this class replaces."""
    rank_names: ClassVar[tuple[str, ...]] = ("rank",)
    """What each rank number means, for messages and reports."""
    structure_keys: ClassVar[tuple[str, ...]] = ()
    """The ``DecomposeOptions`` fields ``structure()`` records; a recipe entry may set only
    these (a hostile file could otherwise set any option, e.g. a huge iteration count)."""

    def __init__(
        self,
        shape: LayerShape,
        ranks: Sequence[int],
        options: DecomposeOptions | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """An untrained layer of ``ranks`` for ``shape``, initialised like a dense layer.

        Args:
            shape: Geometry of the layer it replaces.
            ranks: One int per rank, as ``normalize_rank`` gives them.
            options: Options that fix the structure (e.g. TT modes).
            device: Where every parameter and buffer is created.
            dtype: The floating dtype of every parameter.
        """
        super().__init__()
        self.shape = shape
        self.ranks = tuple(int(r) for r in ranks)
        self.options = options or DecomposeOptions()
        self._build(Factory(device, dtype))

    # ------------------------------------------------------------------ contract
    @classmethod
    def unsupported_reason(cls, shape: LayerShape, options: DecomposeOptions) -> str | None:
        """Why this method cannot replace a layer of ``shape`` (None when it can)."""
        return None

    @classmethod
    def full_rank(cls, shape: LayerShape, options: DecomposeOptions) -> tuple[int, ...]:
        """The largest allowed ranks; at these ranks the decomposition is exact."""
        raise NotImplementedError

    @classmethod
    def param_count(cls, shape: LayerShape, ranks: Sequence[int], options: DecomposeOptions) -> int:
        """Parameters (bias included) of the layer this class builds for ``ranks``."""
        raise NotImplementedError

    @classmethod
    def from_weights(
        cls: type[_LayerT],
        shape: LayerShape,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        ranks: tuple[int, ...],
        options: DecomposeOptions,
    ) -> _LayerT:
        """Factorise ``weight`` (module layout, float32/64) into a new layer of ``ranks``."""
        layer = cls(shape, ranks, options, device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            layer._assign(layer._decompose(weight), bias)
        return layer

    def _build(self, new: Factory) -> None:
        """Create the submodules for ``shape`` and ``ranks`` and initialise them from scratch."""
        raise NotImplementedError

    def _decompose(self, weight: torch.Tensor) -> Any:
        """Factors of ``weight`` (module layout) at this layer's ranks, in ``_assign``'s form."""
        raise NotImplementedError

    def _assign(self, factors: Any, bias: torch.Tensor | None) -> None:
        """Copy ``factors`` (as this class's decomposition gives them) and ``bias`` in."""
        raise NotImplementedError

    def _refactored(self: _LayerT, ranks: tuple[int, ...], options: DecomposeOptions) -> _LayerT:
        """A layer of ``ranks`` equal to this one, on its device, in a dtype of the method's choice.

        The default decomposes the equivalent dense weight again; subclasses with
        a cheaper exact route (re-factorising their own factors) override it.
        """
        return type(self).from_module(self, ranks, options)

    def dense_weight(self) -> torch.Tensor:
        """The weight of the equivalent dense layer, in the original module's layout."""
        raise NotImplementedError

    def dense_bias(self) -> torch.Tensor | None:
        """The bias of the equivalent dense layer."""
        raise NotImplementedError

    def structure(self) -> dict[str, Any]:
        """Options that fix this layer's structure beyond its ranks (e.g. TT modes)."""
        return {}

    # ------------------------------------------------------------------ shared
    @classmethod
    def check_supported(
        cls, shape: LayerShape, options: DecomposeOptions, name: str | None = None
    ) -> None:
        """Raise ``UnsupportedLayerError`` when this method cannot replace the layer."""
        if shape.kind not in cls.kinds:
            raise UnsupportedLayerError(
                f"{describe(shape, name)}: method {cls.method!r} does not apply to "
                f"{shape.kind} layers (it applies to {', '.join(cls.kinds)})"
            )
        reason = cls.unsupported_reason(shape, options)
        if reason is not None:
            raise UnsupportedLayerError(
                f"{describe(shape, name)}: method {cls.method!r} cannot be used: {reason}"
            )

    @classmethod
    def cap_rank(cls, shape: LayerShape, rank: Rank, options: DecomposeOptions) -> Rank:
        """One integer above the largest full rank means full rank (it is a cap on every
        rank), so ``Manual(rank=64)`` also serves layers with fewer channels; anything else
        is returned as given, for ``normalize_rank`` to check."""
        whole = not isinstance(rank, (Sequence, bool, str)) and hasattr(rank, "__index__")
        if whole and operator.index(rank) >= 1:  # type: ignore[arg-type]
            return min(operator.index(rank), max(cls.full_rank(shape, options)))  # type: ignore[arg-type]
        return rank

    @classmethod
    def normalize_rank(
        cls,
        shape: LayerShape,
        rank: Rank,
        options: DecomposeOptions | None = None,
        name: str | None = None,
    ) -> tuple[int, ...]:
        """Turn a user rank into one valid int per rank, or raise ``RankError``.

        One int caps every rank at that value (ranks smaller than it stay full);
        a sequence gives each rank exactly.
        """
        options = options or DecomposeOptions()
        cls.check_supported(shape, options, name)
        full = cls.full_rank(shape, options)
        where = f"{describe(shape, name)}, method {cls.method!r}"
        allowed = (
            f"an integer from 1 to {max(full)}, or {len(full)} integers "
            f"({', '.join(cls._names(len(full)))}) each from 1 up to {tuple(full)}"
        )
        if len(full) == 1:
            allowed = f"an integer from 1 to {full[0]}"
        if isinstance(rank, (bool, str, bytes)) or not (
            isinstance(rank, Sequence) or hasattr(rank, "__index__")
        ):
            raise RankError(f"{where}: rank {rank!r} is not allowed; expected {allowed}")
        if not isinstance(rank, Sequence):
            value = cls._as_int(rank, where, allowed)
            if value < 1 or value > max(full):
                raise RankError(f"{where}: rank {value} is out of range; expected {allowed}")
            return tuple(min(value, f) for f in full)
        values = tuple(cls._as_int(r, where, allowed) for r in rank)
        if len(values) != len(full):
            raise RankError(
                f"{where}: rank {tuple(values)} has {len(values)} entries; expected {allowed}"
            )
        if any(v < 1 or v > f for v, f in zip(values, full, strict=True)):
            raise RankError(f"{where}: rank {values} is out of range; expected {allowed}")
        return values

    @classmethod
    def _names(cls, count: int) -> tuple[str, ...]:
        if len(cls.rank_names) == count:
            return cls.rank_names
        return tuple(f"r{i}" for i in range(count))

    @staticmethod
    def _as_int(value: Any, where: str, allowed: str) -> int:
        if isinstance(value, bool):
            raise RankError(f"{where}: rank {value!r} is not allowed; expected {allowed}")
        try:
            return operator.index(value)
        except TypeError:
            raise RankError(
                f"{where}: rank {value!r} is not an integer; expected {allowed}"
            ) from None

    @classmethod
    def from_module(
        cls: type[_LayerT],
        module: nn.Module,
        rank: Rank,
        options: DecomposeOptions | None = None,
        name: str | None = None,
    ) -> _LayerT:
        """Decompose ``module`` (left untouched) into a new layer on its device and dtype."""
        options = options or DecomposeOptions()
        shape = LayerShape.from_module(module, name)
        ranks = cls.normalize_rank(shape, rank, options, name)
        if isinstance(module, DecomposedLayer):
            weight, bias = module.dense_weight(), module.dense_bias()
        else:
            weight = plain_weight(module)
            bias = module.bias  # type: ignore[assignment]
        with torch.no_grad():
            dtype = math_dtype(weight)
            w = weight.detach().to(dtype)
            b = None if bias is None else bias.detach().to(dtype)
            _check_finite(shape, name, [w] if b is None else [w, b])
            try:
                layer = cls.from_weights(shape, w, b, ranks, options)
            except torch.linalg.LinAlgError as error:
                raise factorisation_failed(shape, name, w, error) from None
        return layer.matched_to(module, name)

    @classmethod
    def _with_factors(
        cls: type[_LayerT],
        shape: LayerShape,
        ranks: tuple[int, ...],
        options: DecomposeOptions | None,
        factors: Any,
        bias: torch.Tensor | None,
        like: torch.Tensor,
    ) -> _LayerT:
        """A new layer on ``like``'s device and dtype holding ``factors`` and ``bias``."""
        layer = cls(shape, ranks, options, device=like.device, dtype=like.dtype)
        with torch.no_grad():
            layer._assign(factors, bias)
        return layer

    def matched_to(self: _LayerT, source: nn.Module, name: str | None = None) -> _LayerT:
        """Look like ``source``, the layer this one replaces, to the model and the optimizer.

        Factors are computed in float32/float64: move to the device and dtype of
        ``source``'s weight, take its train/eval mode and, per parameter role, its
        ``requires_grad`` (the factors take the weight's, the bias the bias's, so a frozen
        weight leaves a trainable bias trainable).

        Raises:
            NonFiniteWeightError: a factor is not finite in that dtype (weights near the
                dtype's largest value give factors beyond it).
        """
        reference = _roles(source)[2]
        self.to(device=reference.device, dtype=reference.dtype)
        self.train(source.training)
        self.take_requires_grad(source)
        with torch.no_grad():
            if not all(bool(torch.isfinite(p).all()) for p in self.parameters()):
                raise NonFiniteWeightError(
                    f"{describe(self.shape, name)}: its {self.method} factors are not finite in "
                    f"{reference.dtype} (largest |w| = {_largest(reference):.3g}); scale the "
                    "weights down, or compress the layer in a wider dtype"
                )
        return self

    def bias_parameter(self) -> nn.Parameter | None:
        """The parameter that holds the dense layer's bias, or ``None``."""
        bias = self.dense_bias()
        return bias if isinstance(bias, nn.Parameter) else None

    def take_requires_grad(self, source: nn.Module) -> None:
        """``requires_grad`` per role from ``source``, the layer this one replaces."""
        weight, bias, _ = _roles(source)
        self.set_requires_grad(weight, bias)

    def set_requires_grad(self, weight: bool, bias: bool | None = None) -> None:
        """``requires_grad`` per role: ``weight`` for the factors, ``bias`` for the bias
        (``None``: as the factors)."""
        bias_param = self.bias_parameter()
        for param in self.parameters():
            trained = bias if param is bias_param and bias is not None else weight
            param.requires_grad_(trained)

    def recompressed(
        self: _LayerT, rank: Rank, options: DecomposeOptions | None = None, name: str | None = None
    ) -> _LayerT:
        """This layer at smaller ranks, for a later compression stage.

        The new layer keeps this one's structure (``structure()``), device, dtype
        and mode, and ``requires_grad`` per role (factors, bias) as ``matched_to`` gives it.
        """
        options = (options or self.options).updated(self.structure())
        ranks = self.normalize_rank(self.shape, rank, options, name)
        params = list(self.parameters())
        with torch.no_grad():
            _check_finite(self.shape, name, params)
            try:
                layer = self._refactored(ranks, options)
            except torch.linalg.LinAlgError as error:
                raise factorisation_failed(self.shape, name, params[0], error) from None
        return layer.matched_to(self, name)

    def to_dense(self) -> nn.Linear | nn.Conv2d | nn.Conv1d:
        """An ordinary layer computing the same function, on this layer's device and dtype."""
        weight = self.dense_weight()
        bias = self.dense_bias()
        dense = self.shape.build_dense(device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            dense.weight.copy_(weight)
            if bias is not None and dense.bias is not None:
                dense.bias.copy_(bias)
        dense.train(self.training)
        return dense

    def as_2d(self, x: torch.Tensor) -> torch.Tensor:
        """A Conv1d input ``(N, C, L)`` as the ``(N, C, 1, L)`` the 2-D sub-layers take."""
        return x.unsqueeze(-2) if self.shape.kind == "conv1d" else x

    def from_2d(self, y: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`as_2d` on the output."""
        return y.squeeze(-2) if self.shape.kind == "conv1d" else y

    def extra_repr(self) -> str:
        names = self._names(len(self.ranks))
        ranks = ", ".join(f"{n}={r}" for n, r in zip(names, self.ranks, strict=True))
        return f"method={self.method!r}, {ranks}"
