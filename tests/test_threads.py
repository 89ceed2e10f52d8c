"""Bounded threads: the count is restored, never raised, and results do not change."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
import scipy.linalg
import torch
from threadpoolctl import threadpool_info

from stagecomp import threads
from stagecomp.decompositions.cp import cp_als
from stagecomp.decompositions.data_aware import whitened_svd
from stagecomp.decompositions.interpolative import grouped_interpolative
from stagecomp.decompositions.svd import svd_recompress, truncated_svd
from stagecomp.decompositions.tt import tt_svd
from stagecomp.decompositions.tucker2 import tucker2
from stagecomp.strategies.evbmf import evbmf_rank, tucker2_vbmf_ranks
from stagecomp.threads import (
    PARALLEL_MIN_MACS,
    bounded_threads,
    product_threads,
    single_threaded,
    single_threaded_blas,
)

F64 = torch.float64
FACTORIZATIONS = ("svd", "svdvals", "eigh", "eigvalsh", "qr", "cholesky_ex", "solve")


@pytest.fixture
def two_threads() -> Iterator[None]:
    """The caller runs torch's default on a 2-core machine (the tests otherwise run one)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


# ------------------------------------------------------------ the context manager
def test_bounded_threads_lowers_and_restores(two_threads):
    with bounded_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2


def test_bounded_threads_restores_on_exception(two_threads):
    with pytest.raises(RuntimeError, match="boom"), bounded_threads(1):
        raise RuntimeError("boom")
    assert torch.get_num_threads() == 2


def test_bounded_threads_never_raises_the_count():
    torch.set_num_threads(1)
    with bounded_threads(2):
        assert torch.get_num_threads() == 1
        with product_threads(10 * PARALLEL_MIN_MACS):
            assert torch.get_num_threads() == 1  # the caller's count is the ceiling
    assert torch.get_num_threads() == 1


def test_bounded_threads_undoes_a_change_made_inside(two_threads):
    with bounded_threads(1):
        torch.set_num_threads(2)
    assert torch.get_num_threads() == 2


def test_bounded_threads_rejects_zero():
    with pytest.raises(ValueError, match="at least 1 thread"), bounded_threads(0):
        pass


def test_product_threads_gives_large_products_the_callers_count(two_threads):
    with product_threads(10 * PARALLEL_MIN_MACS):  # outside a bounded block: nothing to do
        assert torch.get_num_threads() == 2
    with bounded_threads(1):
        with product_threads(PARALLEL_MIN_MACS / 10):
            assert torch.get_num_threads() == 1
        with bounded_threads(1), product_threads(PARALLEL_MIN_MACS):  # nested: outermost caller
            assert torch.get_num_threads() == 2
        assert torch.get_num_threads() == 1
        with pytest.raises(RuntimeError), product_threads(PARALLEL_MIN_MACS):
            raise RuntimeError
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2


def test_switched_off_keeps_the_callers_count(two_threads, monkeypatch):
    monkeypatch.setattr(threads, "enabled", False)
    with bounded_threads(1):
        assert torch.get_num_threads() == 2


def test_single_threaded_decorator(two_threads):
    @single_threaded
    def count(offset: int) -> int:
        """Doc."""
        return torch.get_num_threads() + offset

    @single_threaded
    def fail() -> None:
        raise KeyError("x")

    assert count(10) == 11
    assert count.__name__ == "count" and count.__doc__ == "Doc."
    with pytest.raises(KeyError):
        fail()
    assert torch.get_num_threads() == 2


def _blas_threads() -> list[int]:
    return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]


def test_single_threaded_blas_bounds_and_restores_scipys_blas():
    assert scipy.linalg.qr is not None  # SciPy's BLAS is loaded
    before = _blas_threads()
    if not before:
        pytest.skip("no BLAS library threadpoolctl can control")
    with single_threaded_blas():
        assert set(_blas_threads()) == {1}
    assert _blas_threads() == before


# ------------------------------------------------------------ the decompositions
def _random(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _moment(n: int) -> torch.Tensor:
    x = _random(n, 3 * n, seed=9)
    return x @ x.T / x.shape[1]


def _evbmf(matrix: torch.Tensor) -> tuple[torch.Tensor, ...]:
    result = evbmf_rank(matrix)
    assert result.rank > 0
    return torch.tensor([result.rank]), torch.tensor([result.sigma2]), result.singular_values


CASES: dict[str, Callable[[], object]] = {
    "tucker2": lambda: tucker2(_random(48, 40, 3, 3), (12, 10)),
    "svd exact": lambda: truncated_svd(_random(60, 90), 20),
    "svd randomized": lambda: truncated_svd(_random(60, 90), 5, solver="randomized"),
    "svd recompress": lambda: svd_recompress(_random(50, 12), _random(12, 40, seed=1), 6),
    "cp": lambda: cp_als(_random(16, 12, 9), 10, max_iter=20).factors,
    "tt": lambda: tt_svd(_random(6, 7, 8, 5), 4),
    "interpolative": lambda: grouped_interpolative([truncated_svd(_random(30, 40), 8)]),
    "whitened svd": lambda: whitened_svd(_random(20, 30), _moment(30), 6),
    "evbmf": lambda: _evbmf(_random(40, 5) @ _random(5, 60, seed=1) + _random(40, 60, seed=2)),
    "tucker2 vbmf ranks": lambda: torch.tensor(tucker2_vbmf_ranks(_random(32, 24, 3, 3))),
}


def _flat(result: object) -> list[torch.Tensor]:
    if isinstance(result, torch.Tensor):
        return [result]
    assert isinstance(result, (tuple, list))
    return [t for item in result for t in _flat(item)]


@pytest.mark.parametrize("name", sorted(CASES))
def test_factorizations_run_on_one_thread(name, two_threads, monkeypatch):
    seen: list[int] = []
    for op in FACTORIZATIONS:
        original = getattr(torch.linalg, op)

        def spy(*args, _original=original, **kwargs):
            seen.append(torch.get_num_threads())
            return _original(*args, **kwargs)

        monkeypatch.setattr(torch.linalg, op, spy)
    CASES[name]()
    assert seen and set(seen) == {1}
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("name", sorted(CASES))
def test_results_match_the_unbounded_run(name, two_threads, monkeypatch):
    bounded = _flat(CASES[name]())
    monkeypatch.setattr(threads, "enabled", False)
    default = _flat(CASES[name]())
    assert len(bounded) == len(default)
    for a, b in zip(bounded, default, strict=True):
        assert a.shape == b.shape
        if a.is_floating_point():
            scale = float(b.abs().max()) or 1.0
            assert float((a - b).abs().max()) <= 1e-9 * scale
        else:
            assert torch.equal(a, b)
