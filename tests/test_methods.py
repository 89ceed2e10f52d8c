"""Contract tests run over every registered method handler (``stagecomp.methods``).

A new method is covered by registering its handler: these tests then check that its
layer classes cover its kinds, that the matrices VBMF reads fit its ranks, that its
data-aware factors are exact at full rank and that a BatchNorm folds where it says.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch
from torch import nn

import stagecomp as sc
from stagecomp.calibration import collect_gradient_moments, collect_statistics
from stagecomp.errors import MethodRegistrationError
from stagecomp.layers.svd_linear import SVDLinear
from stagecomp.methods import (
    METHODS,
    MethodHandler,
    default_method,
    get_method,
    handler_of,
    methods_for,
    register_method,
)

D = torch.float64
OPTIONS = sc.DecomposeOptions(seed=0)
KINDS = ("linear", "conv2d", "conv1d")


def _geometries() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {
        "linear": nn.Linear(12, 10, dtype=D),
        "pointwise": nn.Conv2d(8, 6, 1, dtype=D),
        "conv3x3": nn.Conv2d(8, 6, 3, padding=1, dtype=D),
        "grouped": nn.Conv2d(8, 6, 3, padding=1, groups=2, bias=False, dtype=D),
    }


GEOMETRIES = tuple(_geometries())


def _module(geometry: str) -> nn.Module:
    return _geometries()[geometry]


def _inputs(module: nn.Module, n: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    if isinstance(module, nn.Linear):
        return torch.randn(n, module.in_features, dtype=D, generator=g)
    assert isinstance(module, nn.Conv2d)
    return torch.randn(n // 16, module.in_channels, 5, 5, dtype=D, generator=g)


def _applicable(method: str, geometry: str) -> tuple[MethodHandler, sc.LayerShape, nn.Module]:
    module = _module(geometry)
    shape = sc.LayerShape.from_module(module)
    handler = get_method(method)
    if not handler.applies_to(shape, OPTIONS):
        pytest.skip(f"{method} does not apply to {geometry}")
    return handler, shape, module


def _relative(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).detach().norm() / expected.detach().norm())


def _group_norms(weight: torch.Tensor, shape: sc.LayerShape) -> list[float]:
    return [float(g.norm()) for g in shape.grouped_weight(weight.detach().double())]


# ---------------------------------------------------------------------- registry


def test_methods_are_in_the_order_users_see() -> None:
    assert METHODS == ("svd", "svd_id", "tucker2", "cp3", "cp4", "tt", "ht")
    assert sc.METHODS == METHODS
    assert sc.registry.LAYER_CLASSES == sc.methods.LAYER_CLASSES
    assert len(set(sc.methods.LAYER_CLASSES)) == len(sc.methods.LAYER_CLASSES)


@pytest.mark.parametrize("method", METHODS)
def test_layer_classes_cover_the_kinds(method: str) -> None:
    handler = get_method(method)
    assert handler.name == method
    assert handler.summary
    assert handler.kinds and set(handler.kinds) <= set(KINDS)
    for cls in handler.layer_classes:
        assert cls.method == method
    for kind in handler.kinds:
        shape = sc.LayerShape(kind, 8, 6)
        cls = handler.layer_class(shape)
        assert kind in cls.kinds
        assert sum(kind in c.kinds for c in handler.layer_classes) == 1
        assert method in methods_for(shape)
        assert sc.methods.layer_class(method, shape) is cls


@pytest.mark.parametrize(
    ("method", "kind"),
    [(m, k) for m in METHODS for k in KINDS if k not in get_method(m).kinds],
)
def test_layer_class_refuses_other_kinds(method: str, kind: str) -> None:
    shape = sc.LayerShape(kind, 8, 6)
    assert method not in methods_for(shape)
    assert not get_method(method).applies_to(shape)
    with pytest.raises(sc.UnsupportedLayerError, match=rf"{method!r} applies only to"):
        get_method(method).layer_class(shape, "head")
    with pytest.raises(sc.UnsupportedLayerError, match="head"):
        sc.registry.layer_class(method, shape, "head")


@pytest.mark.parametrize("method", METHODS)
def test_duplicate_registration_is_refused(method: str) -> None:
    handler = get_method(method)
    duplicate = type("Duplicate", (MethodHandler,), {"name": method, "layer_classes": ()})
    with pytest.raises(MethodRegistrationError, match=rf"{method!r} is already registered"):
        register_method(duplicate)
    assert get_method(method) is handler


def test_a_layer_class_belongs_to_one_method() -> None:
    thief = type("Thief", (MethodHandler,), {"name": "svd_copy", "layer_classes": (SVDLinear,)})
    with pytest.raises(MethodRegistrationError, match="SVDLinear"):
        register_method(thief)
    with pytest.raises(sc.UnknownMethodError):
        get_method("svd_copy")


def test_unknown_names_get_suggestions() -> None:
    with pytest.raises(sc.UnknownMethodError, match=r"did you mean 'tucker2'\?.*allowed: svd,"):
        get_method("tuker2")
    with pytest.raises(
        sc.UnknownMethodError, match="allowed: svd, svd_id, tucker2, cp3, cp4, tt, ht"
    ):
        sc.registry.check_method("nothing-like-it")


@pytest.mark.parametrize(
    ("geometry", "expected"),
    [("linear", "svd"), ("pointwise", "svd"), ("conv3x3", "tucker2"), ("grouped", "tucker2")],
)
def test_default_method(geometry: str, expected: str) -> None:
    assert default_method(sc.LayerShape.from_module(_module(geometry))) == expected


def test_methods_by_kind() -> None:
    # The CLI's --conv-method / --linear-method choices.
    assert sc.methods.methods_for_kind("conv2d") == METHODS
    assert sc.methods.methods_for_kind("linear") == ("svd", "svd_id", "tt", "ht")


# ---------------------------------------------------------------------- VBMF matrices


def _check_matrices(
    matrices: list[list[torch.Tensor]], ranks: tuple[int, ...], layer: nn.Module
) -> None:
    """One list per rank; each matrix unfolds (or folds exactly) one group's current weight:
    same Frobenius norm, and no more matrix rank than that rank allows."""
    shape = sc.LayerShape.from_module(layer)
    weight = layer.dense_weight() if isinstance(layer, sc.DecomposedLayer) else layer.weight
    norms = _group_norms(weight, shape)
    assert len(matrices) == len(ranks)
    for rank, group_matrices in zip(ranks, matrices, strict=True):
        assert group_matrices and len(group_matrices) % shape.groups == 0
        for i, m in enumerate(group_matrices):
            assert m.dim() == 2 and m.dtype == D
            assert float(m.norm()) == pytest.approx(norms[i % shape.groups], rel=1e-10)
            assert int(torch.linalg.matrix_rank(m, rtol=1e-9)) <= rank


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("method", METHODS)
def test_spectral_matrices_fit_the_ranks_dense(method: str, geometry: str) -> None:
    handler, shape, module = _applicable(method, geometry)
    full = handler.layer_class(shape).full_rank(shape, OPTIONS)
    matrices = handler.spectral_matrices(module, shape, OPTIONS, "layer")
    _check_matrices(matrices, full, module)
    # Random weights: at least one matrix per rank is as large as the full rank allows.
    for rank, group_matrices in zip(full, matrices, strict=True):
        reached = max(int(torch.linalg.matrix_rank(m)) for m in group_matrices)
        assert reached == min(rank, max(min(m.shape) for m in group_matrices))


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("method", METHODS)
def test_spectral_matrices_fit_the_ranks_after_one_stage(method: str, geometry: str) -> None:
    handler, shape, module = _applicable(method, geometry)
    cls = handler.layer_class(shape)
    full = cls.full_rank(shape, OPTIONS)
    ranks = cls.normalize_rank(shape, tuple(max(1, f // 2) for f in full), OPTIONS)
    layer = sc.decompose(module, method, ranks, options=OPTIONS)
    assert handler_of(layer) is handler
    matrices = handler.spectral_matrices(layer, shape, OPTIONS, "layer")
    _check_matrices(matrices, layer.ranks, layer)
    # Half the rank really is missing from the dense weight's matrices.
    if any(r < f for r, f in zip(layer.ranks, full, strict=True)):
        dense = handler.spectral_matrices(layer.to_dense(), shape, OPTIONS, "layer")
        _check_matrices(dense, layer.ranks, layer)


def test_spectral_matrices_fail_where_the_rank_is_too_small() -> None:
    """The check above can fail: a dense random weight exceeds a halved rank."""
    handler, shape, module = _applicable("svd", "linear")
    matrices = handler.spectral_matrices(module, shape, OPTIONS, "layer")
    with pytest.raises(AssertionError):
        _check_matrices(matrices, (5,), module)


# ---------------------------------------------------------------------- data-aware


def _statistics(
    module: nn.Module, handler: MethodHandler, shape: sc.LayerShape, variant: str
) -> sc.LayerStatistics:
    model = nn.Sequential(module)
    batches = [_inputs(module), _inputs(module, 32)]
    stats = collect_statistics(
        model, batches, ["0"], outputs=handler.needs_outputs(shape), progress=False
    )["0"]
    if variant == "gradient":
        stats.gradient_moment = collect_gradient_moments(model, batches, ["0"], progress=False)["0"]
    return stats


DATA_AWARE = [
    (m, g, v)
    for m in METHODS
    for g in GEOMETRIES
    for v in get_method(m).data_aware_variants
    if get_method(m).supports_data_aware(sc.LayerShape.from_module(_module(g)))
]


def test_data_aware_cases_exist() -> None:
    assert {m for m, _, _ in DATA_AWARE} == {"svd", "svd_id", "tucker2"}


@pytest.mark.parametrize(("method", "geometry", "variant"), DATA_AWARE)
def test_data_aware_factors_are_exact_at_full_rank(
    method: str, geometry: str, variant: str
) -> None:
    handler, shape, module = _applicable(method, geometry)
    stats = _statistics(module, handler, shape, variant)
    full = handler.layer_class(shape).full_rank(shape, OPTIONS)
    layer = sc.decompose_data_aware(module, method, full, stats, variant=variant)
    assert handler_of(layer) is handler
    assert _relative(layer.dense_weight(), module.weight) < 1e-10
    x = _inputs(module)
    with torch.no_grad():
        assert _relative(layer(x), module(x)) < 1e-10


@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("method", METHODS)
def test_data_aware_is_refused_where_the_handler_has_none(method: str, geometry: str) -> None:
    handler, shape, module = _applicable(method, geometry)
    if handler.supports_data_aware(shape):
        assert handler.data_aware_variants
        assert set(handler.data_aware_variants) <= set(sc.data_aware.VARIANTS)
        return
    assert not handler.needs_outputs(shape)
    assert sc.data_aware.supports_data_aware(method, shape) is False
    stats = collect_statistics(nn.Sequential(module), [_inputs(module)], ["0"], progress=False)
    with pytest.raises(sc.UnsupportedLayerError, match=rf"layer 'fc'.*{method!r}"):
        sc.decompose_data_aware(module, method, 1, stats["0"], name="fc")


# ---------------------------------------------------------------------- BatchNorm folding


@pytest.mark.parametrize("geometry", ["pointwise", "conv3x3", "grouped"])
@pytest.mark.parametrize("method", METHODS)
def test_fold_target_folds_a_batchnorm_exactly(method: str, geometry: str) -> None:
    handler, shape, module = _applicable(method, geometry)
    cls = handler.layer_class(shape)
    ranks = tuple(max(1, f // 2) for f in cls.full_rank(shape, OPTIONS))
    layer = sc.decompose(module, method, ranks, options=OPTIONS)
    bn = nn.BatchNorm2d(shape.out_channels, dtype=D)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(shape.out_channels, dtype=D, generator=g))
        bn.running_var.copy_(torch.rand(shape.out_channels, dtype=D, generator=g) + 0.5)
        bn.weight.copy_(torch.randn(shape.out_channels, dtype=D, generator=g))
        bn.bias.copy_(torch.randn(shape.out_channels, dtype=D, generator=g))
    model = nn.Sequential(layer, bn).eval()
    x = _inputs(module)
    with torch.no_grad():
        expected = model(x)
        assert _relative(layer(x), expected) > 0.1  # the BatchNorm matters
    target = handler.fold_target(layer)
    folded = sc.fold_batchnorm(model)
    if target is None:
        assert folded == []
        assert isinstance(model[1], nn.BatchNorm2d)
        return
    assert target.out_channels == shape.out_channels
    assert folded == [("0", "1")]
    assert isinstance(model[1], nn.Identity)
    with torch.no_grad():
        assert _relative(model(x), expected) < 1e-10
        assert _relative(layer(x), expected) < 1e-10  # folded into the layer itself


@pytest.mark.parametrize("method", METHODS)
def test_linear_layers_have_no_fold_target(method: str) -> None:
    handler = get_method(method)
    if "linear" not in handler.kinds:
        pytest.skip(f"{method} has no Linear layers")
    layer = sc.decompose(_module("linear"), method, 2, options=OPTIONS)
    assert handler.fold_target(layer) is None


# ---------------------------------------------------------------------- no name switches

# Files being migrated to the handlers by other developers; remove them from this list
# as they land.
MIGRATING = {"cli.py"}

NAME_SWITCH = re.compile(
    r"""method\s*(?:==|!=)\s*["']"""  # method == "svd", cls.method != 'tt'
    r"""|method\s+(?:not\s+)?in\s*[(\[{]\s*["']"""  # method in ("svd", "svd_id")
    r"""|["']\s*(?:==|!=)\s*[\w.]*method\b"""  # "svd" == method
)


