"""The command line: help, one-line errors, compress -> save -> report -> load."""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import save_file

import stagecomp as sc
from stagecomp import cli

# squeezenet1_1 has 3x3 and 1x1 convolutions and compresses in well under a second.
MODEL = "squeezenet1_1"


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        code = cli.main(argv)
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("stagecomp: error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


@pytest.mark.parametrize("command", [[], ["demo"], ["compress"], ["report"]])
def test_help_reads_well(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run([*command, "--help"], capsys)
    assert code == 0
    assert out.startswith("usage: stagecomp")
    words = {
        (): ["demo", "compress", "report", "examples:"],
        ("demo",): ["--out", "digits", "--seed"],
        ("compress",): ["--strategy", "--rate", "--weakening", "--rank", "--exclude", "--weights"],
        ("report",): ["DIR", "no model is built"],
    }[tuple(command)]
    for word in words:
        assert word in out
    assert "(default: None)" not in out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["--version"], capsys)
    assert code == 0 and out.strip() == f"stagecomp {sc.__version__}"


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        (["compress"], ["MODEL", "compress --help"]),
        (["compress", MODEL, "--out", "x"], ["--strategy"]),
        (["compress", MODEL, "--strategy", "svd", "--out", "x"], ["invalid choice"]),
        (["compress", MODEL, "--strategy", "manual", "--rank", "a,b", "--out", "x"], ["rank"]),
        (["frobnicate"], ["invalid choice"]),
    ],
)
def test_usage_errors_are_one_line(
    argv: list[str], needles: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(argv, capsys)
    assert code == 2
    assert_one_line_error(code, err, *needles)


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        (["compress", "resnt18", "--strategy", "vbmf"], ["'resnt18'", "resnet18"]),
        (["compress", "fasterrcnn_resnet50_fpn", "--strategy", "vbmf"], ["classification"]),
        (["compress", MODEL, "--strategy", "vbmf", "--rate", "2"], ["--rate", "reduction"]),
        (["compress", MODEL, "--strategy", "reduction", "--rank", "4"], ["--rank", "manual"]),
        (["compress", MODEL, "--strategy", "manual"], ["--rank"]),
        (["compress", MODEL, "--strategy", "reduction", "--rate", "0.5"], ["rate"]),
        (["compress", MODEL, "--strategy", "reduction", "--exclude", "feature.0"], ["features.0"]),
        (["compress", MODEL, "--strategy", "reduction", "--weights", "nope.pt"], ["nope.pt"]),
        (["compress", MODEL, "--strategy", "reduction", "--input-size", "4"], ["--input-size"]),
        (["compress", MODEL, "--strategy", "reduction", "--macs", "2"], ["--macs", "speedup"]),
        (["compress", MODEL, "--strategy", "vbmf", "--batch-size", "8"], ["--batch-size"]),
        (["compress", MODEL, "--strategy", "speedup", "--macs", "0.5"], ["macs=0.5", "> 1"]),
    ],
)
def test_compress_errors_are_one_line(
    argv: list[str], needles: list[str], capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    code, _, err = run([*argv, "--quiet", "--out", str(tmp_path / "out")], capsys)
    assert_one_line_error(code, err, *needles)
    assert not (tmp_path / "out").exists()


def test_compress_report_load_round_trip(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out = tmp_path / "sq"
    argv = ["compress", MODEL, "--strategy", "reduction", "--rate", "3", "--input-size", "32"]
    code, stdout, err = run([*argv, "--exclude", "classifier.1", "--out", str(out)], capsys)
    assert code == 0, err
    assert "step 1/1" in err  # progress goes to stderr, the report to stdout
    assert "features.3.squeeze" in stdout and "model after step 1" in stdout
    assert (out / "report.txt").read_text().strip() in stdout
    recipe = json.loads((out / "stagecomp.json").read_text())
    assert recipe["extra"]["model"] == MODEL
    assert recipe["extra"]["strategy"] == {"strategy": "reduction", "rate": 3.0}
    assert "classifier.1" not in recipe["layers"]
    summary = recipe["extra"]["summary"]
    assert summary["params_before"] / summary["params_after"] > 1.5  # classifier kept

    code, report, err = run(["report", str(out)], capsys)
    assert code == 0, err
    lines = report.splitlines()
    rows = [line for line in lines if line.startswith("features.")]
    assert len(rows) == len(recipe["layers"])
    assert rows[0].split()[0] == "features.0"  # model order, not alphabetical
    first = recipe["layers"]["features.0"]
    assert rows[0].split()[2] == ",".join(map(str, first["ranks"]))
    assert "Conv2d 3->64 3x3 s2" in rows[0]
    assert any(line.startswith("whole model: params") and "MACs" in line for line in lines)
    # The decomposed layers' parameter total equals the real modules' count.
    fresh = torchvision.models.get_model(MODEL, weights=None).eval()
    loaded = sc.load(fresh, out)
    real = sum(
        sum(p.numel() for p in m.parameters())
        for m in loaded.modules()
        if isinstance(m, sc.DecomposedLayer)
    )
    assert f"-> {cli._human(real)}" in next(x for x in lines if x.startswith("decomposed layers"))
    assert sum(p.numel() for p in loaded.parameters()) == summary["params_after"]


def test_compress_to_a_measured_speedup_and_mac_cut(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    out = tmp_path / "fast"
    argv = ["compress", MODEL, "--strategy", "speedup", "--speedup", "1.2", "--macs", "1.5"]
    code, stdout, err = run([*argv, "--input-size", "32", "--quiet", "--out", str(out)], capsys)
    assert code == 0, err
    recipe = json.loads((out / "stagecomp.json").read_text())
    strategy = recipe["extra"]["strategy"]
    assert strategy["strategy"] == "speedup" and strategy["target"] == 1.2
    assert strategy["macs"] == 1.5
    (line,) = recipe["extra"]["speedup"]
    assert line in stdout and "fewer MACs" in line
    # Every layer is a target, so the MAC budget bounds the whole model.
    fresh = torchvision.models.get_model(MODEL, weights=None).eval()
    x = torch.randn(1, 3, 32, 32)
    before = sc.model_stats(fresh, x).macs
    after = sc.model_stats(sc.load(torchvision.models.get_model(MODEL, weights=None), out), x)
    assert before / after.macs >= 1.5 * 0.999


def test_report_of_a_plain_save_has_no_model_totals(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    model = torch.nn.Sequential(
        torch.nn.Conv2d(8, 16, 3), torch.nn.Flatten(), torch.nn.Linear(16, 4)
    )
    model[0] = sc.decompose(model[0], "tucker2", (4, 2))
    model[2] = sc.decompose(model[2], "svd", 2)
    sc.save(model, tmp_path)
    code, report, _ = run(["report", str(tmp_path)], capsys)
    assert code == 0
    expected = {
        "0": (sc.Tucker2Conv2d, "4,2", 8 * 16 * 9 + 16),
        "2": (sc.SVDLinear, "2", 16 * 4 + 4),
    }
    for name, (cls, ranks, dense) in expected.items():
        row = next(line for line in report.splitlines() if line.startswith(f"{name} "))
        after = sum(p.numel() for p in model.get_submodule(name).parameters())
        assert ranks in row and f"{cli._human(dense)} -> {cli._human(after)}" in row, row
        assert cls.method in row
    assert "whole model" not in report


def test_report_of_a_grown_layer_says_more_not_fewer(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    model = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, bias=False))
    model[0] = sc.decompose(model[0], "tucker2", (8, 8))  # full rank: 576 -> 704 params
    sc.save(model, tmp_path)
    code, report, _ = run(["report", str(tmp_path)], capsys)
    assert code == 0
    assert "decomposed layers: params 576 -> 704 (1.22x more)" in report, report
    assert "fewer" not in report


def test_report_errors_are_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run(["report", str(tmp_path / "missing")], capsys)
    assert_one_line_error(code, err, "stagecomp.json")
    (tmp_path / "stagecomp.json").write_text('{"format_version": 7, "layers": {}}')
    code, _, err = run(["report", str(tmp_path)], capsys)
    assert_one_line_error(code, err, "newer")


@pytest.mark.parametrize("kind", ["safetensors", "pt", "wrapped"])
def test_user_weights_are_loaded(kind: str, tmp_path: Path) -> None:
    torch.manual_seed(1)
    model = torchvision.models.get_model(MODEL, weights=None, num_classes=10)
    state = model.state_dict()
    if kind == "safetensors":
        file = tmp_path / "w.safetensors"
        save_file(state, str(file))
    else:
        file = tmp_path / "w.pt"
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, file)
        if kind == "pt":
            torch.save(state, file)
    loaded = cli.load_weights_file(file)
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_weights_that_do_not_fit_or_pickle_code(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    small = torchvision.models.get_model(MODEL, weights=None, num_classes=10)
    file = tmp_path / "w.pt"
    torch.save(small.state_dict(), file)
    argv = ["compress", MODEL, "--strategy", "reduction", "--quiet", "--out", str(tmp_path / "o")]
    code, _, err = run([*argv, "--weights", str(file)], capsys)
    assert_one_line_error(code, err, "classifier.1.weight", "--num-classes")
    other = tmp_path / "other.safetensors"  # another architecture, as resnet18 -> resnet34
    save_file(torchvision.models.get_model("squeezenet1_0", weights=None).state_dict(), other)
    code, _, err = run([*argv, "--weights", str(other)], capsys)
    assert_one_line_error(
        code,
        err,
        "12 key(s) of the model missing from the file: 'features.6.squeeze.weight'",
        "12 key(s) the model does not have: 'features.5.expand1x1.bias'",
        "10 shape mismatch(es), file vs model: 'features.0.weight' (96, 3, 7, 7) vs (64, 3, 3, 3)",
    )
    assert not err.rstrip().endswith("...")  # nothing cut off
    code, _, err = run(
        [*argv, "--weights", str(file), "--num-classes", "10", "--input-size", "32"], capsys
    )
    assert code == 0, err
    torch.save(small, tmp_path / "module.pt")  # a pickled module, not a state dict
    code, _, err = run([*argv, "--force", "--weights", str(tmp_path / "module.pt")], capsys)
    assert_one_line_error(code, err, "weights-only")


def test_out_is_checked_before_compressing(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was built although --out cannot take the result")

    monkeypatch.setattr(cli, "build_torchvision_model", never)
    file = tmp_path / "file"
    file.write_text("x")
    code, _, err = run(["compress", MODEL, "--strategy", "reduction", "--out", str(file)], capsys)
    assert_one_line_error(code, err, "existing file")
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "stagecomp.json").write_text("{}")
    code, _, err = run(["compress", MODEL, "--strategy", "reduction", "--out", str(saved)], capsys)
    assert_one_line_error(code, err, "--force")
    monkeypatch.setattr(cli, "run_demo", never)
    code, _, err = run(["demo", "--out", str(file)], capsys)
    assert_one_line_error(code, err, "existing file")


def test_exclude_takes_one_name_per_flag_or_commas(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    base = ["compress", "--strategy", "reduction", "--quiet", "--input-size", "32"]
    code, out, err = run(
        [*base, "--exclude", "features.0", MODEL, "--out", str(tmp_path / "a")], capsys
    )
    assert code == 0, err  # the model name after --exclude NAME is not swallowed
    assert "features.0: excluded" in out
    code, out, err = run(
        [*base, MODEL, "--exclude", "features.0,classifier.1", "--out", str(tmp_path / "b")],
        capsys,
    )
    assert code == 0, err
    assert "features.0: excluded" in out and "classifier.1: excluded" in out


def test_a_closed_pipe_still_saves_and_exits_zero(tmp_path: Path) -> None:
    """``stagecomp compress ... | head``: the reader goes away before the output ends."""
    out = tmp_path / "piped"
    argv = ["compress", MODEL, "--strategy", "reduction", "--quiet", "--input-size", "32"]
    with subprocess.Popen(
        [sys.executable, "-m", "stagecomp", *argv, "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    ) as process:
        assert process.stdout is not None and process.stderr is not None
        process.stdout.close()  # the reader is gone before the report is printed
        stderr = process.stderr.read().decode()
        code = process.wait(timeout=300)
    assert code == 0, stderr
    assert "Broken pipe" not in stderr and "BrokenPipeError" not in stderr, stderr
    assert (out / "stagecomp.safetensors").exists() and (out / "stagecomp.json").exists()


def test_unexpected_errors_are_one_line_unless_debug(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(args: object) -> int:
        raise RuntimeError("first line\nsecond line")

    monkeypatch.setattr(cli, "_report", boom)
    code, _, err = run(["report", "x"], capsys)
    assert_one_line_error(code, err, "RuntimeError", "first line second line", "--debug")
    with pytest.raises(RuntimeError):
        cli.main(["--debug", "report", "x"])


def test_python_dash_m_entry_point(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "stagecomp", "report", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert_one_line_error(done.returncode, done.stderr, "stagecomp.json")


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_compress_output_follows_the_umask(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, umask: int
) -> None:
    out = tmp_path / "made" / "sq"
    argv = ["compress", MODEL, "--strategy", "reduction", "--quiet", "--input-size", "32"]
    previous = os.umask(umask)
    try:
        code, _, err = run([*argv, "--out", str(out)], capsys)
    finally:
        os.umask(previous)
    assert code == 0, err
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    expected = 0o666 & ~umask
    assert modes == {
        "stagecomp.json": expected,
        "stagecomp.safetensors": expected,
        "report.txt": expected,
    }
    assert (
        stat.S_IMODE(out.stat().st_mode)
        == stat.S_IMODE(out.parent.stat().st_mode)
        == 0o777 & ~umask
    )


def _documented_commands() -> list[str]:
    """Every ``stagecomp demo|compress|report ...`` command of --help, the README and docs."""
    root = Path(__file__).resolve().parent.parent
    commands = [
        line.strip() for line in cli._EPILOG.splitlines() if line.strip().startswith("stagecomp ")
    ]
    for page in [root / "README.md", *sorted((root / "docs").rglob("*.md"))]:
        text = page.read_text()
        commands += re.findall(r"^stagecomp (?:demo|compress|report)\b.*$", text, re.MULTILINE)
        commands += [
            " ".join(span.split())
            for span in re.findall(r"`(stagecomp (?:demo|compress|report)\b[^`]*)`", text)
        ]
    return commands


def test_every_documented_command_parses() -> None:
    """A command in the docs that the parser refuses (e.g. --exclude a b MODEL) is drift."""
    commands = _documented_commands()
    assert len(commands) > 10
    parser = cli.build_parser()
    for command in commands:
        words = shlex.split(command)[1:]
        if len(words) < 2 or words[-1] == "--out" or words[-1] in ("MODEL", "DIR"):
            continue  # a mention (`stagecomp demo --out`) or a synopsis (`stagecomp report DIR`)
        try:
            args = parser.parse_args(words)
        except (SystemExit, argparse.ArgumentError):
            pytest.fail(f"documented command does not parse: {command}")
        if args.command == "compress" and args.strategy == "vbmf":
            # VBMF finds nothing in random weights: an example without --weights does nothing.
            assert args.weights is not None, command
