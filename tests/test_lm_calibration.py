"""Calibration of decoder LMs: block by block (bounded memory), padding masks, off-path layers.

Tiny Llama-like models built from ``transformers.LlamaConfig`` (random weights, float64 so
that the two calibration paths can be compared to rounding), nothing downloaded.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import pytest
import torch
from torch import nn

import stagecomp as sc
import stagecomp.sequential as sequential
from stagecomp.blocks import find_blocks
from stagecomp.calibration import NO_GRADIENT, collect_gradient_moments, collect_statistics
from stagecomp.errors import NoMatchingLayerError, StagecompError

transformers = pytest.importorskip("transformers")

VOCAB = 48
BLOCKS = "model.layers.*"


def _llama(layers: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )  # use_cache stays True: the block path must drop the key/value cache
    return transformers.LlamaForCausalLM(config).double().eval()


def _batches(count: int = 3, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, VOCAB, (2, 10), generator=g)} for _ in range(count)]


def _block_linears(model: nn.Module) -> list[str]:
    return [
        n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("model.")
    ]


def _compressor(
    model: nn.Module,
    batches: list[Any],
    factors: str,
    blocks: str | None,
    per_step: int = 7,
    refine: sc.LocalDistillation | None = None,
) -> sc.Compressor:
    """A 2x reduction of the block layers (the head left dense), one block per step."""
    return sc.Compressor(
        model,
        sc.Reduction(2.0),
        exclude=["lm_head"],
        layers_per_step=per_step,
        progress=False,
        calibration=sc.Calibration(batches, factors=factors, blocks=blocks, refine=refine),
    )


def _compress(
    model: nn.Module, batches: list[Any], factors: str, blocks: str | None, per_step: int = 7
) -> sc.Compressor:
    compressor = _compressor(model, batches, factors, blocks, per_step)
    while not compressor.done:
        compressor.compression_step()
    return compressor


def _largest_difference(a: nn.Module, b: nn.Module) -> float:
    pairs = zip(a.state_dict().items(), b.state_dict().items(), strict=True)
    worst = 0.0
    for (name_a, x), (name_b, y) in pairs:
        assert name_a == name_b
        worst = max(worst, float((x - y).abs().max()))
    return worst


@pytest.fixture
def captures(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the forward passes that capture block inputs."""
    count: list[int] = []
    original = sequential.capture_inputs

    def counting(*args: Any, **kwargs: Any) -> Any:
        count.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(sequential, "capture_inputs", counting)
    return count


@pytest.mark.parametrize(("factors", "layers"), [("whiten", 3), ("output", 3), ("gradient", 2)])
def test_block_by_block_gives_the_factors_of_the_unbounded_path(
    factors: str, layers: int, captures: list[int]
) -> None:
    """Input and output moments are exact at every step; gradient moments at the first
    and the last block (no compressed block between them and the output: see the next
    test for the blocks in between)."""
    batches = _batches()
    unbounded, bounded = _llama(layers), _llama(layers)
    _compress(unbounded, batches, factors, None)
    compressor = _compress(bounded, batches, factors, BLOCKS)
    assert compressor.total_steps == layers
    assert _largest_difference(unbounded, bounded) < 1e-9
    # Compressed for real (rank halved), and the inputs were captured once, then moved on.
    assert sum(p.numel() for p in bounded.parameters()) < 0.8 * sum(
        p.numel() for p in _llama(layers).parameters()
    )
    assert len(captures) == 1


@pytest.fixture
def gradient_errors(monkeypatch: pytest.MonkeyPatch) -> dict[str, float]:
    """Per layer, how far the block path's gradient moment is from the exact one
    (``collect_gradient_moments`` on the whole model as it is at that step), relative."""
    errors: dict[str, float] = {}
    original = sequential.SequentialStatistics.collect

    def compared(
        self: sequential.SequentialStatistics,
        names: list[str],
        outputs: list[str],
        weighted: list[str],
        **kwargs: Any,
    ) -> Any:
        found = original(self, names, outputs, weighted, **kwargs)
        exact = collect_gradient_moments(self.model, self.batches, weighted, progress=False)
        for name in weighted:
            moment = found[name].gradient_moment
            assert moment is not None
            errors[name] = float((moment - exact[name]).norm() / exact[name].norm())
        return found

    monkeypatch.setattr(sequential.SequentialStatistics, "collect", compared)
    return errors


