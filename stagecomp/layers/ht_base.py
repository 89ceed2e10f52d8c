"""What HTLinear and HTConv2d share: the leaves, the tree, the factors and their contraction.

Both layers hold a Hierarchical Tucker representation (``decompositions/ht.py``) of
each group's weight over the leaves ``(o_1 i_1, ..., o_d i_d)`` followed, for
convolutions, by the kernel leaf ``kh kw``: like a TT-matrix, leaf ``t`` holds an
``(o_t x i_t)`` block of the weight. Pairing the output and input modes is what makes
the format compress: with separate output and input leaves the root's edge would
split outputs from inputs, so its rank would be the matrix rank and the layer could
never be smaller than a truncated SVD of the same rank; with paired leaves every edge
splits the weight into Kronecker-like factors, as TT does, and the tree lets the two
halves of the modes compress independently.

The modes, the tree, the full ranks, the parameter count, the recorded structure,
the factor parameters, their (re)assignment and the choice of contraction order are
the same for both layers, so they live here once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar

import torch
from torch import nn

from stagecomp.decompositions.ht import (
    DimensionTree,
    Sweep,
    ht_full_ranks,
    ht_matrix_sweep,
    ht_nested_ranks,
    ht_param_count,
    ht_svd,
    ht_to_dense,
    ht_to_dense_macs,
    ht_truncate,
    pad_ht_ranks,
)
from stagecomp.decompositions.tt import balance_tt_cores
from stagecomp.layer_shape import LayerShape
from stagecomp.layers.base import DecomposedLayer, Rank, describe, math_dtype
from stagecomp.layers.factory import Factory
from stagecomp.layers.init import init_bias_, init_tt_cores_
from stagecomp.layers.matrix_modes import MatrixModes
from stagecomp.options import DecomposeOptions

_HTLayerT = TypeVar("_HTLayerT", bound="HTLayer")

CONTRACTIONS = ("auto", "ht", "dense")
"""``contraction`` values: choose by cost, always sweep the tree, always rebuild the weight."""


class HTLayer(MatrixModes, DecomposedLayer):
    """Base of the HT layers; subclasses say how many channel modes they default to.

    The ranks are the edge ranks of the balanced dimension tree over the leaves, in
    breadth-first order with the root's two children sharing the first rank (see
    ``stagecomp.decompositions.ht``): for 4 leaves ``(r_{12|34}, r_1, r_2, r_3, r_4)``.
    A rank the tree cannot hold (above the product of the two others at its transfer
    tensor) is lowered to what it can (``ht_nested_ranks``), so ``ranks`` may be below
    the ones asked for; ``param_count`` counts the lowered ones.

    Attributes:
        contraction: ``"auto"`` (default) picks, for each input size, the cheaper of
            the tree sweep and rebuilding the dense weight; ``"ht"`` or ``"dense"``
            force one. Both are exact.
    """

    method = "ht"
    structure_keys = ("ht_in_modes", "ht_out_modes")
    mode_option = "ht"

    in_modes: tuple[int, ...]
    out_modes: tuple[int, ...]
    tree: DimensionTree
    factors: nn.ParameterList
    contraction: str

    # ------------------------------------------------------------------ structure
    @classmethod
    def too_few_modes(cls, shape: LayerShape, in_modes: tuple[int, ...]) -> str | None:
        if len(in_modes) + len(cls.spatial_modes(shape)) < 2:
            return f"a {cls.__name__} needs at least 2 leaves, got {len(in_modes)} channel mode(s)"
        return None

    @classmethod
    def dimension_tree(cls, shape: LayerShape, options: DecomposeOptions) -> DimensionTree:
        """The balanced tree over the leaves (the kernel leaf is the last one)."""
        return DimensionTree.balanced(len(cls.mode_sizes(shape, options)))

    @classmethod
    def full_rank(cls, shape: LayerShape, options: DecomposeOptions) -> tuple[int, ...]:
        return ht_full_ranks(cls.mode_sizes(shape, options), cls.dimension_tree(shape, options))

    @classmethod
    def normalize_rank(
        cls,
        shape: LayerShape,
        rank: Rank,
        options: DecomposeOptions | None = None,
        name: str | None = None,
    ) -> tuple[int, ...]:
        """Valid edge ranks, each then lowered to what the tree can hold (``ht_nested_ranks``).

        A rank above the product of the two others at its transfer tensor could only
        hold zeros, so it costs parameters and changes nothing; one int (a cap on every
        rank) is never lowered further.
        """
        options = options or DecomposeOptions()
        ranks = super().normalize_rank(shape, rank, options, name)
        return ht_nested_ranks(cls.dimension_tree(shape, options), ranks)

    @classmethod
    def param_count(cls, shape: LayerShape, ranks: Sequence[int], options: DecomposeOptions) -> int:
        """Parameters of the layer built for ``ranks`` (after ``ht_nested_ranks``)."""
        tree = cls.dimension_tree(shape, options)
        sizes = cls.mode_sizes(shape, options)
        per_group = ht_param_count(sizes, ht_nested_ranks(tree, ranks), tree)
        return shape.groups * per_group + (shape.out_channels if shape.bias else 0)

    def structure(self) -> dict[str, Any]:
        return {"ht_in_modes": self.in_modes, "ht_out_modes": self.out_modes}

    # ------------------------------------------------------------------ parameters
    def _build(self, new: Factory) -> None:
        shape, options = self.shape, self.options
        self.out_modes, self.in_modes = self.modes(shape, options)
        self.tree = self.dimension_tree(shape, options)
        edges = len(self.tree.edges())
        if len(self.ranks) != edges:
            raise ValueError(
                f"{describe(shape, None)}: an HT of {self.tree.leaves} leaves needs {edges} "
                f"ranks, got {self.ranks}"
            )
        self.ranks = ht_nested_ranks(self.tree, self.ranks)
        sizes = self.mode_sizes(shape, options)
        node_ranks = self.tree.node_ranks(self.ranks)
        groups = shape.groups
        parts = []
        for node, pair in enumerate(self.tree.children):
            if pair is None:
                size = sizes[self.tree.spans[node][0]]
                parts.append(new.parameter(groups, size, node_ranks[node]))
            else:
                left, right = (node_ranks[c] for c in pair)
                parts.append(new.parameter(groups, node_ranks[node], left, right))
        self.factors = nn.ParameterList(parts)
        self.bias = new.bias(shape)
        fan_in = shape.in_per_group * shape.kernel_numel
        # Every non-root node's rank index is summed once (the root's two children apart).
        init_tt_cores_(list(self.factors), fan_in, node_ranks[1:])
        init_bias_(self.bias, fan_in)
        self.contraction = "auto"
        self._sweep = self._cheapest_sweep()
        self._sweep_macs = self._sweep.macs
        if self.spatial_modes(shape):  # the kernel leaf: a depthwise conv with r_K filters
            self._sweep_macs += shape.in_channels * self.kernel_rank * shape.kernel_numel
        self._dense_macs = shape.out_channels * shape.in_per_group * shape.kernel_numel
        self._assembly_macs = groups * ht_to_dense_macs(sizes, self.ranks, self.tree)

    @property
    def kernel_rank(self) -> int:
        """Rank of the kernel leaf (the last one) of a Conv2d; 1 for Linear."""
        if not self.spatial_modes(self.shape):
            return 1
        return self.tree.node_ranks(self.ranks)[self.tree.leaf(self.tree.leaves - 1)]

    def _cheapest_sweep(self) -> Sweep:
        """The sweep order with the fewest multiply-adds (the kernel leaf runs first)."""
        spatial = self.spatial_modes(self.shape)
        return ht_matrix_sweep(
            self.tree,
            self.tree.node_ranks(self.ranks),
            (*self.out_modes, *(1 for _ in spatial)),
            (*self.in_modes, *spatial),
            applied=tuple(range(len(self.in_modes), self.tree.leaves)),
            groups=self.shape.groups,
        )

    def _decompose(self, weight: torch.Tensor) -> list[list[torch.Tensor]]:
        shape, options = self.shape, self.options
        return [
            ht_svd(
                self.mode_ordered_weight(group, shape, options),
                self.ranks,
                tree=self.tree,
                solver=options.svd_solver,
                seed=options.seed,
            )
            for group in shape.grouped_weight(weight)
        ]

    def _assign(self, factors: Sequence[Sequence[torch.Tensor]], bias: torch.Tensor | None) -> None:
        """Copy each group's HT factors (padded to the layer's ranks, norms balanced) and the bias.

        HT-SVD leaves the whole norm in the root; equal factor norms keep the
        gradients of the factors comparable when the layer is fine-tuned.
        """
        groups = [balance_tt_cores(pad_ht_ranks(g, self.tree, self.ranks)) for g in factors]
        for node, param in enumerate(self.factors):
            param.copy_(torch.stack([g[node] for g in groups]))
        if bias is not None and self.bias is not None:
            self.bias.copy_(bias)

    def _refactored(
        self: _HTLayerT, ranks: tuple[int, ...], options: DecomposeOptions
    ) -> _HTLayerT:
        """HT truncation of the factors (all groups at once); the dense weight is never formed.

        The result equals HT-SVD of the dense weight at the new ranks (up to float
        error), at a cost polynomial in the old ranks only.
        """
        dtype = self._math_dtype()
        factors = [f.to(dtype) for f in self.factors]
        truncated = ht_truncate(factors, self.tree, ranks)
        per_group = [[f[g] for f in truncated] for g in range(self.shape.groups)]
        return self._with_factors(
            self.shape, ranks, options, per_group, self.dense_bias(), like=factors[0]
        )

    def _math_dtype(self) -> torch.dtype:
        """The dtype the dense weight would be factorised in (``math_dtype``), not forming it."""
        weight = torch.empty(self.shape.weight_shape, dtype=self.factors[0].dtype, device="meta")
        return math_dtype(weight)

    # ------------------------------------------------------------------ dense
    def dense_weight(self) -> torch.Tensor:
        shape = self.shape
        tensor = ht_to_dense(list(self.factors), self.tree)  # (g, o_1 i_1, ..., [kh kw])
        d = len(self.in_modes)
        pairs = [m for o, i in zip(self.out_modes, self.in_modes, strict=True) for m in (o, i)]
        tensor = tensor.reshape(shape.groups, *pairs, *self.spatial_modes(shape))
        order = [0, *(1 + 2 * k for k in range(d)), *(2 + 2 * k for k in range(d))]
        order += [1 + 2 * d + s for s in range(len(self.spatial_modes(shape)))]
        return shape.module_weight(tensor.permute(*order))

    def dense_bias(self) -> torch.Tensor | None:
        return self.bias

    def _dense_is_cheaper(self, positions: int) -> bool:
        """Whether rebuilding the weight beats the sweep for ``positions`` rows or pixels."""
        if self.contraction not in CONTRACTIONS:
            raise ValueError(f"contraction {self.contraction!r}: allowed {', '.join(CONTRACTIONS)}")
        if self.contraction != "auto":
            return self.contraction == "dense"
        return self._assembly_macs + positions * self._dense_macs < positions * self._sweep_macs

    def contraction_macs(self, positions: int) -> tuple[int, int]:
        """``(sweep, dense)`` multiply-adds of one forward pass over ``positions`` rows/pixels.

        The sweep's includes the kernel leaf's depthwise convolution for Conv2d; the
        dense one includes rebuilding the weight. fvcore counts the same numbers.
        """
        return (
            positions * self._sweep_macs,
            self._assembly_macs + positions * self._dense_macs,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, out_modes={self.out_modes}, in_modes={self.in_modes}"
