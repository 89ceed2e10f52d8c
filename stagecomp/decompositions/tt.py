"""Tensor-train (TT) decompositions: TT-SVD, TT-rounding and TT-matrices (MPO).

A d-way tensor ``A[n_1, ..., n_d]`` is written as a chain of 3-way cores
``G_k[r_{k-1}, n_k, r_k]`` with ``r_0 = r_d = 1`` (Oseledets, "Tensor-Train
Decomposition", SIAM J. Sci. Comput. 2011). A weight matrix becomes a TT-matrix
(a matrix product operator) by splitting its row and column indices into modes
and pairing them, one ``(o_k, i_k)`` pair per core (Novikov et al. 2015).

Every function here is plain torch on the input's device and dtype.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import torch

from stagecomp.decompositions.svd import truncated_svd
from stagecomp.threads import single_threaded

# Below this many columns per product, tt_matrix_apply runs one big GEMM instead of a bmm.
_FEW_COLUMNS = 128

MAX_TT_CORES = 32
"""Most modes a TT-matrix side is split into: far beyond any useful layer (a 2**32-channel
side has 32 prime factors of 2), and a bound on what a recipe can make a load allocate."""

_TRIAL_LIMIT = 1 << 16

TTRanks = int | Sequence[int] | None
"""Bond ranks as the functions here take them: one cap for every bond, one per bond, or None."""


def tt_full_ranks(mode_sizes: Sequence[int]) -> tuple[int, ...]:
    """The TT ranks at which a generic tensor of these mode sizes is represented exactly.

    Bond ``k`` separates modes ``1..k`` from ``k+1..d``; its rank can never exceed
    the smaller of the two products (the rank of that unfolding).
    """
    sizes = [int(n) for n in mode_sizes]
    if not sizes or any(n < 1 for n in sizes):
        raise ValueError(f"TT mode sizes must be positive integers, got {tuple(mode_sizes)}")
    return tuple(min(math.prod(sizes[:k]), math.prod(sizes[k:])) for k in range(1, len(sizes)))


def factorize_modes(n: int, d: int) -> tuple[int, ...]:
    """Split ``n`` into ``d`` integer factors whose product is ``n``, as balanced as possible.

    The prime factors of ``n`` are placed largest first into the currently smallest
    factor (first one on ties); the result is sorted largest first, so the same
    ``(n, d)`` always gives the same modes and paired in/out modes line up by size.
    Factors of 1 appear when ``n`` has fewer than ``d`` prime factors (e.g. a prime).
    The largest factor is at most the largest prime factor times the smallest one.

    Examples: ``factorize_modes(4096, 3) == (16, 16, 16)``, ``factorize_modes(12, 2)
    == (4, 3)``, ``factorize_modes(7, 2) == (7, 1)``.
    """
    if isinstance(n, bool) or isinstance(d, bool) or int(n) != n or int(d) != d:
        raise ValueError(f"factorize_modes takes integers, got n={n!r}, d={d!r}")
    n, d = int(n), int(d)
    if n < 1 or d < 1:
        raise ValueError(f"factorize_modes needs n >= 1 and d >= 1, got n={n}, d={d}")
    if d > MAX_TT_CORES:
        raise ValueError(f"factorize_modes splits into at most {MAX_TT_CORES} modes, got d={d}")
    primes: list[int] = []
    rest, p = n, 2
    # Trial division up to _TRIAL_LIMIT finds every prime factor of a channel count below
    # _TRIAL_LIMIT**2 (2**32); a larger remainder is kept as one factor (the product is
    # still n), so a huge prime cannot make this run for hours.
    while p * p <= rest and p <= _TRIAL_LIMIT:
        while rest % p == 0:
            primes.append(p)
            rest //= p
        p += 1
    if rest > 1:
        primes.append(rest)
    bins = [1] * d
    for prime in sorted(primes, reverse=True):
        smallest = min(range(d), key=bins.__getitem__)
        bins[smallest] *= prime
    return tuple(sorted(bins, reverse=True))


@single_threaded
def tt_svd(
    tensor: torch.Tensor,
    ranks: TTRanks = None,
    *,
    eps: float | None = None,
    solver: str = "exact",
    seed: int = 0,
) -> list[torch.Tensor]:
    """TT-SVD (Oseledets 2011, Algorithm 1): sweep left to right, one truncated SVD per bond.

    With neither ``ranks`` nor ``eps`` the decomposition is exact. The cores come
    out left-orthogonal; the last one carries the norm.

    Args:
        tensor: A float tensor with ``d >= 1`` modes.
        ranks: One int per bond (``d - 1`` of them), or one int for every bond. A rank
            above what the bond can hold is lowered to it (the full TT rank, or less
            when an earlier bond was truncated), so a returned core may be smaller
            than asked.
        eps: Relative accuracy: each of the ``d - 1`` truncations drops singular values
            whose energy is at most ``(eps / sqrt(d - 1) * ||A||_F)^2``, so
            ``||A - TT||_F <= eps ||A||_F``. With ``ranks`` as well, ``ranks`` caps the
            ranks ``eps`` picks.
        solver: ``truncated_svd`` solver used for rank-given truncations (``eps`` needs
            every singular value and always uses the exact SVD).
        seed: Seed of the randomized solver.

    Returns:
        ``d`` cores, core ``k`` of shape ``(r_{k-1}, n_k, r_k)`` with ``r_0 = r_d = 1``.
    """
    if tensor.ndim < 1:
        raise ValueError("tt_svd takes a tensor with at least one mode, got a scalar")
    sizes = tuple(tensor.shape)
    d = len(sizes)
    caps = _rank_caps(ranks, d - 1)
    delta = _threshold(tensor.norm(), eps, d)
    cores: list[torch.Tensor] = []
    rank = 1
    rest = tensor
    for k in range(d - 1):
        matrix = rest.reshape(rank * sizes[k], -1)
        u, s, vh = _truncate(matrix, caps[k], delta, solver=solver, seed=seed)
        new_rank = s.numel()
        cores.append(u.reshape(rank, sizes[k], new_rank))
        rest = s[:, None] * vh
        rank = new_rank
    cores.append(rest.reshape(rank, sizes[-1], 1))
    return cores


@single_threaded
def tt_round(
    cores: Sequence[torch.Tensor],
    ranks: TTRanks = None,
    *,
    eps: float | None = None,
) -> list[torch.Tensor]:
    """TT-rounding (Oseledets 2011, Algorithm 2): recompress a TT without forming the tensor.

    Right-to-left QR makes every core but the first right-orthogonal, so the first
    core carries the norm and a left-to-right sweep of truncated SVDs is optimal
    bond by bond, exactly like TT-SVD of the dense tensor. The cost is linear in
    ``d`` and polynomial in the ranks only, which is what lets a TT layer be cut
    to smaller ranks between fine-tuning stages.

    Args:
        cores: Cores of shape ``(r_{k-1}, *modes_k, r_k)`` with ``r_0 = r_d = 1``; the
            middle dimensions may be several (TT-matrix cores ``(r, o, i, r)``) and are
            kept as they are.
        ranks: New bond ranks (one per bond, or one int for all), each lowered to what
            the bond can hold.
        eps: Relative accuracy of the rounding, as in :func:`tt_svd`.

    Returns:
        The new cores, same mode shapes, smaller (or equal) ranks.
    """
    if not cores:
        raise ValueError("tt_round needs at least one core")
    mode_shapes = [tuple(c.shape[1:-1]) for c in cores]
    flat = [c.reshape(c.shape[0], -1, c.shape[-1]) for c in cores]
    _check_chain(flat)
    d = len(flat)
    caps = _rank_caps(ranks, d - 1)
    for k in range(d - 1, 0, -1):
        left, n, right = flat[k].shape
        q, r = torch.linalg.qr(flat[k].reshape(left, n * right).T)
        flat[k] = q.T.reshape(-1, n, right)
        prev = flat[k - 1]
        flat[k - 1] = (prev.reshape(-1, left) @ r.T).reshape(prev.shape[0], prev.shape[1], -1)
    delta = _threshold(flat[0].norm(), eps, d)
    for k in range(d - 1):
        left, n, right = flat[k].shape
        u, s, vh = _truncate(flat[k].reshape(left * n, right), caps[k], delta)
        flat[k] = u.reshape(left, n, -1)
        nxt = flat[k + 1]
        flat[k + 1] = ((s[:, None] * vh) @ nxt.reshape(right, -1)).reshape(
            s.numel(), nxt.shape[1], nxt.shape[2]
        )
    return [c.reshape(c.shape[0], *m, c.shape[-1]) for c, m in zip(flat, mode_shapes, strict=True)]


def tt_to_dense(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """The full tensor of a TT given by cores ``(r_{k-1}, n_k, r_k)``."""
    if not cores:
        raise ValueError("tt_to_dense needs at least one core")
    _check_chain([c.reshape(c.shape[0], -1, c.shape[-1]) for c in cores])
    result = cores[0].reshape(-1, cores[0].shape[-1])
    for core in cores[1:]:
        result = (result @ core.reshape(core.shape[0], -1)).reshape(-1, core.shape[-1])
    return result.reshape(*(int(c.shape[1]) for c in cores))


@single_threaded
def tt_matrix(
    matrix: torch.Tensor,
    out_modes: Sequence[int],
    in_modes: Sequence[int],
    ranks: TTRanks = None,
    *,
    eps: float | None = None,
    solver: str = "exact",
    seed: int = 0,
) -> list[torch.Tensor]:
    """TT-matrix (MPO) of ``matrix`` by TT-SVD of its mode-paired reshaping.

    Row ``o`` is the C-order index over ``(o_1, ..., o_d)`` and column ``i`` the
    C-order index over ``(i_1, ..., i_d)``; core ``k`` holds the pair ``(o_k, i_k)``.

    Args:
        matrix: ``(prod(out_modes), prod(in_modes))``.
        out_modes: Factorisation of the row count.
        in_modes: Factorisation of the column count, same length as ``out_modes``.
        ranks: Bond ranks (``d - 1`` of them, or one int for all); see :func:`tt_svd`.
        eps: Relative accuracy; see :func:`tt_svd`.
        solver: ``truncated_svd`` solver for rank-given truncations.
        seed: Seed of the randomized solver.

    Returns:
        ``d`` cores of shape ``(r_{k-1}, o_k, i_k, r_k)``.
    """
    out_modes = tuple(int(o) for o in out_modes)
    in_modes = tuple(int(i) for i in in_modes)
    if matrix.ndim != 2:
        raise ValueError(f"tt_matrix takes a matrix, got shape {tuple(matrix.shape)}")
    if len(out_modes) != len(in_modes) or not out_modes:
        raise ValueError(
            f"out_modes {out_modes} and in_modes {in_modes} must be non-empty and of one length"
        )
    if (math.prod(out_modes), math.prod(in_modes)) != tuple(matrix.shape):
        raise ValueError(
            f"modes {out_modes} x {in_modes} (products {math.prod(out_modes)} x "
            f"{math.prod(in_modes)}) do not match the matrix shape {tuple(matrix.shape)}"
        )
    d = len(out_modes)
    paired = matrix.reshape(*out_modes, *in_modes)
    paired = paired.permute(*(j for k in range(d) for j in (k, d + k)))
    paired = paired.reshape(*(o * i for o, i in zip(out_modes, in_modes, strict=True)))
    cores = tt_svd(paired, ranks, eps=eps, solver=solver, seed=seed)
    return [
        c.reshape(c.shape[0], o, i, c.shape[-1])
        for c, o, i in zip(cores, out_modes, in_modes, strict=True)
    ]


def tt_matrix_to_dense(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """The ``(out, in)`` matrix of TT-matrix cores ``(..., r_{k-1}, o_k, i_k, r_k)``.

    Leading dimensions (e.g. one per convolution group) are batch dimensions
    shared by every core; the result is then ``(..., out, in)``.
    """
    if not cores:
        raise ValueError("tt_matrix_to_dense needs at least one core")
    batch = tuple(cores[0].shape[:-4])
    _, rows, cols, rank = cores[0].shape[-4:]
    result = cores[0].reshape(*batch, rows, cols, rank)
    for core in cores[1:]:
        left, o, i, right = core.shape[-4:]
        if left != rank or tuple(core.shape[:-4]) != batch:
            raise ValueError(
                f"TT-matrix core of shape {tuple(core.shape)} does not follow a core of rank "
                f"{rank} with batch shape {batch}"
            )
        merged = torch.matmul(
            result.reshape(*batch, rows * cols, rank), core.reshape(*batch, left, o * i * right)
        )
        merged = merged.reshape(*batch, rows, cols, o, i, right).transpose(-4, -3)
        rows, cols, rank = rows * o, cols * i, right
        result = merged.reshape(*batch, rows, cols, rank)
    if rank != 1:
        raise ValueError(f"the last TT-matrix core must have rank 1 on its right, got {rank}")
    return result.reshape(*batch, rows, cols)


def tt_matrix_apply(cores: Sequence[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Multiply batches of vectors by TT-matrices without forming the matrices.

    ``y[b, g, o, c] = sum_{i, s} T_g[o, i, s] x[b, g, i, s, c]``, where ``T_g`` is the
    TT-matrix of group ``g`` whose last bond ``s`` (size ``r_d``) is left open
    (``r_d = 1`` for a plain TT-matrix; a TT convolution hangs its kernel core there).
    The sweep runs from the last core to the first; every step is one batched
    matmul on contiguous memory: the contracted pair ``(i_k, r_k)`` is always
    adjacent and the produced output mode lands just in front of the columns, so
    the activations are never permuted (except to turn many thin products, fewer
    than ``_FEW_COLUMNS`` columns, into one large GEMM). A step costs
    ``B * g * i_1..i_{k-1} * (r_{k-1} o_k) * (i_k r_k) * o_{k+1}..o_d * c`` MACs.

    Args:
        cores: ``d`` cores ``(g, r_{k-1}, o_k, i_k, r_k)`` with ``r_0 = 1``.
        x: ``(B, g, i_1 * ... * i_d, r_d, c)``.

    Returns:
        ``(B, g, o_1 * ... * o_d, c)``.
    """
    if not cores:
        raise ValueError("tt_matrix_apply needs at least one core")
    batch, groups, rows, last_rank, cols = x.shape
    in_size = math.prod(int(c.shape[3]) for c in cores)
    if rows != in_size or last_rank != cores[-1].shape[-1] or groups != cores[-1].shape[0]:
        raise ValueError(
            f"input of shape {tuple(x.shape)} does not fit TT-matrix cores ending with "
            f"{tuple(cores[-1].shape)} (input size {in_size})"
        )
    state = x
    left = rows
    for core in reversed(cores):
        _, r0, o, i, r1 = core.shape
        left = left // i  # not in place: under ONNX tracing sizes are tensors
        a = core.reshape(groups, r0 * o, i * r1)
        u = state.reshape(batch, groups, left, i * r1, cols)
        if groups == 1 and cols == 1:
            state = u.reshape(batch * left, i * r1) @ a[0].T
        elif groups == 1 and cols < _FEW_COLUMNS:
            # Many thin products are slow: one large GEMM on transposed copies is faster.
            flat = u.reshape(batch * left, i * r1, cols).transpose(1, 2).reshape(-1, i * r1)
            state = (flat @ a[0].T).view(batch * left, cols, r0 * o).transpose(1, 2).contiguous()
        elif groups == 1 and (
            (torch.is_grad_enabled() and a.requires_grad) or torch.jit.is_tracing()
        ):
            # matmul folds the batch into one GEMM, so the core's gradient is one product.
            # A trace takes this branch too: its check re-traces under another grad mode.
            state = torch.matmul(a[0], u.reshape(batch * left, i * r1, cols))
        elif groups == 1:
            # Without autograd, a bmm on the broadcast core avoids matmul's transposed copies.
            state = torch.bmm(a[0].expand(batch * left, -1, -1), u.reshape(-1, i * r1, cols))
        else:
            state = torch.matmul(a.unsqueeze(1), u)
        cols = cols * o
    return state.reshape(batch, groups, -1, x.shape[-1])


