"""The Compressor: a state machine over a fixed plan, one step at a time.

The plan (``stagecomp.plan``) is computed once when the Compressor is built. Each
``compression_step()`` collects the statistics its layers need, runs one job per layer
(``stagecomp.job``) locally or shared among distributed ranks, swaps the new modules in,
counts the result and hands control back, so the user can fine-tune between steps with
any trainer. A step is one unit: if anything in it fails, the model is as before.
"""

from __future__ import annotations

import copy
import logging
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from stagecomp.blocks import find_blocks
from stagecomp.changes import LayerChange, StepResult
from stagecomp.config import Calibration
from stagecomp.distillation import refine_step
from stagecomp.distributed import shared_step, use_distributed
from stagecomp.errors import CompressionFinishedError, RecipeError, StagecompError
from stagecomp.job import JobContext, run_layer_job
from stagecomp.latency_aware import LatencyAware, LatencyChooser, layer_inputs
from stagecomp.legacy import AcceptsLegacyArguments
from stagecomp.memory import release_free_memory
from stagecomp.options import DecomposeOptions
from stagecomp.plan import LayerRank, Plan, PlannedLayer, build_plan, decomposable_layers
from stagecomp.recipe import apply_recipe, model_recipe, undo_recipe
from stagecomp.report import format_run_report
from stagecomp.sequential import SequentialStatistics
from stagecomp.stage_preparation import check_model_strategies, prepare_stages
from stagecomp.state import (
    STATE_FORMAT,
    check_fresh,
    compressor_arguments,
    encode_rank,
    read_progress,
    saved_config,
    step_to_dict,
)
from stagecomp.stats import ModelStats, model_stats
from stagecomp.step_statistics import step_statistics, uses_statistics
from stagecomp.strategies import (
    RankStrategy,
    StrategyLike,
    needs_calibration,
    resolve_strategy,
)
from stagecomp.surgery import get_module, replace_module

logger = logging.getLogger(__name__)

MAX_STAGES = 1000
"""Most global passes a run may plan: the plan lists every step of every stage."""


