"""EVBMF rank selection: agreement with the MUSCO reference, known ranks, weakening, edge cases."""

from __future__ import annotations

import json
import math
import re
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tensorly as tl
import torch

from stagecomp.errors import NonFiniteWeightError, RankError
from stagecomp.strategies.evbmf import EVBMFResult, evbmf_rank, tucker2_vbmf_ranks, weakened_rank

REFERENCE = json.loads((Path(__file__).parent / "data" / "evbmf_reference.json").read_text())
CASES: list[dict[str, Any]] = REFERENCE["cases"]
F64 = torch.float64


def make_matrix(recipe: dict[str, Any]) -> np.ndarray:
    """The matrix a recorded case was run on (recipe in the JSON's "generator")."""
    rng = np.random.default_rng(recipe["seed"])
    rows, cols = recipe["shape"]
    noise = recipe["noise"]
    edge = (math.sqrt(rows) + math.sqrt(cols)) * (noise if noise > 0 else 1.0)
    spectrum = recipe["spectrum"]
    if spectrum["kind"] == "geom":
        gains = np.geomspace(spectrum["hi"], spectrum["lo"], spectrum["rank"])
    elif spectrum["kind"] == "power":
        k = np.arange(1, min(rows, cols) + 1, dtype=np.float64)
        gains = spectrum["hi"] * k ** (-spectrum["p"])
    else:
        gains = np.zeros(0)
    u = rng.standard_normal((rows, gains.size)) / math.sqrt(rows)
    v = rng.standard_normal((gains.size, cols)) / math.sqrt(cols)
    y = (u * (gains * edge)) @ v
    if noise > 0:
        y = y + noise * rng.standard_normal((rows, cols))
    return (recipe["scale"] * y).astype(recipe["dtype"])


@cache
def matrix(name: str) -> torch.Tensor:
    case = next(c for c in CASES if c["name"] == name)
    return torch.from_numpy(make_matrix(case))


def run(case: dict[str, Any], scale_free: bool) -> EVBMFResult:
    return evbmf_rank(
        matrix(case["name"]),
        sigma2=case.get("sigma2"),
        max_rank=case.get("max_rank"),
        scale_free=scale_free,
    )


def unscaled_twin(case: dict[str, Any]) -> dict[str, Any] | None:
    """The recorded case with the same recipe at scale 1, if ``case`` is a scaled copy."""
    if case["scale"] == 1.0:
        return None
    keys = ("seed", "shape", "noise", "spectrum", "dtype", "max_rank", "sigma2")
    return next(
        c for c in CASES if c["scale"] == 1.0 and all(c.get(k) == case.get(k) for k in keys)
    )


# --- (a) agreement with the reference -------------------------------------------------


def test_reference_covers_the_promised_matrices() -> None:
    shapes = [tuple(c["shape"]) for c in CASES]
    assert len(CASES) == 150
    assert any(r == c for r, c in shapes) and any(r < c for r, c in shapes)
    assert any(r > c for r, c in shapes)  # tall: the reference saw the transpose
    ranks = {c["reference"]["rank"] for c in CASES}
    assert 0 in ranks and max(ranks) >= 20
    assert {c["scale"] for c in CASES} >= {1e-3, 1e-2, 1.0, 1e3}


def test_default_mode_reproduces_every_reference_rank_and_sigma2() -> None:
    rank_mismatches, sigma_mismatches = [], []
    for case in CASES:
        ref = case["reference"]
        got = run(case, scale_free=False)
        if got.rank != ref["rank"]:
            rank_mismatches.append((case["name"], ref["rank"], got.rank))
        if case["noise"] == 0:
            continue  # exact low rank: sigma2 sits on the spectrum's round-off tail
        if not math.isclose(got.sigma2, ref["sigma2"], rel_tol=1e-5):
            sigma_mismatches.append((case["name"], ref["sigma2"], got.sigma2))
        head = got.singular_values[: len(ref["posterior_head"])].double().numpy()
        np.testing.assert_allclose(head, ref["posterior_head"], rtol=1e-5, err_msg=case["name"])
    assert rank_mismatches == []
    assert sigma_mismatches == []


