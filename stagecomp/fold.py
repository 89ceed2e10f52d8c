"""Fold each eval-mode BatchNorm into the convolution right before it, for inference.

In eval mode ``bn(conv(x)) = a * conv(x) + b`` per output channel, with
``a = gamma / sqrt(running_var + eps)`` and ``b = beta - a * running_mean``. Scaling
the output channels of a convolution is exact for a dense conv, and for a decomposed
conv whose last factor is a convolution producing the output channels (its method's
handler names it: ``MethodHandler.fold_target``): only that last factor and the bias
change. Other layers (a TT convolution spreads its output channels over several
cores) are left alone.

Adjacency comes from a ``torch.fx`` trace with stagecomp's layers kept whole: a pair
is folded only when the BatchNorm's single input is the convolution's output and
nothing else reads that output, so residual branches and shared modules are safe.
"""

from __future__ import annotations

import dataclasses
import logging

import torch
import torch.fx
from torch import nn

from stagecomp.errors import StagecompError
from stagecomp.layers.base import DecomposedLayer
from stagecomp.methods import handler_of
from stagecomp.surgery import get_module, replace_module

logger = logging.getLogger(__name__)


class _Tracer(torch.fx.Tracer):
    """Keeps stagecomp's layers as leaves: their forward may branch on the input's shape."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, DecomposedLayer) or super().is_leaf_module(m, module_qualified_name)


def _output_conv(module: nn.Module) -> nn.Conv2d | None:
    """The convolution whose output channels are the layer's output, where folding is exact."""
    if type(module) is nn.Conv2d:
        return module
    if isinstance(module, DecomposedLayer):
        return handler_of(module).fold_target(module)
    return None


def _foldable_bn(bn: nn.Module) -> str | None:
    """Why ``bn`` cannot be folded (None when it can)."""
    if type(bn) is not nn.BatchNorm2d:
        return "not a BatchNorm2d"
    if bn.training:
        return "in training mode (call model.eval() first: folding uses the running statistics)"
    if bn.running_mean is None or bn.running_var is None:
        return "it tracks no running statistics"
    return None


@torch.no_grad()
def _fold_pair(conv_layer: nn.Module, target: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    assert bn.running_mean is not None and bn.running_var is not None
    dtype = torch.float64
    scale = bn.running_var.to(dtype).add(bn.eps).rsqrt()
    if bn.weight is not None:
        scale = scale * bn.weight.to(dtype)
    shift = -bn.running_mean.to(dtype) * scale
    if bn.bias is not None:
        shift = shift + bn.bias.to(dtype)
    weight = target.weight
    old_bias = (
        target.bias.to(dtype)
        if target.bias is not None
        else torch.zeros(weight.shape[0], dtype=dtype, device=weight.device)
    )
    new_weight = weight.to(dtype) * scale.view(-1, 1, 1, 1)
    new_bias = old_bias * scale + shift
    weight.copy_(new_weight.to(weight.dtype))
    if target.bias is None:
        target.bias = nn.Parameter(new_bias.to(weight.dtype), requires_grad=weight.requires_grad)
        if isinstance(conv_layer, DecomposedLayer):
            # The layer now has a bias: its shape (used by to_dense, recipes, loading) says so.
            conv_layer.shape = dataclasses.replace(conv_layer.shape, bias=True)
    else:
        target.bias.copy_(new_bias.to(weight.dtype))


def fold_batchnorm(model: nn.Module) -> list[tuple[str, str]]:
    """Merge every eval-mode BatchNorm2d into the convolution it directly follows, in place.

    Works on dense ``nn.Conv2d`` and on decomposed convolutions whose method has a
    ``fold_target`` (e.g. SVD, Tucker2, CP: their last factor absorbs the scale and
    shift). Each folded BatchNorm becomes ``nn.Identity``; outputs are unchanged up to
    float rounding. Call it after compression and fine-tuning, on a model in eval mode.

    Args:
        model: The model, changed in place. It must be traceable by ``torch.fx``.

    Returns:
        The ``(conv, batchnorm)`` name pairs that were folded.

    Raises:
        StagecompError: when the model cannot be traced.
    """
    try:
        graph = _Tracer().trace(model)
    except Exception as error:  # fx raises many types for untraceable code
        raise StagecompError(
            f"fold_batchnorm could not trace {type(model).__name__} with torch.fx ({error}); "
            "only models whose forward torch.fx can trace can be folded"
        ) from error
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
    folded: list[tuple[str, str]] = []
    for node in graph.nodes:
        if node.op != "call_module":
            continue
        bn_name = str(node.target)
        bn = get_module(model, bn_name)
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm):
            continue
        source = node.args[0] if len(node.args) == 1 and not node.kwargs else None
        if not isinstance(source, torch.fx.Node) or source.op != "call_module":
            continue
        conv_name = str(source.target)
        conv_layer = get_module(model, conv_name)
        target = _output_conv(conv_layer)
        if target is None:
            continue
        reason = _foldable_bn(bn)
        if reason is None and len(source.users) != 1:
            reason = f"the output of {conv_name!r} is also used elsewhere"
        if reason is None and (calls[conv_name] != 1 or calls[bn_name] != 1):
            reason = "the convolution or the BatchNorm is called more than once"
        if reason is None and bn.num_features != target.out_channels:
            reason = f"{bn.num_features} features but {target.out_channels} channels"
        if reason is not None:
            logger.info("not folding %s into %s: %s", bn_name, conv_name, reason)
            continue
        assert isinstance(bn, nn.BatchNorm2d)
        _fold_pair(conv_layer, target, bn)
        replace_module(model, bn_name, nn.Identity())
        folded.append((conv_name, bn_name))
    logger.info("folded %d BatchNorm layers", len(folded))
    return folded


__all__ = ["fold_batchnorm"]
