"""Saving beside Hugging Face's files, load_pretrained, and state-dict versions (MNASNet)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import stagecomp as sc
from stagecomp.errors import RecipeError


def _compressed_gpt2() -> tuple[nn.Module, torch.Tensor]:
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    config = transformers.GPT2Config(
        n_layer=1, n_embd=16, n_head=2, vocab_size=40, n_positions=16, bos_token_id=0,
        eos_token_id=0,
    )  # fmt: skip
    model = transformers.GPT2LMHeadModel(config).eval()
    c = sc.Compressor(model, sc.Reduction(2.0), layers_per_step=10, progress=False)
    c.compression_step()
    return model, torch.randint(0, 40, (2, 8))


def test_save_beside_save_pretrained_and_load_pretrained(tmp_path: Path) -> None:
    model, x = _compressed_gpt2()
    with torch.no_grad():
        expected = model(x).logits
    sc.save(model, tmp_path)
    model.save_pretrained(tmp_path)  # writes model.safetensors and config.json beside ours
    assert {"stagecomp.json", "stagecomp.safetensors", "model.safetensors", "config.json"} <= {
        p.name for p in tmp_path.iterdir()
    }
    for source in (type(model), model.config):
        loaded = sc.load_pretrained(source, tmp_path)
        assert isinstance(loaded.transformer.h[0].mlp.c_fc, sc.SVDLinear)
        assert not loaded.training
        with torch.no_grad():
            assert torch.equal(loaded(x).logits, expected)
        assert loaded.lm_head.weight is loaded.transformer.wte.weight  # still tied


def test_load_pretrained_without_a_config_says_what_to_do(tmp_path: Path) -> None:
    model, _ = _compressed_gpt2()
    sc.save(model, tmp_path)
    with pytest.raises(RecipeError, match=r"config\.json"):
        sc.load_pretrained(type(model), tmp_path)


def test_folders_with_the_old_weights_name_still_load(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 8))
    sc.Compressor(model, sc.Reduction(2.0), layers_per_step=2, progress=False).compression_step()
    sc.save(model, tmp_path)
    (tmp_path / "stagecomp.safetensors").rename(tmp_path / "model.safetensors")
    fresh = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 8))
    sc.load(fresh, tmp_path)
    x = torch.randn(3, 8)
    assert torch.equal(fresh(x), model(x))


class _Versioned(nn.Module):
    """Refuses to load without its state-dict version, as torchvision's MNASNet does."""

    _version = 2

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 32)
        self.out = nn.Linear(32, 8)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, *args, **kwargs):  # type: ignore[no-untyped-def]
        if local_metadata.get("version") != 2:
            raise ValueError(f"version should be 2, not {local_metadata.get('version')}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.fc(x))


def test_module_versions_are_saved_and_given_back(tmp_path: Path) -> None:
    model = _Versioned()
    sc.save(model, tmp_path)
    recipe = json.loads((tmp_path / "stagecomp.json").read_text())
    assert recipe["module_versions"] == {"": 2}
    fresh = _Versioned()
    sc.load(fresh, tmp_path)
    assert torch.equal(fresh.fc.weight, model.fc.weight)


def test_mnasnet_round_trips(tmp_path: Path) -> None:
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.mnasnet0_5(weights=None, num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    sc.save(model, tmp_path)
    fresh = torchvision.models.mnasnet0_5(weights=None, num_classes=10).eval()
    sc.load(fresh, tmp_path)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_any_load_failure_is_a_recipe_error(tmp_path: Path) -> None:
    model = _Versioned()
    sc.save(model, tmp_path)
    recipe = json.loads((tmp_path / "stagecomp.json").read_text())
    recipe["module_versions"] = {"": 3}
    (tmp_path / "stagecomp.json").write_text(json.dumps(recipe))
    fresh = _Versioned()
    before = fresh.fc.weight.detach().clone()
    with pytest.raises(RecipeError, match="version should be 2"):
        sc.load(fresh, tmp_path)
    assert torch.equal(fresh.fc.weight, before)


def test_saving_a_quantized_model_is_refused_by_name(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 8))
    sc.Compressor(model, sc.Reduction(2.0), layers_per_step=2, progress=False).compression_step()
    quantized = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    with pytest.raises(sc.StagecompError, match=r"layer '0\.first' is quantized"):
        sc.save(quantized, tmp_path)
    assert not (tmp_path / "stagecomp.json").exists()
