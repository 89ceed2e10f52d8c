"""CP (CANDECOMP/PARAFAC) decomposition of an N-way tensor by alternating least squares.

``X ~ sum_r weights[r] * a_0[:, r] o a_1[:, r] o ... o a_{N-1}[:, r]`` with unit-norm
factor columns. Convolution kernels are wide in two modes (out, in) and short in the
others (kh * kw), and useful ranks run past the long sides, so the algorithm is built
for that case:

* The MTTKRP (tensor times the Khatri-Rao product of the other factors) is computed by
  successive contractions, never by forming the Khatri-Rao product of the two long
  modes (``out * in`` rows x R columns, gigabytes for a 512x512 kernel).
* A two-level dimension tree: the largest mode is updated from the tensor, then the
  tensor contracted with that one factor (a ``prod(other dims) x R`` partial result) is
  reused for every other mode. A sweep costs two GEMMs of ``2 * numel * R`` flops,
  whatever the number of modes, plus ``O(dim * R^2 + R^3)`` for the normal equations;
  memory beyond the tensor is ``O(prod(other dims) * R + R^2)``.
* Bro's extrapolation (line search) after each sweep roughly halves the sweeps needed
  for a given fit and pulls ALS out of swamps; its check reuses the next sweep's first
  GEMM, so an accepted jump costs only two Gram matrices, a rejected one a third GEMM.
* Normal equations are solved by Cholesky with a tiny ridge relative to their diagonal,
  raised step by step if the factorisation fails, with an eigen-decomposition
  pseudo-inverse as the last resort, so degenerate tensors never produce NaN.
* At ranks reaching ``cp_full_rank`` an exact CP is built directly (``cp_exact``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch

from stagecomp.threads import product_threads, single_threaded

logger = logging.getLogger(__name__)

# Relative ridge added to the normal equations, in units of the dtype's machine epsilon
# times the mean diagonal. Each failed Cholesky multiplies it by _RIDGE_GROWTH.
_RIDGE_EPS = 10.0
_RIDGE_GROWTH = 100.0
_RIDGE_TRIES = 5
# Extrapolation (line search) from the third sweep on, by ``sweep ** (1 / power)`` times
# the last change; every rejected jump makes later ones more cautious.
_EXTRAPOLATION_START = 3
_EXTRAPOLATION_POWER = 3.0
_EXTRAPOLATION_BACKOFF = 0.5
# ``||X||^2 - 2 <X, Xhat> + ||Xhat||^2`` loses all digits of a relative error near
# sqrt(eps) (5e-4 in float32); below this many sqrt(eps) (1e-2 in float32) the error
# is measured on the rebuilt tensor instead.
_DIRECT_ERROR_BELOW = 30.0


# Work budget of cp_auto_max_iter: ~2 s at the ~95 GFLOP/s two cores give ALS here.
_AUTO_SWEEP_FLOPS = 200_000_000_000
_MIN_AUTO_SWEEPS = 25
_MAX_AUTO_SWEEPS = 500


class CPResult(NamedTuple):
    """A CP decomposition and how well it fits.

    Attributes:
        weights: Scale of each rank-one term, shape ``(R,)``, non-negative.
        factors: One ``(dim_n, R)`` matrix per mode, with unit-norm (or zero) columns.
        rel_error: ``||X - cp_to_tensor(weights, factors)|| / ||X||`` at the end
            (0 for an all-zero tensor).
        iterations: ALS sweeps run (0 for the exact construction).
    """

    weights: torch.Tensor
    factors: list[torch.Tensor]
    rel_error: float
    iterations: int


def cp_full_rank(shape: Sequence[int]) -> int:
    """The rank at which an exact CP always exists: the product of all dims but the largest.

    Every tensor is a sum of that many rank-one terms (one per fibre along its longest
    mode), so this is the trivial upper bound of the CP rank, and ``cp_exact`` reaches it.
    """
    dims = [int(d) for d in shape]
    if not dims:
        raise ValueError("cp_full_rank needs at least one dimension")
    return math.prod(dims) // max(max(dims), 1)


def cp_auto_max_iter(shape: Sequence[int], rank: int) -> int:
    """ALS sweeps worth running on a tensor of ``shape`` at ``rank``, from a work budget.

    A sweep costs about ``4 * numel * rank`` flops. Small kernels get up to
    500 sweeps (enough to recover exact low-rank tensors that stall for a few
    hundred), large ones at least 25 (where each sweep costs seconds and later
    sweeps gain a few percent of error that fine-tuning recovers anyway).
    """
    per_sweep = 4 * math.prod(int(d) for d in shape) * max(int(rank), 1)
    return max(_MIN_AUTO_SWEEPS, min(_MAX_AUTO_SWEEPS, _AUTO_SWEEP_FLOPS // max(per_sweep, 1)))


def cp_exact(tensor: torch.Tensor, rank: int) -> CPResult:
    """An exact CP with ``rank >= cp_full_rank(tensor.shape)`` terms, without iterating.

    Term ``j`` is the ``j``-th fibre along the largest mode times unit vectors picking
    that fibre's position in every other mode; terms beyond the bound are zero.
    """
    _check_tensor(tensor)
    dims = tuple(tensor.shape)
    bound = cp_full_rank(dims)
    if rank < bound:
        raise ValueError(f"cp_exact needs rank >= {bound} for a tensor of shape {dims}, got {rank}")
    big = _largest_mode(dims)
    others = [k for k in range(len(dims)) if k != big]
    fibres = tensor.movedim(big, 0).reshape(dims[big], bound)
    norms = torch.linalg.vector_norm(fibres, dim=0)
    safe = torch.where(norms > 0, norms, torch.ones_like(norms))
    factors: list[torch.Tensor] = [tensor.new_zeros(d, rank) for d in dims]
    factors[big][:, :bound] = fibres / safe
    index = torch.arange(bound, device=tensor.device)
    stride = bound
    for k in others:  # row-major multi-index of column j over the other modes
        stride //= dims[k]
        position = torch.div(index, stride, rounding_mode="floor") % dims[k]
        factors[k][position, index] = 1.0
    weights = tensor.new_zeros(rank)
    weights[:bound] = norms
    return CPResult(weights, factors, 0.0, 0)


def cp_to_tensor(weights: torch.Tensor, factors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The full tensor of a CP decomposition.

    The longest mode is kept out of the Khatri-Rao product, so the largest temporary
    is ``prod(other dims) x R`` rather than ``numel x R``.
    """
    dims = tuple(int(f.shape[0]) for f in factors)
    rank = int(weights.shape[0])
    big = _largest_mode(dims)
    others = [k for k in range(len(dims)) if k != big]
    khatri_rao = factors[others[0]]
    for k in others[1:]:
        khatri_rao = (khatri_rao[:, None, :] * factors[k][None, :, :]).reshape(-1, rank)
    full = (factors[big] * weights) @ khatri_rao.T
    return full.reshape(dims[big], *(dims[k] for k in others)).movedim(0, big)


