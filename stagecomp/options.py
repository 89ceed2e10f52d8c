"""Knobs of the decomposition algorithms, one frozen dataclass for all methods."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from stagecomp.decompositions.tucker2 import HOOI_ITERS, HOOI_TOL
from stagecomp.errors import StagecompError

SVD_SOLVERS = ("auto", "exact", "randomized")


def _integer(label: str, value: Any, least: int | None) -> None:
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise StagecompError(f"DecomposeOptions {label}={value!r} is not an integer")
    if least is not None and value < least:
        raise StagecompError(
            f"DecomposeOptions {label}={value!r} is not allowed; expected >= {least}"
        )


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

    def __post_init__(self) -> None:
        """Check every field, so a bad value fails here and not deep inside a step."""
        _integer("seed", self.seed, None)
        if self.svd_solver not in SVD_SOLVERS:
            raise StagecompError(
                f"DecomposeOptions svd_solver={self.svd_solver!r} is not allowed; "
                f"expected one of {SVD_SOLVERS}"
            )
        _integer("hooi_iters", self.hooi_iters, 0)
        if self.cp_max_iter is not None:
            _integer("cp_max_iter", self.cp_max_iter, 1)
        tol = self.cp_tol
        if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not 0 <= tol < 1:
            raise StagecompError(
                f"DecomposeOptions cp_tol={tol!r} is not allowed; expected a number in [0, 1)"
            )
        if self.tt_cores is not None:
            _integer("tt_cores", self.tt_cores, 1)
        for label in ("tt_in_modes", "tt_out_modes"):
            modes = getattr(self, label)
            if modes is None:
                continue
            if isinstance(modes, list):
                object.__setattr__(self, label, modes := tuple(modes))
            if not isinstance(modes, tuple) or not modes:
                raise StagecompError(
                    f"DecomposeOptions {label}={modes!r} is not allowed; expected a tuple of "
                    "integers"
                )
            for mode in modes:  # their range and product are the TT layer's to check
                _integer(label, mode, None)

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
