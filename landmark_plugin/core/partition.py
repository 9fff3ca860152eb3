"""kd-tree partition of the scene into axis-aligned leaf boxes (DESIGN.md section 3).

The tree is stored in heap layout: node ``i`` has children ``2i + 1`` (the ``x < split``
side) and ``2i + 2``; the leaves are the nodes of level ``depth`` and leaf ``j`` is node
``2**depth - 1 + j``, numbered left to right.  A leaf owns every point whose descent ends
in it, so ownership is defined for points outside ``bounds`` too: conceptually the outer
faces of the outer leaves extend to infinity.

Split values are kept in float64 so that the midpoint of two adjacent float32 coordinates
is representable and ``x < split`` reproduces the build's left/right choice exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from landmark_plugin.core.median_split import (
    CHUNK,
    AxisRule,
    axis_keys,
    check_weights,
    choose_axes,
    chunk_spans,
    split_level,
)


@dataclass(frozen=True, eq=False)  # eq on tensors would be ambiguous
class KDTree:
    """A complete kd-tree of ``depth`` levels over the box ``bounds``.

    Attributes:
        bounds: [2, 3] float64, min and max corner of the scene box.
        split_axis: [L-1] int64, split axis of every inner node (heap order).
        split_value: [L-1] float64, split coordinate of every inner node (heap order).
        depth: number of levels; the tree has ``L = 2**depth`` leaves.
    """

    bounds: Float[Tensor, "2 3"]
    split_axis: Int[Tensor, " Lm1"]
    split_value: Float[Tensor, " Lm1"]
    depth: int

    @property
    def num_leaves(self) -> int:
        return 2**self.depth

    @property
    def device(self) -> torch.device:
        return self.bounds.device

    def leaf_boxes(
        self,
        root: Optional[Float[Tensor, "2 3"]] = None,
        expand_to: Optional[Float[Tensor, "N 3"]] = None,
    ) -> Float[Tensor, "L 2 3"]:
        """Boxes of the leaves, cut from ``root`` (default ``bounds``) by the split planes.

        Args:
            root: [2, 3] box to cut instead of ``bounds``; it must contain every split plane.
            expand_to: [N, 3] points; the root is grown to contain them, so the outer leaves
                grow with it and every point lies in the box of the leaf that owns it.

        Returns:
            [L, 2, 3] min / max corners; they tile the root exactly.
        """
        box = self.bounds if root is None else root.to(self.bounds)
        if expand_to is not None and expand_to.shape[0] > 0:
            pts = expand_to.detach().to(box)
            box = torch.stack(
                [torch.minimum(box[0], pts.min(0).values), torch.maximum(box[1], pts.max(0).values)]
            )
        boxes = box[None]
        for level in range(self.depth):
            nodes = _level_nodes(level, self.device)
            boxes = _split_boxes(boxes, self.split_axis[nodes], self.split_value[nodes])
        return boxes

    def to(self, device: torch.device | str) -> "KDTree":
        return KDTree(
            bounds=self.bounds.to(device),
            split_axis=self.split_axis.to(device),
            split_value=self.split_value.to(device),
            depth=self.depth,
        )

    def to_dict(self) -> dict:
        """Plain Python lists and ints, for config.yml and checkpoints (exact round trip)."""
        return {
            "depth": int(self.depth),
            "bounds": self.bounds.detach().cpu().tolist(),
            "split_axis": self.split_axis.detach().cpu().tolist(),
            "split_value": self.split_value.detach().cpu().tolist(),
        }

    @classmethod
    def from_dict(cls, data: dict, device: torch.device | str = "cpu") -> "KDTree":
        depth = int(data["depth"])
        tree = cls(
            bounds=torch.tensor(data["bounds"], dtype=torch.float64, device=device).reshape(2, 3),
            split_axis=torch.tensor(data["split_axis"], dtype=torch.int64, device=device),
            split_value=torch.tensor(data["split_value"], dtype=torch.float64, device=device),
            depth=depth,
        )
        if tree.split_axis.numel() != 2**depth - 1 or tree.split_value.numel() != 2**depth - 1:
            raise ValueError(f"a kd-tree of depth {depth} needs {2**depth - 1} splits")
        return tree


def _level_nodes(level: int, device: torch.device) -> Int[Tensor, " M"]:
    """Heap ids of the ``2**level`` nodes of one level, left to right."""
    return torch.arange(2**level - 1, 2 ** (level + 1) - 1, device=device)


def _split_boxes(
    boxes: Float[Tensor, "M 2 3"], axis: Int[Tensor, " M"], value: Float[Tensor, " M"]
) -> Float[Tensor, "2M 2 3"]:
    """Cut every box at its plane; the children come out interleaved (left, right)."""
    rows = torch.arange(boxes.shape[0], device=boxes.device)
    left, right = boxes.clone(), boxes.clone()
    left[rows, 1, axis] = value.to(boxes)
    right[rows, 0, axis] = value.to(boxes)
    return torch.stack([left, right], dim=1).reshape(-1, 2, 3)


def default_bounds(points: Float[Tensor, "N 3"], pad: float = 1e-3) -> Float[Tensor, "2 3"]:
    """The points' bounding box grown by ``pad`` times its largest extent on every side.

    Padding keeps the extreme points strictly inside, so boxes built from this have no
    point on an outer face.
    """
    if points.shape[0] == 0:
        raise ValueError("cannot derive bounds from zero points; pass bounds explicitly")
    pts = points.detach().to(torch.float64)
    lo, hi = pts.min(0).values, pts.max(0).values
    margin = pad * max(float((hi - lo).max()), 1.0e-3)
    return torch.stack([lo - margin, hi + margin])


def build_kdtree(
    points: Float[Tensor, "N 3"],
    depth: int,
    bounds: Optional[Float[Tensor, "2 3"]] = None,
    weights: Optional[Float[Tensor, " N"]] = None,
    axis_rule: AxisRule = "widest",
) -> KDTree:
    """Build a kd-tree of ``depth`` levels over ``points`` (see ``build_kdtree_with_leaves``)."""
    tree, _ = build_kdtree_with_leaves(points, depth, bounds, weights, axis_rule)
    return tree


def build_kdtree_with_leaves(
    points: Float[Tensor, "N 3"],
    depth: int,
    bounds: Optional[Float[Tensor, "2 3"]] = None,
    weights: Optional[Float[Tensor, " N"]] = None,
    axis_rule: AxisRule = "widest",
) -> tuple[KDTree, Int[Tensor, " N"]]:
    """Build a kd-tree and return the leaf each point was put in during the build.

    Every node splits the widest axis of its box (``axis_rule="widest"``) or alternates
    x, y by level (``"xy"``, for aerial scenes) at the weighted median of its points: with
    ``t`` the smallest coordinate at which the cumulative weight of the node's points
    exceeds half their total, points with ``x < t`` go left and the rest right.  With unit
    weights and distinct coordinates the left child gets exactly ``floor(n / 2)`` points.
    The split value lies strictly between the largest left and the smallest right
    coordinate (their midpoint); an empty side is replaced by the box face, so empty nodes
    split at their box midpoint.

    No sorting and no Python loop over points: each level finds every node's median by a
    segmented radix select (a few ``bincount`` passes over order-preserving integer keys).

    Args:
        points: [N, 3] point positions (e.g. the SfM cloud or Gaussian means).
        depth: number of levels (0 gives a single leaf).
        bounds: [2, 3] scene box; default: the points' box padded a little.
        weights: [N] non-negative weights; default 1 per point.
        axis_rule: "widest" or "xy".

    Returns:
        The tree and [N] int64 leaf ids, equal to ``assign_leaves(tree, points)`` for every
        point inside ``bounds`` (ties included: equal coordinates always go to one side).
    """
    if depth < 0:
        raise ValueError(f"depth must be >= 0, got {depth}")
    if axis_rule not in ("widest", "xy"):
        raise ValueError(f"axis_rule must be 'widest' or 'xy', got {axis_rule!r}")
    device = points.device
    pts = points.detach()
    n = pts.shape[0]
    root = default_bounds(pts) if bounds is None else bounds.detach().to(device, torch.float64)
    w = check_weights(weights, n, device)
    codes = axis_keys(pts)

    split_axis = torch.zeros(2**depth - 1, dtype=torch.int64, device=device)
    split_value = torch.zeros(2**depth - 1, dtype=torch.float64, device=device)
    node = torch.zeros(n, dtype=torch.int64, device=device)  # node within the level
    key = torch.empty(n, dtype=torch.int64, device=device)  # reused by every level
    boxes = root[None]
    for level in range(depth):
        axis = choose_axes(boxes, level, axis_rule)
        value = split_level(codes, w, node, key, boxes, axis)
        heap = _level_nodes(level, device)
        split_axis[heap], split_value[heap] = axis, value
        boxes = _split_boxes(boxes, axis, value)
    tree = KDTree(bounds=root, split_axis=split_axis, split_value=split_value, depth=depth)
    return tree, node


def assign_leaves(tree: KDTree, points: Float[Tensor, "N 3"]) -> Int[Tensor, " N"]:
    """The leaf that owns each point: descend, going left iff ``x[axis] < split``.

    Points outside ``tree.bounds`` get the outer leaf whose box, extended to infinity
    outward, contains them.

    Args:
        tree: the kd-tree.
        points: [N, 3] positions (any float dtype; compared in float64).

    Returns:
        [N] int64 leaf ids in [0, L).
    """
    pts = points.detach().to(tree.device)
    if pts.shape[0] > CHUNK:
        return torch.cat([assign_leaves(tree, pts[a:b]) for a, b in chunk_spans(pts.shape[0])])
    flat = pts.to(torch.float64).reshape(-1)
    node = torch.zeros(pts.shape[0], dtype=torch.int64, device=tree.device)
    offset = torch.arange(0, flat.shape[0], 3, device=tree.device)
    for _ in range(tree.depth):
        go_right = flat[offset + tree.split_axis[node]] >= tree.split_value[node]
        node = 2 * node + 1 + go_right.long()
    return node - (tree.num_leaves - 1)


def leaf_ranks(num_leaves: int, world_size: int) -> Int[Tensor, " L"]:
    """Which rank owns each leaf.

    Rank ``r`` owns the contiguous leaf range ``floor(r L / N) .. floor((r + 1) L / N) - 1``.
    With ``N`` a power of two that is exactly one subtree per rank (a box).  For other
    ``N`` the ranges are as even as possible (their sizes differ by at most one) and each
    is a union of whole subtrees (``rank_subtrees`` lists them); each subtree is a box and
    is rendered and sent as its own partial.

    Args:
        num_leaves: L, a power of two.
        world_size: N, the number of ranks.

    Returns:
        [L] int64 rank of every leaf.
    """
    depth = _depth_of(num_leaves)
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if world_size > num_leaves:
        need = math.ceil(math.log2(world_size))
        raise ValueError(
            f"a tree of depth {depth} has {num_leaves} leaves; it cannot give each of "
            f"{world_size} ranks a leaf; use depth >= {need}"
        )
    starts = torch.tensor([r * num_leaves // world_size for r in range(world_size)])
    return torch.searchsorted(starts, torch.arange(num_leaves), right=True) - 1


def rank_subtrees(depth: int, world_size: int) -> list[list[int]]:
    """The whole subtrees (heap node ids, left to right) that make up each rank's leaves.

    A contiguous leaf range splits greedily into the largest aligned power-of-two blocks,
    the minimal set of subtrees; for power-of-two ``world_size`` each rank gets one.
    """
    ranks = leaf_ranks(2**depth, world_size).tolist()
    out: list[list[int]] = []
    for r in range(world_size):
        start, stop = ranks.index(r), len(ranks) - ranks[::-1].index(r)
        nodes = []
        while start < stop:
            k = 0  # grow the block while it stays aligned and inside the range
            while start % 2 ** (k + 1) == 0 and start + 2 ** (k + 1) <= stop:
                k += 1
            level = depth - k
            nodes.append(2**level - 1 + (start >> k))
            start += 2**k
        out.append(nodes)
    return out


def subtree_leaves(depth: int, node: int) -> range:
    """Leaf ids under heap node ``node`` of a tree of ``depth`` levels (contiguous)."""
    level = int(math.floor(math.log2(node + 1)))
    if level > depth:
        raise ValueError(f"node {node} is below the leaves of a depth-{depth} tree")
    width = 2 ** (depth - level)
    first = (node - (2**level - 1)) * width
    return range(first, first + width)


def leaf_counts(leaf_ids: Int[Tensor, " N"], num_leaves: int) -> Int[Tensor, " L"]:
    """Number of points owned by every leaf.

    A scatter rather than ``bincount``: on CUDA, bincount reads the largest id back to size its
    output, a host-device synchronisation on every training step that logs the counts.
    """
    counts = torch.zeros(num_leaves, dtype=torch.int64, device=leaf_ids.device)
    return counts.index_add_(0, leaf_ids.long(), torch.ones_like(leaf_ids, dtype=torch.int64))


def points_in_boxes(
    points: Float[Tensor, "N 3"], boxes: Float[Tensor, "L 2 3"]
) -> Bool[Tensor, "N L"]:
    """Half-open containment ``lo <= x < hi`` (the ownership convention of the tree)."""
    p = points[:, None, :].to(boxes)
    return ((p >= boxes[None, :, 0]) & (p < boxes[None, :, 1])).all(-1)


def _depth_of(num_leaves: int) -> int:
    depth = int(round(math.log2(num_leaves))) if num_leaves > 0 else -1
    if depth < 0 or 2**depth != num_leaves:
        raise ValueError(f"num_leaves must be a power of two, got {num_leaves}")
    return depth