def test_gradient_moments_are_exact_at_the_first_block_and_bounded_after(
    gradient_errors: dict[str, float], monkeypatch: pytest.MonkeyPatch
) -> None:
    """One sweep takes the output gradients; the first block's moments and the last
    two blocks' (run to the output) are exact; the middle ones' come from gradients
    through the blocks after them measured before the blocks before them were
    compressed (within a few percent on this tiny random model, where 2x fewer
    parameters changes a block a lot). Block 2's gradients were kept; block 1 runs
    block 2 too."""
    sweeps: list[int] = []
    original = sequential.SequentialStatistics._sweep

    def counting(self: Any, *args: Any, **kwargs: Any) -> Any:
        sweeps.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(sequential.SequentialStatistics, "_sweep", counting)
    _compress(_llama(5), _batches(), "gradient", BLOCKS)
    assert len(sweeps) == 1
    assert len(gradient_errors) == 35
    by_block = [
        max(e for n, e in gradient_errors.items() if n.startswith(f"model.layers.{i}."))
        for i in range(5)
    ]
    assert max(by_block[0], by_block[3], by_block[4]) < 1e-5
    assert 1e-4 < by_block[1] < 0.15 and 1e-4 < by_block[2] < 0.15


def test_a_change_outside_the_steps_takes_the_output_gradients_again(
    gradient_errors: dict[str, float],
) -> None:
    """A "fine-tuning" update of a block ahead, between steps, invalidates the kept
    output gradients: the next block's moments are exact again."""
    model = _llama(5)
    compressor = _compressor(model, _batches(), "gradient", BLOCKS)
    compressor.compression_step()
    with torch.no_grad():
        model.model.layers[4].mlp.down_proj.weight.mul_(1.5)
    compressor.compression_step()
    assert max(e for n, e in gradient_errors.items() if n.startswith("model.layers.1.")) < 1e-5
    compressor.compression_step()  # kept from the second step: not exact
    assert max(e for n, e in gradient_errors.items() if n.startswith("model.layers.2.")) > 1e-4


def test_fine_tuning_between_steps_takes_the_block_inputs_again(captures: list[int]) -> None:
    batches = _batches()
    models = (_llama(), _llama())
    compressors = [
        _compressor(m, batches, "whiten", blocks)
        for m, blocks in zip(models, (None, BLOCKS), strict=True)
    ]
    for step in range(3):
        for model, compressor in zip(models, compressors, strict=True):
            compressor.compression_step()
            if step == 0:  # a "fine-tuning" update of a layer before the next block
                with torch.no_grad():
                    model.model.embed_tokens.weight.mul_(1.5)
    assert _largest_difference(*models) < 1e-9
    assert len(captures) == 2  # once at the start, once after the update


def test_steps_never_span_two_blocks_and_auto_finds_the_layers() -> None:
    model = _llama()
    assert find_blocks(model, "auto") == ["model.layers.0", "model.layers.1", "model.layers.2"]
    assert find_blocks(model, BLOCKS) == find_blocks(model, "auto")
    compressor = sc.Compressor(
        model,
        sc.Reduction(2.0),
        layers_per_step=5,
        progress=False,
        calibration=sc.Calibration(_batches(1), blocks="auto"),
    )
    sizes = [len(step) for step in compressor.plan.steps]
    assert sizes == [5, 2, 5, 2, 5, 2]
    assert "output embedding head" in compressor.plan.skipped["lm_head"]  # unless named
    blocks = [
        {t.name.split(".")[2] for _, t in step if t.name != "lm_head"}
        for step in compressor.plan.steps
    ]
    assert all(len(b) <= 1 for b in blocks)


