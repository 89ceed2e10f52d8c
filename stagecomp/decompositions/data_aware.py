"""Data-aware low-rank factors: truncate where the layer's real inputs and outputs are small.

A weight-only SVD minimises ``||W - W_r||``; what matters is ``||(W - W_r) X||``
on the inputs ``X`` the layer actually sees. With the input second moment
``S = E[x x^T] = L L^T`` that error is ``||(W - W_r) L||``, minimised by
truncating the SVD of ``W L`` (SVD-LLM's whitening). We return it in the
projection form ``W_r = U_r U_r^T W``, with ``U_r`` the leading left singular
vectors of ``W L``: on the data it is the same optimum, but nothing is ever
multiplied by ``L^-1``, so a singular or ill-conditioned ``S`` (inputs in a
low-dimensional subspace) is harmless, and directions the data never visited
are still mapped as ``W`` maps them, projected.

``U_r`` are also the top eigenvectors of the output second moment ``W S W^T``.
The output-covariance variant (ptdeco's falor) centres it instead, and moves
the mean of what the projection drops into the bias, so outputs lying in an
affine subspace are reproduced exactly. For Tucker2 the channel factors come
from the input and output channel moments, and the core is the kernel
projected onto them.

Whitening only the input side treats every output direction alike. The
gradient-weighted variant also whitens the output side with ``G = E[g g^T]``,
``g`` the gradient of the model's final output with respect to the layer's
output: the truncation then minimises the (Gauss-Newton, Kronecker-factored)
change of the final output, and the dropped singular values are that change,
comparable across layers.

Every function works in float64 on the device of its inputs and returns factors
that are exact at full rank. They run on one thread but for the products with
the moment's root (:mod:`stagecomp.threads`).
"""

from __future__ import annotations

import torch

from stagecomp.threads import product_threads, single_threaded

# Relative damping added to a second moment before its square root: enough for
# Cholesky to succeed on a singular matrix, far below any eigenvalue that matters.
DEFAULT_DAMPING = 1e-10
# Relative ridge of the drift-correcting least squares: it inverts the input
# moment, so directions the data hardly visits must not get huge weights.
CORRECTION_DAMPING = 1e-4
# Relative ridge on the output-gradient moment: output directions the final
# output ignores get a small, finite weight instead of none.
GRADIENT_DAMPING = 1e-6


@single_threaded
def moment_root(moment: torch.Tensor, damping: float = DEFAULT_DAMPING) -> torch.Tensor:
    """A factor ``L`` with ``L L^T = moment + damping * mean(diag) * I``.

    Cholesky when it succeeds; otherwise (indefinite through rounding, or
    exactly singular at tiny damping) the symmetric eigendecomposition with
    negative eigenvalues clipped to zero.
    """
    return _root(moment, damping)[0]


def _root(moment: torch.Tensor, damping: float) -> tuple[torch.Tensor, bool]:
    """``moment_root``, and whether the root is lower-triangular (Cholesky)."""
    # In place where it can be: for a 2048-wide moment every float64 copy is 32 MiB.
    damped = moment.to(torch.float64, copy=True)
    damped.add_(moment.T).mul_(0.5)
    scale = float(damped.diagonal().mean()) if damped.numel() else 0.0
    damped.diagonal().add_(max(damping * scale, torch.finfo(damped.dtype).tiny))
    root, info = torch.linalg.cholesky_ex(damped)
    if int(info) == 0:
        return root, True
    values, vectors = torch.linalg.eigh(damped)
    del damped
    return vectors.mul_(values.clamp_min(0).sqrt()[None, :]), False


@single_threaded
def whitened_spectrum(
    weight: torch.Tensor, moment: torch.Tensor, damping: float = DEFAULT_DAMPING
) -> torch.Tensor:
    """Singular values of ``W L``; truncating after ``r`` costs ``sum_{i>r} s_i^2``."""
    w = weight.to(torch.float64)
    root = moment_root(moment, damping).to(w.device)
    with product_threads(w.numel() * root.shape[1]):
        whitened = w @ root
    return torch.linalg.svdvals(whitened)


def _output_basis(
    weight: torch.Tensor, moment: torch.Tensor, rank: int, damping: float
) -> torch.Tensor:
    """Leading ``rank`` left singular vectors of ``W L`` (``out x rank``, orthonormal)."""
    root = moment_root(moment, damping)
    with product_threads(weight.numel() * root.shape[1]):
        whitened = weight @ root
    u, _, _ = torch.linalg.svd(whitened, full_matrices=False)
    return u[:, :rank]


