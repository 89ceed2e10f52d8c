"""Attacks on the layers a run replaces: not plain ones, hooks, frozen parts, huge weights.

Every module the generators build is either replaced so that the model computes the same
function at full rank (its hooks included), or left exactly as it was with the reason in
the plan; never replaced into something that computes another function.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.ao.nn.intrinsic.qat as nniqat
import torch.ao.nn.qat as nnqat
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.ao.quantization import get_default_qat_qconfig
from torch.nn.utils import parametrize

import stagecomp as sc
from stagecomp import recipe
from stagecomp.errors import NonFiniteWeightError
from stagecomp.layer_shape import LayerShape
from stagecomp.layers.base import DecomposedLayer
from stagecomp.methods import METHODS, get_method
from stagecomp.registry import LAYER_CLASSES

PLAIN = ("plain", "subclass_without_code")
CUSTOM = ("subclass_forward", "subclass_conv_forward", "instance_forward", "qat")
FIXED = ("parametrization", "state_dict_hook")


class _Scale(nn.Module):
    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * 2


def _layer(kind: str, variant: str) -> nn.Module:
    """One Linear 4->6 or Conv2d 4->6 (3x3) of the given variant."""
    base: type[nn.Module] = nn.Linear if kind == "linear" else nn.Conv2d
    args: tuple[Any, ...] = (4, 6) if kind == "linear" else (4, 6, 3)
    kwargs: dict[str, Any] = {} if kind == "linear" else {"padding": 1}
    if variant == "qat":
        qconfig = get_default_qat_qconfig()
        if kind == "linear":
            return nnqat.Linear(*args, qconfig=qconfig)
        return nniqat.ConvBn2d(*args, qconfig=qconfig, **kwargs)
    if variant == "subclass_without_code":
        return type("Tagged" + base.__name__, (base,), {"note": "only adds an attribute"})(
            *args, **kwargs
        )
    if variant == "subclass_forward":

        def forward(self: Any, x: torch.Tensor) -> torch.Tensor:
            weight = self.weight - self.weight.mean()  # weight standardisation, in short
            if kind == "linear":
                return nn.functional.linear(x, weight, self.bias)
            return self._conv_forward(x, weight, self.bias)

        return type("Standardised" + base.__name__, (base,), {"forward": forward})(*args, **kwargs)
    if variant == "subclass_conv_forward":
        if kind == "linear":  # a Linear has no _conv_forward: the forward is the code then
            return _layer(kind, "subclass_forward")

        def conv_forward(self: Any, x: torch.Tensor, weight: torch.Tensor, bias: Any) -> Any:
            return nn.Conv2d._conv_forward(self, x, weight.sign(), bias)

        return type("SignConv2d", (nn.Conv2d,), {"_conv_forward": conv_forward})(*args, **kwargs)
    layer = base(*args, **kwargs)
    if variant == "instance_forward":
        stock = layer.forward
        layer.forward = lambda x: stock(x) * 3  # type: ignore[method-assign]
    elif variant == "parametrization":
        parametrize.register_parametrization(layer, "weight", _Scale())
    elif variant == "state_dict_hook":
        layer._register_state_dict_hook(lambda module, state, prefix, local: state)
    return layer


def _model(kind: str, layer: nn.Module) -> tuple[nn.Sequential, torch.Tensor]:
    last = nn.Linear(6, 3) if kind == "linear" else nn.Conv2d(6, 3, 1)
    x = torch.randn(2, 4) if kind == "linear" else torch.randn(2, 4, 5, 5)
    return nn.Sequential(layer, nn.Tanh(), last).eval(), x


def _stock_or_custom(
    kind: str, variant: str, opt_in: bool, forward_hook: bool, pre_hook: bool, seed: int
) -> None:
    torch.manual_seed(seed)
    layer = _layer(kind, variant)
    if forward_hook:
        layer.register_forward_hook(lambda module, inputs, output: output * 2 + 1)
    if pre_hook:
        layer.register_forward_pre_hook(lambda module, inputs: (inputs[0] * 0.5,))
    model, x = _model(kind, layer)
    with torch.no_grad():
        before = model(x)
    ranks = {"0": 10**6} if opt_in else {}
    c = sc.Compressor(
        model,
        sc.Manual(rank=10**6, allows_growth=True),
        ranks=ranks,
        layers_per_step=2,
        progress=False,
    )
    if variant in FIXED or (variant in CUSTOM and not opt_in):
        assert "0" in c.skipped and "0" not in [t.name for t in c.targets]
        if variant in CUSTOM:
            assert "name the layer exactly" in c.skipped["0"]
        c.compression_step()
        assert model[0] is layer  # left exactly as it was
        with torch.no_grad():
            torch.testing.assert_close(model(x), before, rtol=1e-4, atol=1e-5)
        return
    c.compression_step()
    assert isinstance(model[0], DecomposedLayer)
    if variant in CUSTOM:  # opted in: replaced, and the plan says what that means
        assert "replaced as asked" in (c.targets[0].note or "")
        return
    with torch.no_grad():  # full rank: the same function, hooks included
        torch.testing.assert_close(model(x), before, rtol=1e-4, atol=1e-5)


@given(
    kind=st.sampled_from(["linear", "conv2d"]),
    variant=st.sampled_from(PLAIN + CUSTOM + FIXED),
    opt_in=st.booleans(),
    forward_hook=st.booleans(),
    pre_hook=st.booleans(),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=50)
def test_only_stock_layers_are_replaced_and_replacing_keeps_the_function(
    kind: str, variant: str, opt_in: bool, forward_hook: bool, pre_hook: bool, seed: int
) -> None:
    _stock_or_custom(
        kind=kind,
        variant=variant,
        opt_in=opt_in,
        forward_hook=forward_hook,
        pre_hook=pre_hook,
        seed=seed,
    )


@pytest.mark.slow
@given(
    kind=st.sampled_from(["linear", "conv2d"]),
    variant=st.sampled_from(PLAIN + CUSTOM + FIXED),
    opt_in=st.booleans(),
    forward_hook=st.booleans(),
    pre_hook=st.booleans(),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=500)
def test_only_stock_layers_are_replaced_and_replacing_keeps_the_function_sweep(
    kind: str, variant: str, opt_in: bool, forward_hook: bool, pre_hook: bool, seed: int
) -> None:
    _stock_or_custom(
        kind=kind,
        variant=variant,
        opt_in=opt_in,
        forward_hook=forward_hook,
        pre_hook=pre_hook,
        seed=seed,
    )


def test_hooks_move_to_the_new_layer_and_their_handles_still_remove_them() -> None:
    model, x = _model("linear", nn.Linear(4, 6))
    calls: list[str] = []
    forward = model[0].register_forward_hook(lambda m, i, o: calls.append("forward"))
    pre = model[0].register_forward_pre_hook(lambda m, i: calls.append("pre"))
    backward = model[0].register_full_backward_hook(lambda m, gi, go: calls.append("backward"))
    c = sc.Compressor(model, sc.Manual(rank=2), layers_per_step=2, progress=False)
    c.compression_step()
    model(x.requires_grad_()).sum().backward()
    assert calls == ["pre", "forward", "backward"]
    for handle in (forward, pre, backward):
        handle.remove()
    calls.clear()
    model(x).sum().backward()
    assert calls == []


def test_a_parametrization_added_after_the_plan_is_skipped_at_its_step() -> None:
    model, _ = _model("linear", nn.Linear(4, 6))
    c = sc.Compressor(model, sc.Manual(rank=2), progress=False)
    parametrize.register_parametrization(model[0], "weight", _Scale())
    change = c.compression_step().changes[0]
    assert change.skipped is not None and "parametrization" in change.skipped
    assert isinstance(model[0], nn.Linear)


@given(
    method=st.sampled_from(METHODS),
    weight_trained=st.booleans(),
    bias_trained=st.booleans(),
    stages=st.integers(1, 2),
    data_aware=st.booleans(),
)
@settings(max_examples=25)
def test_requires_grad_is_kept_per_parameter_role(
    method: str, weight_trained: bool, bias_trained: bool, stages: int, data_aware: bool
) -> None:
    kind = "linear" if "linear" in get_method(method).kinds else "conv2d"
    layer = _layer(kind, "plain")
    layer.weight.requires_grad_(weight_trained)
    layer.bias.requires_grad_(bias_trained)
    model, x = _model(kind, layer)
    shape = LayerShape.from_module(layer)
    calibration = None
    if data_aware and get_method(method).supports_data_aware(shape):
        calibration = sc.Calibration([x], factors={"0": "whiten"})
    c = sc.Compressor(
        model,
        sc.Reduction(1.5),
        exclude=["2"],
        methods={"0": method},
        stages=stages,
        calibration=calibration,
        options=sc.DecomposeOptions(cp_max_iter=5),  # the flags are the point, not the fit
        progress=False,
    )
    while not c.done:
        c.compression_step()
    new = model[0]
    assert isinstance(new, DecomposedLayer)
    bias = new.bias_parameter()
    assert bias is not None and bias.requires_grad == bias_trained
    factors = [p for p in new.parameters() if p is not bias]
    assert factors and all(p.requires_grad == weight_trained for p in factors)


def _applicable(method: str, large: bool) -> nn.Module:
    """A layer the method applies to; ``large`` ones are factorised in float32."""
    if "linear" in get_method(method).kinds:
        return nn.Linear(600, 600) if large else nn.Linear(16, 12)
    return nn.Conv2d(64, 64, 3) if large else nn.Conv2d(8, 12, 3)


@given(
    method=st.sampled_from(METHODS),
    largest=st.sampled_from([1e30, 2.0**120, 1e38, 3.0e38, 3.4e38]),
    full=st.booleans(),
    large=st.booleans(),
    seed=st.integers(0, 2**16),
)
@settings(max_examples=40)
def test_weights_near_the_float32_maximum_give_finite_factors_or_a_clear_error(
    method: str, largest: float, full: bool, large: bool, seed: int
) -> None:
    torch.manual_seed(seed)
    module = _applicable(method, large and method in ("svd", "svd_id", "tt"))
    with torch.no_grad():  # entries up to ``largest``, all finite in float32
        module.weight.copy_(torch.rand_like(module.weight).mul(2).sub(1).mul(largest))
    assert torch.isfinite(module.weight).all()
    shape = LayerShape.from_module(module)
    cls = get_method(method).layer_class(shape)
    rank = cls.full_rank(shape, sc.DecomposeOptions()) if full else 4
    try:
        layer = sc.decompose(module, method, rank, name="big")
    except NonFiniteWeightError as error:
        assert "'big'" in str(error)
        return
    assert all(bool(torch.isfinite(p).all()) for p in layer.parameters())
    expected = module.weight.detach().double()
    approx = copy.deepcopy(layer).double().dense_weight().detach()
    error = float((approx - expected).norm() / expected.norm())
    assert error < (1e-3 if full else 1.0)  # exact at full rank; better than nothing below


@pytest.mark.parametrize("method", METHODS)
def test_manual_rank_caps_every_method_on_a_layer_smaller_than_it(method: str) -> None:
    # vgg16's first layer has 3 input channels; tucker2, cp3 and tt ranks stay below 64.
    layer = nn.Linear(3, 5) if "linear" in get_method(method).kinds else nn.Conv2d(3, 8, 3)
    model, _ = _model("linear" if isinstance(layer, nn.Linear) else "conv2d", layer)
    if isinstance(layer, nn.Linear):
        model[0], model[2] = nn.Linear(3, 6), nn.Linear(6, 3)
    else:
        model[0] = nn.Conv2d(3, 6, 3)
    c = sc.Compressor(
        model, sc.Manual(rank=64), methods={"0": method}, exclude=["2"], progress=False
    )
    if "0" in c.skipped:  # too small for this method: skipped with the reason, not an error
        assert "too small" in c.skipped["0"]
        return
    c.compression_step()


@pytest.mark.parametrize("cls", LAYER_CLASSES, ids=lambda c: f"{c.method}-{c.kinds[0]}")
def test_every_layer_class_declares_the_structure_it_records(cls: type[DecomposedLayer]) -> None:
    module = nn.Linear(12, 8) if "linear" in cls.kinds else nn.Conv2d(6, 8, 3)
    layer = cls.from_module(module, 2)
    assert set(layer.structure()) <= set(cls.structure_keys)
    entry = recipe.layer_entry(layer)
    assert recipe.read_entry("x", entry, LayerShape.from_module(module)).ranks == layer.ranks
