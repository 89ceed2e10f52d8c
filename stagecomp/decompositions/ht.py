"""Hierarchical Tucker (HT) decompositions: HT-SVD, truncation from the factors, contraction.

A d-way tensor ``A[n_1, ..., n_d]`` is represented over a binary dimension tree
(Hackbusch and Kühn 2009; Grasedyck, "Hierarchical singular value decomposition of
tensors", SIAM J. Matrix Anal. Appl. 2010). Each node ``t`` owns a contiguous range
of the modes; its matricization ``A^(t)`` has the modes of ``t`` as rows (C order)
and all others as columns, and its rank ``r_t`` is the HT rank of the node. A leaf
holds a frame ``U_t`` (``n_t x r_t``); an inner node a transfer tensor ``B_t``
(``r_t x r_left x r_right``) with which the implied frames of its children give its
own: ``U_t[(i, j), a] = sum_bc U_left[i, b] U_right[j, c] B_t[a, b, c]``. The root
has ``r_root = 1``, so its implied frame is the tensor itself.

Conventions used throughout:

- Trees are balanced (``DimensionTree.balanced``): a node over ``m`` modes gives its
  left child the first ``ceil(m / 2)``. Nodes are numbered breadth first, root 0, left
  child before right child, so children always come after their parent.
- Factors are a list indexed by node: ``(..., n_t, r_t)`` at leaves, ``(..., r_t,
  r_left, r_right)`` at inner nodes (``(..., 1, r_left, r_right)`` at the root). Leading
  dimensions (one per convolution group) are batch dimensions.
- Ranks are given per *edge*: one for every node but the root, in breadth-first order,
  except that the root's two children share the first rank (their matricizations are
  transposes of each other, so separate ranks could only waste parameters). A tree of
  ``d`` leaves has ``2 d - 3`` ranks, one per distinct matricization. For 4 leaves the
  order is ``(r_{12|34}, r_1, r_2, r_3, r_4)``; for 3 leaves ``(r_{12|3}, r_1, r_2)``.
  Ranks above what an edge can hold (its matricization's size, ``ht_full_ranks``, or
  the product of the two other ranks at a transfer tensor, ``ht_nested_ranks``) are
  lowered by the decompositions here.

Every function here is plain torch on the input's device and dtype.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from stagecomp.decompositions.svd import truncated_svd

HTRanks = int | Sequence[int] | None
"""Edge ranks as the functions here take them: one cap for every edge, one per edge, or None."""


@dataclass(frozen=True)
class DimensionTree:
    """A binary tree over modes ``0 .. d-1``, nodes numbered breadth first (root 0).

    Attributes:
        spans: For each node, the range ``(first, stop)`` of modes it owns.
        children: For each node, its ``(left, right)`` children, or None for a leaf.
    """

    spans: tuple[tuple[int, int], ...]
    children: tuple[tuple[int, int] | None, ...]

    @classmethod
    def balanced(cls, leaves: int) -> DimensionTree:
        """The balanced tree over ``leaves`` modes (left child takes the larger half)."""
        if isinstance(leaves, bool) or int(leaves) != leaves or leaves < 2:
            raise ValueError(f"an HT dimension tree needs at least 2 modes, got {leaves!r}")
        spans: list[tuple[int, int]] = [(0, int(leaves))]
        children: list[tuple[int, int] | None] = []
        node = 0
        while node < len(spans):
            first, stop = spans[node]
            if stop - first == 1:
                children.append(None)
            else:
                middle = first + math.ceil((stop - first) / 2)
                spans += [(first, middle), (middle, stop)]
                children.append((len(spans) - 2, len(spans) - 1))
            node += 1
        return cls(tuple(spans), tuple(children))

    @property
    def leaves(self) -> int:
        """Number of modes (leaves)."""
        return self.spans[0][1]

    @property
    def nodes(self) -> int:
        """Number of nodes, ``2 d - 1``."""
        return len(self.spans)

    def is_leaf(self, node: int) -> bool:
        return self.children[node] is None

    def leaf(self, mode: int) -> int:
        """The node of the leaf that owns ``mode``."""
        for node, (first, stop) in enumerate(self.spans):
            if stop - first == 1 and first == mode:
                return node
        raise ValueError(f"mode {mode} is not a leaf of a tree over {self.leaves} modes")

    def parent(self, node: int) -> tuple[int, int]:
        """``(parent, side)`` of a non-root node; side 0 is the left child, 1 the right."""
        for p, pair in enumerate(self.children):
            if pair is not None and node in pair:
                return p, pair.index(node)
        raise ValueError(f"node {node} has no parent (the root is node 0)")

    def edges(self) -> tuple[tuple[int, ...], ...]:
        """For each rank, in the documented order, the nodes whose frames carry it."""
        root_children = self.children[0]
        assert root_children is not None  # a tree has at least two leaves
        rest = tuple((n,) for n in range(1, self.nodes) if n not in root_children)
        return (root_children, *rest)

    def node_ranks(self, ranks: Sequence[int]) -> tuple[int, ...]:
        """One rank per node (the root's is 1) from one rank per edge."""
        edges = self.edges()
        if len(ranks) != len(edges):
            raise ValueError(
                f"an HT tree of {self.leaves} leaves needs {len(edges)} ranks, got {tuple(ranks)}"
            )
        per_node = [1] * self.nodes
        for rank, nodes in zip(ranks, edges, strict=True):
            for node in nodes:
                per_node[node] = int(rank)
        return tuple(per_node)

    def edge_ranks(self, node_ranks: Sequence[int]) -> tuple[int, ...]:
        """Inverse of :meth:`node_ranks` (the root's two children must agree)."""
        return tuple(max(int(node_ranks[n]) for n in nodes) for nodes in self.edges())


def ht_full_ranks(sizes: Sequence[int], tree: DimensionTree | None = None) -> tuple[int, ...]:
    """Edge ranks at which a generic tensor of these mode sizes is represented exactly.

    The rank of node ``t`` can never exceed the rank of its matricization,
    ``min(N_t, N / N_t)`` with ``N_t`` the product of its mode sizes. These caps
    are nested (``r_t <= r_left r_right`` holds for them), so they are attainable.
    """
    sizes = [int(n) for n in sizes]
    if len(sizes) < 2 or any(n < 1 for n in sizes):
        raise ValueError(f"HT mode sizes must be at least 2 positive integers, got {sizes}")
    tree = tree or DimensionTree.balanced(len(sizes))
    _check_tree(tree, len(sizes))
    total = math.prod(sizes)
    full = []
    for nodes in tree.edges():
        first, stop = tree.spans[nodes[0]]
        rows = math.prod(sizes[first:stop])
        full.append(min(rows, total // rows))
    return tuple(full)


def ht_nested_ranks(tree: DimensionTree, ranks: Sequence[int]) -> tuple[int, ...]:
    """The largest edge ranks, none above ``ranks``, that an HT can actually have.

    Around a transfer tensor ``B_t`` (``r_t x r_left x r_right``) each rank is at most
    the product of the other two: ``U_t`` lies in the span of ``U_left ⊗ U_right``,
    and the left child's matricization factors through ``r_t r_right`` columns. A
    larger rank could only hold zero columns, so it is lowered (repeatedly, until
    every transfer tensor satisfies all three bounds). Caps that are all equal, or all
    full ranks, already satisfy them.
    """
    per_node = list(tree.node_ranks(ranks))
    shared = tree.edges()[0]  # the root's two children
    changed = True
    while changed:
        changed = False
        for node, pair in enumerate(tree.children):
            if pair is None or node == 0:
                continue
            trio = [per_node[node], per_node[pair[0]], per_node[pair[1]]]
            for k, index in enumerate((node, *pair)):
                bound = math.prod(trio[j] for j in range(3) if j != k)
                if per_node[index] > bound:
                    per_node[index] = trio[k] = bound
                    if index in shared:  # the root's children share one rank
                        for other in shared:
                            per_node[other] = bound
                    changed = True
    return tree.edge_ranks(per_node)


def ht_param_count(sizes: Sequence[int], ranks: Sequence[int], tree: DimensionTree) -> int:
    """Numbers in the factors of an HT of these mode sizes and edge ranks (one group)."""
    per_node = tree.node_ranks(ranks)
    count = 0
    for node, pair in enumerate(tree.children):
        if pair is None:
            count += int(sizes[tree.spans[node][0]]) * per_node[node]
        else:
            count += per_node[node] * per_node[pair[0]] * per_node[pair[1]]
    return count


def ht_matricization(tensor: torch.Tensor, tree: DimensionTree, node: int) -> torch.Tensor:
    """``A^(t)``: the modes of ``node`` as rows (C order), every other mode as columns."""
    _check_tree(tree, tensor.ndim)
    first, stop = tree.spans[node]
    sizes = tensor.shape
    before, rows = math.prod(sizes[:first]), math.prod(sizes[first:stop])
    return tensor.reshape(before, rows, -1).transpose(0, 1).reshape(rows, -1)


def ht_svd(
    tensor: torch.Tensor,
    ranks: HTRanks = None,
    *,
    tree: DimensionTree | None = None,
    solver: str = "exact",
    seed: int = 0,
) -> list[torch.Tensor]:
    """HT-SVD (Grasedyck 2010, root-to-leaves truncation): one truncated SVD per edge.

    Every frame ``U_t`` holds the leading left singular vectors of ``A^(t)``; the
    transfer tensors are the coordinates of a node's frame in its children's,
    ``B_t = (U_left ⊗ U_right)^T U_t``, and the root's are those of ``A`` itself.
    The result is ``A`` projected onto every frame, and its error is at most the
    root of the summed squared singular value tails of the ``2 d - 3`` edges, hence
    within ``sqrt(2 d - 3)`` of the best HT approximation of these ranks. At full
    ranks it is exact, and a tensor of exactly the given HT ranks is recovered.

    Args:
        tensor: A float tensor with ``d >= 2`` modes.
        ranks: One int per edge (order in the module docstring), or one int for every
            edge; each is lowered to what its edge can hold (``ht_full_ranks``, then
            ``ht_nested_ranks``). None keeps full ranks.
        tree: The dimension tree (default: balanced over the tensor's modes).
        solver: ``truncated_svd`` solver of the edge SVDs.
        seed: Seed of the randomized solver.

    Returns:
        The factors, indexed by node (see the module docstring).
    """
    if tensor.ndim < 2:
        raise ValueError(f"ht_svd takes a tensor with at least two modes, got {tensor.ndim}")
    tree = tree or DimensionTree.balanced(tensor.ndim)
    full = ht_full_ranks(tensor.shape, tree)
    caps = [min(c, f) for c, f in zip(_edge_caps(ranks, len(full)), full, strict=True)]
    node_rank = tree.node_ranks(ht_nested_ranks(tree, caps))
    frames: dict[int, torch.Tensor] = {}
    left, right = tree.edges()[0]
    u, s, vh = _tall_svd(ht_matricization(tensor, tree, left), node_rank[left], solver, seed)
    frames[left], frames[right] = u, vh.T
    factors: list[torch.Tensor] = [torch.diag_embed(s).unsqueeze(0)] * tree.nodes
    for node in range(1, tree.nodes):
        if node not in frames:
            matrix = ht_matricization(tensor, tree, node)
            frames[node] = _tall_svd(matrix, node_rank[node], solver, seed)[0]
    for node, pair in enumerate(tree.children):
        if pair is None:
            factors[node] = frames[node]
        elif node != 0:
            factors[node] = _coordinates(frames[node], frames[pair[0]], frames[pair[1]])
    return factors


def ht_to_dense(factors: Sequence[torch.Tensor], tree: DimensionTree) -> torch.Tensor:
    """The full tensor ``(..., n_1, ..., n_d)`` of HT factors with leading batch dimensions."""
    _check_factors(factors, tree)
    frame = _implied_frame(factors, tree, 0)
    sizes = [factors[tree.leaf(mode)].shape[-2] for mode in range(tree.leaves)]
    return frame.reshape(*frame.shape[:-2], *sizes)


def ht_to_dense_macs(sizes: Sequence[int], ranks: Sequence[int], tree: DimensionTree) -> int:
    """Multiply-adds of :func:`ht_to_dense` for one group (its matmuls, in its order)."""
    per_node = tree.node_ranks(ranks)
    rows = [math.prod(sizes[a:b]) for a, b in tree.spans]
    macs = 0
    for node, pair in enumerate(tree.children):
        if pair is not None:
            left, right = pair
            rank, r_left, r_right = per_node[node], per_node[left], per_node[right]
            macs += rows[left] * r_left * rank * r_right + rows[left] * rank * r_right * rows[right]
    return macs


def ht_orthogonalize(factors: Sequence[torch.Tensor], tree: DimensionTree) -> list[torch.Tensor]:
    """The same tensor with orthonormal frames: every implied frame but the root's has
    orthonormal columns, and the root's transfer tensor carries the norm.

    Leaves to root, each frame (a leaf's ``U_t``, an inner node's ``B_t`` as an
    ``(r_left r_right) x r_t`` matrix) is replaced by the Q of its thin QR and the R
    is multiplied into the parent. A node's rank may drop to the rank its children
    can hold (``min(n_t, r_t)`` at a leaf, ``min(r_left r_right, r_t)`` above).
    """
    _check_factors(factors, tree)
    out = list(factors)
    for node in range(tree.nodes - 1, 0, -1):
        factor = out[node]
        if tree.is_leaf(node):
            q, r = torch.linalg.qr(factor)
            out[node] = q
        else:
            rank, r_left, r_right = factor.shape[-3:]
            matrix = factor.reshape(*factor.shape[:-3], rank, r_left * r_right).transpose(-1, -2)
            q, r = torch.linalg.qr(matrix)
            out[node] = q.transpose(-1, -2).reshape(*factor.shape[:-3], -1, r_left, r_right)
        parent, side = tree.parent(node)
        out[parent] = _multiply_child(out[parent], r, side)
    return out


def ht_truncate(
    factors: Sequence[torch.Tensor], tree: DimensionTree, ranks: HTRanks
) -> list[torch.Tensor]:
    """Truncate an HT to smaller edge ranks from its factors alone (no dense tensor).

    After :func:`ht_orthogonalize`, the singular values and left singular vectors of
    every matricization ``A^(t)`` live in the factors: root to leaves, a square root
    ``C_t`` of node ``t``'s reduced Gramian (``A^(t) A^(t)^T = U_t C_t C_t^T U_t^T``)
    gives each child's as the SVD of ``B_t`` contracted with ``C_t`` over ``r_t``
    (a ``r_child x (r_other C_t-columns)`` matrix). Each frame is then rotated onto its
    leading ``k_t`` singular vectors, which gives exactly the HT-SVD of the dense
    tensor at the new ranks (up to float error and the sign of each singular vector),
    at a cost polynomial in the old ranks only.

    Args:
        factors: HT factors (leading batch dimensions allowed).
        tree: Their dimension tree.
        ranks: New edge ranks (one per edge, or one int for all), each lowered to what
            the edge holds; the result is zero-padded back up where it held less.

    Returns:
        The truncated factors, with the requested edge ranks.
    """
    out = ht_orthogonalize(factors, tree)
    edges = tree.edges()
    target = tree.node_ranks(ht_nested_ranks(tree, _edge_caps(ranks, len(edges))))
    batch = out[0].shape[:-3]
    roots: dict[int, torch.Tensor] = {0: out[0].new_ones(*batch, 1, 1)}
    bases: dict[int, torch.Tensor] = {}
    for node, pair in enumerate(tree.children):
        if pair is None:
            continue
        transfer, root = out[node], roots[node]
        rank, r_left, r_right = transfer.shape[-3:]
        width = root.shape[-1]
        # K_child[b, (c, j)] = sum_a B[a, b, c] C[a, j]: its Gram is the child's reduced Gramian.
        contracted = torch.matmul(
            root.transpose(-1, -2), transfer.reshape(*batch, rank, r_left * r_right)
        ).reshape(*batch, width, r_left, r_right)
        nb = len(batch)
        grams = (
            contracted.permute(*range(nb), nb + 1, nb + 2, nb).reshape(*batch, r_left, -1),
            contracted.permute(*range(nb), nb + 2, nb + 1, nb).reshape(*batch, r_right, -1),
        )
        for child, matrix in zip(pair, grams, strict=True):
            u, s, _ = torch.linalg.svd(matrix, full_matrices=False)
            keep = min(target[child], s.shape[-1])
            bases[child] = u[..., :keep]
            roots[child] = u * s.unsqueeze(-2)
    truncated = list(out)
    for node, pair in enumerate(tree.children):
        if pair is None:
            truncated[node] = torch.matmul(out[node], bases[node])
            continue
        transfer = out[node]
        if node != 0:
            transfer = _multiply_parent(transfer, bases[node].transpose(-1, -2))
        transfer = _multiply_child(transfer, bases[pair[0]].transpose(-1, -2), 0)
        truncated[node] = _multiply_child(transfer, bases[pair[1]].transpose(-1, -2), 1)
    return pad_ht_ranks(truncated, tree, tree.edge_ranks(target))


def pad_ht_ranks(
    factors: Sequence[torch.Tensor], tree: DimensionTree, ranks: Sequence[int]
) -> list[torch.Tensor]:
    """Zero-pad the factors up to the given edge ranks (the tensor does not change).

    A truncation may keep fewer singular vectors than asked where an edge holds
    fewer; a layer built for the asked ranks still needs factors of that size.
    """
    _check_factors(factors, tree)
    per_node = tree.node_ranks(ranks)
    padded = []
    for node, factor in enumerate(factors):
        pair = tree.children[node]
        if pair is None:
            want: tuple[int, ...] = (int(factor.shape[-2]), per_node[node])
        else:
            want = (per_node[node], per_node[pair[0]], per_node[pair[1]])
        have = tuple(int(n) for n in factor.shape[-len(want) :])
        if any(h > w for h, w in zip(have, want, strict=True)):
            raise ValueError(
                f"HT factor {node} of shape {tuple(factor.shape)} is larger than ranks {want}"
            )
        if have == want:
            padded.append(factor)
            continue
        full = factor.new_zeros(*factor.shape[: -len(want)], *want)
        index: tuple[Any, ...] = (Ellipsis, *(slice(0, h) for h in have))
        full[index] = factor
        padded.append(full)
    return padded


# ---------------------------------------------------------------------- contraction
Label = tuple[str, int]
"""A dimension of the sweep's working tensor: ``("in", mode)``, ``("out", mode)``,
``("rank", node)``, or the batch, group and column dimensions."""

_BATCH: Label = ("batch", 0)
_GROUP: Label = ("group", 0)
_COLUMNS: Label = ("columns", 0)


@dataclass(frozen=True)
class SweepStep:
    """One product of a sweep: a node's factor contracted with the working tensor.

    Attributes:
        node: The node whose factor is applied.
        factor_shape: The factor's dimensions after the group one, each with a label
            (a leaf's ``(o_t, i_t, r_t)``, a transfer tensor's ``(r_t, r_left, r_right)``,
            the root's without its ``r_t = 1``).
        factor_order: Permutation of those dimensions to (contracted..., produced...).
        state_order: Permutation of the working tensor to (group, kept..., contracted...).
        kept: Labels and sizes of the dimensions the step keeps, in order.
        contracted: Size of the summed dimensions together.
        produced: Sizes of the dimensions the step creates, in order.
        macs: Multiply-adds per group, batch entry and column.
    """

    node: int
    factor_shape: tuple[int, ...]
    factor_order: tuple[int, ...]
    state_order: tuple[int, ...]
    kept: tuple[tuple[Label, int], ...]
    contracted: int
    produced: tuple[int, ...]
    macs: int


@dataclass(frozen=True)
class Sweep:
    """A contraction order of an HT-matrix with a batch of inputs (:func:`ht_matrix_sweep`).

    Attributes:
        start: Sizes of the input's slots between its group and column dimensions.
        steps: The products, in order.
        final_order: Permutation of the last working tensor to (batch, group, outputs, columns).
        groups: Number of groups.
        macs: Multiply-adds per batch entry and column, all groups together.
    """

    start: tuple[int, ...]
    steps: tuple[SweepStep, ...]
    final_order: tuple[int, ...]
    groups: int
    macs: int


def ht_matrix_sweep(
    tree: DimensionTree,
    node_ranks: Sequence[int],
    out_modes: Sequence[int],
    in_modes: Sequence[int],
    *,
    applied: Sequence[int] = (),
    groups: int = 1,
    firsts: Sequence[int] | None = None,
) -> Sweep:
    """The order in which :func:`ht_matrix_apply` contracts an input with HT-matrix factors.

    At each inner node one child's subtree is swept first and keeps its rank open;
    the node's transfer tensor then turns that rank into a pending rank of the other
    child, whose subtree closes it at its own top (its transfer tensor, or its leaf
    frame, sums the pending rank together with its children's or its input mode).
    Intermediate results so carry at most one open and one pending rank per level
    instead of a finished subtree's full output times its rank.

    Args:
        tree: The dimension tree; leaf ``t`` holds an ``(out_modes[t], in_modes[t])`` block.
        node_ranks: One rank per node (``DimensionTree.node_ranks``).
        out_modes: Output mode of each leaf.
        in_modes: Input mode of each leaf.
        applied: Leaves whose frame the caller applies before the sweep (a convolution's
            kernel leaf): the input holds their rank instead of their input mode, and
            their output mode must be 1. Such a leaf is swept first at its parent.
        groups: Leading group dimension of the factors and the input.
        firsts: For each node, which child (0 left, 1 right) is swept first; None picks
            the order with the fewest multiply-adds among all valid ones.

    Returns:
        The sweep.
    """
    if firsts is None:
        inner = [n for n in range(tree.nodes) if not tree.is_leaf(n)]
        best: Sweep | None = None
        for choice in itertools.product((0, 1), repeat=len(inner)):
            order = [0] * tree.nodes
            for node, first in zip(inner, choice, strict=True):
                order[node] = first
            if not _valid_firsts(tree, order, applied):
                continue
            sweep = ht_matrix_sweep(
                tree, node_ranks, out_modes, in_modes, applied=applied, groups=groups, firsts=order
            )
            if best is None or sweep.macs < best.macs:
                best = sweep
        if best is None:
            raise ValueError(f"no sweep order applies leaves {tuple(applied)} first")
        return best
    if not _valid_firsts(tree, firsts, applied):
        raise ValueError(f"a leaf applied beforehand ({tuple(applied)}) must be swept first")
    sizes: dict[Label, int] = {_BATCH: 1, _GROUP: 1, _COLUMNS: 1}
    for mode in range(tree.leaves):
        leaf = tree.leaf(mode)
        sizes["in", mode] = int(in_modes[mode])
        sizes["out", mode] = int(out_modes[mode])
        sizes["rank", leaf] = int(node_ranks[leaf])
    for node in range(tree.nodes):
        sizes["rank", node] = int(node_ranks[node])
    start = [("rank", tree.leaf(m)) if m in applied else ("in", m) for m in range(tree.leaves)]
    dims: list[Label] = [_BATCH, _GROUP, *start, _COLUMNS]
    steps: list[SweepStep] = []

    def apply(node: int, labels: list[Label], contracted_set: list[Label]) -> None:
        nonlocal dims
        contracted = [label for label in dims if label in contracted_set]
        produced = [label for label in labels if label not in contracted_set]
        kept = [label for label in dims if label not in contracted_set and label != _GROUP]
        inner = math.prod(sizes[label] for label in kept)
        size_in = math.prod(sizes[label] for label in contracted)
        size_out = math.prod(sizes[label] for label in produced)
        steps.append(
            SweepStep(
                node=node,
                factor_shape=tuple(sizes[label] for label in labels),
                factor_order=tuple(labels.index(label) for label in contracted + produced),
                state_order=tuple(dims.index(label) for label in [_GROUP, *kept, *contracted]),
                kept=tuple((label, sizes[label]) for label in kept),
                contracted=size_in,
                produced=tuple(sizes[label] for label in produced),
                macs=inner * size_in * size_out,
            )
        )
        dims = [_GROUP, *kept, *produced]

    def visit(node: int, pending: bool) -> None:
        pair = tree.children[node]
        own = [("rank", node)] if pending else []
        if pair is None:
            mode = tree.spans[node][0]
            if mode not in applied:
                labels: list[Label] = [("out", mode), ("in", mode), ("rank", node)]
                apply(node, labels, [("in", mode), *own])
            return
        first, second = pair if firsts[node] == 0 else (pair[1], pair[0])
        visit(first, False)
        ranks: list[Label] = [("rank", pair[0]), ("rank", pair[1])]
        labels = ranks if node == 0 else [("rank", node), *ranks]
        apply(node, labels, [("rank", first), *own])
        visit(second, True)

    visit(0, False)
    outputs: list[Label] = [("out", m) for m in range(tree.leaves) if m not in applied]
    final = [dims.index(label) for label in [_BATCH, _GROUP, *outputs, _COLUMNS]]
    return Sweep(
        start=tuple(sizes[label] for label in start),
        steps=tuple(steps),
        final_order=tuple(final),
        groups=groups,
        macs=groups * sum(step.macs for step in steps),
    )


def ht_matrix_apply(factors: Sequence[torch.Tensor], sweep: Sweep, x: torch.Tensor) -> torch.Tensor:
    """Multiply batches of vectors by HT-matrices without forming the matrices.

    Leaf ``t`` holds an ``(o_t, i_t)`` block (``n_t = o_t i_t`` in C order), so the
    weight of group ``g`` is ``W_g[(o_1..o_d), (i_1..i_d)]``. Each step of ``sweep``
    moves the dimensions it sums to the end of the working tensor and runs one GEMM
    (one bmm over the groups), which is also what fvcore counts: the MACs it reports
    are ``sweep.macs`` per batch entry and column.

    Args:
        factors: HT factors with one leading group dimension ``g``.
        sweep: The order, from :func:`ht_matrix_sweep` with the factors' modes and ranks.
        x: ``(B, g, S, c)``, ``S`` the product of ``sweep.start``.

    Returns:
        ``(B, g, O, c)``.
    """
    batch, cols, groups = x.shape[0], x.shape[-1], sweep.groups  # groups static for tracing
    state = x.reshape(batch, groups, *sweep.start, cols)
    for step in sweep.steps:
        factor = factors[step.node].reshape(groups, *step.factor_shape)
        factor = factor.permute(0, *(1 + i for i in step.factor_order))
        factor = factor.reshape(groups, step.contracted, -1)
        moved = state.permute(*step.state_order)
        if groups == 1:
            product = moved.reshape(-1, step.contracted) @ factor[0]
        else:
            product = torch.bmm(moved.reshape(groups, -1, step.contracted), factor)
        kept = [batch if lab == _BATCH else cols if lab == _COLUMNS else n for lab, n in step.kept]
        state = product.reshape(groups, *kept, *step.produced)
    return state.permute(*sweep.final_order).reshape(batch, groups, -1, cols)


def _valid_firsts(tree: DimensionTree, firsts: Sequence[int], applied: Sequence[int]) -> bool:
    """Whether every applied leaf is the child swept first (its rank is open, not pending)."""
    for mode in applied:
        node = tree.leaf(mode)
        parent, side = tree.parent(node)
        if firsts[parent] != side:
            return False
    return True


# ---------------------------------------------------------------------- helpers
def _tall_svd(
    matrix: torch.Tensor, rank: int, solver: str, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``truncated_svd`` run on the tall orientation of ``matrix``.

    A leaf's matricization is very wide (``n_t x N / n_t``), and LAPACK's SVD of a
    wide matrix is several times slower than of its transpose (13 s against 1.7 s
    for a 64 x 262144 one on one thread), with the same factors.
    """
    if matrix.shape[0] < matrix.shape[1]:
        u, s, vh = truncated_svd(matrix.T, rank, solver=solver, seed=seed)
        return vh.T, s, u.T
    return truncated_svd(matrix, rank, solver=solver, seed=seed)


def _coordinates(frame: torch.Tensor, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """``B[a, b, c] = sum_ij left[i, b] right[j, c] frame[(i, j), a]``."""
    rows_left, r_left = left.shape
    rows_right, r_right = right.shape
    rank = frame.shape[-1]
    half = left.T @ frame.reshape(rows_left, rows_right * rank)  # (r_l, N_r r_t)
    half = half.reshape(r_left, rows_right, rank).transpose(1, 2).reshape(-1, rows_right)
    full = (half @ right).reshape(r_left, rank, r_right)  # (r_l, r_t, r_r)
    return full.transpose(0, 1).contiguous()


def _implied_frame(factors: Sequence[torch.Tensor], tree: DimensionTree, node: int) -> torch.Tensor:
    """``(..., N_t, r_t)``: the frame a node's subtree spans."""
    pair = tree.children[node]
    if pair is None:
        return factors[node]
    left = _implied_frame(factors, tree, pair[0])
    right = _implied_frame(factors, tree, pair[1])
    transfer = factors[node]
    batch = transfer.shape[:-3]
    rank, r_left, r_right = transfer.shape[-3:]
    rows_left, rows_right = left.shape[-2], right.shape[-2]
    # U_l @ B as (r_l, r_t r_r), then @ U_r^T: (N_l, r_t, N_r) -> (N_l N_r, r_t).
    step = torch.matmul(
        left, transfer.transpose(-3, -2).reshape(*batch, r_left, rank * r_right)
    ).reshape(*batch, rows_left * rank, r_right)
    step = torch.matmul(step, right.transpose(-1, -2)).reshape(*batch, rows_left, rank, rows_right)
    return step.transpose(-1, -2).reshape(*batch, rows_left * rows_right, rank)


def _multiply_child(transfer: torch.Tensor, matrix: torch.Tensor, side: int) -> torch.Tensor:
    """``B`` with child index ``side`` (0 left, 1 right) replaced by ``sum_b' M[k, b'] B[b']``."""
    if side == 0:
        moved = transfer.transpose(-3, -2)  # (..., r_l, r_t, r_r)
        shape = moved.shape
        product = torch.matmul(matrix, moved.reshape(*shape[:-2], shape[-2] * shape[-1]))
        return product.reshape(*shape[:-3], -1, shape[-2], shape[-1]).transpose(-3, -2)
    return torch.matmul(transfer, matrix.unsqueeze(-3).transpose(-1, -2))


def _multiply_parent(transfer: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """``B`` with its own index replaced: ``sum_a M[k, a] B[a, b, c]``."""
    shape = transfer.shape
    product = torch.matmul(matrix, transfer.reshape(*shape[:-2], shape[-2] * shape[-1]))
    return product.reshape(*shape[:-3], -1, shape[-2], shape[-1])


def _edge_caps(ranks: HTRanks, edges: int) -> list[int]:
    if ranks is None:
        return [2**62] * edges
    if isinstance(ranks, bool):
        raise ValueError(f"HT ranks must be integers, got {ranks!r}")
    values = [ranks] * edges if isinstance(ranks, int) else list(ranks)
    if len(values) != edges:
        raise ValueError(f"an HT with {edges} edges needs {edges} ranks, got {tuple(values)}")
    if any(isinstance(r, bool) or int(r) != r or r < 1 for r in values):
        raise ValueError(f"HT ranks must be positive integers, got {ranks!r}")
    return [int(r) for r in values]


def _check_tree(tree: DimensionTree, modes: int) -> None:
    if tree.leaves != modes:
        raise ValueError(
            f"the dimension tree has {tree.leaves} leaves but the tensor has {modes} modes"
        )


def _check_factors(factors: Sequence[torch.Tensor], tree: DimensionTree) -> None:
    if torch.jit.is_tracing():  # sizes are tensors then; they were checked when built
        return
    if len(factors) != tree.nodes:
        raise ValueError(
            f"an HT of {tree.nodes} nodes needs {tree.nodes} factors, got {len(factors)}"
        )
    for node, pair in enumerate(tree.children):
        if pair is None:
            continue
        transfer = factors[node]
        if transfer.ndim < 3:
            raise ValueError(f"HT transfer tensor {node} has shape {tuple(transfer.shape)}")
        for side, child in enumerate(pair):
            rank = factors[child].shape[-1] if tree.is_leaf(child) else factors[child].shape[-3]
            if transfer.shape[-2 + side] != rank:
                raise ValueError(
                    f"HT transfer tensor {node} of shape {tuple(transfer.shape)} does not fit "
                    f"child {child} of rank {rank}"
                )
