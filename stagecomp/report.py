"""The Compressor's report as a plain-text table a person can read."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from stagecomp.compressor import Compressor


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


def format_report(compressor: Compressor) -> str:
    """Per step: each layer's method, ranks, params and MACs before/after, error; totals."""
    c = compressor
    original = c.original_stats
    lines = [
        f"stagecomp: {len(c.targets)} target layers, {c.stages} stage(s), "
        f"{c.layers_per_step} layer(s) per step: step {c.step_index} of {c.total_steps} done",
    ]
    if c.skipped:
        lines.append("skipped layers:")
        lines.extend(f"  {name}: {reason}" for name, reason in c.skipped.items())
    header = (
        f"{'step':>4} {'stage':>5}  {'layer':<28} {'method':<8} {'ranks':<14} "
        f"{'params':>17} {'MACs':>17} {'w.err':>7}"
    )
    first_params = c.history[0].params_before if c.history else None
    for result in c.history:
        lines.append("")
        lines.append(header)
        for ch in result.changes:
            ranks = ",".join(str(r) for r in ch.ranks) if ch.ranks else "-"
            err = f"{ch.weight_error:.4f}" if ch.weight_error is not None else "-"
            params = f"{format_count(ch.params_before)} -> {format_count(ch.params_after)}"
            macs = f"{format_count(ch.macs_before)} -> {format_count(ch.macs_after)}"
            row = (
                f"{result.step:>4} {ch.stage + 1:>5}  {ch.name:<28} {ch.method:<8} {ranks:<14} "
                f"{params:>17} {macs:>17} {err:>7}"
            )
            if ch.skipped:
                row += f"  (unchanged: {ch.skipped})"
            elif ch.latency_before is not None and ch.latency_after is not None:
                row += (
                    f"  (latency {ch.latency_before * 1e3:.3g} -> {ch.latency_after * 1e3:.3g} ms)"
                )
            lines.append(row)
        base_macs = original.macs if original else None
        lines.append(
            f"     model after step {result.step}: params {format_count(result.params_after)} "
            f"({format_ratio(first_params, result.params_after)} fewer than the original), "
            f"MACs {format_count(result.macs_after)} "
            f"({format_ratio(base_macs, result.macs_after)} fewer)"
        )
    if not c.history:
        lines.append("no step has run yet")
    return "\n".join(lines)
