"""The demo: deterministic rows, its files (table, CSV, PNG, saved model), the CLI around it."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest
import torch

import stagecomp as sc
from stagecomp import cli
from stagecomp.demo import DemoResult, format_rows, rows_csv, run_demo, write_outputs
from stagecomp.digits import DigitsCNN, load_digits_data

QUICK = {"epochs": 3, "finetune_epochs": 1, "stages": 1, "layers_per_step": 2, "latency_repeats": 2}


@pytest.fixture(scope="module")
def quick() -> DemoResult:
    return run_demo(**QUICK)  # type: ignore[arg-type]


def test_rows_are_deterministic_and_shrink(quick: DemoResult) -> None:
    again = run_demo(**QUICK)  # type: ignore[arg-type]
    strip = [(r.label, r.accuracy, r.params, r.macs) for r in quick.rows]
    assert strip == [(r.label, r.accuracy, r.params, r.macs) for r in again.rows]
    # conv2, conv3 and fc1 (fc2 is excluded, conv1 has one input channel): 2 steps.
    assert [r.label for r in quick.rows] == ["original", "step 1", "step 2"]
    assert quick.rows[0].accuracy > 0.85
    macs = [r.macs for r in quick.rows]
    params = [r.params for r in quick.rows]
    assert macs == sorted(macs, reverse=True) and macs[0] / macs[-1] > 2.5
    assert params[0] / params[-1] > 2.5
    assert sum(p.numel() for p in quick.model.parameters()) == params[-1]
    assert torch.get_num_threads() == 1  # restored


def test_table_and_csv(quick: DemoResult) -> None:
    table = format_rows(quick.rows)
    assert table.splitlines()[1].startswith("original")
    assert "MACs x" in table and "speed x" in table
    rows = list(csv.DictReader(io.StringIO(rows_csv(quick.rows))))
    assert [r["step"] for r in rows] == ["original", "step 1", "step 2"]
    assert int(rows[-1]["macs"]) == quick.rows[-1].macs
    assert float(rows[-1]["macs_reduction"]) == pytest.approx(
        quick.rows[0].macs / quick.rows[-1].macs, rel=1e-3
    )


def test_write_outputs_plot_and_reloadable_model(quick: DemoResult, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="the demo plot needs matplotlib (stagecomp[demo])")
    written = write_outputs(quick, tmp_path)
    png = written["plot"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert written["csv"].read_text().startswith("step,accuracy,params,macs")
    assert "model after step 2" in written["table"].read_text()
    loaded = sc.load(DigitsCNN().eval(), written["model"])
    x = load_digits_data(0).test_x[:32]
    quick.model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x), quick.model(x))
    report = cli.format_saved_report(written["model"])
    assert "conv2" in report and "whole model" in report


def test_cli_demo_prints_rows_and_writes_files(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    pytest.importorskip("matplotlib", reason="the demo plot needs matplotlib (stagecomp[demo])")
    argv = ["demo", "--epochs", "2", "--finetune-epochs", "1", "--stages", "1"]
    code = cli.main([*argv, "--layers-per-step", "3", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0
    assert "original" in out and "step 1" in out
    assert str(tmp_path / "demo.png") in out
    assert (tmp_path / "demo.png").is_file() and (tmp_path / "model" / "stagecomp.json").is_file()


@pytest.mark.slow
def test_full_demo_under_two_minutes() -> None:
    result = run_demo()
    first, last = result.rows[0], result.rows[-1]
    assert result.seconds < 120
    assert first.macs / last.macs > 2.5
    assert last.accuracy >= first.accuracy - 0.01
