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
from typing import Literal, NamedTuple, Optional

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

AxisRule = Literal["widest", "xy"]


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
    w = _check_weights(weights, n, device)
    codes = _axis_keys(pts)

    split_axis = torch.zeros(2**depth - 1, dtype=torch.int64, device=device)
    split_value = torch.zeros(2**depth - 1, dtype=torch.float64, device=device)
    node = torch.zeros(n, dtype=torch.int64, device=device)  # node within the level
    key = torch.empty(n, dtype=torch.int64, device=device)  # reused by every level
    boxes = root[None]
    for level in range(depth):
        axis = _choose_axes(boxes, level, axis_rule)
        value = _split_level(codes, w, node, key, boxes, axis)
        heap = _level_nodes(level, device)
        split_axis[heap], split_value[heap] = axis, value
        boxes = _split_boxes(boxes, axis, value)
    tree = KDTree(bounds=root, split_axis=split_axis, split_value=split_value, depth=depth)
    return tree, node


_CHUNK = 1 << 18
"""Points per chunk in per-point sweeps: small temporaries are reused by the allocator,
while whole-array temporaries of 10M points cost more in page faults than in arithmetic."""


def _spans(n: int) -> list[tuple[int, int]]:
    return [(a, min(a + _CHUNK, n)) for a in range(0, n, _CHUNK)]


def _split_level(
    codes: "_AxisKeys",
    weights: Optional[Float[Tensor, " N"]],
    node: Int[Tensor, " N"],
    key: Int[Tensor, " N"],
    boxes: Float[Tensor, "M 2 3"],
    axis: Int[Tensor, " M"],
) -> Float[Tensor, " M"]:
    """Split every node of one level at its weighted median.

    ``node`` is advanced in place to the child ids (2m left, 2m + 1 right); ``key`` is
    scratch space for the points' keys along their node's axis.  Returns the [M] float64
    split values.
    """
    m, device = boxes.shape[0], node.device
    none_left, none_right = -1, 2**codes.bits
    if node.shape[0] == 0:  # no points: every node splits at its box midpoint
        no_key = torch.full_like(axis, none_left), torch.full_like(axis, none_right)
        return _split_values(codes, *no_key, boxes, axis)
    for a, b in _spans(node.shape[0]):
        key[a:b] = codes.keys[:, a:b].gather(0, axis[node[a:b]][None])[0]
    threshold = _segmented_weighted_median(key, node, weights, m, codes.bits)
    lo_key = torch.full((m,), none_left, dtype=torch.int64, device=device)
    hi_key = torch.full((m,), none_right, dtype=torch.int64, device=device)
    for a, b in _spans(node.shape[0]):
        seg, k = node[a:b], key[a:b]
        go_right = k >= threshold[seg]
        lo_key.scatter_reduce_(0, seg, torch.where(go_right, none_left, k), "amax")
        hi_key.scatter_reduce_(0, seg, torch.where(go_right, k, none_right), "amin")
        node[a:b] = 2 * seg + go_right.long()
    return _split_values(codes, lo_key, hi_key, boxes, axis)


def _check_weights(
    weights: Optional[Tensor], n: int, device: torch.device
) -> Optional[Float[Tensor, " N"]]:
    """float64 copy of the weights (None stays None: unit weights use exact int counts)."""
    if weights is None:
        return None
    if weights.shape != (n,):
        raise ValueError(f"weights must have shape ({n},), got {tuple(weights.shape)}")
    w = weights.detach().to(device, torch.float64)
    if bool((w < 0).any()):
        raise ValueError("weights must be non-negative")
    return w


class _AxisKeys(NamedTuple):
    """Order-preserving integer codes of the coordinates (equal coordinates, equal keys).

    keys: [3, N] non-negative int64; bits: significant bits of the largest key;
    offset: [3] (float32 path) key of the smallest coordinate, subtracted to make keys
    non-negative; uniques: per axis sorted distinct float64 values (float64 path).
    """

    keys: Int[Tensor, "3 N"]
    bits: int
    offset: Optional[Int[Tensor, " 3"]]
    uniques: Optional[list[Tensor]]


