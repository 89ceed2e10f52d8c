"""The Compressor: which layers, in which order, with which ranks, and when it is done.

The plan is fixed when the Compressor is built: the target layers in their
order, repeated ``stages`` times, cut into steps of ``layers_per_step``. Each
``compression_step()`` runs one step and hands control back, so the user can
fine-tune between steps with any trainer.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from stagecomp.calibration import (
    Forward,
    LayerStatistics,
    OutputFn,
    collect_gradient_moments,
    collect_statistics,
)
from stagecomp.changes import LayerChange, StepResult
from stagecomp.data_aware import (
    check_variant,
    decompose_data_aware,
    needs_outputs,
    supports_data_aware,
)
from stagecomp.distributed import shared_step, use_distributed
from stagecomp.errors import (
    CompressionFinishedError,
    NoMatchingLayerError,
    RecipeError,
    StagecompError,
    UnsupportedLayerError,
)
from stagecomp.latency_aware import LatencyAware, LatencyChooser, layer_inputs
from stagecomp.layer_shape import LayerShape
from stagecomp.layers.base import DecomposedLayer, Rank
from stagecomp.matching import check_keys, lookup, select
from stagecomp.options import DecomposeOptions
from stagecomp.recipe import apply_recipe, model_recipe
from stagecomp.registry import check_method, layer_class
from stagecomp.report import format_report
from stagecomp.stats import ModelStats, model_stats
from stagecomp.strategies.base import RankRequest, RankStrategy
from stagecomp.strategies.manual import Manual
from stagecomp.strategies.reduction import Reduction, rank_at_step
from stagecomp.strategies.vbmf import VBMF
from stagecomp.surgery import get_module, replace_module

logger = logging.getLogger(__name__)

StrategyLike = str | RankStrategy
LayerRank = Rank | RankStrategy | None

_STRATEGIES: dict[str, Callable[[], RankStrategy]] = {
    "vbmf": VBMF,
    "reduction": Reduction,
    "manual": Manual,
}
_ORDERS = ("model", "macs")
_LINEAR_METHODS = ("svd", "svd_id", "tt")
_STATE_FORMAT = 1


def resolve_strategy(strategy: StrategyLike) -> RankStrategy:
    """A strategy object from a name ("vbmf", "reduction", "manual") or an object."""
    if isinstance(strategy, str):
        if strategy not in _STRATEGIES:
            raise StagecompError(
                f"unknown strategy {strategy!r}; allowed: {', '.join(_STRATEGIES)} "
                "(or an object such as stagecomp.VBMF(weakening=0.5))"
            )
        return _STRATEGIES[strategy]()
    if not hasattr(strategy, "choose_ranks"):
        raise StagecompError(
            f"strategy {strategy!r} is not a strategy; allowed: {', '.join(_STRATEGIES)}, "
            "stagecomp.VBMF(...), stagecomp.Reduction(...), stagecomp.Manual(...)"
        )
    return strategy


def decomposable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every Linear, Conv2d and decomposed layer, not counting the insides of decomposed ones."""
    found: list[tuple[str, nn.Module]] = []
    inside: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(prefix + ".") for prefix in inside):
            continue
        if isinstance(module, DecomposedLayer):
            inside.append(name)
            found.append((name, module))
        elif isinstance(module, (nn.Linear, nn.Conv2d)) and name:
            found.append((name, module))
    return found