@single_threaded
def cp_als(
    tensor: torch.Tensor,
    rank: int,
    *,
    max_iter: int | None = None,
    tol: float = 1e-7,
    seed: int = 0,
) -> CPResult:
    """Rank-``rank`` CP of ``tensor`` by alternating least squares with extrapolation.

    Starts from the leading left singular vectors of each unfolding (columns beyond a
    mode's size are drawn from a generator seeded with ``seed``), so a run repeats
    exactly. Works in the tensor's dtype and on its device. At ``rank >=
    cp_full_rank(tensor.shape)`` the exact construction of ``cp_exact`` is returned.

    Runs on one thread but for its large GEMMs (:mod:`stagecomp.threads`): the small
    solves of a sweep are barrier-bound, and with a second thread on a busy machine a
    256x256x3x3 kernel took several times longer.

    A sweep of a 512x512x3x3 kernel at rank ~1150 costs about 19 GFLOP (two GEMMs of
    5.4 GFLOP, the rest Gram matrices and Cholesky solves of size R), so ``max_iter``
    is what bounds the time of large layers; by default it comes from
    :func:`cp_auto_max_iter`.

    Args:
        tensor: A float32 or float64 tensor with at least two modes.
        rank: Number of rank-one terms, at least 1.
        max_iter: Cap on ALS sweeps, so a slow fit stops instead of running for minutes
            (``None``: sized from the work of one sweep by :func:`cp_auto_max_iter`).
        tol: Stop when a sweep improves the relative error by less than this.
        seed: Seed of the random start columns.

    Returns:
        A ``CPResult`` (``weights``, ``factors``, ``rel_error``, ``iterations``).
    """
    _check_tensor(tensor)
    if isinstance(rank, bool) or int(rank) != rank or rank < 1:
        raise ValueError(f"CP rank must be a positive integer, got {rank!r}")
    if max_iter is None:
        max_iter = cp_auto_max_iter(tensor.shape, int(rank))
    if max_iter < 1:
        raise ValueError(f"max_iter must be at least 1, got {max_iter}")
    if not tol >= 0:
        raise ValueError(f"tol must be non-negative, got {tol}")
    rank = int(rank)
    dims = tuple(tensor.shape)
    if rank >= cp_full_rank(dims):
        return cp_exact(tensor, rank)
    # float32 norms of big tensors drift by 1e-5; the error expansion needs the exact value.
    norm_x = float(torch.linalg.vector_norm(tensor, dtype=torch.float64))
    big = _largest_mode(dims)
    rest = [k for k in range(len(dims)) if k != big]  # axis order of the partial result
    factors = _initial_factors(tensor, rank, seed, skip=big)
    if norm_x == 0.0:
        return CPResult(tensor.new_zeros(rank), factors, 0.0, 0)

    # (dim_big, prod(rest)): a view when the largest mode comes first, else one copy.
    unfolded = tensor.movedim(big, 0).reshape(dims[big], -1)
    partial_shape = (*(dims[k] for k in rest), rank)
    gemm_macs = unfolded.numel() * rank  # each of the sweep's two GEMMs
    update_order = sorted(rest, key=lambda k: -dims[k])
    grams = [f.T @ f for f in factors]
    norm_x2 = norm_x**2
    weights = tensor.new_ones(rank)
    rel_error = math.inf
    previous: list[torch.Tensor] = []
    power = _EXTRAPOLATION_POWER
    direct_below = _DIRECT_ERROR_BELOW * math.sqrt(torch.finfo(tensor.dtype).eps)
    sweep = 0
    while sweep < max_iter:
        sweep += 1
        accepted = False
        if sweep >= _EXTRAPOLATION_START:
            # Bro's line search: jump along the last sweep's change of the short modes,
            # kept only if the fit after re-solving the largest mode is better.
            step = sweep ** (1.0 / power)
            trial = [
                _unit(old + step * (factors[k] - old), factors[k])
                for old, k in zip(previous, rest, strict=True)
            ]
            trial_grams = list(grams)
            for k, factor in zip(rest, trial, strict=True):
                trial_grams[k] = factor.T @ factor
            gram_big = _hadamard(trial_grams, skip=big)
            khatri_rao = _khatri_rao(trial)
            with product_threads(gemm_macs):
                mttkrp = unfolded @ khatri_rao
            solution = _solve_normal(mttkrp, gram_big)
            accepted = _relative_error(norm_x2, mttkrp, solution, gram_big) < rel_error
            if accepted:
                for k, factor in zip(rest, trial, strict=True):
                    factors[k], grams[k] = factor, trial_grams[k]
                weights = _set_factor_(factors, grams, big, solution)
            else:
                power += _EXTRAPOLATION_BACKOFF
                logger.debug("CP-ALS sweep %d: extrapolation by %.3g rejected", sweep, step)
        previous = [factors[k].clone() for k in rest]
        if not accepted:
            # Largest mode: one GEMM against the Khatri-Rao product of the short modes.
            khatri_rao = _khatri_rao([factors[k] for k in rest])
            with product_threads(gemm_macs):
                mttkrp = unfolded @ khatri_rao
            solution = _solve_normal(mttkrp, _hadamard(grams, skip=big))
            weights = _set_factor_(factors, grams, big, solution)
        # Every other mode from the shared partial X x_big A_big, (rest dims..., R).
        with product_threads(gemm_macs):
            partial = (unfolded.T @ factors[big]).reshape(partial_shape)
        for mode in update_order:
            mttkrp = _contract_ranked(partial, rest, factors, keep=mode)
            solution = _solve_normal(mttkrp, _hadamard(grams, skip=mode))
            weights = _set_factor_(factors, grams, mode, solution)
        last = update_order[-1]
        new_error = _relative_error(
            norm_x2, mttkrp, factors[last] * weights, _hadamard(grams, skip=last)
        )
        if new_error < direct_below:  # the expansion has cancelled to noise: measure it
            residual = cp_to_tensor(weights, factors) - tensor
            new_error = float(torch.linalg.vector_norm(residual, dtype=torch.float64)) / norm_x
        improved = rel_error - new_error
        rel_error = new_error
        logger.debug("CP-ALS rank %d, sweep %d: relative error %.6g", rank, sweep, rel_error)
        if improved < tol or rel_error == 0.0:
            break
    return CPResult(weights, factors, float(rel_error), sweep)


