"""Pure scheduling math of the distributed retina-gs step (DESIGN.md section 3, Distribution).

Vocabulary.  A *part* is one whole subtree of the kd-tree that a rank owns (one per rank when
the world size is a power of two, see ``partition.rank_subtrees``); it is rendered and sent as
one partial.  A *task* is one (camera, part) render.  Every rank computes the same schedule
from the same inputs, so nothing here communicates.

- ``pack_cameras``: how many cameras of a queue form the next batch under ``max_batch_size``
  and ``max_load`` (render tasks per rank, RetinaGS's knobs);
- ``assign_owners``: which rank composites each camera and computes its loss, balanced per
  batch (tests and callers that hold every image);
- ``image_owner`` / ``owned_images`` / ``interleave_owners``: the training pipeline's fixed
  owner per image (``index % R``), so that each rank loads only its own images, and a camera
  order in which consecutive cameras cycle through the owners, so that every batch still
  spreads its losses evenly over the ranks;
- ``part_order``: front-to-back order of the parts for one camera (subtrees are contiguous
  in the camera's leaf order, so the parts are ordered too);
- ``content_rect``: the screen rectangle outside which a partial is exactly empty (C = 0,
  T = 1), i.e. what must be sent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Tuple

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from landmark_plugin.core.partition import rank_subtrees, subtree_leaves


@dataclass(frozen=True)
class Parts:
    """The parts (whole subtrees) of a tree of ``depth`` levels shared over ``world_size`` ranks.

    Attributes:
        nodes: [S] heap node id of every part, ranks in order, left to right within a rank.
        rank: [S] owner rank of every part.
        first_leaf / num_leaves: leaf range ``first_leaf[s] .. first_leaf[s] + num_leaves[s] - 1``.
    """

    depth: int
    world_size: int
    nodes: Tuple[int, ...]
    rank: Tuple[int, ...]
    first_leaf: Tuple[int, ...]
    num_leaves: Tuple[int, ...]

    @classmethod
    def of(cls, depth: int, world_size: int) -> "Parts":
        nodes, ranks, first, count = [], [], [], []
        for r, subtrees in enumerate(rank_subtrees(depth, world_size)):
            for node in subtrees:
                leaves = subtree_leaves(depth, node)
                nodes.append(node)
                ranks.append(r)
                first.append(leaves.start)
                count.append(len(leaves))
        return cls(depth, world_size, tuple(nodes), tuple(ranks), tuple(first), tuple(count))

    def __len__(self) -> int:
        return len(self.nodes)

    def of_rank(self, rank: int) -> List[int]:
        """Indices (into ``nodes``) of the parts of ``rank``."""
        return [s for s, r in enumerate(self.rank) if r == rank]

    def leaf_part(self) -> Int[Tensor, " L"]:
        """[L] part index of every leaf."""
        out = torch.empty(2**self.depth, dtype=torch.int64)
        for s, (first, count) in enumerate(zip(self.first_leaf, self.num_leaves)):
            out[first : first + count] = s
        return out


def pack_cameras(
    visible: Bool[Tensor, "P S"], part_rank: Sequence[int], world_size: int, max_batch_size: int, max_load: int
) -> int:
    """How many cameras from the front of a queue go into the next batch.

    Cameras are taken in queue order (so every camera is trained equally often) while the
    batch holds at most ``max_batch_size`` cameras and no rank gets more than ``max_load``
    render tasks; the first camera is always taken, so a batch is never empty.

    Args:
        visible: [P, S] whether part s contributes to queue camera p.
        part_rank: [S] rank of every part.
        world_size: R.

    Returns:
        The batch size B, 1 <= B <= min(P, max_batch_size) (0 only when P == 0).
    """
    if max_batch_size < 1 or max_load < 1:
        raise ValueError(f"max_batch_size and max_load must be >= 1, got {max_batch_size}, {max_load}")
    num = visible.shape[0]
    if num == 0:
        return 0
    onehot = torch.zeros(len(part_rank), world_size, dtype=torch.int64)
    onehot[torch.arange(len(part_rank)), torch.as_tensor(part_rank, dtype=torch.int64)] = 1
    tasks = visible.to(torch.int64) @ onehot  # [P, R] tasks each camera puts on each rank
    load = torch.cumsum(tasks, 0).max(dim=1).values  # [P] busiest rank if the batch ends there
    fits = int((load <= max_load).sum().item())  # cumulative load is non-decreasing
    return max(1, min(fits, max_batch_size, num))


def assign_owners(visible: Bool[Tensor, "B S"], part_rank: Sequence[int], world_size: int) -> Int[Tensor, " B"]:
    """The rank that composites each camera and computes its loss.

    Each camera goes to the rank rendering one of its parts that owns the fewest cameras so
    far (one partial then stays local); a camera no part sees goes to the least loaded rank.
    Ties go to the lowest rank.  Deterministic: every rank computes the same owners.

    Returns:
        [B] int64 owner ranks.
    """
    owned = [0] * world_size
    owners = []
    for row in visible.tolist():
        candidates = sorted({part_rank[s] for s, v in enumerate(row) if v}) or list(range(world_size))
        best = min(candidates, key=lambda r: (owned[r], r))
        owned[best] += 1
        owners.append(best)
    return torch.tensor(owners, dtype=torch.int64)


def image_owner(index: int, world_size: int) -> int:
    """The rank that composites image ``index`` and computes its loss: ``index % R``.

    Fixed per image (unlike ``assign_owners``, which balances each batch), so a rank needs
    only the images of its own cameras: ``owned_images``.
    """
    return index % world_size


def owned_images(num_images: int, rank: int, world_size: int) -> List[int]:
    """Indices of the images ``rank`` owns (``image_owner``), ascending."""
    return list(range(rank, num_images, world_size))


def interleave_owners(order: Sequence[int], world_size: int) -> List[int]:
    """``order`` rearranged so that consecutive images cycle through their owner ranks.

    Each owner's images keep their relative order; owners take turns (0, 1, ..., R-1, 0, ...),
    skipping an owner whose images ran out.  Any window of B consecutive cameras then gives
    every rank B / R losses to compute, up to one.  With one rank ``order`` is unchanged.
    """
    if world_size <= 1:
        return list(order)
    queues: List[List[int]] = [[] for _ in range(world_size)]
    for index in order:
        queues[image_owner(index, world_size)].append(index)
    out: List[int] = []
    for turn in range(max(len(q) for q in queues)):
        out.extend(q[turn] for q in queues if turn < len(q))
    return out


def part_order(leaf_order: Int[Tensor, " L"], parts: Parts) -> List[int]:
    """Parts front to back for one camera.

    Args:
        leaf_order: [L] leaf ids front to back (``order.camera_leaf_order``).

    Returns:
        Part indices sorted by the position of their leaves in ``leaf_order``.  A subtree's
        leaves are contiguous in that order, so its first leaf's position orders it.
    """
    position = torch.empty_like(leaf_order)
    position[leaf_order] = torch.arange(leaf_order.numel(), device=leaf_order.device)
    first_position = [int(position[f : f + n].min()) for f, n in zip(parts.first_leaf, parts.num_leaves)]
    return sorted(range(len(parts)), key=lambda s: first_position[s])


def content_rect(color: Float[Tensor, "H W D"], transmittance: Float[Tensor, "H W 1"]) -> Tuple[int, int, int, int]:
    """Smallest window ``(x0, y0, x1, y1)`` (half open, as ``raster_ref.Window``) outside
    which the partial is empty.

    Empty means C == 0 and T == 1 exactly, which is what a pixel no Gaussian touches gets;
    its gradient is zero too, so cutting such pixels away changes neither the composite
    nor any gradient.  An empty partial gives ``(0, 0, 0, 0)``.
    """
    touched = (transmittance[..., 0] != 1) | (color != 0).any(dim=-1)  # [H, W]
    rows = torch.nonzero(touched.any(dim=1)).flatten()
    if rows.numel() == 0:
        return (0, 0, 0, 0)
    cols = torch.nonzero(touched.any(dim=0)).flatten()
    return (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)


def look_points(c2w: Float[Tensor, "C 3 4"], lo: Float[Tensor, " 3"], hi: Float[Tensor, " 3"]) -> Float[Tensor, "C 3"]:
    """What each camera looks at: the middle of its optical axis' run through the box ``lo``..``hi``
    (its centre when the axis misses the box); nerfstudio cameras look along -z."""
    centres, forward = c2w[:, :3, 3], -c2w[:, :3, 2]
    safe = torch.where(forward.abs() < 1e-12, torch.full_like(forward, 1e-12), forward)
    t0, t1 = (lo - centres) / safe, (hi - centres) / safe
    enter = torch.minimum(t0, t1).amax(dim=1).clamp_min(0.0)
    leave = torch.maximum(t0, t1).amin(dim=1)
    hits = leave > enter
    middle = centres + forward * (0.5 * (enter + leave))[:, None]
    return torch.where(hits[:, None], middle, centres)


def locality_order(points: Float[Tensor, "N 3"], lo: Float[Tensor, " 3"], hi: Float[Tensor, " 3"], block: int,
                   generator: torch.Generator) -> List[int]:
    """A camera order in which consecutive cameras look at nearby places, covering every camera
    once: the cameras sorted along a Z-order (Morton) curve of ``points`` (what each camera looks
    at, quantised to 10 bits per axis in the box ``lo``..``hi``), cut into runs of ``block``
    cameras whose order ``generator`` shuffles (a new order per epoch, runs kept whole)."""
    unit = ((points.double() - lo.double()) / (hi.double() - lo.double()).clamp_min(1e-12)).clamp(0, 1)
    cells = (unit * 1023).round().long()
    code = torch.zeros(points.shape[0], dtype=torch.int64)
    for bit in range(10):  # interleave the bits: x0 y0 z0 x1 y1 z1 ...
        for axis in range(3):
            code |= ((cells[:, axis] >> bit) & 1) << (3 * bit + axis)
    order = torch.argsort(code, stable=True).tolist()
    runs = [order[i : i + block] for i in range(0, len(order), max(block, 1))]
    return [index for r in torch.randperm(len(runs), generator=generator).tolist() for index in runs[r]]