def _projected_svd(
    basis: torch.Tensor, weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The exact SVD ``(u, s, vh)`` of ``basis basis^T weight`` (rank ``basis.shape[1]``).

    Returning an SVD (not just the two factors) lets the layer split the singular
    values evenly across its two factors, as the weight-only SVD does.
    """
    with product_threads(basis.shape[1] * weight.numel()):
        projected = basis.T @ weight
    a, s, vh = torch.linalg.svd(projected, full_matrices=False)
    return basis @ a, s, vh


def _check(weight: torch.Tensor, moment: torch.Tensor, rank: int) -> None:
    if weight.ndim != 2:
        raise ValueError(f"expected a matrix weight (out, in), got shape {tuple(weight.shape)}")
    if moment.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(
            f"input moment of shape {tuple(moment.shape)} does not fit a weight of shape "
            f"{tuple(weight.shape)}; expected ({weight.shape[1]}, {weight.shape[1]})"
        )
    if not 1 <= rank <= min(weight.shape):
        raise ValueError(f"rank {rank} is out of range for a {tuple(weight.shape)} weight")


@single_threaded
def whitened_svd(
    weight: torch.Tensor,
    moment: torch.Tensor,
    rank: int,
    *,
    damping: float = DEFAULT_DAMPING,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-``rank`` ``W_r = u diag(s) vh`` minimising ``E ||(W - W_r) x||^2`` over the data.

    Args:
        weight: ``(out, in)``.
        moment: ``E[x x^T]`` of the layer's inputs, ``(in, in)``; may be singular.
        rank: ``1 <= rank <= min(out, in)``.
        damping: Relative ridge for the square root of ``moment``.

    Returns:
        ``u (out, rank)``, ``s (rank,)``, ``vh (rank, in)``, float64.
    """
    _check(weight, moment, rank)
    w = weight.to(torch.float64)
    return _projected_svd(_output_basis(w, moment.to(w.device), rank, damping), w)


@single_threaded
def output_covariance_svd(
    weight: torch.Tensor,
    moment: torch.Tensor,
    mean: torch.Tensor,
    rank: int,
    *,
    damping: float = DEFAULT_DAMPING,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Project the outputs on the principal axes of their centred covariance; fix the mean.

    ``W_r = P W`` with ``P`` the projection on the top ``rank`` eigenvectors of
    ``W Cov(x) W^T``; the returned bias shift ``(I - P) W E[x]`` added to the bias
    makes ``W_r x + b + shift = W x + b`` for every ``x`` whose output lies in the
    affine ``rank``-dimensional subspace through the mean output.

    Returns:
        ``u``, ``s``, ``vh`` as ``whitened_svd``, and the bias shift ``(out,)``.
    """
    _check(weight, moment, rank)
    w = weight.to(torch.float64)
    m = mean.to(device=w.device, dtype=torch.float64)
    covariance = moment.to(w.device, torch.float64) - torch.outer(m, m)
    basis = _output_basis(w, covariance, rank, damping)
    u, s, vh = _projected_svd(basis, w)
    out_mean = w @ m
    shift = out_mean - basis @ (basis.T @ out_mean)
    return u, s, vh, shift


@single_threaded
def drift_corrected(
    weight: torch.Tensor,
    moment: torch.Tensor,
    cross_moment: torch.Tensor,
    damping: float = CORRECTION_DAMPING,
) -> torch.Tensor:
    """The weight that best maps the inputs seen now to the original outputs.

    After earlier layers were compressed a layer sees ``x`` instead of the
    original ``x_ref``. ``B = W E[x_ref x^T] E[x x^T]^-1`` (a ridge-damped least
    squares) minimises ``E||W x_ref - B x||^2``; whitening ``B`` with the moment of
    ``x`` then truncates it optimally for that same error, so each layer also
    undoes part of the drift the layers before it caused.
    """
    s = moment.to(torch.float64)
    s = (s + s.T) / 2
    scale = float(s.diagonal().mean()) if s.numel() else 0.0
    eye = torch.eye(s.shape[0], dtype=s.dtype, device=s.device)
    damped = s + max(damping * scale, torch.finfo(s.dtype).tiny) * eye
    w = weight.to(torch.float64)
    with product_threads(w.numel() * cross_moment.shape[1]):
        target = w @ cross_moment.to(w.device, torch.float64)  # W E[x_ref x^T]
    return torch.linalg.solve(damped, target.T).T


@single_threaded
def weighted_spectrum(
    weight: torch.Tensor,
    moment: torch.Tensor,
    gradient_moment: torch.Tensor,
    damping: float = DEFAULT_DAMPING,
) -> torch.Tensor:
    """Singular values of ``R^T W L`` (``R R^T = gradient_moment``, ``L L^T = moment``).

    Dropping component ``i`` changes the model's final output by about ``s_i^2``
    (in the units ``gradient_moment`` was collected in), so these values compare
    across layers: a global budget drops the smallest ones first.
    """
    w = weight.to(torch.float64)
    left = moment_root(gradient_moment.to(w.device), GRADIENT_DAMPING)
    right = moment_root(moment.to(w.device), damping)
    with product_threads(w.numel() * (left.shape[0] + right.shape[1])):
        whitened = left.T @ w @ right
    return torch.linalg.svdvals(whitened)


@single_threaded
def gradient_weighted_svd(
    weight: torch.Tensor,
    moment: torch.Tensor,
    gradient_moment: torch.Tensor,
    rank: int,
    *,
    damping: float = DEFAULT_DAMPING,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-``rank`` ``W_r`` minimising ``tr(G (W - W_r) S (W - W_r)^T)``: both sides whitened.

    ``S`` is the input moment and ``G = E[g g^T]`` the moment of the gradients of
    the model's output with respect to this layer's output (a Gauss-Newton,
    Kronecker-factored estimate of how an error in this layer's output moves the
    final output). With ``G = I`` this is ``whitened_svd``. ``W_r = R^-T U_r U_r^T R^T W``
    with ``U_r`` the leading left singular vectors of ``R^T W L``: exact at full rank
    and on inputs in a subspace of dimension ``rank``.

    Returns:
        ``u (out, rank)``, ``s (rank,)``, ``vh (rank, in)``: an exact SVD of ``W_r``.
    """
    _check(weight, moment, rank)
    w = weight.to(torch.float64)
    root, triangular = _root(gradient_moment.to(w.device), GRADIENT_DAMPING)
    with product_threads(root.shape[0] * w.numel()):
        whitened_out = root.T @ w
    basis = _output_basis(whitened_out, moment.to(w.device), rank, damping)
    # R^-T U_r, out x rank; a Cholesky root is triangular: no LU copy of an out x out matrix.
    if triangular:
        second = torch.linalg.solve_triangular(root.T, basis, upper=True)
    else:
        second = torch.linalg.solve(root.T, basis)
    del root
    first = basis.T @ whitened_out  # U_r^T R^T W, rank x in
    q, r = torch.linalg.qr(second)
    a, s, vh = torch.linalg.svd(r @ first, full_matrices=False)
    return q @ a, s, vh


@single_threaded
def principal_axes(moment: torch.Tensor, rank: int) -> torch.Tensor:
    """The top ``rank`` eigenvectors of a symmetric moment, ``(d, rank)``, orthonormal."""
    s = moment.to(torch.float64)
    _, vectors = torch.linalg.eigh((s + s.T) / 2)
    return vectors.flip(1)[:, :rank]


@single_threaded
def data_aware_tucker2(
    kernel: torch.Tensor,
    ranks: tuple[int, int],
    input_moment: torch.Tensor,
    output_covariance: torch.Tensor,
    output_mean: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Tucker2 of a conv kernel with channel factors from the data, not the kernel.

    ``u_in`` spans the top ``r_in`` principal axes of the input channels
    (uncentred: the first 1x1 conv has no bias, and zero padding must stay
    zero), ``u_out`` the top ``r_out`` axes of the centred output channels, and
    the core is the kernel projected on both. When ``output_mean`` (the mean of
    the layer's output without its bias) is given, the returned bias shift
    ``(I - P_out) output_mean`` keeps the output mean exact.

    Args:
        kernel: ``(out, in, kh, kw)``.
        ranks: ``(r_out, r_in)``.
        input_moment: ``E[x x^T]`` over input channels, ``(in, in)``.
        output_covariance: Centred output channel covariance, ``(out, out)``.
        output_mean: Mean output channel value without the bias, or None.

    Returns:
        ``core (r_out, r_in, kh, kw)``, ``u_out (out, r_out)``, ``u_in (in, r_in)``,
        and the bias shift (or None).
    """
    if kernel.ndim != 4:
        raise ValueError(f"expected a conv kernel (out, in, kh, kw), got {tuple(kernel.shape)}")
    n_out, n_in = kernel.shape[:2]
    r_out, r_in = ranks
    if not (1 <= r_out <= n_out and 1 <= r_in <= n_in):
        raise ValueError(f"ranks {ranks} are out of range for a kernel {tuple(kernel.shape)}")
    k = kernel.to(torch.float64)
    u_in = principal_axes(input_moment.to(k.device), r_in)
    u_out = principal_axes(output_covariance.to(k.device), r_out)
    with product_threads(k.numel() * (r_out + r_in)):
        core = torch.einsum("oikl,or,is->rskl", k, u_out, u_in)
    shift = None
    if output_mean is not None:
        m = output_mean.to(device=k.device, dtype=torch.float64)
        shift = m - u_out @ (u_out.T @ m)
    return core, u_out, u_in, shift


__all__ = [
    "CORRECTION_DAMPING",
    "DEFAULT_DAMPING",
    "GRADIENT_DAMPING",
    "data_aware_tucker2",
    "drift_corrected",
    "gradient_weighted_svd",
    "moment_root",
    "output_covariance_svd",
    "principal_axes",
    "weighted_spectrum",
    "whitened_spectrum",
    "whitened_svd",
]