# ---------------------------------------------------------------------- helpers
def _check_tensor(tensor: torch.Tensor) -> None:
    if tensor.ndim < 2:
        raise ValueError(
            f"CP needs a tensor with at least 2 modes, got shape {tuple(tensor.shape)}"
        )
    if tensor.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"CP runs in float32 or float64, got a {tensor.dtype} tensor")
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError("CP needs a finite tensor; it contains NaN or infinity")


def _largest_mode(dims: Sequence[int]) -> int:
    return max(range(len(dims)), key=lambda k: (dims[k], -k))


def _initial_factors(tensor: torch.Tensor, rank: int, seed: int, skip: int) -> list[torch.Tensor]:
    """Unit-norm starting factors: leading left singular vectors, then seeded random columns.

    Mode ``skip`` is solved for first, so its start only needs the right shape.
    """
    generator = torch.Generator(device=tensor.device).manual_seed(seed)
    factors = []
    for mode, dim in enumerate(tensor.shape):
        columns = []
        if mode != skip:
            unfolded = tensor.movedim(mode, 0).reshape(dim, -1)
            # Eigenvectors of the (dim x dim) Gram: the left singular vectors, without
            # an SVD of the wide unfolding; precision only matters for the start.
            with product_threads(unfolded.numel() * dim):
                gram = unfolded @ unfolded.T
            _, vectors = torch.linalg.eigh(gram)
            columns.append(vectors.flip(-1)[:, : min(dim, rank)])
        extra = rank - sum(c.shape[1] for c in columns)
        if extra > 0:
            columns.append(
                torch.randn(
                    dim, extra, generator=generator, device=tensor.device, dtype=tensor.dtype
                )
            )
        factor = torch.cat(columns, dim=1)
        factors.append(factor / torch.linalg.vector_norm(factor, dim=0).clamp_min(1e-30))
    return factors


