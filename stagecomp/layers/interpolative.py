"""SVD in interpolative form: the same rank-r layer as ``svd`` with ``r^2`` fewer parameters.

``W_r = P [I; B] C`` (see ``stagecomp.decompositions.interpolative``): a Linear
(or kxk conv) ``in -> r`` computes ``r`` of the outputs exactly as they are, a
second Linear (1x1 conv) mixes the other ``out - r`` outputs from those ``r``,
and a fixed permutation puts the outputs back in order. Per group it stores
``r (in * kh * kw + out - r)`` numbers where the SVD form stores
``r (in * kh * kw + out)``, so a parameter budget buys a higher rank: the gain
is largest at mild compression, where ``r`` is a large part of ``out``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from stagecomp.decompositions.interpolative import grouped_interpolative
from stagecomp.layer_shape import LayerShape
from stagecomp.layers.factory import Factory
from stagecomp.layers.init import dense_weight_variance, init_bias_
from stagecomp.layers.svd_base import GroupedSVDLayer, Triplet
from stagecomp.options import DecomposeOptions


class InterpolativeLayer(GroupedSVDLayer):
    """A Linear or Conv2d as its truncated SVD in interpolative form (method ``"svd_id"``).

    Attributes:
        first: ``in -> r`` per group (a Linear, or a Conv2d with the layer's
            geometry): the kept output rows ``C``.
        second: ``r -> out - r`` per group (Linear or 1x1 Conv2d, no bias): the
            mixing matrix ``B``; None at ``r == out``.
        bias: The layer's bias, added after the outputs are put in order.
        order: Buffer; output channel ``c`` is entry ``order[c]`` of
            ``cat([first(x), second(first(x))])``.
    """

    method = "svd_id"
    kinds = ("linear", "conv2d")
    first: nn.Linear | nn.Conv2d
    second: nn.Linear | nn.Conv2d | None
    bias: nn.Parameter | None
    order: torch.Tensor

    def _build(self, new: Factory) -> None:
        shape, (rank,) = self.shape, self.ranks
        groups, extra = shape.groups, shape.out_per_group - rank
        self.second = None
        if shape.kind == "linear":
            self.first = new.linear(shape.in_channels, rank)
            if extra:
                self.second = new.linear(rank, extra)
        else:
            self.first = new.conv(
                shape.in_channels, groups * rank, shape.kernel_size, groups, **shape.conv_kwargs()
            )
            if extra:
                self.second = new.conv(groups * rank, groups * extra, 1, groups)
        self.bias = new.bias(shape)
        self.register_buffer(
            "order", torch.arange(shape.out_channels, device=new.device, dtype=torch.long)
        )
        fan_in = shape.in_per_group * shape.kernel_numel
        with torch.no_grad():
            # Kept rows at the dense init's variance; mixed rows (r of them summed) too.
            self.first.weight.normal_(0.0, math.sqrt(dense_weight_variance(fan_in)))
            if self.second is not None:
                self.second.weight.normal_(0.0, math.sqrt(1.0 / rank))
        init_bias_(self.bias, fan_in)

    @classmethod
    def param_count(cls, shape: LayerShape, ranks: Sequence[int], options: DecomposeOptions) -> int:
        (rank,) = ranks
        per_group = rank * (shape.in_per_group * shape.kernel_numel + shape.out_per_group - rank)
        return shape.groups * per_group + (shape.out_channels if shape.bias else 0)

    def _group_factors(self, dtype: torch.dtype) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per group, ``left`` (``out/g x r``, the rows of ``[I; B]`` in output order) and ``C``."""
        shape, (rank,) = self.shape, self.ranks
        groups, per_group = shape.groups, shape.out_per_group
        kept = self.first.weight.to(dtype).reshape(groups, rank, -1)
        eye = torch.eye(rank, dtype=dtype, device=kept.device)
        mixes = (
            self.second.weight.to(dtype).reshape(groups, per_group - rank, rank)
            if self.second is not None
            else None
        )
        lefts = []
        for g in range(groups):
            stacked = eye if mixes is None else torch.cat([eye, mixes[g]])
            position = self.order[g * per_group : (g + 1) * per_group]
            local = torch.where(
                position < groups * rank,
                position - g * rank,
                rank + position - groups * rank - g * (per_group - rank),
            )
            lefts.append(stacked[local])
        return lefts, list(kept)

    def _assign(self, factors: list[Triplet], bias: torch.Tensor | None) -> None:
        """Each group's SVD in interpolative form (``grouped_interpolative``), and ``bias``."""
        order, mixes, kepts = grouped_interpolative(factors)
        self.first.weight.copy_(torch.cat(kepts).reshape(self.first.weight.shape))
        if self.second is not None:
            self.second.weight.copy_(torch.cat(mixes).reshape(self.second.weight.shape))
        self.order.copy_(order)
        if bias is not None and self.bias is not None:
            self.bias.copy_(bias)

    def order_problem(self, order: torch.Tensor) -> str | None:
        """Why ``order`` cannot be this layer's output order, or ``None``.

        It must be an integer tensor of one entry per output channel, a permutation, and
        send each group's channels to that group's own rows (``first`` then ``second``):
        out-of-range entries would fail at the first forward, duplicated ones would give
        wrong outputs silently.
        """
        shape, (rank,) = self.shape, self.ranks
        groups, per_group, out = shape.groups, shape.out_per_group, shape.out_channels
        if order.dtype.is_floating_point or order.dtype.is_complex or order.dtype == torch.bool:
            return f"order has dtype {order.dtype}; expected integers"
        if tuple(order.shape) != (out,):
            return f"order has shape {tuple(order.shape)}; expected ({out},)"
        values = order.detach().to(device="cpu", dtype=torch.long)
        if out and (int(values.min()) < 0 or int(values.max()) >= out):
            return f"order has entries outside 0..{out - 1}"
        if out and int(torch.bincount(values, minlength=out).max()) > 1:
            return "order repeats entries; expected a permutation of the output channels"
        kept = groups * rank
        owner = torch.where(
            values < kept, values // rank, (values - kept) // max(per_group - rank, 1)
        )
        if not torch.equal(owner, torch.arange(out) // per_group):
            return "order sends a group's channels to another group's rows"
        return None

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        """Refuse an ``order`` that is not a valid output order (see ``order_problem``)."""
        order = state_dict.get(prefix + "order")
        if isinstance(order, torch.Tensor):
            problem = self.order_problem(order)
            if problem is not None:
                error_msgs.append(f"{prefix}order: {problem}")
                return  # leave this layer as it is; load_state_dict raises with the message
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.first(x)
        linear = self.shape.kind == "linear"
        if self.second is not None:
            dim = -1 if linear else -3  # channels of batched and unbatched conv inputs
            y = torch.cat([y, self.second(y)], dim=dim)
            if linear:  # on a 2-D view: index_select on the last dim of 3-D is ~20x slower
                y = y.reshape(-1, y.shape[-1]).index_select(1, self.order).reshape(y.shape)
            else:
                y = y.index_select(dim, self.order)
        if self.bias is not None:
            y = y + (self.bias if linear else self.bias.view(-1, 1, 1))
        return y

    def dense_weight(self) -> torch.Tensor:
        shape, (rank,) = self.shape, self.ranks
        groups = shape.groups
        kept = self.first.weight.reshape(groups, rank, -1)
        rows = [kept.reshape(groups * rank, -1)]
        if self.second is not None:
            mix = self.second.weight.reshape(groups, shape.out_per_group - rank, rank)
            rows.append(torch.bmm(mix, kept).reshape(-1, kept.shape[-1]))
        return torch.cat(rows).index_select(0, self.order).reshape(shape.weight_shape)

    def dense_bias(self) -> torch.Tensor | None:
        return self.bias
