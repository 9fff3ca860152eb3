"""The split planes of one level of the kd-tree build (``partition.build_kdtree_with_leaves``).

Every node of a level splits at the weighted median of its points along its axis.  The
median is found without sorting: coordinates become order-preserving integer keys
(``axis_keys``), and a segmented radix select (``_RadixState``) narrows every node's median
key a few bits at a time with ``bincount`` passes, all nodes at once.
"""

from __future__ import annotations

import math
from typing import Literal, NamedTuple, Optional

import torch
from jaxtyping import Float, Int
from torch import Tensor

AxisRule = Literal["widest", "xy"]


CHUNK = 1 << 18
"""Points per chunk in per-point sweeps: small temporaries are reused by the allocator,
while whole-array temporaries of 10M points cost more in page faults than in arithmetic."""


def chunk_spans(n: int) -> list[tuple[int, int]]:
    return [(a, min(a + CHUNK, n)) for a in range(0, n, CHUNK)]


def split_level(
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
    for a, b in chunk_spans(node.shape[0]):
        key[a:b] = codes.keys[:, a:b].gather(0, axis[node[a:b]][None])[0]
    threshold = _segmented_weighted_median(key, node, weights, m, codes.bits)
    lo_key = torch.full((m,), none_left, dtype=torch.int64, device=device)
    hi_key = torch.full((m,), none_right, dtype=torch.int64, device=device)
    for a, b in chunk_spans(node.shape[0]):
        seg, k = node[a:b], key[a:b]
        go_right = k >= threshold[seg]
        lo_key.scatter_reduce_(0, seg, torch.where(go_right, none_left, k), "amax")
        hi_key.scatter_reduce_(0, seg, torch.where(go_right, k, none_right), "amin")
        node[a:b] = 2 * seg + go_right.long()
    return _split_values(codes, lo_key, hi_key, boxes, axis)


def check_weights(
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


def axis_keys(points: Float[Tensor, "N 3"]) -> _AxisKeys:
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
    spans = chunk_spans(n)

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


def choose_axes(boxes: Float[Tensor, "M 2 3"], level: int, rule: AxisRule) -> Int[Tensor, " M"]:
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
