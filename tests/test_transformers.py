"""Hugging Face and torchvision transformers: weights read by attribute, dict inputs, caches."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import stagecomp as sc


def _quiet(transformers: object) -> None:
    transformers.logging.set_verbosity_error()  # type: ignore[attr-defined]


@pytest.mark.slow
def test_swin_layers_read_by_weight_are_skipped() -> None:
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.swin_t(weights=None, num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    c = sc.Compressor(model, sc.Reduction(2.0), x, layers_per_step=1000, progress=False)
    skipped = c.plan.skipped
    read = [n for n, r in skipped.items() if "reads its weight" in r]
    assert len(read) == 24  # qkv and proj of 12 blocks
    assert "ShiftedWindowAttention.forward" in skipped["features.1.0.attn.qkv"]
    assert "features.1.0.mlp.0" in {t.name for t in c.plan.targets}
    assert type(model.features[1][0].attn.qkv) is nn.Linear  # the watch left it as it was


@pytest.mark.slow
def test_swin_compresses_around_the_layers_read_by_weight() -> None:
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.swin_t(weights=None, num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    c = sc.Compressor(model, sc.Reduction(2.0), x, layers_per_step=1000, progress=False)
    c.compression_step()
    with torch.no_grad():
        assert torch.isfinite(model(x)).all()  # replaced layers run; read ones stay dense
    assert isinstance(model.features[1][0].attn.qkv, nn.Linear)


def test_without_example_input_the_plan_says_reads_were_not_checked() -> None:
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 8))
    c = sc.Compressor(model, sc.Reduction(2.0), progress=False)
    assert "not checked" in str(c.plan)
    c = sc.Compressor(model, sc.Reduction(2.0), torch.randn(2, 8), progress=False)
    assert "not checked" not in str(c.plan)


class _ReadsOutside(nn.Module):
    """Calls ``inner`` and also reads its weight's dtype, like T5 or HF ViT do."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(16, 16)
        self.other = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.other(self.inner(x.to(self.inner.weight.dtype)))


def test_a_weight_read_beside_the_forward_is_found() -> None:
    model = _ReadsOutside()
    c = sc.Compressor(model, sc.Reduction(2.0), torch.randn(2, 16), progress=False)
    assert "outside its forward" in c.plan.skipped["inner"]
    assert [t.name for t in c.plan.targets] == ["other"]
    assert type(model.inner) is nn.Linear  # the watch left the class as it was


def _vit() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    _quiet(transformers)
    config = transformers.ViTConfig(
        image_size=16, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=32, num_labels=3,
    )  # fmt: skip
    return transformers.ViTForImageClassification(config).eval()


def test_hf_vit_patch_embedding_is_skipped_and_the_rest_compresses() -> None:
    model = _vit()
    x = torch.randn(2, 3, 16, 16)
    c = sc.Compressor(
        model, sc.Reduction(2.0), {"pixel_values": x}, layers_per_step=100, progress=False
    )
    name = "vit.embeddings.patch_embeddings.projection"
    assert "outside its forward" in c.plan.skipped[name]
    c.compression_step()
    with torch.no_grad():
        assert model(pixel_values=x).logits.shape == (2, 3)


def _gpt2(tie: bool) -> nn.Module:
    transformers = pytest.importorskip("transformers")
    _quiet(transformers)
    config = transformers.GPT2Config(
        n_layer=1, n_embd=16, n_head=2, vocab_size=40, n_positions=16, bos_token_id=0,
        eos_token_id=0, tie_word_embeddings=tie,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config).eval()


def test_an_untied_output_head_is_skipped_unless_named() -> None:
    model = _gpt2(tie=False)
    batch = {"input_ids": torch.randint(0, 40, (2, 8)), "attention_mask": torch.ones(2, 8)}
    c = sc.Compressor(model, sc.Reduction(2.0), batch, progress=False)
    assert "output embedding head" in c.plan.skipped["lm_head"]
    c = sc.Compressor(model, sc.Reduction(2.0), batch, ranks={"lm_head": 4}, progress=False)
    assert "lm_head" in {t.name for t in c.plan.targets}


def test_a_tokenizer_dict_counts_macs_with_the_cache_off() -> None:
    model = _gpt2(tie=True)
    assert model.config.use_cache
    batch = {"input_ids": torch.randint(0, 40, (2, 8)), "attention_mask": torch.ones(2, 8)}
    stats = sc.model_stats(model, batch)
    # c_attn: 16 -> 48 on 16 tokens.
    assert stats.layer_macs["transformer.h.0.attn.c_attn"] == 16 * 16 * 48
    assert model.config.use_cache  # restored
    c = sc.Compressor(model, sc.Reduction(2.0), batch, layers_per_step=10, progress=False)
    result = c.compression_step()
    assert result.macs_after is not None and result.macs_before is not None
    assert result.macs_after < result.macs_before


def test_an_encoder_decoder_counts_with_a_dict() -> None:
    transformers = pytest.importorskip("transformers")
    _quiet(transformers)
    config = transformers.T5Config(
        vocab_size=40, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
        decoder_start_token_id=0,
    )  # fmt: skip
    model = transformers.T5ForConditionalGeneration(config).eval()
    batch = {
        "input_ids": torch.randint(0, 40, (2, 8)),
        "attention_mask": torch.ones(2, 8, dtype=torch.long),
        "decoder_input_ids": torch.randint(0, 40, (2, 4)),
    }
    c = sc.Compressor(model, sc.Reduction(2.0), batch, layers_per_step=100, progress=False)
    assert "outside its forward" in c.plan.skipped["encoder.block.0.layer.1.DenseReluDense.wo"]
    c.compression_step()
    with torch.no_grad():
        assert model(**batch).logits.shape == (2, 4, 40)