class Compressor(metaclass=AcceptsLegacyArguments):
    """Compress a model in place, a few layers per step, over one or more global stages.

    Only layers that compute the stock ``nn.Linear`` / ``nn.Conv2d`` function are
    planned: a subclass with its own ``forward`` (quantisation-aware ``ConvBn2d``, a
    weight-standardised convolution) is skipped with the reason in ``plan``, unless its
    exact name is a key of ``methods=`` or ``ranks=`` (then it is replaced by a
    factorisation of its ``weight``, which computes the stock function). Layers whose
    weight is computed (parametrizations, ``weight_norm``) or whose state dict has hooks
    are always skipped. Forward, pre-forward and backward hooks move to the new layer.
    Each new layer keeps ``requires_grad`` per role: its factors as the old weight, its
    bias as the old bias.

    Args:
        model: The model to compress; it is modified in place.
        strategy: ``"vbmf"``, ``"reduction"`` (2x by default), ``"manual"``, or a
            strategy object (``VBMF(weakening=...)``, ``Reduction(rate=...)``,
            ``Manual(rank=...)``, ``DataAware(...)``).
        example_input: A batch the model accepts; used by fvcore to count MACs (for
            the report and ``order="macs"``) and to time layers (``latency_aware``).
        ranks: Per-layer overrides by name or pattern: an int or tuple (manual ranks),
            a strategy object, or ``None`` to leave the layer alone. An exact name (with
            a value other than ``None``) also opts in a layer with its own ``forward``.
        exclude: Names or patterns of layers never to touch.
        methods: Method by layer name or pattern (see ``stagecomp.METHODS``). A pattern
            sets the method of the layers it can decompose (``{"*": "cp3"}`` leaves
            Linear layers to SVD); an exact name is taken as asked, and opts in a layer
            with its own ``forward``. Default: ``"svd"`` for Linear and 1x1
            convolutions, ``"tucker2"`` for kxk convolutions.
        layers_per_step: Layers decomposed by each ``compression_step()``.
        stages: Global passes; a later pass compresses already-decomposed layers again.
        order: ``"model"`` (module order) or ``"macs"`` (most MACs first) within a pass.
        progress: Show progress bars over the layers and batches of a step.
        calibration: Real inputs and how they are used (``stagecomp.Calibration``):
            data-aware factors, and the statistics a strategy such as ``DataAware`` reads.
        latency_aware: Time each layer and its candidate decompositions at the layer's
            real input shape and keep the fastest (``stagecomp.LatencyAware``).
        options: Decomposition settings (``stagecomp.DecomposeOptions``).
        distributed: Share each step's layers among the ranks of the initialised
            ``torch.distributed`` process group (see the DDP how-to). ``None``: when a
            group with more than one rank is initialised; ``False``: never.

    Raises:
        StagecompError: a setting is invalid or two settings contradict each other
            (each rule is checked here, before anything is decomposed), or the model
            does not run on ``example_input``.
        NoMatchingLayerError: a name or pattern matches no layer, or no layer can be
            compressed.
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
        layers_per_step: int = 1,
        stages: int = 1,
        order: str = "model",
        progress: bool = True,
        calibration: Calibration | None = None,
        latency_aware: LatencyAware | None = None,
        options: DecomposeOptions | None = None,
        distributed: bool | None = None,
    ) -> None:
        for label, value in (("layers_per_step", layers_per_step), ("stages", stages)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise StagecompError(f"{label}={value!r} is not allowed; expected an integer >= 1")
        if stages > MAX_STAGES:  # the plan lists every stage's steps
            raise StagecompError(
                f"stages={stages} is not allowed; expected at most {MAX_STAGES} (each stage "
                "shrinks every layer a little more; far fewer already reach any rank)"
            )
        _check_type("calibration", calibration, Calibration, "stagecomp.Calibration(batches)")
        _check_type("latency_aware", latency_aware, LatencyAware, "stagecomp.LatencyAware()")
        _check_type("options", options, DecomposeOptions, "stagecomp.DecomposeOptions()")
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
        self.calibration = calibration
        self.latency_aware = latency_aware
        self.distributed = distributed
        use_distributed(distributed)  # fail early when True has no process group
        self._ranks = dict(ranks or {})
        self._exclude = list(exclude)
        self._methods = dict(methods or {})

        self._stats: ModelStats | None = self._count_example()
        self.original_stats = self._stats
        blocks = (
            find_blocks(model, calibration.blocks)
            if calibration is not None and calibration.blocks is not None
            else []
        )
        self.plan: Plan = build_plan(
            model,
            strategy=self.strategy,
            ranks=self._ranks,
            exclude=self._exclude,
            methods=self._methods,
            factors=calibration.factors if calibration is not None else None,
            options=self.options,
            stages=stages,
            layers_per_step=layers_per_step,
            order=order,
            layer_macs=self._stats.layer_macs if self._stats is not None else None,
            calibrated=calibration is not None,
            example_input=example_input,
            blocks=blocks,
        )
        self._check_calibration_use()
        check_model_strategies(self.plan, example_input)  # e.g. Speedup: needs the model's input
        self._sequential = (
            SequentialStatistics(
                model,
                list(calibration.batches),
                blocks,
                forward=calibration.forward,
                output=calibration.output,
                mask=calibration.mask,
            )
            if calibration is not None and blocks
            else None
        )
        self._reference = (
            copy.deepcopy(model) if calibration is not None and calibration.correct_drift else None
        )
        latency: LatencyChooser | None = None
        if latency_aware is not None:
            if example_input is None:
                raise StagecompError(
                    "latency_aware needs example_input: each layer is timed at the shape "
                    "of the input it really receives"
                )
            inputs = layer_inputs(model, example_input, [t.name for t in self.targets])
            latency = LatencyChooser(latency_aware, inputs)
        self._context = JobContext(stages, self.options, latency)
        self.step_index = 0
        self.history: list[StepResult] = []
        self._prepared_stages: set[int] = set()  # stages whole-model strategies were prepared for

    def _check_calibration_use(self) -> None:
        wanting = [t.name for t in self.targets if needs_calibration(t.strategy)]
        if wanting and self.calibration is None:
            raise StagecompError(
                f"the strategy of {_names(wanting)} reads calibration statistics, but no "
                "calibration was given; pass calibration=stagecomp.Calibration(batches)"
            )
        refine = self.calibration.refine if self.calibration is not None else None
        if refine is not None:
            refine.check_model(self.model)
        elif self.calibration is not None and not any(uses_statistics(t) for t in self.targets):
            noted = [t.name for t in self.targets if t.note]
            notes = f"{_names(noted)}: no data-aware factors for their method" if noted else ""
            raise StagecompError(
                "calibration was given, but no layer uses it: no target has data-aware "
                f"factors{' (' + notes + ')' if notes else ''} and no strategy reads "
                "statistics; drop calibration=, set Calibration(factors='whiten'), or use "
                "a method that has data-aware factors (svd, svd_id, tucker2)"
            )

    # ------------------------------------------------------------------ plan views
    @property
    def targets(self) -> list[PlannedLayer]:
        """The target layers, in the order of one stage."""
        return list(self.plan.targets)

    @property
    def skipped(self) -> dict[str, str]:
        """Every other decomposable layer, with the reason it is left alone."""
        return dict(self.plan.skipped)

    @property
    def total_steps(self) -> int:
        """``ceil(stages * len(targets) / layers_per_step)``."""
        return len(self.plan.steps)

    @property
    def done(self) -> bool:
        """True once the last planned step has run."""
        return self.step_index >= len(self.plan.steps)

    def _count_example(self) -> ModelStats | None:
        """MACs of the model as given; a bad ``example_input`` is named as the cause."""
        try:
            return self._count()
        except MemoryError:
            raise
        except Exception as error:
            given = self.example_input
            described = (
                f"a {given.dtype} tensor of shape {tuple(given.shape)} on {given.device}"
                if isinstance(given, torch.Tensor)
                else f"a {type(given).__name__}"
            )
            raise StagecompError(
                f"example_input ({described}) does not run through the model "
                f"({type(error).__name__}: {_first_line(error)}); expected a batch the model "
                "accepts (a tensor, or a tuple of positional inputs) on the model's device "
                "and in its dtype"
            ) from error

    def _count(self) -> ModelStats | None:
        if self.example_input is None:
            return None
        return model_stats(self.model, self.example_input)

    # ------------------------------------------------------------------ step
    def compression_step(self) -> StepResult:
        """Decompose the next ``layers_per_step`` layers, in place.

        Returns:
            What changed; ``result.new_parameters()`` are the parameters an optimizer
            must now include (the replaced layers' old parameters are gone).

        Raises:
            CompressionFinishedError: when all planned steps have run.
            StagecompError: the model fails on ``example_input`` with the new layers in.

        Whatever a step raises (``KeyboardInterrupt`` and ``MemoryError`` included), it
        is one unit: every layer it swapped is put back, and ``history`` and
        ``step_index`` are as before, so calling it again runs the same step.
        """
        if self.done:
            raise CompressionFinishedError(
                f"all {self.total_steps} planned steps have run ({len(self.targets)} layers x "
                f"{self.stages} stages, {self.layers_per_step} per step); "
                "nothing is left to compress"
            )
        step_number = self.step_index + 1
        chunk = self.plan.steps[self.step_index]
        desc = f"stagecomp step {step_number}/{self.total_steps}"
        params_before = sum(p.numel() for p in self.model.parameters())
        prepare_stages(  # whole-model strategies (needs_model) size this step's new stages
            self.model, self.example_input, self.plan, chunk, self._prepared_stages,
            stages=self.stages, options=self.options, calibration=self.calibration,
        )  # fmt: skip
        # Every rank calibrates the whole step on the same (unchanged) model, so the
        # statistics, and the factors computed from them, agree across ranks.
        statistics = step_statistics(
            self.model,
            self.calibration,
            [target for _, target in chunk],
            reference=self._reference,
            progress=self.progress,
            sequential=self._sequential,
        )

        uses = Counter(target.name for _, target in chunk)

        def job(stage: int, target: PlannedLayer) -> tuple[LayerChange, nn.Module | None]:
            module = get_module(self.model, target.name)
            stats = statistics.get(target.name)
            uses[target.name] -= 1
            if uses[target.name] == 0:
                # Its last job: its moments (32 MiB a 2048-wide one) go when it ends.
                statistics.pop(target.name, None)
            if self._sequential is not None:  # memory-bounded: what the last job freed
                release_free_memory()
            return run_layer_job(module, target, step_number, stage, self._context, stats)

        swapped: list[tuple[str, nn.Module]] = []  # (name, old) in order, a name may repeat
        try:
            if use_distributed(self.distributed):
                changes, pairs = shared_step(
                    self.model,
                    chunk,
                    job,
                    options=self.options,
                    step=step_number,
                    desc=desc,
                    progress=self.progress,
                )
                swapped = [(name, old) for name, (old, _) in pairs.items()]
                replaced = {name: new for name, (_, new) in pairs.items()}
            else:
                changes, replaced = self._local_step(chunk, job, desc, swapped)
            if self.calibration is not None:  # local distillation, if Calibration(refine=...)
                previous = dict(reversed(swapped))  # each layer's module before the step
                refine_step(
                    self.model,
                    self.calibration,
                    replaced,
                    previous,
                    changes,
                    progress=self.progress,
                    distributed=use_distributed(self.distributed),
                )
            after = self._count_checked(f"step {step_number}: with the new layers in place")
            result = self._step_result(step_number, changes, replaced, params_before, after)
        except BaseException:
            # Everything a step does is one unit: put back every layer it swapped, last
            # first (a layer twice in one step gets its module from before the step).
            for name, old in reversed(swapped):
                replace_module(self.model, name, old)
            raise
        self._stats = after
        self.history.append(result)
        self.step_index += 1
        return result

    def _count_checked(self, when: str) -> ModelStats | None:
        """MACs of the model with new layers in place, or an error the caller rolls back."""
        try:
            return self._count()
        except MemoryError:
            raise
        except Exception as error:
            raise StagecompError(
                f"{when}, the model fails on example_input ({type(error).__name__}: "
                f"{_first_line(error)}); the model was put back as it was. Did the model "
                "change device or dtype since example_input was given, or does a module "
                "read a replaced layer's .weight directly (exclude that layer)?"
            ) from error

    def _step_result(
        self,
        step_number: int,
        changes: list[LayerChange],
        replaced: dict[str, nn.Module],
        params_before: int,
        after: ModelStats | None,
    ) -> StepResult:
        before = self._stats
        for change in changes:
            if before is not None and after is not None:
                change.macs_before = before.layer_macs.get(change.name)
                change.macs_after = after.layer_macs.get(change.name)
        return StepResult(
            step=step_number,
            changes=changes,
            replaced=replaced,
            macs_before=before.macs if before else None,
            macs_after=after.macs if after else None,
            params_before=params_before,
            params_after=sum(p.numel() for p in self.model.parameters()),
        )

    def _local_step(
        self,
        chunk: Sequence[tuple[int, PlannedLayer]],
        job: Any,
        desc: str,
        swapped: list[tuple[str, nn.Module]],
    ) -> tuple[list[LayerChange], dict[str, nn.Module]]:
        """Run the step's jobs here, swapping each new module in as soon as it exists
        (a layer's second stage in the same step starts from its first)."""
        changes: list[LayerChange] = []
        replaced: dict[str, nn.Module] = {}
        bar = tqdm(chunk, desc=desc, disable=not self.progress, leave=False)
        try:
            for stage, target in bar:
                bar.set_postfix_str(target.name, refresh=False)
                change, new = job(stage, target)
                changes.append(change)
                if new is not None:
                    # Recorded before the swap, so an interruption during it is undone too.
                    swapped.append((target.name, get_module(self.model, target.name)))
                    replace_module(self.model, target.name, new)
                    replaced[target.name] = new
        finally:
            bar.close()
        return changes, replaced

    # ------------------------------------------------------------------ reporting
    def report(self) -> str:
        """A readable table: per layer and step, method, ranks, params, MACs, error; totals."""
        return format_run_report(
            targets=len(self.plan.targets),
            stages=self.stages,
            layers_per_step=self.layers_per_step,
            step_index=self.step_index,
            total_steps=self.total_steps,
            skipped=self.plan.skipped,
            history=self.history,
            original_macs=self.original_stats.macs if self.original_stats else None,
        )

    def __str__(self) -> str:
        return self.report()

    # ------------------------------------------------------------------ state
    def config(self) -> dict[str, Any]:
        """The run's settings as JSON (data and code recorded as present, not written)."""
        return {
            "strategy": self.strategy.to_dict(),
            "ranks": {k: encode_rank(v) for k, v in self._ranks.items()},
            "exclude": list(self._exclude),
            "methods": dict(self._methods),
            "layers_per_step": self.layers_per_step,
            "stages": self.stages,
            "order": self.order,
            "options": self.options.to_dict(),
            "calibration": None if self.calibration is None else self.calibration.to_dict(),
            "latency_aware": None if self.latency_aware is None else self.latency_aware.to_dict(),
            "distributed": self.distributed,
            "example_input": self.example_input is not None,
        }

    def state_dict(self) -> dict[str, Any]:
        """Configuration, plan, progress and the decomposed structure (JSON-ready).

        The weights are not included: save ``model.state_dict()`` beside it.
        """
        return {
            "format": STATE_FORMAT,
            "config": self.config(),
            "step_index": self.step_index,
            "plan": self.plan.signature(),
            "recipe": model_recipe(self.model),
            "history": [step_to_dict(r) for r in self.history],
        }

    @classmethod
    def from_state(
        cls,
        model: nn.Module,
        state: Mapping[str, Any],
        *,
        example_input: Any = None,
        calibration: Calibration | Iterable[Any] | None = None,
        latency_aware: LatencyAware | None = None,
        strategy: RankStrategy | None = None,
        progress: bool = True,
    ) -> Compressor:
        """The Compressor of a saved run, rebuilt on a freshly built ``model`` and resumed.

        Every setting comes from ``state``; only what cannot be saved is given again:
        the example input, the calibration batches (or a ``Calibration`` when the run
        used custom ``forward=``/``output=`` functions), an injected latency timer, and a
        strategy of your own (the built-in ones are rebuilt from the state).
        Then load the saved weights with ``model.load_state_dict``.

        Raises:
            RecipeError: the state is damaged, of another format, or does not fit.
            StagecompError: data the saved run used is not given again.
        """
        arguments = compressor_arguments(
            saved_config(state),
            example_input=example_input,
            calibration=calibration,
            latency_aware=latency_aware,
            strategy=strategy,
        )
        try:
            compressor = cls(model, progress=progress, **arguments)
        except RecipeError:
            raise
        except Exception as error:  # the saved settings do not fit this model
            raise RecipeError(
                "the saved run's settings do not build a Compressor on this model "
                f"({type(error).__name__}: {_first_line(error)})"
            ) from error
        compressor.load_state_dict(state)
        return compressor

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume: rebuild the decomposed layers of the finished steps on this (fresh) model.

        Build the Compressor on a freshly built model (``from_state`` does it from the
        state alone), call this, then ``model.load_state_dict(saved_model_weights)``.
        Everything is checked before the model is changed.
        """
        fmt = state.get("format") if isinstance(state, Mapping) else None
        if type(fmt) is not int or fmt not in (1, STATE_FORMAT):
            found = state.get("format") if isinstance(state, Mapping) else type(state).__name__
            raise RecipeError(
                f"compressor state format {found!r} is not supported "
                f"(this stagecomp reads formats 1 and {STATE_FORMAT})"
            )
        if self.step_index != 0 or self.history:
            raise RecipeError(
                f"load_state_dict needs a Compressor that has not run (this one is at step "
                f"{self.step_index}); build a new one on a freshly built model"
            )
        if state.get("plan") != self.plan.signature():
            raise RecipeError(
                "the saved compressor state was made with a different plan (other layers, "
                "order, methods, stages or layers_per_step); build the Compressor with the "
                "same arguments as the interrupted run, or use Compressor.from_state"
            )
        steps = [[(stage, t.name) for stage, t in step] for step in self.plan.steps]
        progress = read_progress(state, steps)
        check_fresh(self.model, progress)
        replaced = apply_recipe(self.model, progress.recipe, self.options)
        try:
            stats = self._count_checked(f"after rebuilding the {progress.step_index} saved steps")
        except BaseException:
            undo_recipe(self.model, replaced)
            raise
        self._stats = stats
        self.history = progress.history
        self.step_index = progress.step_index


def _check_type(label: str, value: object, expected: type, example: str) -> None:
    if value is not None and not isinstance(value, expected):
        raise StagecompError(
            f"{label}={type(value).__name__} is not allowed; expected {example} or None"
        )


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _names(names: Sequence[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:3])
    return shown + (f" and {len(names) - 3} more" if len(names) > 3 else "")


__all__ = [
    "STATE_FORMAT",
    "Compressor",
    "LayerChange",
    "StepResult",
    "decomposable_layers",
    "resolve_strategy",
]