def test_scale_free_mode_agrees_except_where_the_reference_depends_on_scale() -> None:
    """The reference's absolute 1e-5 tolerance on sigma2 makes its rank change with the
    matrix's scale; ours is scale-free, so it keeps the reference's unit-scale rank."""
    disagreements = []
    for case in CASES:
        ref_rank = case["reference"]["rank"]
        got = run(case, scale_free=True).rank
        twin = unscaled_twin(case)
        if twin is not None and twin["reference"]["rank"] != ref_rank:
            assert got == twin["reference"]["rank"], case["name"]
            disagreements.append(case["name"])
        else:
            assert got == ref_rank, case["name"]
    # Only small scales (sigma2 << 1e-3) make the reference's search too coarse.
    assert len(disagreements) == 5
    assert all(c["scale"] <= 0.05 for c in CASES if c["name"] in disagreements)


def test_singular_values_input_equals_matrix_input() -> None:
    for name in ("lowrank_r5_n0.5_128x1152", "power_p1.0_200x200", "lowrank_r20_n0.5_400x50"):
        y = matrix(name)
        from_matrix = evbmf_rank(y)
        from_values = evbmf_rank(torch.linalg.svdvals(y), y.shape)
        assert from_values.rank == from_matrix.rank
        assert math.isclose(from_values.sigma2, from_matrix.sigma2, rel_tol=1e-9)
        from_list = evbmf_rank(torch.linalg.svdvals(y).tolist()[::-1], tuple(y.shape))
        assert from_list.rank == from_matrix.rank


# --- (b) known ranks ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "rank", "noise"),
    [
        ((64, 64), 3, 0.1),
        ((96, 288), 8, 0.5),
        ((288, 96), 8, 0.5),  # tall
        ((128, 1152), 16, 0.01),
        ((256, 2304), 30, 1.0),
        ((40, 400), 1, 2.0),
    ],
)
def test_low_rank_plus_noise_gives_its_rank(
    shape: tuple[int, int], rank: int, noise: float
) -> None:
    g = torch.Generator().manual_seed(rank)
    rows, cols = shape
    edge = noise * (math.sqrt(rows) + math.sqrt(cols))
    gains = torch.linspace(6.0, 3.0, rank, dtype=F64) * edge
    u = torch.linalg.qr(torch.randn(rows, rank, generator=g, dtype=F64))[0]
    v = torch.linalg.qr(torch.randn(cols, rank, generator=g, dtype=F64))[0]
    y = (u * gains) @ v.T + noise * torch.randn(rows, cols, generator=g, dtype=F64)
    result = evbmf_rank(y)
    assert result.rank == rank
    assert math.isclose(result.sigma2, noise**2, rel_tol=0.1)
    assert result.singular_values.shape == (rank,)
    observed = torch.linalg.svdvals(y)[:rank]
    assert bool((result.singular_values > 0).all() and (result.singular_values < observed).all())
    assert result.threshold < float(observed[-1])


@pytest.mark.parametrize("shape", [(50, 50), (30, 500), (500, 30), (256, 2304)])
def test_pure_noise_gives_rank_zero(shape: tuple[int, int]) -> None:
    y = torch.randn(*shape, generator=torch.Generator().manual_seed(7), dtype=F64)
    result = evbmf_rank(y)
    assert result.rank == 0
    assert result.singular_values.numel() == 0
    assert math.isclose(result.sigma2, 1.0, rel_tol=0.1)
    assert result.threshold > float(torch.linalg.svdvals(y)[0])


def test_scale_free_rank_is_invariant_to_scale_and_transpose() -> None:
    y = matrix("power_p1.0_256x2304")
    base = evbmf_rank(y, scale_free=True)
    assert base.rank == 25
    for scale in (1e-6, 1e-2, 1e4):
        scaled = evbmf_rank(scale * y, scale_free=True)
        assert scaled.rank == base.rank
        assert math.isclose(scaled.sigma2, scale**2 * base.sigma2, rel_tol=1e-6)
    transposed = evbmf_rank(y.T, scale_free=True)
    assert transposed.rank == base.rank
    assert math.isclose(transposed.sigma2, base.sigma2, rel_tol=1e-9)


