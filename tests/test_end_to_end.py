"""End to end on real data: scikit-learn's digits, two stages, fine-tuning between steps."""

from __future__ import annotations

import copy

import pytest
import torch

import stagecomp as sc
from stagecomp.digits import DigitsCNN, DigitsData, accuracy, load_digits_data, train


@pytest.fixture(scope="module")
def trained() -> tuple[DigitsCNN, DigitsData]:
    torch.manual_seed(0)
    data = load_digits_data(0)
    return train(DigitsCNN(), data, epochs=12, seed=0), data


def test_two_stages_halve_macs_within_one_point(trained: tuple) -> None:
    original, data = trained
    model = copy.deepcopy(original)
    base_accuracy = accuracy(original, data)
    assert base_accuracy > 0.95
    x = data.test_x[:1]
    c = sc.Compressor(
        model, sc.Reduction(3.0), x, stages=2, layers_per_step=2, exclude=["fc2"], progress=False
    )
    while not c.done:
        result = c.compression_step()
        # A gentle fine-tune. At 2 epochs of lr 1e-3 the result hung on one CPU's rounding:
        # it passed on CI and lost 1.8 points on another machine; at 3 epochs of 5e-4 four
        # training seeds ended within 0.2 points of the original there.
        train(model, data, epochs=3, lr=5e-4, seed=result.step)
    before = sc.model_stats(original, x).macs
    after = sc.model_stats(model, x).macs
    assert before / after >= 2.0, (before, after)
    assert accuracy(model, data) >= base_accuracy - 0.01


def test_full_rank_compression_keeps_outputs(trained: tuple) -> None:
    original, data = trained
    model = copy.deepcopy(original).double()
    reference = copy.deepcopy(model)
    full = {}
    for name in ("conv2", "conv3", "fc1", "fc2"):
        shape = sc.LayerShape.from_module(model.get_submodule(name))
        method = "tucker2" if shape.kind == "conv2d" else "svd"
        full[name] = sc.registry.layer_class(method, shape).full_rank(shape, sc.DecomposeOptions())
    c = sc.Compressor(model, "manual", ranks=full, layers_per_step=4, progress=False)
    c.compression_step()
    x = data.test_x.double()
    with torch.no_grad():
        assert torch.allclose(model(x), reference(x), atol=1e-9, rtol=1e-9)
