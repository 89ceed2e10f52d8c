"""What the package knows about one decomposition method, in one object.

Every question the rest of the package asks about a method (which layers it applies to,
which layer class it builds, which matrices VBMF reads, whether it has data-aware
factors, which factor absorbs a BatchNorm) is answered by the method's handler, so no
other module switches on method names. Adding a method means one handler file here,
one layer file in ``layers/`` and one decomposition file in ``decompositions/``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

from stagecomp.errors import UnsupportedLayerError
from stagecomp.layer_shape import LayerShape
from stagecomp.layers.base import DecomposedLayer, describe
from stagecomp.options import DecomposeOptions

if TYPE_CHECKING:
    from stagecomp.calibration import LayerStatistics

DATA_AWARE_VARIANTS = ("whiten", "output", "gradient")
"""The calibration ``factors`` variants: ``"whiten"``: SVD-LLM's whitened SVD (input
second moment); ``"output"``: falor's centred output covariance with the mean moved
into the bias; ``"gradient"``: the whitened SVD also weighted on the output side by
the moment of the final output's gradients (needs ``LayerStatistics.gradient_moment``).
A handler lists those it has in ``data_aware_variants``."""


class MethodHandler:
    """One decomposition method: subclass it and register it with ``register_method``.

    Attributes:
        name: The name users pass (``"svd"``, ``"tucker2"``, ...).
        layer_classes: The layer class for each layer kind the method applies to.
        summary: One line for the CLI's help and the docs' method table.
        data_aware_variants: The calibration ``factors`` variants this method has
            data-aware factors for (empty: weight-only factors only).
        truncated_svd: Its layers are one truncated SVD of each group's weight matrix
            (one rank), so the whitened spectrum gives their exact output error at
            every rank: what ``allocate_ranks`` budgets with.
    """

    name: ClassVar[str]
    layer_classes: ClassVar[tuple[type[DecomposedLayer], ...]]
    summary: ClassVar[str] = ""
    data_aware_variants: ClassVar[tuple[str, ...]] = ()
    truncated_svd: ClassVar[bool] = False

    # ------------------------------------------------------------------ layers
    @property
    def kinds(self) -> tuple[str, ...]:
        """The ``LayerShape.kind`` values this method applies to."""
        return tuple(k for cls in self.layer_classes for k in cls.kinds)

    def layer_class(self, shape: LayerShape, name: str | None = None) -> type[DecomposedLayer]:
        """The class that decomposes a layer of ``shape``, or ``UnsupportedLayerError``."""
        for cls in self.layer_classes:
            if shape.kind in cls.kinds:
                return cls
        raise UnsupportedLayerError(
            f"{describe(shape, name)}: method {self.name!r} applies only to "
            f"{', '.join(self.kinds)} layers"
        )

    def applies_to(self, shape: LayerShape, options: DecomposeOptions | None = None) -> bool:
        """True when this method can replace a layer of ``shape`` with ``options``."""
        if shape.kind not in self.kinds:
            return False
        cls = self.layer_class(shape)
        return cls.unsupported_reason(shape, options or DecomposeOptions()) is None

    def is_default_for(self, shape: LayerShape) -> bool:
        """True when this is the method for ``shape`` where the user names none."""
        return False

    # ------------------------------------------------------------------ ranks
    def spectral_matrices(
        self, module: nn.Module, shape: LayerShape, options: DecomposeOptions, name: str | None
    ) -> list[list[torch.Tensor]]:
        """For each rank of the method, the matrices (one per group) whose spectrum VBMF reads.

        ``module`` is the layer as it is now: dense, or decomposed by an earlier stage
        (a handler reads its own layers' factors instead of rebuilding the dense weight).
        """
        raise NotImplementedError

    # ------------------------------------------------------------------ data-aware
    def supports_data_aware(self, shape: LayerShape) -> bool:
        """True where this method has factors fitted to calibration data for ``shape``."""
        return False

    def needs_outputs(self, shape: LayerShape) -> bool:
        """Whether its data-aware factors need the layer's output statistics too."""
        return False

    def data_aware_layer(
        self,
        module: nn.Module,
        shape: LayerShape,
        ranks: tuple[int, ...],
        statistics: LayerStatistics,
        variant: str,
        options: DecomposeOptions,
        name: str | None,
        damping: float,
        correction_damping: float,
    ) -> DecomposedLayer:
        """A new layer of ``ranks`` with factors fitted to ``statistics`` (float64, on CPU or
        the statistics' device; the caller moves it to the module's device and dtype)."""
        raise UnsupportedLayerError(
            f"{describe(shape, name)}: method {self.name!r} has no data-aware factors"
        )

    def data_aware_ranks(
        self,
        module: nn.Module,
        shape: LayerShape,
        statistics: LayerStatistics,
        tolerance: float,
        name: str | None,
    ) -> tuple[int, ...]:
        """The smallest ranks (not yet normalized) whose relative error on the calibration
        data stays within ``tolerance``: the ``DataAware`` strategy's per-layer budget."""
        raise UnsupportedLayerError(
            f"{describe(shape, name)}: method {self.name!r} has no data-aware ranks"
        )

    # ------------------------------------------------------------------ inference
    def fold_target(self, layer: nn.Module) -> nn.Conv2d | None:
        """The convolution whose output channels are ``layer``'s output, where a following
        BatchNorm folds exactly (``None``: this method's layers do not fold)."""
        return None
