"""Every table stagecomp prints, rendered from plain data.

The Compressor's per-step report (:func:`format_run_report`), the totals a save records
(:func:`run_summary`) and the table of a saved folder (:func:`format_saved_table`) read
records (``StepResult``, ``LayerChange``, recipe entries), never the objects that made them,
so this module sits below everything that prints.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from stagecomp.changes import StepResult
from stagecomp.layer_shape import LayerShape


def format_count(value: int | None) -> str:
    """12_345_678 -> '12.35M': counts a person can compare at a glance."""
    if value is None:
        return "-"
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.2f}{unit}"
    return str(value)


def format_ratio(before: int | None, after: int | None) -> str:
    """How many times smaller ``after`` is, or '-' when either is unknown."""
    if not before or not after:
        return "-"
    return f"{before / after:.2f}x"


def format_change(before: int | None, after: int | None) -> str:
    """'2.00x fewer', 'no fewer' or '1.20x more': the direction said in words."""
    if not before or not after:
        return "-"
    if after < before:
        return f"{before / after:.2f}x fewer"
    if after == before:
        return "no fewer"
    return f"{after / before:.2f}x more"


# ---------------------------------------------------------------------- a run, step by step
def format_run_report(
    *,
    targets: int,
    stages: int,
    layers_per_step: int,
    step_index: int,
    total_steps: int,
    skipped: Mapping[str, str],
    history: Sequence[StepResult],
    original_macs: int | None,
) -> str:
    """Per step: each layer's method, ranks, params and MACs before/after, error; totals.

    Args:
        targets: How many layers the run decomposes.
        stages / layers_per_step: The run's plan.
        step_index / total_steps: Steps done so far, and planned.
        skipped: Layers left out of the plan, with the reason.
        history: One record per step that ran.
        original_macs: MACs of the model before the first step (``None`` when unknown).
    """
    lines = [
        f"stagecomp: {targets} target layers, {stages} stage(s), "
        f"{layers_per_step} layer(s) per step: step {step_index} of {total_steps} done",
    ]
    if skipped:
        lines.append("skipped layers:")
        lines.extend(f"  {name}: {reason}" for name, reason in skipped.items())
    header = (
        f"{'step':>4} {'stage':>5}  {'layer':<28} {'method':<8} {'fit':<8} {'ranks':<14} "
        f"{'params':>17} {'MACs':>17} {'w.err':>7}"
    )
    first_params = history[0].params_before if history else None
    for result in history:
        lines.append("")
        lines.append(header)
        for ch in result.changes:
            ranks = ",".join(str(r) for r in ch.ranks) if ch.ranks else "-"
            err = f"{ch.weight_error:.4f}" if ch.weight_error is not None else "-"
            params = f"{format_count(ch.params_before)} -> {format_count(ch.params_after)}"
            macs = f"{format_count(ch.macs_before)} -> {format_count(ch.macs_after)}"
            row = (
                f"{result.step:>4} {ch.stage + 1:>5}  {ch.name:<28} {ch.method:<8} "
                f"{ch.factors or '-':<8} {ranks:<14} "
                f"{params:>17} {macs:>17} {err:>7}"
            )
            if ch.refined_error_before is not None and ch.refined_error_after is not None:
                row += f"  (distilled: out.err {ch.refined_error_before:.3g} -> "
                row += f"{ch.refined_error_after:.3g})"
            if (
                ch.skipped is None
                and ch.macs_before is not None
                and ch.macs_after is not None
                and ch.macs_after > ch.macs_before
            ):
                row += "  MACs up"
            lines.append(row.rstrip())
            if ch.skipped:
                lines.append(f"{'':>12}unchanged: {ch.skipped}")
            elif ch.latency_before is not None and ch.latency_after is not None:
                lines.append(
                    f"{'':>12}latency {ch.latency_before * 1e3:.3g} -> "
                    f"{ch.latency_after * 1e3:.3g} ms"
                )
        lines.append(
            f"     model after step {result.step}: params {format_count(result.params_after)} "
            f"({format_change(first_params, result.params_after)} than the original), "
            f"MACs {format_count(result.macs_after)} "
            f"({format_change(original_macs, result.macs_after)})"
        )
    if not history:
        lines.append("no step has run yet")
    elif not any(ch.skipped is None for result in history for ch in result.changes):
        lines.append("")
        lines.append(
            f"warning: no layer was replaced in {len(history)} step(s): the model is unchanged "
            "(each layer's reason is in its row above)"
        )
    return "\n".join(lines)


def format_plan(
    steps: Sequence[Sequence[tuple[int, str, str, str]]],
    notes: Mapping[str, str],
    skipped: Mapping[str, str],
) -> str:
    """A plan before it runs: per step its layers as ``(stage, name, method, factors)``,
    then the notes on planned layers and the skipped layers with their reasons."""
    count = len({name for step in steps for _, name, _, _ in step})
    lines = [f"plan: {count} target layers in {len(steps)} step(s)"]
    for index, step in enumerate(steps, start=1):
        layers = ", ".join(
            f"{name} ({method}{'' if factors == 'weight' else ', ' + factors}"
            f"{', stage ' + str(stage + 1) if stage else ''})"
            for stage, name, method, factors in step
        )
        lines.append(f"  step {index}: {layers}")
    if notes:
        lines.append("notes:")
        lines.extend(f"  {name}: {note}" for name, note in notes.items())
    if skipped:
        lines.append("skipped:")
        lines.extend(f"  {name}: {reason}" for name, reason in skipped.items())
    return "\n".join(lines)


def format_report(compressor: Any) -> str:
    """:func:`format_run_report` of anything with a Compressor's attributes (duck typed, so
    this module never imports the Compressor)."""
    original = compressor.original_stats
    return format_run_report(
        targets=len(compressor.targets),
        stages=compressor.stages,
        layers_per_step=compressor.layers_per_step,
        step_index=compressor.step_index,
        total_steps=compressor.total_steps,
        skipped=compressor.skipped,
        history=compressor.history,
        original_macs=original.macs if original else None,
    )


def run_summary(
    history: Sequence[StepResult], original_params: int | None, original_macs: int | None
) -> dict[str, Any]:
    """Whole-model and per-layer totals of a run, JSON-ready.

    ``stagecomp report`` shows them when a save carries them in ``extra["summary"]``.
    ``original_params`` falls back to the first step's count when it is ``None``.
    """
    layer_macs: dict[str, list[int | None]] = {}
    layer_params: dict[str, list[int]] = {}
    for result in history:
        for change in result.changes:
            if change.name not in layer_macs:
                layer_macs[change.name] = [change.macs_before, change.macs_before]
                layer_params[change.name] = [change.params_before, change.params_before]
            if change.skipped is None:
                layer_macs[change.name][1] = change.macs_after
                layer_params[change.name][1] = change.params_after
    first_params = history[0].params_before if history else None
    return {
        "params_before": original_params if original_params is not None else first_params,
        "params_after": history[-1].params_after if history else None,
        "macs_before": original_macs,
        "macs_after": history[-1].macs_after if history else None,
        "layer_macs": layer_macs,
        "layer_params": layer_params,
        "layer_order": list(layer_macs),  # JSON objects are saved with sorted keys
        "steps": len(history),
    }


def compressor_summary(compressor: Any) -> dict[str, Any]:
    """:func:`run_summary` of anything with a Compressor's ``history`` and ``original_stats``."""
    original = compressor.original_stats
    return run_summary(
        compressor.history,
        original.params if original else None,
        original.macs if original else None,
    )


