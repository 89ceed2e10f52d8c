"""Factorised layers from the start: replace Linear/Conv2d layers by fresh low-rank ones.

Compressing a trained model reads its weights (``Compressor``, ``decompose``).
Training a factorised model from scratch needs the opposite: the structure
only, with an initialisation under which the effective dense weight has the
variance PyTorch gives a dense layer, so the usual learning rates still work.
``factorize`` builds such layers from shapes alone (``empty_layer``) and puts
them in place, choosing layers with the same name rule as the Compressor.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import cast

import torch
from torch import nn

from stagecomp.compressor import decomposable_layers
from stagecomp.decompose import empty_layer
from stagecomp.errors import RankError, StagecompError, UnsupportedLayerError
from stagecomp.layer_shape import LayerShape
from stagecomp.layers.base import DecomposedLayer, Rank
from stagecomp.matching import check_keys, key_matches, lookup, select
from stagecomp.methods import check_method, layer_class
from stagecomp.options import DecomposeOptions
from stagecomp.surgery import replace_module

logger = logging.getLogger(__name__)

RankSpec = Rank | Mapping[str, Rank]
"""One rank for every layer, or ranks by layer name or pattern."""


def _dense_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every plain Linear and Conv2d, not counting the insides of decomposed layers."""
    return [
        (name, module)
        for name, module in decomposable_layers(model)
        if not isinstance(module, DecomposedLayer)
    ]


def _skip_reason(
    shape: LayerShape, method: str, name: str, options: DecomposeOptions
) -> str | None:
    """Why a layer picked by a pattern (not by its exact name) is left dense."""
    try:
        cls = layer_class(method, shape, name)
        cls.check_supported(shape, options, name)
    except UnsupportedLayerError as error:
        return str(error)
    if shape.kind == "conv2d" and min(shape.in_per_group, shape.out_per_group) == 1:
        return "one input or output channel per group: nothing to factorise"
    return None


def factorize(
    model: nn.Module,
    method: str,
    rank: RankSpec,
    *,
    targets: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    options: DecomposeOptions | None = None,
) -> dict[str, DecomposedLayer]:
    """Replace Linear/Conv2d layers of ``model`` by freshly initialised factorised layers.

    Nothing is read from the old weights: use this to train a factorised model
    from scratch (use ``Compressor`` or ``decompose`` to compress a trained one).
    Each new layer keeps its predecessor's geometry, bias, device, dtype, train
    mode and ``requires_grad``; its effective dense weight has the variance of
    PyTorch's default dense initialisation.

    Args:
        model: Modified in place.
        method: One of ``stagecomp.METHODS`` (what each does: ``stagecomp.methods``).
        rank: One int (a cap on every rank: above a layer's full rank it means full
            rank), one int per rank, or a mapping from
            layer names or patterns to such ranks. With a mapping and no
            ``targets``, the mapping's keys choose the layers.
        targets: Names or patterns (``"features.*"``, ``"re:..."``) of the layers to
            replace; ``None`` means every layer the method applies to.
        exclude: Names or patterns of layers to leave dense.
        options: Structure settings (TT modes, ``tt_cores``).

    Returns:
        The new layers by qualified name, in model order.

    Raises:
        NoMatchingLayerError: a name or pattern matches no layer (closest names given).
        UnsupportedLayerError: a layer named exactly cannot take ``method``.
        RankError: a rank does not fit a layer; the model is then left unchanged.
    """
    check_method(method)
    options = options or DecomposeOptions()
    if isinstance(exclude, str):
        exclude = [exclude]
    if isinstance(targets, str):
        targets = [targets]
    candidates = _dense_layers(model)
    names = [name for name, _ in candidates]
    if not names:
        raise UnsupportedLayerError("the model has no nn.Linear or nn.Conv2d layer to factorise")
    per_layer = dict(rank) if isinstance(rank, Mapping) else None
    if per_layer is not None:
        check_keys(per_layer, names, "rank")
    check_keys(targets or (), names, "targets")
    check_keys(exclude, names, "exclude")

    keys = list(targets) if targets is not None else list(per_layer or ["*"])
    chosen = set(select(names, keys)) - set(select(names, exclude))
    # A layer named exactly must take the method; one reached by a pattern may be skipped.
    exact = {key for key in keys if not any(key_matches(key, n) for n in names if n != key)}

    planned: list[tuple[str, DecomposedLayer]] = []
    for name, module in candidates:
        if name not in chosen:
            continue
        shape = LayerShape.from_module(module, name)
        if name not in exact:
            reason = _skip_reason(shape, method, name, options)
            if reason is not None:
                logger.info("factorize: leaving %s dense: %s", name, reason)
                continue
        if per_layer is None:
            layer_rank = cast(Rank, rank)
        else:
            found, value = lookup(per_layer, name)
            if not found or value is None:
                raise RankError(
                    f"layer {name!r} is a target but the rank mapping has no entry for it"
                )
            layer_rank = value
        weight = cast(torch.Tensor, module.weight)
        layer_rank = layer_class(method, shape, name).cap_rank(shape, layer_rank, options)
        layer = empty_layer(
            shape,
            method,
            layer_rank,
            options=options,
            name=name,
            device=weight.device,
            dtype=weight.dtype,
        )
        layer.train(module.training)
        layer.take_requires_grad(module)
        planned.append((name, layer))
    if not planned:
        raise StagecompError(
            f"no layer was factorised with {method!r}: the selected layers "
            f"({', '.join(sorted(chosen)) or 'none'}) cannot take this method"
        )
    for name, layer in planned:
        replace_module(model, name, layer)
    return dict(planned)


__all__ = ["RankSpec", "factorize"]