def test_layers_outside_the_blocks_are_calibrated_on_the_whole_model() -> None:
    batches = _batches(2)
    unbounded, bounded = _llama(2), _llama(2)
    for model, blocks in ((unbounded, None), (bounded, BLOCKS)):
        compressor = sc.Compressor(
            model,
            sc.Reduction(2.0),
            methods={"lm_head": "svd"},  # named: the output head is compressed too
            layers_per_step=7,  # steps: block 0, block 1, lm_head on both paths
            progress=False,
            calibration=sc.Calibration(batches, factors="gradient", blocks=blocks),
        )
        while not compressor.done:
            compressor.compression_step()
        assert isinstance(model.lm_head, sc.SVDLinear)
    assert _largest_difference(unbounded, bounded) < 1e-9


@pytest.mark.parametrize(
    "settings",
    [
        {"rounds": 0},
        {"rounds": 1, "method": "svd_id"},
        {"sensitivity": "probe", "rounds": 1},
    ],
)
def test_allocate_ranks_block_by_block_gives_the_same_ranks(settings: dict[str, Any]) -> None:
    model, batches = _llama(2), _batches(2)
    names = [*_block_linears(model), "lm_head"]
    before = copy.deepcopy(model.state_dict())
    unbounded = sc.allocate_ranks(model, batches, names, rate=2.0, progress=False, **settings)
    bounded = sc.allocate_ranks(
        model, batches, names, rate=2.0, progress=False, blocks=BLOCKS, **settings
    )
    assert bounded == unbounded
    assert list(bounded) == names
    assert any(rank is not None for rank in bounded.values())
    assert _largest_difference_dict(before, model.state_dict()) == 0.0  # left as it was


def _largest_difference_dict(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def _padded() -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
    """One right-padded batch of two sequences (10 and 6 tokens), and each alone."""
    g = torch.Generator().manual_seed(2)
    first = torch.randint(1, VOCAB, (1, 10), generator=g)
    second = torch.randint(1, VOCAB, (1, 6), generator=g)
    ids = torch.zeros(2, 10, dtype=torch.long)
    ids[0], ids[1, :6] = first[0], second[0]
    mask = torch.zeros(2, 10, dtype=torch.long)
    mask[0], mask[1, :6] = 1, 1
    return {"input_ids": ids, "attention_mask": mask}, [
        {"input_ids": first},
        {"input_ids": second},
    ]


def test_padded_positions_are_not_samples() -> None:
    model = _llama(2)
    names = [*_block_linears(model), "lm_head"]
    padded, alone = _padded()
    masked = collect_statistics(model, [padded], names, outputs=True, progress=False)
    reference = collect_statistics(model, alone, names, outputs=True, progress=False)
    for name in names:
        assert masked[name].count == reference[name].count == 16
        for field in ("input_moment", "input_mean", "output_moment", "output_mean"):
            got, want = getattr(masked[name], field), getattr(reference[name], field)
            assert torch.allclose(got, want, rtol=0, atol=1e-12), (name, field)
    # Without the mask the 4 padded positions count: a different moment.
    unmasked = collect_statistics(
        model, [padded], names[:1], progress=False, mask=lambda _batch: None
    )
    assert unmasked[names[0]].count == 20
    assert (
        float((unmasked[names[0]].input_moment - reference[names[0]].input_moment).abs().max())
        > 1e-3
    )


def test_padding_does_not_reach_the_gradient_moments() -> None:
    """What stands at padded positions (token ids there, their outputs) changes nothing."""
    model = _llama(2)
    names = _block_linears(model)
    padded, _ = _padded()
    other = {**padded, "input_ids": padded["input_ids"].clone()}
    other["input_ids"][1, 6:] = torch.tensor([5, 17, 33, 40])
    first = collect_gradient_moments(model, [padded], names, progress=False)
    second = collect_gradient_moments(model, [other], names, progress=False)
    for name in names:
        assert float((first[name] - second[name]).abs().max()) < 1e-12 * float(
            first[name].abs().max()
        )
    blind = collect_gradient_moments(model, [other], names[:1], progress=False, mask=lambda b: None)
    assert float((blind[names[0]] - first[names[0]]).abs().max()) > 1e-6 * float(
        first[names[0]].abs().max()
    )


def test_block_path_masks_padding_like_the_unbounded_path() -> None:
    padded, _ = _padded()
    unbounded, bounded = _llama(2), _llama(2)
    _compress(unbounded, [padded], "gradient", None)
    _compress(bounded, [padded], "gradient", BLOCKS)
    assert _largest_difference(unbounded, bounded) < 1e-9
    names = [*_block_linears(_llama(2)), "lm_head"]
    assert sc.allocate_ranks(_llama(2), [padded], names, rate=2.0, progress=False) == (
        sc.allocate_ranks(_llama(2), [padded], names, rate=2.0, progress=False, blocks="auto")
    )


def _bert() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=40,  # not 32: an intermediate layer would look like an embedding
    )
    return transformers.BertModel(config).eval()  # its pooler does not feed last_hidden_state