# ---------------------------------------------------------------------- a saved folder
@dataclass(frozen=True)
class SavedLayer:
    """One decomposed layer of a save, as its table shows it."""

    name: str
    method: str
    ranks: tuple[int, ...]
    shape: LayerShape
    params_after: int


def describe_shape(shape: LayerShape) -> str:
    """'Conv2d 3->64 3x3 s2', 'Linear 512->10': the original layer in a few characters."""
    if shape.kind == "linear":
        return f"Linear {shape.in_channels}->{shape.out_channels}"
    kh, kw = shape.kernel_size
    text = f"Conv2d {shape.in_channels}->{shape.out_channels} {kh}x{kw}"
    if shape.stride != (1, 1):
        text += (
            f" s{shape.stride[0]}" if shape.stride[0] == shape.stride[1] else f" s{shape.stride}"
        )
    if shape.groups > 1:
        text += f" g{shape.groups}"
    return text


def _natural_key(name: str) -> list[tuple[int, int | str]]:
    return [(0, int(part)) if part.isdigit() else (1, part) for part in name.split(".")]


def model_order(names: Sequence[str], recorded: Any) -> list[str]:
    """Recorded model order when the save has it, else a natural sort (layer2 < layer10)."""
    order = [n for n in recorded if n in names] if isinstance(recorded, list) else []
    rest = sorted((n for n in names if n not in order), key=_natural_key)
    return order + rest