def test_float32_input_keeps_its_dtype_and_rank() -> None:
    y = matrix("lowrank_r5_n0.5_128x1152")
    result = evbmf_rank(y.float())
    assert result.rank == evbmf_rank(y).rank == 5
    assert result.singular_values.dtype == torch.float32
    assert evbmf_rank(y.half()).rank == 5  # half precision is promoted, not refused


def test_max_rank_caps_the_rank() -> None:
    y = matrix("lowrank_r20_n0.5_200x200")
    assert evbmf_rank(y, max_rank=12).rank == 12  # the reference indexes past H here
    assert evbmf_rank(y, max_rank=150).rank == 20


def test_known_sigma2_is_used_as_given() -> None:
    y = matrix("lowrank_r5_n0.5_128x1152")
    result = evbmf_rank(y, sigma2=0.25)
    assert result.sigma2 == 0.25
    assert result.rank == 5
    assert evbmf_rank(y, sigma2=1e6).rank == 0  # all of it explained as noise


def test_tucker2_ranks_use_mode0_and_mode1_unfoldings() -> None:
    g = torch.Generator().manual_seed(3)
    out, inp, k, r_out, r_in = 64, 48, 3, 6, 4
    core = torch.randn(r_out, r_in, k, k, generator=g, dtype=F64) * 20
    a = torch.linalg.qr(torch.randn(out, r_out, generator=g, dtype=F64))[0]
    b = torch.linalg.qr(torch.randn(inp, r_in, generator=g, dtype=F64))[0]
    kernel = torch.einsum("oi,ijhw,cj->ochw", a, core, b)
    kernel = kernel + 0.01 * torch.randn(kernel.shape, generator=g, dtype=F64)
    assert tucker2_vbmf_ranks(kernel) == (r_out, r_in)
    # The same matrices MUSCO unfolds with tensorly.
    unfolded = [tl.base.unfold(kernel.numpy(), mode) for mode in (0, 1)]
    assert tuple(evbmf_rank(torch.from_numpy(m)).rank for m in unfolded) == (r_out, r_in)


# --- (c) weakening ---------------------------------------------------------------------------


def test_weakening_interpolates_between_full_and_vbmf_rank() -> None:
    assert weakened_rank(100, 30, 0.0) == 100
    assert weakened_rank(100, 30, 1.0) == 30
    assert weakened_rank(100, 30, 0.5) == 65
    assert weakened_rank(100, 31, 0.5) == 65  # 65.5 rounds down, as MUSCO's int()
    assert weakened_rank(10, 1, 0.25) == 7  # 7.75 -> 7
    # Float noise does not lose a rank: 299 - 0.56 * 275 is 145 exactly, not 144.99...
    assert weakened_rank(299, 24, 0.56) == 145


def test_weakening_floors_and_zero_rank() -> None:
    assert weakened_rank(100, 3, 1.0, min_rank=8) == 8
    assert weakened_rank(100, 3, 0.5, min_rank=8) == 51
    assert weakened_rank(6, 2, 1.0, min_rank=8) == 6  # already at or below the floor
    assert weakened_rank(8, 2, 1.0, min_rank=8) == 8
    assert weakened_rank(100, 0, 1.0) == 100  # EVBMF saw only noise: keep the layer whole
    assert weakened_rank(100, 100, 1.0) == 100
    assert weakened_rank(1, 1, 1.0) == 1


@pytest.mark.parametrize("weakening", [-0.1, 1.5, float("nan"), float("inf"), True, "0.5"])
def test_weakening_out_of_range_is_a_clear_error(weakening: Any) -> None:
    with pytest.raises(RankError, match=re.escape(repr(weakening))):
        weakened_rank(100, 30, weakening)


