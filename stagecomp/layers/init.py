"""Initialisation of factor chains for layers built from shapes, not from weights.

PyTorch's default Linear/Conv2d initialisation gives weights of variance
``1 / (3 * fan_in)``. A factorised layer's effective weight is a product of
factors summed over the inner (rank) dimensions, so each factor is drawn with a
variance that makes the product match that target: training from scratch then
starts where a dense layer would.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def dense_weight_variance(fan_in: int) -> float:
    """Variance of PyTorch's default weight initialisation for this fan-in."""
    return 1.0 / (3.0 * max(fan_in, 1))


@torch.no_grad()
def init_factor_chain_(factors: Sequence[torch.Tensor], fan_in: int, inner: Sequence[int]) -> None:
    """Fill ``factors`` with normal values whose chained product has the dense variance.

    Args:
        factors: The tensors multiplied together to form the weight.
        fan_in: Fan-in of the dense layer being imitated.
        inner: Sizes of the dimensions summed over when chaining the factors.
    """
    target = dense_weight_variance(fan_in)
    per_factor = (target / math.prod(max(int(i), 1) for i in inner)) ** (1.0 / len(factors))
    for factor in factors:
        factor.normal_(0.0, math.sqrt(per_factor))


@torch.no_grad()
def init_bias_(bias: torch.Tensor | None, fan_in: int) -> None:
    """PyTorch's default bias initialisation for this fan-in."""
    if bias is not None:
        bound = 1.0 / math.sqrt(max(fan_in, 1))
        bias.uniform_(-bound, bound)


@torch.no_grad()
def init_tt_cores_(cores: Sequence[torch.Tensor], fan_in: int, ranks: Sequence[int]) -> None:
    """``init_factor_chain_``, then each core rescaled to exactly its target mean square.

    TT cores can be tiny (a ``(1, 1, 1, 1)`` core for a mode of size 1): a random
    draw would then scale the whole weight by chance. With every core at its
    exact scale the dense weight's variance is the dense init's, up to the
    cross terms of the rank sums.
    """
    init_factor_chain_(cores, fan_in, ranks)
    per_core = (dense_weight_variance(fan_in) / math.prod(ranks)) ** (1.0 / len(cores))
    for core in cores:
        core.mul_(math.sqrt(per_core) / core.pow(2).mean().sqrt().clamp_min(1e-30))
