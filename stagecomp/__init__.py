"""stagecomp: multi-stage low-rank decomposition of trained PyTorch models.

The names here are the public API in two tiers. What a user's loop needs: the
Compressor and its settings (strategies, ``Calibration``, ``LatencyAware``,
``DecomposeOptions``), ``save``/``load``, one-layer ``decompose``/``factorize``,
``allocate_ranks``, the inference helpers and the errors. Extension points, documented
on the "Extending" page: ``RankStrategy``/``RankRequest`` (a new rank strategy) and
``MethodHandler``/``register_method`` (a new decomposition method), with the layer
classes. Everything else is internal: importable, but free to change.
"""

from stagecomp import registry
from stagecomp.calibration import LayerStatistics, collect_statistics
from stagecomp.changes import LayerChange, StepResult
from stagecomp.compressor import Compressor
from stagecomp.config import Calibration
from stagecomp.data_aware import decompose_data_aware
from stagecomp.decompose import decompose, empty_layer
from stagecomp.distillation import LocalDistillation
from stagecomp.errors import (
    CompressionFinishedError,
    DistributedError,
    NoMatchingLayerError,
    NonFiniteWeightError,
    RankError,
    RecipeError,
    StagecompError,
    UnknownMethodError,
    UnsupportedLayerError,
)
from stagecomp.factorize import factorize
from stagecomp.fold import fold_batchnorm
from stagecomp.latency_aware import LatencyAware
from stagecomp.layer_shape import LayerShape
from stagecomp.layers.base import DecomposedLayer, Rank
from stagecomp.layers.cp3_conv2d import CP3Conv2d
from stagecomp.layers.cp4_conv2d import CP4Conv2d
from stagecomp.layers.ht_conv2d import HTConv2d
from stagecomp.layers.ht_linear import HTLinear
from stagecomp.layers.interpolative import InterpolativeLayer
from stagecomp.layers.svd_conv2d import SVDConv2d
from stagecomp.layers.svd_linear import SVDLinear
from stagecomp.layers.tt_conv2d import TTConv2d
from stagecomp.layers.tt_linear import TTLinear
from stagecomp.layers.tucker2_conv2d import Tucker2Conv2d
from stagecomp.memory_format import to_channels_last
from stagecomp.methods import METHODS, get_method, register_method
from stagecomp.methods.base import MethodHandler
from stagecomp.options import DecomposeOptions
from stagecomp.plan import Plan, PlannedLayer
from stagecomp.pretrained import load_pretrained
from stagecomp.serialization import load, save
from stagecomp.stats import ModelStats, model_stats
from stagecomp.strategies.base import RankRequest, RankStrategy
from stagecomp.strategies.data_aware import DataAware, allocate_ranks
from stagecomp.strategies.manual import Manual
from stagecomp.strategies.reduction import Reduction
from stagecomp.strategies.speedup import Speedup
from stagecomp.strategies.vbmf import VBMF
from stagecomp.version import __version__

__all__ = [
    "METHODS",
    "VBMF",
    "CP3Conv2d",
    "CP4Conv2d",
    "Calibration",
    "CompressionFinishedError",
    "Compressor",
    "DataAware",
    "DecomposeOptions",
    "DecomposedLayer",
    "DistributedError",
    "HTConv2d",
    "HTLinear",
    "InterpolativeLayer",
    "LatencyAware",
    "LayerChange",
    "LayerShape",
    "LayerStatistics",
    "LocalDistillation",
    "Manual",
    "MethodHandler",
    "ModelStats",
    "NoMatchingLayerError",
    "NonFiniteWeightError",
    "Plan",
    "PlannedLayer",
    "Rank",
    "RankError",
    "RankRequest",
    "RankStrategy",
    "RecipeError",
    "Reduction",
    "SVDConv2d",
    "SVDLinear",
    "Speedup",
    "StagecompError",
    "StepResult",
    "TTConv2d",
    "TTLinear",
    "Tucker2Conv2d",
    "UnknownMethodError",
    "UnsupportedLayerError",
    "__version__",
    "allocate_ranks",
    "collect_statistics",
    "decompose",
    "decompose_data_aware",
    "empty_layer",
    "factorize",
    "fold_batchnorm",
    "get_method",
    "load",
    "load_pretrained",
    "model_stats",
    "register_method",
    "registry",
    "save",
    "to_channels_last",
]