@pytest.mark.parametrize("blocks", [None, "encoder.layer.*"])
def test_a_layer_off_the_output_path_is_skipped_with_the_reason(
    blocks: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    g = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(0, VOCAB, (2, 8), generator=g)} for _ in range(2)]
    model = _bert()
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    with caplog.at_level(logging.WARNING, logger="stagecomp"):
        ranks = sc.allocate_ranks(model, batches, names, rate=2.0, progress=False, blocks=blocks)
    assert ranks["pooler.dense"] is None
    assert any("pooler.dense" in r.message and NO_GRADIENT in r.message for r in caplog.records)
    assert sum(rank is not None for rank in ranks.values()) >= 6

    compressor = sc.Compressor(
        model,
        sc.Reduction(2.0),
        layers_per_step=100,
        progress=False,
        calibration=sc.Calibration(batches, factors="gradient", blocks=blocks),
    )
    changes = [
        c for _ in range(compressor.total_steps) for c in compressor.compression_step().changes
    ]
    skipped = {c.name: c.skipped for c in changes if c.skipped}
    assert skipped == {"pooler.dense": NO_GRADIENT}
    assert isinstance(model.pooler.dense, nn.Linear)
    assert sum(isinstance(m, sc.SVDLinear) for m in model.modules()) == 12


class _Gapped(nn.Module):
    """Blocks with something applied between them: not a chain."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Sequential(nn.Linear(8, 8), nn.ReLU()) for _ in range(2)])
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x) * 2
        return self.head(x)


def test_blocks_must_feed_each_other_and_settings_are_checked() -> None:
    with pytest.raises(StagecompError, match=r"is not the output of block 'layers\.0'"):
        _compress_gapped()
    with pytest.raises(NoMatchingLayerError, match="blocks='auto' found no"):
        find_blocks(nn.Sequential(nn.Linear(4, 4)), "auto")
    with pytest.raises(NoMatchingLayerError, match="matches no layer"):
        find_blocks(_llama(1), "model.blocks.*")
    with pytest.raises(StagecompError, match="correct_drift=True cannot be combined"):
        sc.Calibration([torch.zeros(1)], blocks="auto", correct_drift=True)
    with pytest.raises(StagecompError, match="blocks=3 is not allowed"):
        sc.Calibration([torch.zeros(1)], blocks=3)  # type: ignore[arg-type]
    settings = sc.Calibration([torch.zeros(1)], blocks=BLOCKS).to_dict()
    assert settings["blocks"] == BLOCKS
    assert sc.Calibration.from_dict(settings, [torch.zeros(1)]).blocks == BLOCKS


def _compress_gapped() -> None:
    model = _Gapped()
    compressor = sc.Compressor(
        model,
        sc.Reduction(2.0),
        progress=False,
        calibration=sc.Calibration([torch.randn(4, 8)], blocks="layers.*"),
    )
    compressor.compression_step()


def test_block_path_moves_on_through_refined_blocks() -> None:
    """Local distillation changes a block after its step; the next block's cached
    inputs must come from the refined block, as on the unbounded path."""
    batches = _batches(2)
    refine = sc.LocalDistillation(steps=3, lr=1e-2)
    models = {}
    for label, blocks, refined in (
        ("plain", None, None),
        ("unbounded", None, refine),
        ("bounded", BLOCKS, refine),
    ):
        model = _llama(2)
        compressor = _compressor(model, batches, "whiten", blocks, refine=refined)
        while not compressor.done:
            compressor.compression_step()
        models[label] = model
    assert _largest_difference(models["plain"], models["unbounded"]) > 1e-4  # refine acted
    assert _largest_difference(models["unbounded"], models["bounded"]) < 1e-9