def _hadamard(grams: Sequence[torch.Tensor], skip: int) -> torch.Tensor:
    """Elementwise product of every Gram matrix but ``grams[skip]``."""
    result: torch.Tensor | None = None
    for k, gram in enumerate(grams):
        if k != skip:
            result = gram.clone() if result is None else result.mul_(gram)
    if result is None:
        raise ValueError("CP needs at least two modes")
    return result


def _khatri_rao(matrices: Sequence[torch.Tensor]) -> torch.Tensor:
    """Column-wise Kronecker product, rows in row-major order of the modes given."""
    result = matrices[0]
    for matrix in matrices[1:]:
        result = (result[:, None, :] * matrix[None, :, :]).reshape(-1, result.shape[1])
    return result


def _set_factor_(
    factors: list[torch.Tensor], grams: list[torch.Tensor], mode: int, solution: torch.Tensor
) -> torch.Tensor:
    """Store a least-squares solution as ``factors[mode]`` with unit columns; return weights."""
    weights = _normalise_(solution, factors[mode])
    factors[mode] = solution
    grams[mode] = solution.T @ solution
    return weights


def _contract_ranked(
    tensor: torch.Tensor, axes: Sequence[int], factors: Sequence[torch.Tensor], keep: int
) -> torch.Tensor:
    """Contract every mode but ``keep`` of a ``(dims..., R)`` tensor with its factor.

    ``axes[i]`` names the mode of axis ``i``; the rank axis is last and is shared
    (``sum_i T[..., i, ..., r] * A[i, r]``). Larger modes go first so the
    intermediates shrink fastest.
    """
    axes = list(axes)
    for mode in sorted((m for m in axes if m != keep), key=lambda m: -factors[m].shape[0]):
        axis = axes.index(mode)
        moved = tensor.movedim(axis, -2)
        tensor = torch.linalg.vecdot(moved, factors[mode], dim=-2)
        axes.pop(axis)
    return tensor


