"""A compressed model with every method exports (jit.trace, ONNX, torch.compile) unchanged."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import stagecomp as sc

# (index in the Sequential, method): every conv method, a 1x1 conv, every Linear method.
_DECOMPOSED = [
    (0, "svd"),
    (2, "tucker2"),
    (4, "cp3"),
    (6, "cp4"),
    (8, "tt"),
    (10, "ht"),
    (12, "svd_id"),
    (16, "svd"),
    (18, "tt"),
    (20, "svd_id"),
    (22, "ht"),
]


def _compressed() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1, groups=2),
        nn.ReLU(),
        nn.Conv2d(16, 16, 1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(64, 32),
        nn.ReLU(),
        nn.Linear(32, 8),
        nn.ReLU(),
        nn.Linear(8, 8),
        nn.ReLU(),
        nn.Linear(8, 8),
    )
    for index, method in _DECOMPOSED:
        model[index] = sc.decompose(model[index], method, 2 if method in ("tt", "ht") else 4)
    return model.eval()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_every_method_is_in_the_model() -> None:
    methods = {m.method for m in _compressed().modules() if isinstance(m, sc.DecomposedLayer)}
    assert methods == set(sc.METHODS)


def test_jit_trace_matches_eager() -> None:
    model = _compressed()
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        expected = model(x)
    traced = torch.jit.trace(model, x)  # check_trace on: the graph must not depend on mode
    with torch.no_grad():
        assert _rel(traced(x), expected) < 1e-6
        other = torch.randn(2, 3, 12, 12)
        assert _rel(traced(other), model(other)) < 1e-6


def _onnx_run(path: Path, x: torch.Tensor) -> torch.Tensor:
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (output,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    return torch.from_numpy(output)


def test_onnx_export_matches_eager_in_onnxruntime(tmp_path: Path) -> None:
    pytest.importorskip("onnx")
    model = _compressed()
    x = torch.randn(2, 3, 12, 12)
    path = tmp_path / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(model, (x,), str(path), dynamo=False)
    with torch.no_grad():
        assert _rel(_onnx_run(path, x), model(x)) < 1e-5


@pytest.mark.slow
def test_onnx_dynamo_export_matches_eager(tmp_path: Path) -> None:
    pytest.importorskip("onnxscript")
    model = _compressed()
    x = torch.randn(2, 3, 12, 12)
    path = tmp_path / "model.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=True)
    with torch.no_grad():
        assert _rel(_onnx_run(path, x), model(x)) < 1e-5


@pytest.mark.slow
def test_torch_compile_matches_eager() -> None:
    model = _compressed()
    x = torch.randn(2, 3, 12, 12)
    compiled = torch.compile(model)
    with torch.no_grad():
        assert _rel(compiled(x), model(x)) < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_on_cpu(dtype: torch.dtype) -> None:
    model = _compressed()
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        expected = model(x)
        half = model.to(dtype)(x.to(dtype))
    assert half.dtype == dtype
    assert _rel(half.float(), expected) < 2e-2


def test_channels_last_matches_eager() -> None:
    model = _compressed()
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        expected = model(x)
        with pytest.raises(RuntimeError, match="rank 4"):  # why to_channels_last exists
            _compressed().to(memory_format=torch.channels_last)
        converted = sc.to_channels_last(model)
        out = converted(x.to(memory_format=torch.channels_last))
    conv_weight = model[2].core.weight
    assert conv_weight.is_contiguous(memory_format=torch.channels_last)
    assert _rel(out, expected) < 1e-6