@pytest.mark.parametrize(
    ("full", "vbmf", "min_rank", "word"),
    [
        (0, 0, 1, "full rank"),
        (10, 11, 1, "EVBMF rank"),
        (10, -1, 1, "EVBMF rank"),
        (10, 3, 0, "min_rank"),
    ],
)
def test_weakening_rejects_bad_ranks(full: int, vbmf: int, min_rank: int, word: str) -> None:
    with pytest.raises(RankError, match=word):
        weakened_rank(full, vbmf, 1.0, min_rank)


# --- (d) edge cases -------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1, 50), (50, 1), (1, 1), (2, 2)])
def test_tiny_matrices_give_rank_zero_without_error(shape: tuple[int, int]) -> None:
    y = torch.randn(*shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    result = evbmf_rank(y)
    assert result.rank == 0
    assert result.singular_values.shape == (0,)


def test_all_zero_matrix_has_rank_zero() -> None:
    result = evbmf_rank(torch.zeros(20, 30))
    assert (result.rank, result.sigma2, result.threshold) == (0, 0.0, 0.0)
    assert result.singular_values.shape == (0,)
    assert result.singular_values.dtype == torch.float32


def test_exact_zero_singular_values_keep_the_free_energy_finite() -> None:
    """Dead filters (zero rows) make the reference's objective infinite everywhere;
    ours drops the constant that holds the infinity, so zeros act as tiny values."""
    y = matrix("lowrank_r5_n0.5_128x1152").clone()
    y[100:] = 0.0
    values = torch.linalg.svdvals(y[:100])
    with_zeros = evbmf_rank(torch.cat([values, torch.zeros(28, dtype=F64)]), (128, 1152))
    with_tiny = evbmf_rank(torch.cat([values, torch.full((28,), 1e-150, dtype=F64)]), (128, 1152))
    assert math.isfinite(with_zeros.sigma2) and with_zeros.sigma2 > 0
    assert with_zeros.rank == with_tiny.rank >= 5
    assert math.isclose(with_zeros.sigma2, with_tiny.sigma2, rel_tol=1e-9)
    assert evbmf_rank(y).rank == with_zeros.rank


def test_exact_low_rank_without_noise() -> None:
    y = matrix("exact_r7_128x128")
    assert evbmf_rank(y).rank == 7


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_is_a_clear_error(bad: float) -> None:
    y = torch.randn(10, 20, dtype=F64)
    y[3, 4] = bad
    with pytest.raises(NonFiniteWeightError, match="NaN or infinity"):
        evbmf_rank(y)
    with pytest.raises(NonFiniteWeightError):
        evbmf_rank(torch.tensor([3.0, bad, 1.0]), (3, 8))


def test_bad_arguments_are_clear_errors() -> None:
    y = torch.randn(10, 20, dtype=F64)
    with pytest.raises(ValueError, match="non-empty"):
        evbmf_rank(torch.zeros(0, 5))
    with pytest.raises(ValueError, match="shape"):
        evbmf_rank(torch.ones(4))
    with pytest.raises(ValueError, match="has 4 singular values, got 3"):
        evbmf_rank(torch.ones(3), (4, 9))
    with pytest.raises(ValueError, match="does not match"):
        evbmf_rank(y, (20, 10))
    with pytest.raises(ValueError, match="shape"):
        evbmf_rank(torch.ones(2, 3, 4))
    with pytest.raises(ValueError, match=r"sigma2 -1\.0"):
        evbmf_rank(y, sigma2=-1.0)
    with pytest.raises(ValueError, match="max_rank 11"):
        evbmf_rank(y, max_rank=11)
    with pytest.raises(ValueError, match=r"\(out, in, kh, kw\)"):
        tucker2_vbmf_ranks(y)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_input_gives_the_cpu_answer() -> None:
    y = matrix("power_p1.0_200x200")
    on_gpu = evbmf_rank(y.cuda())
    assert on_gpu.rank == evbmf_rank(y).rank
    assert on_gpu.singular_values.device.type == "cuda"