def _solve_normal(mttkrp: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """``mttkrp @ inv(gram)`` for a symmetric positive semi-definite ``gram``, never NaN.

    A ridge of a few machine epsilons of the mean diagonal makes the Cholesky succeed on
    singular Grams (ranks above a mode's size); it grows if the factorisation still fails,
    and an eigen-decomposition pseudo-inverse is the last resort.
    """
    size = gram.shape[0]
    scale = float(gram.diagonal().mean())
    if not math.isfinite(scale) or scale <= 0.0:
        scale = 1.0
    ridge = _RIDGE_EPS * torch.finfo(gram.dtype).eps * scale
    for _ in range(_RIDGE_TRIES):
        regularised = gram.clone()
        regularised.diagonal().add_(ridge)
        factor, info = torch.linalg.cholesky_ex(regularised)
        if int(info) == 0:
            solution = torch.cholesky_solve(mttkrp.T, factor).T
            if math.isfinite(float(solution.sum())):
                return solution
        ridge *= _RIDGE_GROWTH
        logger.debug("CP-ALS: Cholesky failed, ridge raised to %.3g of the diagonal", ridge / scale)
    values, vectors = torch.linalg.eigh(gram)
    cutoff = values.abs().max() * size * torch.finfo(gram.dtype).eps
    inverse = torch.where(values > cutoff, 1.0 / values.clamp_min(cutoff), 0.0)
    return ((mttkrp @ vectors) * inverse) @ vectors.T


def _normalise_(factor: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
    """Scale ``factor``'s columns to unit norm in place and return the norms.

    A column that came out zero keeps its previous (unit) direction with weight 0, so
    the Gram matrices stay well conditioned.
    """
    norms = torch.linalg.vector_norm(factor, dim=0)
    alive = norms > 0
    factor.div_(torch.where(alive, norms, torch.ones_like(norms)))
    if not bool(alive.all()):
        factor[:, ~alive] = previous[:, ~alive]
    return norms


def _unit(factor: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    """``factor`` with unit columns; zero columns are taken from ``fallback``."""
    _normalise_(factor, fallback)
    return factor


def _relative_error(
    norm_x2: float,
    mttkrp: torch.Tensor,
    scaled_factor: torch.Tensor,
    gram_rest: torch.Tensor,
) -> float:
    """``||X - Xhat|| / ||X||`` from quantities the last update already has.

    With ``B = A diag(w)`` for the last mode updated, ``<X, Xhat> = sum(M * B)`` and
    ``||Xhat||^2 = sum(B^T B * V)``, so the full tensor is never rebuilt. Sums run in
    float64 to limit the cancellation when the fit is close.
    """
    gram = scaled_factor.T @ scaled_factor
    inner = float((mttkrp.double() * scaled_factor.double()).sum())
    norm_hat2 = float((gram.double() * gram_rest.double()).sum())
    residual2 = max(norm_x2 - 2.0 * inner + norm_hat2, 0.0)
    return math.sqrt(residual2 / norm_x2)