def _used_outside_forward(model: nn.Module) -> dict[str, str]:
    """Layers that other code reads by weight, so replacing them would change nothing or break.

    ``nn.MultiheadAttention`` reads ``out_proj.weight`` directly, and a weight tied to
    another module (e.g. an embedding) would be untied by a replacement.
    """
    reasons: dict[str, str] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.MultiheadAttention):
            prefix = f"{name}." if name else ""
            reasons[f"{prefix}out_proj"] = (
                "nn.MultiheadAttention uses this layer's weight directly, not its forward"
            )
    owners: dict[int, list[str]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for param in module.parameters(recurse=False):
            owners.setdefault(id(param), []).append(module_name)
    for names in owners.values():
        if len(set(names)) > 1:
            for owner in names:
                others = ", ".join(n for n in names if n != owner)
                reasons.setdefault(owner, f"its weight is shared with {others}")
    return reasons


@dataclass(frozen=True)
class _Target:
    name: str
    method: str
    strategy: RankStrategy


class Compressor:
    """Compress a model in place, a few layers per step, over one or more global stages.

    Args:
        model: The model to compress; it is modified in place.
        strategy: ``"vbmf"``, ``"reduction"`` (2x by default), ``"manual"``, or a
            strategy object (``VBMF(weakening=...)``, ``Reduction(rate=...)``,
            ``Manual(rank=...)``).
        example_input: A batch the model accepts; used by fvcore to count MACs (for
            the report and ``order="macs"``). Without it the report shows parameters only.
        ranks: Per-layer overrides by name or pattern: an int or tuple (manual ranks),
            a strategy object, or ``None`` to exclude the layer.
        exclude: Names or patterns of layers never to touch.
        methods: Per-layer method by name or pattern ("svd", "svd_id", "tucker2", "cp3",
            "cp4", "tt").
        conv_method: Method for kxk convolutions (1x1 convolutions use SVD).
        linear_method: Method for Linear layers ("svd", "svd_id" or "tt").
        layers_per_step: Layers decomposed by each ``compression_step()``.
        stages: Global passes; a later pass compresses already-decomposed layers again.
        order: ``"model"`` (module order) or ``"macs"`` (most MACs first) within a pass.
        options: Decomposition settings (seed, solver, iterations, TT modes).
        progress: Show a progress bar over the layers of a step.
        calibration: Batches of real inputs (a list or a DataLoader). Before each step
            the statistics of that step's layers are collected on the model as it is
            then, so later layers see the outputs of the already compressed ones. Needed
            by ``data_aware`` and by the ``DataAware`` strategy.
        data_aware: Data-aware factors (``"whiten"`` or ``"output"``, see
            ``stagecomp.data_aware.VARIANTS``) for every layer where they exist (SVD of
            Linear and 1x1 conv, Tucker2), or a per-layer mapping by name or pattern
            (``None`` keeps weight-only factors). ``None``: weight-only everywhere.
        calibration_forward: ``forward(model, batch)`` when the model is not called as
            ``model(batch)`` / ``model(*batch)`` / ``model(**batch)``.
        correct_drift: Keep a copy of the original model and fit each data-aware layer
            to the original layer's outputs on the original inputs, from the inputs it
            sees now, so it also undoes drift caused by earlier compressed layers
            (costs one copy of the model and a second forward per calibration batch).
        calibration_output: Picks the tensor whose gradients the ``"gradient"`` variant
            uses from the model's output (default ``stagecomp.calibration.main_output``).
        latency_aware: Time each layer and its candidate decompositions at the layer's
            real input shape and keep the fastest (or the layer as it is); needs
            ``example_input``. See ``stagecomp.LatencyAware``.
        distributed: Share each step's layers among the ranks of the initialised
            ``torch.distributed`` process group and broadcast the results, so every
            rank ends with the same model (see the DDP how-to). ``None`` (default):
            when a group with more than one rank is initialised; ``False``: every
            rank decomposes every layer itself.
    """

    def __init__(
        self,
        model: nn.Module,
        strategy: StrategyLike = "vbmf",
        example_input: Any = None,
        *,
        ranks: Mapping[str, LayerRank] | None = None,
        exclude: Sequence[str] = (),
        methods: Mapping[str, str] | None = None,
        conv_method: str = "tucker2",
        linear_method: str = "svd",
        layers_per_step: int = 1,
        stages: int = 1,
        order: str = "model",
        options: DecomposeOptions | None = None,
        progress: bool = True,
        calibration: Iterable[Any] | None = None,
        data_aware: str | Mapping[str, str | None] | None = None,
        calibration_forward: Forward | None = None,
        correct_drift: bool = False,
        calibration_output: OutputFn | None = None,
        latency_aware: LatencyAware | None = None,
        distributed: bool | None = None,
    ) -> None:
        for label, value in (("layers_per_step", layers_per_step), ("stages", stages)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise StagecompError(f"{label}={value!r} is not allowed; expected an integer >= 1")
        if order not in _ORDERS:
            raise StagecompError(f"order={order!r} is not allowed; expected one of {_ORDERS}")
        check_method(conv_method)
        if linear_method not in _LINEAR_METHODS:
            raise StagecompError(
                f"linear_method={linear_method!r} is not allowed; expected one of {_LINEAR_METHODS}"
            )
        if isinstance(exclude, str):
            exclude = [exclude]
        self.model = model
        self.strategy = resolve_strategy(strategy)
        self.example_input = example_input
        self.layers_per_step = layers_per_step
        self.stages = stages
        self.order = order
        self.options = options or DecomposeOptions()
        self.progress = progress
        self.distributed = distributed
        use_distributed(distributed)  # fail early when True has no process group
        self._ranks = dict(ranks or {})
        self._methods = dict(methods or {})
        self._exclude = list(exclude)
        self._conv_method = conv_method
        self._linear_method = linear_method
        self.calibration = calibration
        self.calibration_forward = calibration_forward
        self.calibration_output = calibration_output
        self._data_aware = data_aware
        if data_aware is not None and calibration is None:
            raise StagecompError(
                f"data_aware={data_aware!r} needs calibration batches: "
                "Compressor(..., calibration=batches)"
            )
        if correct_drift and data_aware is None:
            raise StagecompError(
                "correct_drift=True is allowed only with data_aware='whiten' or 'output' "
                "(and calibration batches)"
            )
        self._reference = copy.deepcopy(model) if correct_drift else None

        candidates = decomposable_layers(model)
        names = [name for name, _ in candidates]
        check_keys(self._ranks, names, "ranks")
        check_keys(self._exclude, names, "exclude")
        check_keys(self._methods, names, "methods")
        for method in self._methods.values():
            check_method(method)
        if isinstance(data_aware, str):
            check_variant(data_aware)
        elif data_aware is not None:
            check_keys(data_aware, names, "data_aware")
            for key, variant in data_aware.items():
                if variant is not None:
                    check_variant(variant, key)

        self._stats: ModelStats | None = self._count()
        self.original_stats = self._stats
        self.targets: list[_Target] = []
        self.skipped: dict[str, str] = {}
        excluded = set(select(names, self._exclude))
        fixed = _used_outside_forward(model)
        for name, module in candidates:
            reason = fixed.get(name) or self._skip_reason(name, module, excluded)
            if reason is not None:
                self.skipped[name] = reason
                logger.info("skipping %s: %s", name, reason)
            else:
                self.targets.append(self._target(name, module))
        if not self.targets:
            raise NoMatchingLayerError(
                "no layer of the model can be compressed: "
                + ("; ".join(f"{n}: {r}" for n, r in self.skipped.items()) or "it has none")
            )
        self.latency_aware = latency_aware
        self._latency: LatencyChooser | None = None
        if latency_aware is not None:
            if example_input is None:
                raise StagecompError(
                    "latency_aware needs example_input: each layer is timed at the shape "
                    "of the input it really receives"
                )
            inputs = layer_inputs(model, example_input, [t.name for t in self.targets])
            self._latency = LatencyChooser(latency_aware, inputs)
        if order == "macs":
            if self._stats is None:
                raise StagecompError("order='macs' needs example_input to count MACs")
            macs = self._stats.layer_macs
            self.targets.sort(key=lambda t: -macs.get(t.name, 0))
        plan = [(stage, t) for stage in range(stages) for t in self.targets]
        self._plan = [plan[i : i + layers_per_step] for i in range(0, len(plan), layers_per_step)]
        self.step_index = 0
        self.history: list[StepResult] = []

    # ------------------------------------------------------------------ planning
    def _method_for(self, name: str, module: nn.Module) -> str:
        found, method = lookup(self._methods, name)
        if found and method is not None:
            return method
        shape = LayerShape.from_module(module, name)
        if shape.kind == "linear":
            return self._linear_method
        return "svd" if shape.is_pointwise else self._conv_method

    def _strategy_for(self, name: str) -> RankStrategy | None:
        found, value = lookup(self._ranks, name)
        if not found:
            return self.strategy
        if value is None:
            return None
        if isinstance(value, (int, Sequence)):
            return Manual(rank=value)
        return value

    def _skip_reason(self, name: str, module: nn.Module, excluded: set[str]) -> str | None:
        if name in excluded:
            return "excluded"
        strategy = self._strategy_for(name)
        if strategy is None:
            return "excluded (rank None)"
        if isinstance(strategy, Manual) and strategy.rank is None:
            return "no manual rank given"
        shape = LayerShape.from_module(module, name)
        if shape.kind == "conv2d" and min(shape.in_per_group, shape.out_per_group) == 1:
            return (
                "one input or output channel per group (depthwise or single-channel): "
                "nothing to factorise"
            )
        method = self._method_for(name, module)
        try:
            cls = layer_class(method, shape, name)
            cls.check_supported(shape, self.options, name)
        except UnsupportedLayerError as error:
            return str(error)
        smallest = cls.param_count(
            shape, rank_at_step(cls.full_rank(shape, self.options), 1), self.options
        )
        if smallest >= shape.dense_params:
            return (
                f"too small: even rank 1 with {method} has {smallest} >= "
                f"{shape.dense_params} parameters"
            )
        return None

    def _target(self, name: str, module: nn.Module) -> _Target:
        strategy = self._strategy_for(name)
        assert strategy is not None  # checked by _skip_reason
        return _Target(name, self._method_for(name, module), strategy)

    def _count(self) -> ModelStats | None:
        if self.example_input is None:
            return None
        return model_stats(self.model, self.example_input)

    # ------------------------------------------------------------------ state
    @property
    def total_steps(self) -> int:
        """``ceil(stages * len(targets) / layers_per_step)``."""
        return len(self._plan)

    @property
    def done(self) -> bool:
        """True once the last planned step has run."""
        return self.step_index >= len(self._plan)

    def compression_step(self) -> StepResult:
        """Decompose the next ``layers_per_step`` layers, in place.

        Returns:
            What changed; ``result.new_parameters()`` are the parameters an optimizer
            must now include (the replaced layers' old parameters are gone).

        Raises:
            CompressionFinishedError: when all planned steps have run.
        """
        if self.done:
            raise CompressionFinishedError(
                f"all {self.total_steps} planned steps have run ({len(self.targets)} layers x "
                f"{self.stages} stages, {self.layers_per_step} per step); "
                "nothing is left to compress"
            )
        step_number = self.step_index + 1
        before = self._stats
        params_before = sum(p.numel() for p in self.model.parameters())
        changes: list[LayerChange] = []
        replaced: dict[str, tuple[nn.Module, nn.Module]] = {}
        chunk = self._plan[self.step_index]
        # Every rank calibrates the whole step on the same (unchanged) model, so the
        # statistics, and the factors computed from them, agree across ranks.
        statistics = self._calibrate([target for _, target in chunk])
        shared = use_distributed(self.distributed)
        if shared:  # the ranks share the layers; the loop below then has nothing to do
            changes, replaced = shared_step(
                self.model,
                chunk,
                lambda stage, target: self._compress_layer(
                    step_number, stage, target, statistics.get(target.name)
                ),
                options=self.options,
                step=step_number,
                desc=f"stagecomp step {step_number}/{self.total_steps}",
                progress=self.progress,
            )
        bar = tqdm(
            [] if shared else chunk,
            desc=f"stagecomp step {step_number}/{self.total_steps}",
            disable=shared or not self.progress,
            leave=False,
        )
        try:
            for stage, target in bar:
                bar.set_postfix_str(target.name, refresh=False)
                change, new = self._compress_layer(
                    step_number, stage, target, statistics.get(target.name)
                )
                changes.append(change)
                if new is not None:
                    replaced[target.name] = (replace_module(self.model, target.name, new), new)
        except BaseException:
            for name, (old, _) in reversed(list(replaced.items())):
                replace_module(self.model, name, old)
            raise
        finally:
            bar.close()
        after = self._count()
        for change in changes:
            if before is not None and after is not None:
                change.macs_before = before.layer_macs.get(change.name)
                change.macs_after = after.layer_macs.get(change.name)
        result = StepResult(
            step=step_number,
            changes=changes,
            replaced={name: new for name, (_, new) in replaced.items()},
            macs_before=before.macs if before else None,
            macs_after=after.macs if after else None,
            params_before=params_before,
            params_after=sum(p.numel() for p in self.model.parameters()),
        )
        self._stats = after
        self.history.append(result)
        self.step_index += 1
        return result

    def _variant_for(self, name: str) -> str | None:
        if isinstance(self._data_aware, Mapping):
            return lookup(self._data_aware, name)[1]
        return self._data_aware

    def _calibrate(self, targets: Sequence[_Target]) -> dict[str, LayerStatistics]:
        """Statistics of ``targets`` on the model as it is now (empty without calibration)."""
        if self.calibration is None:
            return {}
        names = list(dict.fromkeys(t.name for t in targets))
        outputs = [
            t.name
            for t in targets
            if needs_outputs(t.method, LayerShape.from_module(get_module(self.model, t.name)))
        ]
        statistics = collect_statistics(
            self.model,
            self.calibration,
            names,
            outputs=outputs,
            forward=self.calibration_forward,
            progress=self.progress,
            reference=self._reference,
        )
        weighted = [n for n in names if self._variant_for(n) == "gradient"]
        if weighted:
            gradients = collect_gradient_moments(
                self.model,
                self.calibration,
                weighted,
                forward=self.calibration_forward,
                output=self.calibration_output,
                progress=self.progress,
            )
            for name, moment in gradients.items():
                statistics[name].gradient_moment = moment
        return statistics

    def _compress_layer(
        self,
        step: int,
        stage: int,
        target: _Target,
        statistics: LayerStatistics | None = None,
    ) -> tuple[LayerChange, nn.Module | None]:
        module = get_module(self.model, target.name)
        shape = LayerShape.from_module(module, target.name)
        cls = layer_class(target.method, shape, target.name)
        request = RankRequest(
            target.name, cls, shape, module, stage, self.stages, self.options, statistics
        )
        ranks = target.strategy.choose_ranks(request)
        params_before = sum(p.numel() for p in module.parameters())
        change = LayerChange(
            step, stage, target.name, target.method, ranks, params_before, params_before
        )
        if self._latency is not None:
            if not self._choose_by_latency(change, target, module, statistics):
                return change, None
            cls, ranks = layer_class(change.method, shape, target.name), change.ranks or ranks
        if isinstance(module, cls) and module.ranks == ranks:
            change.skipped = f"already at ranks {ranks}"
            return change, None
        new_params = cls.param_count(shape, ranks, self.options)
        if new_params >= params_before and not isinstance(target.strategy, Manual):
            change.skipped = (
                f"ranks {ranks} would not reduce parameters ({new_params} >= {params_before})"
            )
            return change, None
        variant = self._variant_for(target.name)
        if (
            variant is not None
            and statistics is not None
            and supports_data_aware(change.method, shape)
        ):
            new = decompose_data_aware(
                module,
                change.method,
                ranks,
                statistics,
                variant=variant,
                options=self.options,
                name=target.name,
            )
        elif isinstance(module, cls):
            new = module.recompressed(ranks, name=target.name)
        else:
            new = cls.from_module(module, ranks, self.options, target.name)
        change.params_after = sum(p.numel() for p in new.parameters())
        change.weight_error = _weight_error(module, new)
        return change, new

    def _choose_by_latency(
        self,
        change: LayerChange,
        target: _Target,
        module: nn.Module,
        statistics: LayerStatistics | None,
    ) -> bool:
        """Put the measured choice in ``change``; False when the layer stays as it is."""
        assert self._latency is not None
        pinned = lookup(self._methods, target.name)[1]
        choice = self._latency.choose(
            target.name,
            module,
            target.strategy,
            change.stage,
            self.stages,
            self.options,
            pinned,
            statistics,
        )
        change.latency_before, change.latency_after = choice.current_s, choice.chosen_s
        if choice.method is None or choice.ranks is None:
            change.ranks = None
            change.skipped = choice.reason
            return False
        change.method, change.ranks = choice.method, choice.ranks
        return True

    # ------------------------------------------------------------------ reporting
    def report(self) -> str:
        """A readable table: per layer and step, method, ranks, params, MACs, error; totals."""
        return format_report(self)

    def __str__(self) -> str:
        return self.report()

    # ------------------------------------------------------------------ resume
    def state_dict(self) -> dict[str, Any]:
        """Progress and the decomposed structure.

        The weights are not included: save ``model.state_dict()`` beside it.
        """
        return {
            "format": _STATE_FORMAT,
            "step_index": self.step_index,
            "plan": [[[stage, t.name, t.method] for stage, t in chunk] for chunk in self._plan],
            "recipe": model_recipe(self.model),
            "history": [
                {
                    "step": r.step,
                    "changes": [c.to_dict() for c in r.changes],
                    "macs_before": r.macs_before,
                    "macs_after": r.macs_after,
                    "params_before": r.params_before,
                    "params_after": r.params_after,
                }
                for r in self.history
            ],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume: rebuild the decomposed layers of a finished step on this (fresh) model.

        Build the Compressor with the same arguments on a freshly built model,
        call this, then ``model.load_state_dict(saved_model_weights)``.
        """
        if state.get("format") != _STATE_FORMAT:
            raise RecipeError(
                f"compressor state format {state.get('format')!r} is not supported "
                f"(this stagecomp reads format {_STATE_FORMAT})"
            )
        plan = [[[stage, t.name, t.method] for stage, t in chunk] for chunk in self._plan]
        if state.get("plan") != plan:
            raise RecipeError(
                "the saved compressor state was made with a different plan (other layers, "
                "order, methods, stages or layers_per_step); build the Compressor with the "
                "same arguments as the interrupted run"
            )
        step_index = int(state["step_index"])
        if not 0 <= step_index <= len(self._plan):
            raise RecipeError(f"saved step_index {step_index} is outside 0..{len(self._plan)}")
        apply_recipe(self.model, dict(state["recipe"]), self.options)
        self.history = [
            StepResult(
                step=int(r["step"]),
                changes=[LayerChange.from_dict(c) for c in r["changes"]],
                macs_before=r.get("macs_before"),
                macs_after=r.get("macs_after"),
                params_before=int(r.get("params_before", 0)),
                params_after=int(r.get("params_after", 0)),
            )
            for r in state.get("history", [])
        ]
        self.step_index = step_index
        self._stats = self._count()


def _weight_error(old: nn.Module, new: DecomposedLayer) -> float:
    """Relative Frobenius error of the new layer's weight against the old one's.

    Accumulated over row blocks in float64 so a 4096 x 25088 weight costs one
    dense copy of the approximation, not two double-precision copies.
    """
    with torch.no_grad():
        weight = old.dense_weight() if isinstance(old, DecomposedLayer) else old.weight
        if not isinstance(weight, torch.Tensor):
            return float("nan")
        reference = weight.detach().reshape(weight.shape[0], -1)
        approx = new.dense_weight().detach().reshape(reference.shape)
        error = norm = 0.0
        for start in range(0, reference.shape[0], _ERROR_ROWS):
            ref_block = reference[start : start + _ERROR_ROWS].double()
            diff = approx[start : start + _ERROR_ROWS].double() - ref_block
            error += float(diff.square().sum())
            norm += float(ref_block.square().sum())
        return (error / norm) ** 0.5 if norm > 0 else 0.0


_ERROR_ROWS = 256


__all__ = [
    "Compressor",
    "LayerChange",
    "StepResult",
    "decomposable_layers",
    "resolve_strategy",
]
