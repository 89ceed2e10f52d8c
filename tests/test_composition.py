"""After compression, the tools people compose with reach the factors: int8 quantization
(torch.ao and torchao) and LoRA adapters (peft). TT cores are not modules: they stay float."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import stagecomp as sc

# torch deprecates its own eager int8 path (torch.ao) in favour of torchao; both are tested.
pytestmark = [
    pytest.mark.filterwarnings("ignore:torch.ao.quantization is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning"),
]


def _compressed(method: str = "svd") -> tuple[nn.Sequential, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32)).eval()
    x = torch.randn(8, 64)
    c = sc.Compressor(
        model,
        sc.Reduction(2.0),
        x,
        methods={"0": method, "2": method},
        layers_per_step=8,
        progress=False,
    )
    c.compression_step()
    assert all(isinstance(model[i], sc.DecomposedLayer) for i in (0, 2))
    return model, x


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_dynamic_int8_reaches_every_svd_factor() -> None:
    model, x = _compressed()
    with torch.no_grad():
        reference = model(x)
    quantized = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    kinds = [type(m).__name__ for m in quantized.modules()]
    assert kinds.count("Linear") == 4 and "SVDLinear" in kinds  # the factors' int8 Linear
    assert all(type(m) is not nn.Linear for m in quantized.modules())
    with torch.no_grad():
        assert 0 < _relative(quantized(x), reference) < 0.05


def test_tt_cores_stay_float_under_dynamic_int8() -> None:
    model, x = _compressed("tt")
    with torch.no_grad():
        reference = model(x)
    quantized = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    assert all(p.dtype == torch.float32 for p in quantized.parameters())
    with torch.no_grad():
        assert _relative(quantized(x), reference) == 0.0  # nothing was quantized


def test_torchao_int8_weight_only_reaches_the_factors() -> None:
    pytest.importorskip("torchao", reason="torchao (pip install 'stagecomp[int8]')")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    model, x = _compressed()
    with torch.no_grad():
        reference = model(x)
    quantize_(model, Int8WeightOnlyConfig())
    factors = [m.weight for n, m in model.named_modules() if n.endswith(("first", "second"))]
    assert len(factors) == 4
    assert all(type(w) is not nn.Parameter and type(w) is not torch.Tensor for w in factors)
    with torch.no_grad():
        assert 0 < _relative(model(x), reference) < 0.05


def test_lora_on_the_factor_names_trains_only_the_adapters() -> None:
    pytest.importorskip("peft", reason="peft (pip install 'stagecomp[lora]')")
    from peft import LoraConfig, get_peft_model

    model, x = _compressed()
    with torch.no_grad():
        reference = model(x)
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=["first", "second"]))
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert len(trainable) == 8  # lora_A and lora_B on 2 factors of 2 layers
    assert all("lora_" in n for n in trainable)
    with torch.no_grad():
        assert _relative(lora(x), reference) == 0.0  # lora_B starts at zero
    frozen = {n: p.detach().clone() for n, p in lora.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.SGD([p for p in lora.parameters() if p.requires_grad], lr=0.1)
    for _ in range(2):
        optimizer.zero_grad()
        lora(x).square().mean().backward()
        optimizer.step()
    with torch.no_grad():
        assert _relative(lora(x), reference) > 1e-4
    assert all(torch.equal(p, frozen[n]) for n, p in lora.named_parameters() if n in frozen)
