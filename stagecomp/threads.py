"""Bounded intra-op threads for the many small linear-algebra calls of a decomposition.

A decomposition is a long run of small calls: SVDs, eigensolves and QRs of
matrices a few hundred wide, Cholesky solves of an ALS sweep, products of a few
million multiply-adds. Each of them is a parallel region whose threads meet at
a barrier, so with torch's default thread count (one per core) a call is as
slow as its slowest thread. When other work holds a core, that thread waits for
a scheduler time slice at every barrier, and a LAPACK factorization has
hundreds of them. Measured on a 2-core CPU shared with other jobs, with a
busy-loop process per core beside it, one thread against two: an SVD of a
256 x 256 float64 matrix took 27 ms against 890 ms; an eigensolve of 1024 x 1024
1.6 s against 8.8 s, of 2048 x 2048 2.3 s against 14.6 s; a float32 product of
150M multiply-adds 11 ms against 32 ms, of 1.2G 90 ms against 118 ms (of 9.7G
the second thread gained 1.35x). On the idle machine two threads are at most
~1.9x faster on the same calls, and no faster below ~128 x 128.

So a decomposition runs on one thread (:func:`single_threaded`), and only a
single product of at least :data:`PARALLEL_MIN_MACS` (1e9) multiply-adds gets
the caller's threads back (:func:`product_threads`): below it, one thread on
an idle core takes at most ~25 ms (about 40 GMAC/s here), so the most the bound
can cost is about that per product. Factorizations always run on one thread:
under load two threads were slower at every size tried, up to 2048.
``benchmarks/bench_threads.py`` times whole decompositions both ways
(``docs/benchmarks.md``).

The bound never raises the caller's thread count, and restores it on the way
out, also on an exception. Setting the environment variable
``STAGECOMP_THREADS=off`` (or ``stagecomp.threads.enabled = False``) turns it
off, so the caller's count is used throughout, e.g. to compare.

SciPy and NumPy bring their own BLAS (OpenBLAS), which ``torch.set_num_threads``
does not reach; :func:`single_threaded_blas` bounds it, through threadpoolctl,
for the few SciPy calls (the pivoted QR of the interpolative form of a 2048 x 512
factor: 0.26 s on one thread, 0.9-2.8 s on two on the shared CPU, 6 s with the
busy loops).

``torch.set_num_threads`` is process-wide: the bound is meant for a process
that decomposes from one Python thread at a time, which is how stagecomp runs.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import ParamSpec, TypeVar

import torch
from threadpoolctl import threadpool_limits

__all__ = [
    "PARALLEL_MIN_MACS",
    "bounded_threads",
    "enabled",
    "product_threads",
    "single_threaded",
    "single_threaded_blas",
]

#: Multiply-adds from which one product runs with the caller's thread count.
PARALLEL_MIN_MACS = 1e9

#: False when ``STAGECOMP_THREADS=off``: every call keeps the caller's thread count.
enabled: bool = os.environ.get("STAGECOMP_THREADS", "").strip().lower() != "off"

# The caller's thread count while a bounded block runs (None outside one).
_caller_threads: int | None = None

_P = ParamSpec("_P")
_R = TypeVar("_R")


@contextmanager
def bounded_threads(threads: int = 1) -> Iterator[None]:
    """Run the block with at most ``threads`` intra-op threads, then restore the count.

    Never raises the count: a caller that set one thread keeps one. Nested
    blocks remember the outermost caller's count, which :func:`product_threads`
    gives back to a large product inside.

    Args:
        threads: The most threads the block may use, at least 1.
    """
    if threads < 1:
        raise ValueError(f"bounded_threads takes at least 1 thread, got {threads}")
    global _caller_threads
    current = torch.get_num_threads()
    outer = _caller_threads
    if outer is None:
        _caller_threads = current
    try:
        if enabled and threads < current:
            torch.set_num_threads(threads)
        yield
    finally:
        _caller_threads = outer
        if torch.get_num_threads() != current:
            torch.set_num_threads(current)


@contextmanager
def product_threads(macs: float) -> Iterator[None]:
    """Give one product of ``macs`` multiply-adds the caller's threads, if it is large enough.

    Inside a :func:`bounded_threads` block, a product of at least
    :data:`PARALLEL_MIN_MACS` runs with the thread count the outermost caller
    had; a smaller one stays bounded. Outside a bounded block this does nothing.
    """
    caller = _caller_threads
    current = torch.get_num_threads()
    if not enabled or caller is None or macs < PARALLEL_MIN_MACS or caller <= current:
        yield
        return
    torch.set_num_threads(caller)
    try:
        yield
    finally:
        torch.set_num_threads(current)


@contextmanager
def single_threaded_blas() -> Iterator[None]:
    """Run the block with one thread in SciPy's and NumPy's BLAS, then restore their counts."""
    if not enabled:
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


def single_threaded(function: Callable[_P, _R]) -> Callable[_P, _R]:
    """Decorator: run ``function`` inside ``bounded_threads(1)``."""

    @functools.wraps(function)
    def bounded(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        with bounded_threads(1):
            return function(*args, **kwargs)

    return bounded
