"""Tucker2 of a convolution kernel: channel modes compressed, spatial modes kept.

A kernel ``W`` of shape ``(out, in, kh, kw)`` is approximated as
``core x0 u_out x1 u_in``, with ``u_out`` and ``u_in`` having orthonormal
columns. As a layer this is a 1x1 conv ``in -> r_in``, a ``kh x kw`` conv
``r_in -> r_out`` and a 1x1 conv ``r_out -> out`` (Kim et al. 2016, MUSCO).

The factors come from the HOSVD (leading eigenvectors of the small channel
Gram matrices, formed in float64: ~10x cheaper than an SVD of the wide
unfoldings and as accurate) refined by HOOI sweeps, which maximise the core's
energy one mode at a time and so never increase the error. The sweeps run until
one improves the relative error by less than a tolerance, as tensorly's
``partial_tucker`` (MUSCO's default) does, capped by a sweep count.
"""

from __future__ import annotations

import logging
import math

import torch

from stagecomp.threads import product_threads, single_threaded

logger = logging.getLogger(__name__)

#: Default cap on HOOI sweeps and default tolerance (see ``DecomposeOptions``).
HOOI_ITERS = 30
HOOI_TOL = 1e-4


@single_threaded
def tucker2(
    kernel: torch.Tensor,
    ranks: tuple[int, int],
    *,
    hooi_iters: int = HOOI_ITERS,
    hooi_tol: float = HOOI_TOL,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Tucker decomposition of ``kernel`` over its output and input channel modes.

    The sweep order matches tensorly's ``partial_tucker`` (output mode first,
    then input mode), so ``hooi_iters=n, hooi_tol=0`` reproduces its result
    after ``n`` iterations. Eigenvectors are sign-fixed (largest entry
    positive), so the result is deterministic.

    Args:
        kernel: A float tensor of shape ``(out, in, kh, kw)``, on any device.
            float32 and float64 are used as they are; other dtypes run in float32.
        ranks: ``(r_out, r_in)`` with ``1 <= r_out <= out`` and ``1 <= r_in <= in``.
            At ``(out, in)`` the decomposition is exact.
        hooi_iters: Most HOOI sweeps after the HOSVD start; 0 keeps the plain HOSVD,
            1 is a single sweep.
        hooi_tol: Stop once a sweep lowers the relative error ``||W - W_r|| / ||W||``
            by less than this (0: run all ``hooi_iters`` sweeps).

    Returns:
        ``core`` of shape ``(r_out, r_in, kh, kw)``, ``u_out`` of shape ``(out, r_out)``
        and ``u_in`` of shape ``(in, r_in)``, both with orthonormal columns.
    """
    if kernel.ndim != 4:
        raise ValueError(
            f"tucker2 takes a conv kernel (out, in, kh, kw), got shape {tuple(kernel.shape)}"
        )
    n_out, n_in, kh, kw = kernel.shape
    r_out, r_in = _check_ranks(ranks, n_out, n_in)
    if hooi_iters < 0:
        raise ValueError(f"hooi_iters must be 0 or more, got {hooi_iters}")
    if not hooi_tol >= 0:
        raise ValueError(f"hooi_tol must be 0 or more, got {hooi_tol}")
    x = _working(kernel).reshape(n_out, n_in, kh * kw)

    # HOSVD start. With at least one sweep only u_in is used: the first sweep
    # recomputes u_out from it, so the output-mode eigenproblem is skipped.
    u_in = _leading_vectors(x, 1, r_in)
    if hooi_iters == 0:
        u_out = _leading_vectors(x, 0, r_out)
        core = _project_in(_project_out(x, u_out), u_in)
        return core.reshape(r_out, r_in, kh, kw), u_out, u_in
    # With orthonormal factors ||W - W_r||^2 = ||W||^2 - ||core||^2: the error of
    # each sweep costs a norm of the core. Norms in float64 keep the difference.
    norm2 = float(torch.linalg.vector_norm(x, dtype=torch.float64)) ** 2
    error = math.inf
    sweeps = 0
    while sweeps < hooi_iters:
        sweeps += 1
        u_out = _leading_vectors(_project_in(x, u_in), 0, r_out)
        y = _project_out(x, u_out)
        u_in = _leading_vectors(y, 1, r_in)
        core = _project_in(y, u_in)
        if hooi_tol == 0:
            continue
        energy = float(torch.linalg.vector_norm(core, dtype=torch.float64)) ** 2
        new_error = math.sqrt(max(norm2 - energy, 0.0) / norm2) if norm2 > 0 else 0.0
        improved, error = error - new_error, new_error
        if improved < hooi_tol or error == 0.0:
            break
    logger.debug("Tucker2 %s at ranks %s: %d HOOI sweeps", tuple(kernel.shape), ranks, sweeps)
    return core.reshape(r_out, r_in, kh, kw), u_out, u_in


@single_threaded
def tucker2_recompress(
    core: torch.Tensor,
    u_out: torch.Tensor,
    u_in: torch.Tensor,
    ranks: tuple[int, int],
    *,
    hooi_iters: int = HOOI_ITERS,
    hooi_tol: float = HOOI_TOL,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``tucker2`` of the kernel ``core x0 u_out x1 u_in`` without forming that kernel.

    A later compression stage shrinks an already decomposed (and fine-tuned)
    layer. Its factors are no longer orthonormal, so they are QR-factorised and
    their triangular parts folded into the core; the Tucker2 of that small core,
    mapped back through the orthonormal parts, is the Tucker2 of the dense kernel
    (the channel Gram matrices share their eigenvectors through the map).

    Args:
        core: Shape ``(c_out, c_in, kh, kw)``.
        u_out: Shape ``(out, c_out)``, any full or rank-deficient matrix.
        u_in: Shape ``(in, c_in)``.
        ranks: The new ``(r_out, r_in)``, from 1 to ``(out, in)``; they may exceed
            the current ``(c_out, c_in)``, in which case the extra directions carry
            no energy.
        hooi_iters: Most HOOI sweeps, as for ``tucker2``.
        hooi_tol: HOOI tolerance, as for ``tucker2``.

    Returns:
        ``(core, u_out, u_in)`` as ``tucker2`` of the dense kernel gives them, up to
        float error (and the choice of basis inside a repeated eigenvalue).
    """
    if core.ndim != 4 or u_out.ndim != 2 or u_in.ndim != 2:
        raise ValueError(
            "tucker2_recompress takes a core (c_out, c_in, kh, kw) and two factor matrices, "
            f"got shapes {tuple(core.shape)}, {tuple(u_out.shape)}, {tuple(u_in.shape)}"
        )
    c_out, c_in, kh, kw = core.shape
    if u_out.shape[1] != c_out or u_in.shape[1] != c_in:
        raise ValueError(
            f"factors {tuple(u_out.shape)} and {tuple(u_in.shape)} do not fit a core of "
            f"shape {tuple(core.shape)}"
        )
    n_out, n_in = u_out.shape[0], u_in.shape[0]
    r_out, r_in = _check_ranks(ranks, n_out, n_in)
    dtype = _working(core).dtype
    q_out, t_out = _orthonormal_basis(u_out.to(dtype), r_out)
    q_in, t_in = _orthonormal_basis(u_in.to(dtype), r_in)
    small = _project_in(_project_out(core.to(dtype).reshape(c_out, c_in, -1), t_out.T), t_in.T)
    small_core, v_out, v_in = tucker2(
        small.reshape(t_out.shape[0], t_in.shape[0], kh, kw),
        (r_out, r_in),
        hooi_iters=hooi_iters,
        hooi_tol=hooi_tol,
    )
    # Fix the signs on the final vectors, as tucker2 of the dense kernel does, and
    # flip the matching core slices so the product is unchanged.
    new_out, flip_out = _sign_fixed(q_out @ v_out)
    new_in, flip_in = _sign_fixed(q_in @ v_in)
    new_core = small_core * flip_out[:, None, None, None] * flip_in[None, :, None, None]
    return new_core, new_out, new_in


