"""save/load: exact round trip, no decomposition on load, clear errors, model kept on failure."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
import torch
from torch import nn

import stagecomp as sc
from stagecomp.serialization import RECIPE_FILE, WEIGHTS_FILE


def build() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.Conv2d(16, 24, 3, padding=1),
        nn.Conv2d(24, 24, 3, padding=1),
        nn.Conv2d(24, 32, 1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 27),
    )


X = torch.randn(2, 3, 8, 8)


def compressed() -> nn.Module:
    model = build()
    model[3] = sc.decompose(model[3], "tucker2", (8, 4))
    model[4] = sc.decompose(model[4], "cp3", 6)
    model[5] = sc.decompose(model[5], "tt", 4)
    model[6] = sc.decompose(model[6], "svd", 5)
    model[9] = sc.decompose(model[9], "tt", 3)
    with torch.no_grad():  # weights that differ from any fresh decomposition
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model[1].running_mean.fill_(0.3)
    return model.eval()


def test_round_trip_is_exact(tmp_path: Path) -> None:
    model = compressed()
    sc.save(model, tmp_path)
    fresh = build().eval()
    loaded = sc.load(fresh, tmp_path)
    assert loaded is fresh
    assert torch.equal(loaded(X), model(X))
    recipe = json.loads((tmp_path / RECIPE_FILE).read_text())
    assert recipe["format_version"] == 1 and set(recipe["layers"]) == {"3", "4", "5", "6", "9"}
    assert recipe["layers"]["3"]["ranks"] == [8, 4]


def test_load_does_not_decompose(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sc.save(compressed(), tmp_path)

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("load must not decompose")

    for cls in sc.registry.LAYER_CLASSES:
        monkeypatch.setattr(cls, "from_weights", classmethod(fail))
    sc.load(build(), tmp_path)


def _unchanged(model: nn.Module, reference: dict[str, torch.Tensor]) -> bool:
    state = model.state_dict()
    return state.keys() == reference.keys() and all(
        torch.equal(state[k], reference[k]) for k in state
    )


@pytest.mark.parametrize(
    "damage",
    ["truncate", "garbage", "newer", "missing_layer", "other_shape", "no_weights", "bad_json"],
)
def test_errors_leave_the_fresh_model_untouched(tmp_path: Path, damage: str) -> None:
    sc.save(compressed(), tmp_path)
    recipe_file, weights = tmp_path / RECIPE_FILE, tmp_path / WEIGHTS_FILE
    recipe = json.loads(recipe_file.read_text())
    fresh = build()
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif damage == "garbage":
        data = bytearray(weights.read_bytes())
        data[:8] = b"\xff" * 8
        weights.write_bytes(bytes(data))
    elif damage == "newer":
        recipe["format_version"] = 99
    elif damage == "missing_layer":
        recipe["layers"]["features.7"] = recipe["layers"]["3"]
    elif damage == "other_shape":
        fresh[3] = nn.Conv2d(16, 16, 5, padding=2)
    elif damage == "no_weights":
        weights.unlink()
    elif damage == "bad_json":
        recipe_file.write_text("{not json")
    if damage in ("newer", "missing_layer"):
        recipe_file.write_text(json.dumps(recipe))
    reference = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(sc.RecipeError) as info:
        sc.load(fresh, tmp_path)
    assert isinstance(info.value, ValueError)
    assert _unchanged(fresh, reference)
    assert not any(isinstance(m, sc.DecomposedLayer) for m in fresh.modules())
    message = str(info.value)
    expected = {
        "newer": "newer",
        "missing_layer": "features.7",
        "other_shape": "'3'",
        "no_weights": WEIGHTS_FILE,
        "bad_json": "JSON",
    }.get(damage, WEIGHTS_FILE)
    assert expected in message


def test_weights_file_holds_no_pickle(tmp_path: Path) -> None:
    sc.save(compressed(), tmp_path)
    header_len = int.from_bytes((tmp_path / WEIGHTS_FILE).read_bytes()[:8], "little")
    header = json.loads((tmp_path / WEIGHTS_FILE).read_bytes()[8 : 8 + header_len])
    assert "3.core.weight" in header or any(k.startswith("3.") for k in header)


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_saved_files_follow_the_umask(tmp_path: Path, umask: int) -> None:
    """Both files and the folders a save creates get the modes plain open()/mkdir give."""
    previous = os.umask(umask)
    try:
        folder = sc.save(compressed(), tmp_path / "new" / "save")
    finally:
        os.umask(previous)
    modes = {
        name: stat.S_IMODE((folder / name).stat().st_mode) for name in (RECIPE_FILE, WEIGHTS_FILE)
    }
    assert modes == {RECIPE_FILE: 0o666 & ~umask, WEIGHTS_FILE: 0o666 & ~umask}
    for created in (folder, folder.parent):
        assert stat.S_IMODE(created.stat().st_mode) == 0o777 & ~umask
    assert sorted(p.name for p in folder.iterdir()) == sorted(modes)  # no temporaries left


def test_a_save_of_another_architecture_names_the_keys_that_differ(tmp_path: Path) -> None:
    """Like a resnet18 save loaded into resnet34: torch's message is cut off on one line,
    ours counts each kind of difference and names the first keys of each."""
    sc.save(compressed(), tmp_path)
    deeper = nn.Sequential(*build(), nn.ReLU(), nn.Linear(27, 5)).eval()
    reference = {k: v.clone() for k, v in deeper.state_dict().items()}
    with pytest.raises(sc.RecipeError) as info:
        sc.load(deeper, tmp_path)
    message = str(info.value)
    assert "2 key(s) of the model missing from the file: '11.weight', '11.bias'" in message
    assert "Error(s) in loading state_dict" not in message and len(message) < 300
    assert _unchanged(deeper, reference)
    assert not any(isinstance(m, sc.DecomposedLayer) for m in deeper.modules())

    untracked = build()
    untracked[1] = nn.BatchNorm2d(16, track_running_stats=False)
    with pytest.raises(sc.RecipeError) as info:
        sc.load(untracked, tmp_path)
    assert (
        "3 key(s) the model does not have: '1.num_batches_tracked', '1.running_mean', "
        "'1.running_var'" in str(info.value)
    )

    other_classes = build()
    other_classes[9] = nn.Linear(32, 10)
    with pytest.raises(sc.RecipeError) as info:
        sc.load(other_classes, tmp_path)  # the recipe's geometry is checked first
    assert str(info.value) == (
        "recipe layer '9' does not fit the model's: out_channels 27 in the recipe, 10 in the model"
    )
    plain = tmp_path / "plain"
    sc.save(build(), plain)
    with pytest.raises(sc.RecipeError) as info:
        sc.load(other_classes.eval(), plain)
    assert (
        "2 shape mismatch(es), file vs model: '9.weight' (27, 32) vs (10, 32), "
        "'9.bias' (27,) vs (10,)" in str(info.value)
    )