def _axis_keys(points: Float[Tensor, "N 3"]) -> _AxisKeys:
    """Integer keys per axis, so medians can be found by radix select.

    float32 (and narrower) coordinates use their IEEE bits, which needs no sort; float64
    bit patterns span too wide a range for int64 differences, so they become dense ranks
    (one sort per axis).
    """
    device = points.device
    if points.shape[0] == 0:
        zeros = torch.zeros(3, dtype=torch.int64, device=device)
        return _AxisKeys(torch.zeros(3, 0, dtype=torch.int64, device=device), 1, zeros, None)
    if points.dtype == torch.float64:
        pairs = [torch.unique(points[:, a], sorted=True, return_inverse=True) for a in range(3)]
        keys = torch.stack([inverse for _, inverse in pairs])
        return _AxisKeys(keys, _bits(keys), None, [values for values, _ in pairs])
    keys = _sortable_bits(points.to(torch.float32).T.contiguous().view(torch.int32).to(torch.int64))
    offset = keys.min(dim=1).values
    keys = keys - offset[:, None]
    return _AxisKeys(keys, _bits(keys), offset, None)


def _sortable_bits(bits: Int[Tensor, "..."]) -> Int[Tensor, "..."]:
    """float32 bit patterns (as int64) -> integers ordered like the floats; an involution."""
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def _bits(keys: Int[Tensor, "..."]) -> int:
    return max(int(keys.max()).bit_length(), 1)


def _key_values(
    codes: _AxisKeys, axis: Int[Tensor, " M"], key: Int[Tensor, " M"]
) -> Float[Tensor, " M"]:
    """Coordinates (float64) of a few keys, one axis each."""
    if codes.uniques is None:
        bits = _sortable_bits(key + codes.offset[axis]).to(torch.int32)
        return bits.view(torch.float32).to(torch.float64)
    values = torch.zeros(key.shape, dtype=torch.float64, device=key.device)
    for a, uniques in enumerate(codes.uniques):
        on_axis = axis == a
        values[on_axis] = uniques[key[on_axis]].to(torch.float64)
    return values


