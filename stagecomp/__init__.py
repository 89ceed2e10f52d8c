"""stagecomp: multi-stage low-rank decomposition of trained PyTorch models."""

from stagecomp import registry
from stagecomp.calibration import LayerStatistics, collect_statistics
from stagecomp.compressor import Compressor, LayerChange, StepResult
from stagecomp.data_aware import decompose_data_aware
from stagecomp.decompose import decompose, empty_layer
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
from stagecomp.layers.interpolative import InterpolativeLayer
from stagecomp.layers.svd_conv2d import SVDConv2d
from stagecomp.layers.svd_linear import SVDLinear
from stagecomp.layers.tt_conv2d import TTConv2d
from stagecomp.layers.tt_linear import TTLinear
from stagecomp.layers.tucker2_conv2d import Tucker2Conv2d
from stagecomp.memory_format import to_channels_last
from stagecomp.options import DecomposeOptions
from stagecomp.registry import METHODS
from stagecomp.serialization import load, save
from stagecomp.stats import ModelStats, model_stats
from stagecomp.strategies.data_aware import DataAware, allocate_ranks
from stagecomp.strategies.manual import Manual
from stagecomp.strategies.reduction import Reduction
from stagecomp.strategies.vbmf import VBMF

__version__ = "0.1.0"

__all__ = [
    "METHODS",
    "VBMF",
    "CP3Conv2d",
    "CP4Conv2d",
    "CompressionFinishedError",
    "Compressor",
    "DataAware",
    "DecomposeOptions",
    "DecomposedLayer",
    "DistributedError",
    "InterpolativeLayer",
    "LatencyAware",
    "LayerChange",
    "LayerShape",
    "LayerStatistics",
    "Manual",
    "ModelStats",
    "NoMatchingLayerError",
    "NonFiniteWeightError",
    "Rank",
    "RankError",
    "RecipeError",
    "Reduction",
    "SVDConv2d",
    "SVDLinear",
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
    "load",
    "model_stats",
    "registry",
    "save",
    "to_channels_last",
]
