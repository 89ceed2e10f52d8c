"""Layers beyond nn.Linear/nn.Conv2d: Hugging Face Conv1D, nn.Conv1d, and kinds left alone."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import stagecomp as sc
from stagecomp.plan import decomposable_layers


def _full_ranks(model: nn.Module) -> dict[str, int]:
    """Each target at its exact rank, named exactly (an exact name may grow the layer)."""
    ranks = {}
    for name, module in decomposable_layers(model):
        shape = sc.LayerShape.from_module(module, name)
        ranks[name] = min(shape.in_per_group * shape.kernel_numel, shape.out_per_group)
    return ranks


def test_gpt2_conv1d_is_a_linear_and_full_rank_is_exact() -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(
        n_layer=2, n_embd=16, n_head=2, vocab_size=40, n_positions=16, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(config).eval().double()
    x = torch.randint(0, 40, (2, 8))
    with torch.no_grad():
        reference = model(x).logits
    layer = model.transformer.h[0].attn.c_attn
    shape = sc.LayerShape.from_module(layer)
    assert (shape.kind, shape.in_channels, shape.out_channels) == ("linear", 16, 48)
    ranks = {k: v for k, v in _full_ranks(model).items() if k != "lm_head"}
    c = sc.Compressor(
        model, "vbmf", ranks=ranks, layers_per_step=100, progress=False,
        exclude=["transformer.h.1.mlp.c_fc"],
    )  # fmt: skip
    assert len(c.plan.targets) == 7
    assert c.plan.skipped["transformer.h.1.mlp.c_fc"] == "excluded"
    assert "Embedding" in c.plan.skipped["transformer.wte"]
    c.compression_step()
    assert isinstance(model.transformer.h[0].attn.c_attn, sc.SVDLinear)
    with torch.no_grad():
        assert (model(x).logits - reference).abs().max() < 1e-10
        dense = model.transformer.h[0].attn.c_attn.to_dense()
        assert torch.allclose(dense.weight, layer.weight.T)


@pytest.mark.parametrize(
    ("kernel", "stride", "padding", "dilation", "groups", "mode"),
    [
        (1, 1, 0, 1, 1, "zeros"),
        (3, 2, 1, 1, 1, "zeros"),
        (5, 1, 4, 2, 2, "reflect"),
        (3, 1, "same", 1, 1, "circular"),
    ],
)
def test_conv1d_full_rank_is_exact(
    kernel: int, stride: int, padding: int | str, dilation: int, groups: int, mode: str
) -> None:
    conv = nn.Conv1d(
        8, 12, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups,
        padding_mode=mode,
    ).double()  # fmt: skip
    x = torch.randn(2, 8, 20, dtype=torch.float64)
    shape = sc.LayerShape.from_module(conv)
    assert shape.kind == "conv1d" and shape.kernel_size == (1, kernel)
    method = "svd" if kernel == 1 else "tucker2"
    assert sc.get_method(method).is_default_for(shape)
    full = sc.get_method(method).layer_class(shape).full_rank(shape, sc.DecomposeOptions())
    layer = sc.decompose(conv, method, full)
    with torch.no_grad():
        assert (layer(x) - conv(x)).abs().max() < 1e-10
        assert (layer(x[0]) - conv(x[0])).abs().max() < 1e-10  # unbatched (C, L)
        dense = layer.to_dense()
    assert isinstance(dense, nn.Conv1d) and torch.allclose(dense.weight, conv.weight)
    small = sc.decompose(conv, method, 2)
    assert (small(x) - conv(x)).abs().max() > 1e-3


def test_conv1d_in_a_model_is_compressed_and_saved(tmp_path: object) -> None:
    model = nn.Sequential(nn.Conv1d(4, 16, 3, padding=1), nn.ReLU(), nn.Conv1d(16, 16, 1))
    c = sc.Compressor(model, sc.Reduction(2.0), layers_per_step=10, progress=False)
    assert [t.method for t in c.plan.targets] == ["tucker2", "svd"]
    c.compression_step()
    x = torch.randn(2, 4, 10)
    expected = model(x)
    sc.save(model, tmp_path)  # type: ignore[arg-type]
    fresh = nn.Sequential(nn.Conv1d(4, 16, 3, padding=1), nn.ReLU(), nn.Conv1d(16, 16, 1))
    sc.load(fresh, tmp_path)  # type: ignore[arg-type]
    assert torch.allclose(fresh(x), expected)


def test_unsupported_kinds_are_listed_with_a_reason() -> None:
    model = nn.Sequential(
        nn.Embedding(10, 8),
        nn.Linear(8, 32),
        nn.Conv3d(4, 4, 3),
        nn.ConvTranspose2d(4, 4, 3),
        nn.ConvTranspose1d(4, 4, 3),
        nn.Bilinear(4, 4, 4),
        nn.LazyLinear(4),
        nn.Linear(32, 32),
    )
    c = sc.Compressor(model, sc.Reduction(2.0), progress=False)
    assert [t.name for t in c.plan.targets] == ["1", "7"]
    skipped = c.plan.skipped
    assert "Embedding" in skipped["0"]
    assert "3-D" in skipped["2"]
    assert "transposed" in skipped["3"] and "transposed" in skipped["4"]
    assert "Bilinear" in skipped["5"]
    assert "lazy" in skipped["6"]
    assert "Embedding" in str(c.plan)