def format_saved_table(
    path: str | os.PathLike[str], recipe: Mapping[str, Any], layers: Sequence[SavedLayer]
) -> str:
    """The table of a save: its recipe (plain JSON data) and its layers' parameter counts.

    Whole-model totals and MACs appear when the recipe records them in
    ``extra["summary"]`` (see :func:`run_summary`).
    """
    extra = recipe.get("extra") or {}
    summary = extra.get("summary") if isinstance(extra, dict) else None
    summary = summary if isinstance(summary, dict) else {}
    layer_macs = summary.get("layer_macs") or {}
    lines = [
        f"{path}: {len(layers)} decomposed layer(s); format {recipe['format_version']}, "
        f"written by stagecomp {recipe.get('stagecomp_version', '?')} with torch "
        f"{recipe.get('torch_version', '?')}"
    ]
    if isinstance(extra, dict) and extra.get("model"):
        strategy = extra.get("strategy") or {}
        described = ", ".join(f"{k} {v}" for k, v in strategy.items() if k != "strategy")
        lines.append(
            f"model {extra['model']} at {extra.get('input_size', '?')} px, strategy "
            f"{strategy.get('strategy', '?')}{f' ({described})' if described else ''}, "
            f"{extra.get('stages', '?')} stage(s)"
        )
    if not layers:
        lines.append("no layer is decomposed in this save")
        return "\n".join(lines)
    by_name = {layer.name: layer for layer in layers}
    width = max(28, *(len(name) for name in by_name))
    show_macs = bool(layer_macs)
    header = (
        f"{'layer':<{width}} {'method':<8} {'ranks':<14} {'original':<26} {'params':>19} {'x':>6}"
    )
    if show_macs:
        header += f" {'MACs':>19} {'x':>6}"
    lines += ["", header]
    total_before = total_after = 0
    macs_before = macs_after = 0
    for name in model_order(list(by_name), summary.get("layer_order")):
        layer = by_name[name]
        before, after = layer.shape.dense_params, layer.params_after
        total_before += before
        total_after += after
        row = (
            f"{name:<{width}} {layer.method:<8} {','.join(map(str, layer.ranks)):<14} "
            f"{describe_shape(layer.shape):<26} "
            f"{format_count(before) + ' -> ' + format_count(after):>19} "
            f"{format_ratio(before, after):>6}"
        )
        if show_macs:
            pair = layer_macs.get(name) or [None, None]
            macs_before += pair[0] or 0
            macs_after += pair[1] or 0
            row += (
                f" {format_count(pair[0]) + ' -> ' + format_count(pair[1]):>19} "
                f"{format_ratio(pair[0], pair[1]):>6}"
            )
        lines.append(row)
    lines.append("")
    lines.append(
        f"decomposed layers: params {_totals(total_before, total_after)}"
        + (f", MACs {_totals(macs_before, macs_after)}" if show_macs else "")
    )
    if summary.get("params_before") and summary.get("params_after"):
        model_line = (
            f"whole model: params {_totals(summary['params_before'], summary['params_after'])}"
        )
        if summary.get("macs_before") and summary.get("macs_after"):
            model_line += f", MACs {_totals(summary['macs_before'], summary['macs_after'])}"
        lines.append(model_line)
    return "\n".join(lines)


def _totals(before: int, after: int) -> str:
    return f"{format_count(before)} -> {format_count(after)} ({format_ratio(before, after)} fewer)"


__all__ = [
    "SavedLayer",
    "compressor_summary",
    "describe_shape",
    "format_count",
    "format_ratio",
    "format_report",
    "format_run_report",
    "format_saved_table",
    "model_order",
    "run_summary",
]