def _segmented_weighted_median(
    key: Int[Tensor, " N"],
    segment: Int[Tensor, " N"],
    weights: Optional[Float[Tensor, " N"]],
    num_segments: int,
    key_bits: int,
) -> Int[Tensor, " M"]:
    """Per segment, the smallest key ``t`` whose inclusive cumulative weight exceeds half
    the segment's weight (``2**key_bits`` if there is none: empty or weightless segments).

    Radix select: each pass histograms the remaining candidates of every segment over the
    next few key bits, picks the bucket where the cumulative weight crosses half, and
    keeps only that bucket's candidates.  The first pass streams over all points in
    chunks; later passes see only the (few) candidates left.  Unit weights use integer
    counts, so the result is exact.

    Args:
        key: [N] non-negative keys below ``2**key_bits``.
        segment: [N] segment id in [0, M).
        weights: [N] non-negative weights, or None for unit weights.
        num_segments: M.
        key_bits: number of significant key bits.

    Returns:
        [M] int64 thresholds.
    """
    m, n = num_segments, key.shape[0]
    spans = _spans(n)

    def chunk(a: int, b: int) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        return key[a:b], segment[a:b], None if weights is None else weights[a:b]

    total = torch.bincount(segment, weights=weights, minlength=m)
    # About a million histogram bins: big enough that a pass or two settle most bits,
    # small enough to stay cheap next to a sweep of the points.
    d_max = max(1, min(16, int(math.log2(max(2**20 // m, 2)))))
    state = _RadixState(total, key_bits)
    d = state.next_digits(d_max)
    hist = torch.zeros(m * 2**d, dtype=total.dtype, device=key.device)
    for a, b in spans:
        state.histogram(*chunk(a, b), d, out=hist)
    state.pick(hist, d)
    cand = [state.keep(*chunk(a, b)) for a, b in spans]
    cand_key, cand_seg = torch.cat([c[0] for c in cand]), torch.cat([c[1] for c in cand])
    cand_w = None if weights is None else torch.cat([c[2] for c in cand])
    while state.shift > 0:
        d = state.next_digits(d_max)
        state.pick(state.histogram(cand_key, cand_seg, cand_w, d), d)
        cand_key, cand_seg, cand_w = state.keep(cand_key, cand_seg, cand_w)
    return torch.where(state.found, state.prefix, torch.full_like(state.prefix, 2**key_bits))


class _RadixState:
    """Per segment: the key bits decided so far (``prefix``), the weight of keys below
    the current range (``below``), and whether a crossing bucket exists (``found``)."""

    def __init__(self, total: Tensor, key_bits: int):
        m = total.shape[0]
        self.total, self.shift = total, key_bits
        self.below = torch.zeros_like(total)
        self.prefix = torch.zeros(m, dtype=torch.int64, device=total.device)
        self.found = torch.ones(m, dtype=torch.bool, device=total.device)

    def next_digits(self, d_max: int) -> int:
        d = min(d_max, self.shift)
        self.shift -= d
        return d

    def histogram(
        self, key: Tensor, seg: Tensor, w: Optional[Tensor], d: int, out: Optional[Tensor] = None
    ) -> Tensor:
        """Weight per (segment, next d bits); accumulated into ``out`` when given."""
        index = seg * 2**d + ((key >> self.shift) & (2**d - 1))
        if out is None:
            return torch.bincount(index, weights=w, minlength=self.total.shape[0] * 2**d)
        return out.index_add_(0, index, torch.ones_like(index) if w is None else w)

    def pick(self, hist: Tensor, d: int) -> None:
        cum = self.below[:, None] + torch.cumsum(hist.view(-1, 2**d), dim=1)
        pick = (2 * cum <= self.total[:, None]).sum(dim=1)  # first bucket crossing half
        self.found &= pick < 2**d
        pick = pick.clamp(max=2**d - 1)
        prev = cum.gather(1, (pick - 1).clamp(min=0)[:, None])[:, 0]
        self.below = torch.where(pick > 0, prev, self.below)
        self.prefix = self.prefix * 2**d + pick

    def keep(self, key: Tensor, seg: Tensor, w: Optional[Tensor]) -> tuple[Tensor, Tensor, Optional[Tensor]]:
        keep = (key >> self.shift) == self.prefix[seg]
        return key[keep], seg[keep], None if w is None else w[keep]


def _choose_axes(boxes: Float[Tensor, "M 2 3"], level: int, rule: AxisRule) -> Int[Tensor, " M"]:
    if rule == "xy":
        return torch.full((boxes.shape[0],), level % 2, dtype=torch.int64, device=boxes.device)
    return (boxes[:, 1] - boxes[:, 0]).argmax(dim=1)


def _split_values(
    codes: _AxisKeys,
    lo_key: Int[Tensor, " M"],
    hi_key: Int[Tensor, " M"],
    boxes: Float[Tensor, "M 2 3"],
    axis: Int[Tensor, " M"],
) -> Float[Tensor, " M"]:
    """float64 split plane of every node of a level, from the largest left key and the
    smallest right key (-1 / 2**bits when a side is empty).

    The midpoint of the two coordinates (a box face stands in for an empty side), clamped
    into the box so the child boxes stay valid.  Where the midpoint of two adjacent floats
    rounds down onto the left value, the right value is used instead, so ``x < value``
    always reproduces the build's choice.
    """
    rows = torch.arange(boxes.shape[0], device=boxes.device)
    box_lo, box_hi = boxes[rows, 0, axis], boxes[rows, 1, axis]
    has_lo, has_hi = lo_key >= 0, hi_key < 2**codes.bits
    lo, hi = box_lo.clone(), box_hi.clone()
    lo[has_lo] = _key_values(codes, axis[has_lo], lo_key[has_lo])
    hi[has_hi] = _key_values(codes, axis[has_hi], hi_key[has_hi])
    mid = 0.5 * (lo + hi)
    mid = torch.where(mid <= lo, hi, mid)
    return torch.minimum(torch.maximum(mid, box_lo), box_hi)


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
    if pts.shape[0] > _CHUNK:
        return torch.cat([assign_leaves(tree, pts[a:b]) for a, b in _spans(pts.shape[0])])
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