def tucker2_dense(core: torch.Tensor, u_out: torch.Tensor, u_in: torch.Tensor) -> torch.Tensor:
    """The kernel ``core x0 u_out x1 u_in`` of shape ``(out, in, kh, kw)``."""
    c_out, c_in, kh, kw = core.shape
    dense = _project_in(_project_out(core.reshape(c_out, c_in, -1), u_out.T), u_in.T)
    return dense.reshape(u_out.shape[0], u_in.shape[0], kh, kw)


# --------------------------------------------------------------------- helpers
def _check_ranks(ranks: tuple[int, int], n_out: int, n_in: int) -> tuple[int, int]:
    r_out, r_in = (int(r) for r in ranks)
    if not (1 <= r_out <= n_out and 1 <= r_in <= n_in):
        raise ValueError(
            f"Tucker2 ranks {(r_out, r_in)} are out of range for {n_out} output and "
            f"{n_in} input channels: (1..{n_out}, 1..{n_in})"
        )
    return r_out, r_in


def _working(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.dtype in (torch.float32, torch.float64):
        return tensor
    return tensor.float()


def _gram_out(x: torch.Tensor) -> torch.Tensor:
    """Gram matrix ``(a, a)`` of the mode-0 unfolding of ``x`` (a, b, k), in float64."""
    flat = x.reshape(x.shape[0], -1).to(_gram_dtype(x))
    with product_threads(flat.shape[0] * flat.numel()):
        return flat @ flat.T


def _gram_in(x: torch.Tensor) -> torch.Tensor:
    """Gram matrix ``(b, b)`` of the mode-1 unfolding of ``x`` (a, b, k), in float64."""
    a, b, k = x.shape
    flat = torch.empty((b, a, k), dtype=_gram_dtype(x), device=x.device)
    flat = flat.copy_(x.transpose(0, 1)).reshape(b, a * k)  # one copy: transpose and cast
    with product_threads(b * flat.numel()):
        return flat @ flat.T


def _gram_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 wherever the device has it.

    A float32 Gram matrix squares the condition number: its rounding, about
    ``eps * sigma_1**2``, blurs every direction whose singular value is below
    ``sqrt(eps) * sigma_1`` and puts a floor near 1e-4 under the relative error.
    Formed in float64 from the float32 data, it is as accurate as a float32 SVD
    of the unfolding at a small part of the cost.
    """
    return torch.float32 if x.device.type == "mps" else torch.float64


def _project_out(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``x x0 u.T``: (a, b, k) with u (a, r) -> (r, b, k)."""
    a, b, k = x.shape
    with product_threads(x.numel() * u.shape[1]):
        return (u.T @ x.reshape(a, b * k)).reshape(u.shape[1], b, k)


def _project_in(x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """``x x1 u.T``: (a, b, k) with u (b, r) -> (a, r, k)."""
    with product_threads(x.numel() * u.shape[1]):
        return torch.einsum("abk,br->ark", x, u)


def _leading_vectors(x: torch.Tensor, mode: int, rank: int) -> torch.Tensor:
    """The ``rank`` leading left singular vectors of the mode-``mode`` unfolding of ``x`` (a, b, k).

    They are the leading eigenvectors of the unfolding's Gram matrix. When the
    unfolding is tall (a 1x1 conv ``512 -> 2048``, or a projection onto a few
    input directions in HOOI), its QR comes first and only the small ``R R^T``
    is eigendecomposed, so the eigenproblem's size is the unfolding's width, not
    its height. Vectors asked for beyond the width span the unfolding's null
    space (they carry no energy) and come from the complete QR.
    """
    height = x.shape[mode]
    width = x.numel() // height
    if height <= width:
        gram = _gram_out(x) if mode == 0 else _gram_in(x)
        return _sign_fixed(_top_eigvecs(gram, rank).to(x.dtype))[0]
    unfolding = x.reshape(height, -1) if mode == 0 else x.transpose(0, 1).reshape(height, -1)
    q, r = torch.linalg.qr(unfolding, mode="reduced" if rank <= width else "complete")
    r = r[:width].to(_gram_dtype(x))
    vectors = q[:, :width] @ _top_eigvecs(r @ r.T, min(rank, width)).to(x.dtype)
    if rank > width:
        vectors = torch.cat([vectors, q[:, width:rank]], dim=1)
    return _sign_fixed(vectors)[0]


def _top_eigvecs(gram: torch.Tensor, rank: int) -> torch.Tensor:
    """Eigenvectors of the ``rank`` largest eigenvalues of a symmetric PSD matrix."""
    _, vectors = torch.linalg.eigh(gram)
    return vectors[:, -rank:].flip(1)


def _sign_fixed(vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip columns so each one's largest-magnitude entry is positive; also the flips."""
    pick = vectors.abs().argmax(dim=0, keepdim=True)
    signs = torch.gather(vectors, 0, pick).squeeze(0).sign()
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    return vectors * signs, signs


def _orthonormal_basis(factor: torch.Tensor, wanted: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``factor = q @ t`` with orthonormal ``q`` of at least ``wanted`` columns (when possible).

    Extra columns beyond the factor's own come from the complete QR; their rows
    of ``t`` are zero, so they add directions that carry no energy.
    """
    rows, cols = factor.shape
    width = min(rows, max(cols, wanted))
    if width <= cols:
        q, t = torch.linalg.qr(factor)
        return q, t
    q, t = torch.linalg.qr(factor, mode="complete")
    return q[:, :width], t[:width]
