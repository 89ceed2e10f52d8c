"""Knobs of the decomposition algorithms, one frozen dataclass for all methods."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

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
        hooi_iters: HOOI refinement sweeps after the HOSVD start of Tucker2. One sweep
            gets nearly all of the gain; 0 keeps the plain HOSVD.
        cp_max_iter: Cap on CP-ALS sweeps, so a bad fit stops instead of running for
            minutes; ``None`` sizes it from the layer (500 sweeps for small kernels, down
            to 25 for a 512x512x3x3 one, about two seconds of work either way).
        cp_tol: CP-ALS stops when the relative fit error improves by less than this.
        tt_cores: Number of channel modes the TT layers split ``in`` and ``out`` into
            when no explicit modes are given (``None``: 3 for Linear, 2 for Conv2d).
        tt_in_modes: Explicit factorisation of the input channels for TT (product must
            equal the per-group input size).
        tt_out_modes: Explicit factorisation of the output channels for TT.
    """

    seed: int = 0
    svd_solver: str = "auto"
    hooi_iters: int = 1
    cp_max_iter: int | None = None
    cp_tol: float = 1e-7
    tt_cores: int | None = None
    tt_in_modes: tuple[int, ...] | None = None
    tt_out_modes: tuple[int, ...] | None = None

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
