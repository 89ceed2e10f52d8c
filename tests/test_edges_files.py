"""Attacks on saved folders: atomic saves, loads that roll back, hostile and damaged files.

The generated cases interrupt a re-save at every file operation (the folder must then
load as the old save or the new one), interrupt a load with any exception (the model must
be as given), and damage a saved folder in many ways (every load is then the saved model
or a ``RecipeError`` with the model untouched; ``stagecomp report`` is a table or a
``RecipeError``, quickly).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file
from torch import nn

import stagecomp as sc
import stagecomp.serialization as serialization
from stagecomp import cli
from stagecomp.saved_report import format_saved_report

X = torch.randn(2, 6, 5, 5)


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(6, 8, 3, padding=1, groups=2),
        nn.ReLU(),
        nn.Conv2d(8, 12, 1),
        nn.Flatten(),
        nn.Linear(300, 16),
        nn.ReLU(),
        nn.Linear(16, 5),
    ).eval()


def _compressed(steps: int) -> nn.Sequential:
    model = _net()
    c = sc.Compressor(
        model,
        sc.Reduction(1.5),
        methods={"0": "svd_id", "4": "tt", "6": "svd_id"},
        layers_per_step=1,
        progress=False,
    )
    for _ in range(steps):
        c.compression_step()
    with torch.no_grad():  # train a little, so that every save differs from a fresh one
        for p in model.parameters():
            p.add_(0.01 * steps)
    return model


def _output(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(X)


def _snapshot(model: nn.Module) -> tuple[list[tuple[str, int]], dict[str, torch.Tensor]]:
    return (
        [(name, id(module)) for name, module in model.named_modules()],
        {k: v.detach().clone() for k, v in model.state_dict().items()},
    )


def _unchanged(model: nn.Module, snapshot: Any) -> bool:
    modules, values = snapshot
    now = model.state_dict()
    return [(n, id(m)) for n, m in model.named_modules()] == modules and all(
        torch.equal(now[k], v) for k, v in values.items()
    )


OLD, NEW = _compressed(1), _compressed(3)
OLD_OUT, NEW_OUT = _output(OLD), _output(NEW)


# ---------------------------------------------------------------------- atomic saves
SAVE_POINTS = ("weights", "fsync", "recipe", "replace_weights", "replace_recipe")


@given(
    point=st.sampled_from(SAVE_POINTS),
    failure=st.sampled_from([OSError, KeyboardInterrupt, MemoryError]),
)
@settings(max_examples=15)
def test_an_interrupted_resave_leaves_the_old_save_or_the_new_one(
    tmp_path_factory: pytest.TempPathFactory, point: str, failure: type[BaseException]
) -> None:
    folder = tmp_path_factory.mktemp("save")
    sc.save(OLD, folder, extra={"note": "old"})
    real_replace, real_fsync = os.replace, os.fsync
    real_save_model = serialization.save_model
    calls = {"replace": 0}

    def replace(source: Any, target: Any) -> None:
        calls["replace"] += 1
        which = "replace_weights" if calls["replace"] == 1 else "replace_recipe"
        if point == which:
            raise failure("injected")
        real_replace(source, target)

    def fsync(descriptor: int) -> None:
        if point == "fsync":
            raise failure("injected")
        real_fsync(descriptor)

    def save_model(*args: Any, **kwargs: Any) -> None:
        if point == "weights":
            raise failure("injected")
        real_save_model(*args, **kwargs)

    def write_text(text: str) -> None:
        raise failure("injected")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(serialization.os, "replace", replace)
        patch.setattr(serialization.os, "fsync", fsync)
        patch.setattr(serialization, "save_model", save_model)
        if point == "recipe":
            patch.setattr(serialization, "open", _failing_open(failure), raising=False)
        with pytest.raises(failure):
            sc.save(NEW, folder, extra={"note": "new"})
    loaded = sc.load(_net(), folder)
    out = _output(loaded)
    expected = NEW_OUT if point == "replace_recipe" else OLD_OUT
    assert torch.equal(out, expected)
    assert not [p for p in folder.iterdir() if p.name.startswith(".stagecomp-partial-")]


def _failing_open(failure: type[BaseException]) -> Any:
    def failing(*args: Any, **kwargs: Any) -> Any:
        raise failure("injected")

    return failing


def test_a_save_interrupted_between_the_renames_loads_the_new_save(tmp_path: Path) -> None:
    sc.save(OLD, tmp_path)
    old_recipe = (tmp_path / "stagecomp.json").read_text()
    sc.save(NEW, tmp_path)
    (tmp_path / "stagecomp.json").write_text(old_recipe)  # the recipe's rename never happened
    (tmp_path / ".stagecomp-partial-0.json").write_text("{")  # a hard crash's leftover
    assert torch.equal(_output(sc.load(_net(), tmp_path)), NEW_OUT)


@pytest.mark.parametrize(
    "extra",
    [{"loss": float("nan")}, {"loss": float("inf")}, {"model": object()}, {(1, 2): 3}, [1]],
    ids=["nan", "inf", "object", "tuple-key", "list"],
)
def test_extra_is_checked_before_anything_is_written(tmp_path: Path, extra: Any) -> None:
    sc.save(OLD, tmp_path, extra={"note": "old"})
    files = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(sc.StagecompError, match="extra"):
        sc.save(NEW, tmp_path, extra=extra)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == files
    text = (tmp_path / "stagecomp.json").read_text()
    json.loads(text, parse_constant=lambda name: pytest.fail(f"non-standard JSON {name}"))


def test_saving_a_bare_decomposed_layer_refuses_clearly(tmp_path: Path) -> None:
    layer = sc.decompose(nn.Linear(8, 8), "svd", 2)
    with pytest.raises(sc.StagecompError, match="wrap the layer"):
        sc.save(layer, tmp_path / "bare")
    assert not (tmp_path / "bare").exists()
    sc.save(nn.Sequential(layer), tmp_path / "wrapped")  # the way the message shows
    loaded = sc.load(nn.Sequential(nn.Linear(8, 8)), tmp_path / "wrapped")
    x = torch.randn(3, 8)
    assert torch.equal(loaded(x), layer(x))


def test_saving_into_a_file_refuses_clearly(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("mine")
    with pytest.raises(sc.StagecompError, match="is a file"):
        sc.save(OLD, tmp_path / "file")
    assert (tmp_path / "file").read_text() == "mine"


# ---------------------------------------------------------------------- loads roll back
@given(
    failure=st.sampled_from(
        [RuntimeError, OSError, ValueError, KeyError, TypeError, MemoryError, KeyboardInterrupt]
    ),
    copied=st.integers(0, 30),
)
@settings(max_examples=14)
def test_any_exception_during_a_load_leaves_the_model_as_given(
    tmp_path_factory: pytest.TempPathFactory, failure: type[BaseException], copied: int
) -> None:
    folder = tmp_path_factory.mktemp("load")
    sc.save(NEW, folder)
    fresh = _net()
    snapshot = _snapshot(fresh)

    def partial_load(model: nn.Module, filename: Any, device: str, versions: Any) -> Any:
        saved = load_file(str(filename))
        own = model.state_dict()
        for key in list(saved)[:copied]:  # some tensors are in before the failure
            with torch.no_grad():
                own[key].copy_(saved[key])
        raise failure("injected")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(serialization, "load_weights", partial_load)
        expected = failure if failure in (MemoryError, KeyboardInterrupt) else sc.RecipeError
        with pytest.raises(expected):
            sc.load(fresh, folder)
    assert _unchanged(fresh, snapshot)


# ---------------------------------------------------------------------- damaged folders
HOSTILE: list[Any] = [
    None,
    -1,
    0,
    10**30,
    1e999,
    2.5,
    True,
    "x",
    [],
    {},
    [1, 2],
    [[[[]]]],
    {"tt_in_modes": [1] * 10**4},
    {"cp_max_iter": 10**9},
    "tt",
    "svd",
    [10**6],
    list(range(10**4)),
]


def _json_paths(value: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    found = [prefix] if prefix else []
    if isinstance(value, dict):
        for key, item in value.items():
            found += _json_paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found += _json_paths(item, (*prefix, index))
    return found


def _damage_json(folder: Path, where: int, value: Any, remove: bool) -> None:
    file = folder / "stagecomp.json"
    recipe = json.loads(file.read_text())
    paths = _json_paths(recipe["layers"])
    path = ("layers", *paths[where % len(paths)]) if paths else ("layers",)
    parent = recipe
    for key in path[:-1]:
        parent = parent[key]
    if remove and isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    file.write_text(json.dumps(recipe))


def _damage_bytes(file: Path, where: int, kind: str) -> None:
    data = bytearray(file.read_bytes())
    position = where % max(len(data), 1)
    if kind == "truncate":
        data = data[:position]
    elif kind == "flip":
        data[position] ^= 0xFF
    elif kind == "header":  # the safetensors header: its length and JSON
        data[position % min(len(data), 200)] ^= 0x5A
    file.write_bytes(bytes(data))


def _damaged_folder(
    tmp_path_factory: pytest.TempPathFactory,
    damage: str,
    where: int,
    value: Any,
    remove: bool,
    kind: str,
) -> None:
    folder = tmp_path_factory.mktemp("damaged")
    sc.save(NEW, folder, extra={"note": "x"})
    if damage == "json":
        _damage_json(folder, where, value, remove)
    elif damage == "recipe-bytes":
        _damage_bytes(folder / "stagecomp.json", where, kind)
    elif damage == "weights-bytes":
        _damage_bytes(folder / "stagecomp.safetensors", where, kind)
    else:  # a file replaced by a folder
        name = "stagecomp.json" if where % 2 else "stagecomp.safetensors"
        (folder / name).unlink()
        (folder / name).mkdir()
    started = time.perf_counter()
    with contextlib.suppress(sc.RecipeError):
        format_saved_report(folder)
    assert time.perf_counter() - started < 2.0
    fresh = _net()
    snapshot = _snapshot(fresh)
    try:
        loaded = sc.load(fresh, folder)
    except sc.RecipeError:
        assert _unchanged(fresh, snapshot)
        return
    # Accepted: the damage did not touch what the model is made of (or it was a bit
    # of a weight, which loads as that weight).
    out = _output(loaded)
    if damage != "weights-bytes":
        assert torch.equal(out, NEW_OUT)


@given(
    damage=st.sampled_from(["json", "json", "recipe-bytes", "weights-bytes", "swap"]),
    where=st.integers(0, 10**6),
    value=st.sampled_from(HOSTILE),
    remove=st.booleans(),
    kind=st.sampled_from(["truncate", "flip", "header"]),
)
@settings(max_examples=70)
def test_any_damaged_folder_loads_exactly_or_is_a_recipe_error(
    tmp_path_factory: pytest.TempPathFactory,
    damage: str,
    where: int,
    value: Any,
    remove: bool,
    kind: str,
) -> None:
    _damaged_folder(
        tmp_path_factory, damage=damage, where=where, value=value, remove=remove, kind=kind
    )


@pytest.mark.slow
@given(
    damage=st.sampled_from(["json", "json", "recipe-bytes", "weights-bytes", "swap"]),
    where=st.integers(0, 10**6),
    value=st.sampled_from(HOSTILE),
    remove=st.booleans(),
    kind=st.sampled_from(["truncate", "flip", "header"]),
)
@settings(max_examples=600)
def test_any_damaged_folder_loads_exactly_or_is_a_recipe_error_sweep(
    tmp_path_factory: pytest.TempPathFactory,
    damage: str,
    where: int,
    value: Any,
    remove: bool,
    kind: str,
) -> None:
    _damaged_folder(
        tmp_path_factory, damage=damage, where=where, value=value, remove=remove, kind=kind
    )


def test_hostile_recipes_are_refused_before_anything_is_allocated(tmp_path: Path) -> None:
    sc.save(NEW, tmp_path)
    file = tmp_path / "stagecomp.json"
    saved = json.loads(file.read_text())
    tt = saved["layers"]["4"]
    for name, entry in {
        "unknown structure key": {**tt, "structure": {**tt["structure"], "cp_max_iter": 10**9}},
        "200000 TT cores": {
            **tt,
            "ranks": [1] * (2 * 10**5 - 1),
            "structure": {
                "tt_in_modes": [1] * (2 * 10**5 - 1) + [300],
                "tt_out_modes": [16] + [1] * (2 * 10**5 - 1),
            },
        },
        "a huge rank list": {**tt, "ranks": list(range(2 * 10**5))},
        "ranks beyond the full rank": {**tt, "ranks": [10**9] * len(tt["ranks"])},
    }.items():
        file.write_text(json.dumps({**saved, "layers": {**saved["layers"], "4": entry}}))
        started = time.perf_counter()
        with pytest.raises(sc.RecipeError, match="'4'"):
            sc.load(_net(), tmp_path)
        with pytest.raises(sc.RecipeError, match="'4'"):
            format_saved_report(tmp_path)
        assert time.perf_counter() - started < 3.0, name


def test_report_of_a_huge_prime_channel_count_is_quick(tmp_path: Path) -> None:
    sc.save(NEW, tmp_path)
    file = tmp_path / "stagecomp.json"
    saved = json.loads(file.read_text())
    prime = (1 << 61) - 1
    saved["layers"]["4"] = {
        "method": "tt",
        "ranks": [1, 1],  # modes (p * p, 1, 1): every bond has rank 1
        "original": {"kind": "linear", "in_channels": prime, "out_channels": prime},
        "structure": {},
    }
    file.write_text(json.dumps(saved))
    started = time.perf_counter()
    table = format_saved_report(tmp_path)
    assert time.perf_counter() - started < 2.0
    assert f"Linear {prime}->{prime}" in table
    assert file.read_text() == json.dumps(saved)  # read-only


def test_recipe_files_beyond_the_size_bound_are_refused_unread(tmp_path: Path) -> None:
    sc.save(NEW, tmp_path)
    with open(tmp_path / "stagecomp.json", "r+b") as file:
        file.truncate(serialization.MAX_RECIPE_BYTES + 1)  # sparse: nothing is written
    with pytest.raises(sc.RecipeError, match="bytes"):
        sc.load(_net(), tmp_path)


# ---------------------------------------------------------------------- svd_id order
@given(
    changes=st.lists(st.tuples(st.integers(0, 7), st.integers(-2, 9)), min_size=1, max_size=3),
    swap=st.booleans(),
)
@settings(max_examples=30)
def test_a_corrupt_svd_id_order_is_refused_or_is_a_valid_order(
    tmp_path_factory: pytest.TempPathFactory, changes: list[tuple[int, int]], swap: bool
) -> None:
    folder = tmp_path_factory.mktemp("order")
    sc.save(NEW, folder)
    tensors = load_file(folder / "stagecomp.safetensors")
    order = tensors["0.order"].clone()
    if swap:
        first, second = changes[0][0] % 8, changes[0][1] % 8
        order[[first, second]] = order[[second, first]]
    else:
        for index, value in changes:
            order[index] = value
    save_file({**tensors, "0.order": order}, folder / "stagecomp.safetensors")
    (folder / "stagecomp.json").write_text(
        json.dumps({**json.loads((folder / "stagecomp.json").read_text()), "save_id": None})
    )  # the recipe inside the weights is gone with the rewrite: the JSON one is used
    fresh = _net()
    snapshot = _snapshot(fresh)
    try:
        loaded = sc.load(fresh, folder)
    except sc.RecipeError as error:
        assert "order" in str(error) and _unchanged(fresh, snapshot)
        return
    layer = loaded[0]
    assert layer.order_problem(layer.order) is None  # type: ignore[operator]
    values = sorted(int(v) for v in layer.order)
    assert values == list(range(8))
    _output(loaded)  # runs


# ---------------------------------------------------------------------- dtypes
def test_weights_of_another_float_precision_convert_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    sc.save(NEW, tmp_path)
    tensors = load_file(tmp_path / "stagecomp.safetensors")
    halved = {k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}
    save_file(halved, tmp_path / "stagecomp.safetensors")
    with caplog.at_level(logging.WARNING, logger="stagecomp.serialization"):
        loaded = sc.load(_net(), tmp_path)
    assert "float16 to the model's float32" in caplog.text
    assert loaded[4].bias.dtype == torch.float32
    assert torch.equal(loaded[4].bias, halved["4.bias"].float())
    # A model built in float16 asks for float16: a float32 save converts into it.
    sc.save(NEW, tmp_path)
    half = sc.load(_net().half(), tmp_path)
    assert half[4].bias.dtype == torch.float16


@pytest.mark.parametrize(
    ("key", "dtype"),
    [("4.bias", torch.int32), ("0.order", torch.float32), ("0.order", torch.int32)],
)
def test_weights_of_another_kind_of_dtype_are_refused(
    tmp_path: Path, key: str, dtype: torch.dtype
) -> None:
    sc.save(NEW, tmp_path)
    tensors = load_file(tmp_path / "stagecomp.safetensors")
    save_file({**tensors, key: tensors[key].to(dtype)}, tmp_path / "stagecomp.safetensors")
    fresh = _net()
    snapshot = _snapshot(fresh)
    with pytest.raises(sc.RecipeError, match=key.replace(".", r"\.")):
        sc.load(fresh, tmp_path)
    assert _unchanged(fresh, snapshot)


# ---------------------------------------------------------------------- the CLI
def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        code = cli.main(argv)
    except SystemExit as exit_:
        code = int(exit_.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_report_refuses_an_impossible_rank(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sc.save(NEW, tmp_path)
    file = tmp_path / "stagecomp.json"
    saved = json.loads(file.read_text())
    saved["layers"]["2"]["ranks"] = [99]  # a 1x1 Conv2d 8 -> 12 has rank at most 8
    file.write_text(json.dumps(saved))
    code, out, err = _run(["report", str(tmp_path)], capsys)
    assert code != 0 and "'2'" in err and "out of range" in err and not out


def test_compress_refuses_an_out_that_is_a_file_before_compressing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "taken").write_text("mine")

    def never(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the model was built before --out was checked")

    monkeypatch.setattr(cli, "build_torchvision_model", never)
    code, _, err = _run(
        ["compress", "squeezenet1_1", "--strategy", "reduction", "--out", str(tmp_path / "taken")],
        capsys,
    )
    assert code != 0 and "--out" in err and "existing file" in err
    assert (tmp_path / "taken").read_text() == "mine"
