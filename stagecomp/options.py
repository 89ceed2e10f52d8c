"""Knobs of the decomposition algorithms, one frozen dataclass for all methods."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from stagecomp.decompositions.tucker2 import HOOI_ITERS, HOOI_TOL


@dataclass(frozen=True)
class DecomposeOptions:
    """How factors are computed; ranks are given separately.

    Attributes:
        seed: Seed of every randomized step (randomized SVD, CP starts), so runs repeat.
        svd_solver: ``"auto"`` picks the exact SVD for small matrices and a randomized
            range finder for large ones with a small rank; ``"exact"`` or ``"randomized"``
            force one.
        hooi_iters: Cap on the HOOI refinement sweeps after the HOSVD start of Tucker2;
            0 keeps the plain HOSVD, 1 is the single sweep of earlier versions.
        hooi_tol: HOOI stops once a sweep lowers the relative weight error by less than
            this (0: always run ``hooi_iters`` sweeps). Iterating to it, as tensorly's
            ``partial_tucker`` (MUSCO's default) does, gave 98.66% accuracy before
            fine-tuning on the trained digits CNN against 98.00% for one sweep, at the
            same ranks. On random 3x3 kernels it takes 6-8 sweeps, 3-6.5x the time of
            one (a few seconds for 512 channels on one thread), for 0.3-0.5 points less
            relative weight error (``docs/benchmarks.md``).
        cp_max_iter: Cap on CP-ALS sweeps, so a bad fit stops instead of running for
            minutes; ``None`` sizes it from the layer (500 sweeps for small kernels, down
            to 25 for a 512x512x3x3 one, about two seconds of work either way).
        cp_tol: CP-ALS stops when the relative fit error improves by less than this.
        tt_cores: Number of channel modes the TT layers split ``in`` and ``out`` into
            when no explicit modes are given (``None``: 3 for Linear, 2 for Conv2d).
        tt_in_modes: Explicit factorisation of the input channels for TT (product must
            equal the per-group input size).
        tt_out_modes: Explicit factorisation of the output channels for TT.
        ht_cores: Number of channel modes (leaves holding an ``(out_t, in_t)`` block) the
            Hierarchical Tucker layers split ``in`` and ``out`` into when no explicit modes
            are given (``None``: 4 for Linear, 3 for Conv2d, whose kernel is one more leaf).
            Separate from ``tt_cores`` because the two methods want different defaults
            (a balanced HT tree needs 4 leaves to differ from a TT).
        ht_in_modes: Explicit factorisation of the input channels for HT (product must
            equal the per-group input size).
        ht_out_modes: Explicit factorisation of the output channels for HT.
    """

    seed: int = 0
    svd_solver: str = "auto"
    hooi_iters: int = HOOI_ITERS
    hooi_tol: float = HOOI_TOL
    cp_max_iter: int | None = None
    cp_tol: float = 1e-7
    tt_cores: int | None = None
    tt_in_modes: tuple[int, ...] | None = None
    tt_out_modes: tuple[int, ...] | None = None
    ht_cores: int | None = None
    ht_in_modes: tuple[int, ...] | None = None
    ht_out_modes: tuple[int, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DecomposeOptions:
        known = {f.name for f in fields(cls)}
        clean = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items() if k in known}
        return cls(**clean)  # type: ignore[arg-type]

    def updated(self, changes: dict[str, Any]) -> DecomposeOptions:
        """A copy with ``changes`` applied (e.g. a layer's recorded TT modes)."""
        return replace(self, **changes)