@pytest.mark.parametrize(
    "line",
    [
        'if method == "tucker2":',
        "if request.cls.method in ('svd', 'svd_id'):",
        'elif linear_method != "tt":',
        'if "cp3" == cls.method:',
        'if method not in ["svd"]:',
    ],
)
def test_the_name_switch_pattern_catches_switches(line: str) -> None:
    assert NAME_SWITCH.search(line)


def test_only_handlers_compare_method_names() -> None:
    package = Path(sc.__file__).parent
    offenders = []
    for path in sorted(package.rglob("*.py")):
        relative = path.relative_to(package)
        if relative.parts[0] == "methods" or str(relative) in MIGRATING:
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if NAME_SWITCH.search(line):
                offenders.append(f"{relative}:{number}: {line.strip()}")
    assert offenders == []


ABOVE_METHODS = ("strategies", "compressor", "calibration", "cli", "report", "data_aware")


def test_handlers_import_nothing_above_them() -> None:
    """Data flows down: methods/ imports layers and decompositions, never their callers
    (``LayerStatistics`` only for type checking)."""
    offenders = []
    for path in sorted((Path(sc.__file__).parent / "methods").glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in tree.body:  # module level: TYPE_CHECKING blocks are `if` nodes
            if isinstance(node, ast.ImportFrom) and node.module:
                parts = node.module.split(".")
                if parts[0] == "stagecomp" and len(parts) > 1 and parts[1] in ABOVE_METHODS:
                    offenders.append(f"{path.name}: {node.module}")
    assert offenders == []