def tt_matrix_modes(
    out_size: int,
    in_size: int,
    cores: int,
    out_modes: Sequence[int] | None = None,
    in_modes: Sequence[int] | None = None,
    *,
    option: str = "tt",
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Row and column modes of a TT-matrix: the given ones, checked, or balanced ones.

    When only one side is given, the other is factorised into as many modes.
    ``cores`` is used only when neither is given. ``option`` is the prefix of the
    options the modes came from (``tt_in_modes``, ``ht_in_modes``), for the messages.

    Raises:
        ValueError: naming the modes and sizes that do not fit.
    """
    if (
        out_modes is None
        and in_modes is None
        and (
            isinstance(cores, bool) or not isinstance(cores, int) or not 1 <= cores <= MAX_TT_CORES
        )
    ):
        raise ValueError(
            f"{option}_cores must be an integer from 1 to {MAX_TT_CORES}, got {cores!r}"
        )
    checked: list[tuple[int, ...] | None] = []
    for side, size, modes in (("out", out_size, out_modes), ("in", in_size, in_modes)):
        if modes is None:
            checked.append(None)
            continue
        values = tuple(modes)
        if not 1 <= len(values) <= MAX_TT_CORES:
            raise ValueError(
                f"{option}_{side}_modes has {len(values)} modes; expected 1 to {MAX_TT_CORES}"
            )
        if any(isinstance(m, bool) or not hasattr(m, "__index__") or m < 1 for m in values):
            raise ValueError(f"{option}_{side}_modes {values} must be positive integers")
        values = tuple(operator.index(m) for m in values)
        if math.prod(values) != size:
            raise ValueError(
                f"{option}_{side}_modes {values} multiply to {math.prod(values)}, "
                f"but the layer has {size} {side}put channels (per group)"
            )
        checked.append(values)
    outs, ins = checked
    if outs is not None and ins is not None and len(outs) != len(ins):
        raise ValueError(
            f"{option}_out_modes {outs} and {option}_in_modes {ins} must have the same length"
        )
    count = len(outs) if outs is not None else len(ins) if ins is not None else int(cores)
    return (
        outs if outs is not None else factorize_modes(out_size, count),
        ins if ins is not None else factorize_modes(in_size, count),
    )


def pad_tt_ranks(cores: Sequence[torch.Tensor], ranks: Sequence[int]) -> list[torch.Tensor]:
    """Zero-pad cores ``(r_{k-1}, ..., r_k)`` up to the given bond ranks (same tensor).

    TT-SVD may return a bond smaller than asked when the bond cannot hold more; a
    layer built for the asked ranks still needs cores of that size.
    """
    bonds = (1, *(int(r) for r in ranks), 1)
    if len(bonds) != len(cores) + 1:
        raise ValueError(f"{len(cores)} cores need {len(cores) - 1} ranks, got {tuple(ranks)}")
    padded = []
    for k, core in enumerate(cores):
        left, right = core.shape[0], core.shape[-1]
        if left > bonds[k] or right > bonds[k + 1]:
            raise ValueError(
                f"core {k} of shape {tuple(core.shape)} is larger than ranks "
                f"({bonds[k]}, {bonds[k + 1]})"
            )
        if (left, right) == (bonds[k], bonds[k + 1]):
            padded.append(core)
            continue
        full = core.new_zeros(bonds[k], *core.shape[1:-1], bonds[k + 1])
        full[:left, ..., :right] = core
        padded.append(full)
    return padded


def balance_tt_cores(cores: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Rescale cores to one Frobenius norm each, leaving their product unchanged.

    TT-SVD leaves the whole norm in one core; equal scales keep the gradients of
    the cores comparable when the layer is fine-tuned.
    """
    norms = [float(c.norm()) for c in cores]
    if any(n == 0.0 or not math.isfinite(n) for n in norms):
        return list(cores)
    mean = math.exp(sum(math.log(n) for n in norms) / len(norms))
    return [c * (mean / n) for c, n in zip(cores, norms, strict=True)]


# ---------------------------------------------------------------------- helpers
def _rank_caps(ranks: TTRanks, bonds: int) -> list[int]:
    if ranks is None:
        return [2**62] * bonds
    if isinstance(ranks, bool):
        raise ValueError(f"TT ranks must be integers, got {ranks!r}")
    if isinstance(ranks, int):
        values = [ranks] * bonds
    else:
        values = list(ranks)
        if len(values) != bonds:
            raise ValueError(f"a TT with {bonds} bonds needs {bonds} ranks, got {tuple(values)}")
    if any(isinstance(r, bool) or int(r) != r or r < 1 for r in values):
        raise ValueError(f"TT ranks must be positive integers, got {ranks!r}")
    return [int(r) for r in values]


def _threshold(norm: torch.Tensor, eps: float | None, d: int) -> float | None:
    if eps is None:
        return None
    if not eps >= 0:
        raise ValueError(f"eps must be a non-negative relative accuracy, got {eps!r}")
    return float(eps) / math.sqrt(max(d - 1, 1)) * float(norm)


def _truncate(
    matrix: torch.Tensor,
    cap: int,
    delta: float | None,
    *,
    solver: str = "exact",
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Truncated SVD at rank ``min(cap, ...)`` or at the smallest rank within ``delta``."""
    cap = min(cap, *matrix.shape)
    if delta is None:
        return truncated_svd(matrix, cap, solver=solver, seed=seed)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    # tail[j] = energy dropped when keeping j singular values.
    energy = s.double() ** 2
    tail = energy.flip(0).cumsum(0).flip(0)
    keep = int((tail > delta**2).sum())
    keep = max(1, min(keep, cap))
    return u[:, :keep], s[:keep], vh[:keep]


def _check_chain(cores: Sequence[torch.Tensor]) -> None:
    for k, core in enumerate(cores):
        if core.ndim != 3:
            raise ValueError(f"TT core {k} has shape {tuple(core.shape)}; expected (r, n, r')")
    if cores[0].shape[0] != 1 or cores[-1].shape[-1] != 1:
        raise ValueError("the first TT core must start and the last end with rank 1")
    for k in range(1, len(cores)):
        if cores[k].shape[0] != cores[k - 1].shape[-1]:
            raise ValueError(
                f"TT cores {k - 1} and {k} do not chain: ranks {cores[k - 1].shape[-1]} "
                f"and {cores[k].shape[0]}"
            )
