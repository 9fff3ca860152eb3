"""Layout edits as pure functions: remove and copy axis-aligned boxes of a scene.

An edit list is applied to the scene in order, each edit a map from scene to scene:

- ``remove(B)``: the content inside box B disappears;
- ``copy(S, t)``: the content inside S is shown again at S + t, replacing what was inside S + t.

A field (landmark-grid) is edited through its query points: the edited scene at a point p is the
trained scene at a source point p', or empty.  Walking the edits from the last to the first, a copy
sends p in S + t to p - t and a remove kills p in B (``edit_points``).

A point set (retina-gs Gaussians, by their means) is edited forwards: a remove drops the members
inside B; a copy drops the members inside S + t and appends the members inside S, translated by t
(``edit_point_set``).  Both read the same scene: what the edited scene holds at p is what the trained
scene holds at p'.

Boxes are half-open, ``lo <= x < hi`` per axis (the kd-tree's ownership convention), so boxes that tile
space partition it.  Containment is tested in float64.
"""

from __future__ import annotations

from typing import Literal, NamedTuple, Optional, Sequence, Tuple

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from landmark_plugin.core.partition import KDTree, assign_leaves
from landmark_plugin.core.render import Gaussians


class BoxEdit(NamedTuple):
    """One resolved edit (block indices already turned into boxes)."""

    kind: Literal["remove", "copy"]
    box: Float[Tensor, "2 3"]  # min / max corner: the removed box, or the copy's source
    offset: Float[Tensor, " 3"]  # copy translation (zeros for remove)

    @property
    def target(self) -> Float[Tensor, "2 3"]:
        """Where the content lands: ``box + offset`` (the removed box itself for a remove)."""
        return self.box + self.offset

    @classmethod
    def remove(cls, box) -> "BoxEdit":
        """Remove the content of ``box`` ([2, 3] min / max)."""
        box = torch.as_tensor(box, dtype=torch.float64)
        return cls("remove", box, torch.zeros(3, dtype=torch.float64))

    @classmethod
    def copy(cls, box, offset) -> "BoxEdit":
        """Show the content of ``box`` again at ``box + offset``, replacing what is there."""
        return cls("copy", torch.as_tensor(box, dtype=torch.float64), torch.as_tensor(offset, dtype=torch.float64))


def in_box(points: Float[Tensor, "N 3"], box: Float[Tensor, "2 3"]) -> Bool[Tensor, " N"]:
    """Half-open containment ``lo <= p < hi`` on every axis, in float64."""
    p = points.detach().to(torch.float64)
    box = box.to(p)
    return ((p >= box[0]) & (p < box[1])).all(dim=-1)


def edit_points(
    edits: Sequence[BoxEdit], points: Float[Tensor, "N 3"]
) -> Tuple[Float[Tensor, "N 3"], Bool[Tensor, " N"]]:
    """Where the trained field is read for each query point of the edited scene.

    Args:
        edits: the edit list, first edit first.
        points: [N, 3] query points (any float dtype; the result keeps it).

    Returns:
        source: [N, 3] points at which to read the trained field.
        alive: [N] False where the edited scene is empty (a removed box).
    """
    source = points
    alive = torch.ones(points.shape[:-1], dtype=torch.bool, device=points.device)
    for edit in reversed(edits):
        if edit.kind == "remove":
            alive = alive & ~in_box(source, edit.box)
        else:
            moved = in_box(source, edit.target)
            offset = edit.offset.to(points)
            source = torch.where(moved[:, None], source - offset, source)
    return source, alive


def edit_point_set(
    edits: Sequence[BoxEdit], means: Float[Tensor, "N 3"]
) -> Tuple[Int[Tensor, " M"], Float[Tensor, "M 3"]]:
    """The members of the edited point set, as (original member, translation) pairs.

    Args:
        edits: the edit list, first edit first.
        means: [N, 3] positions of the original members.

    Returns:
        index: [M] original member of every edited member (a copied member appears again).
        offset: [M, 3] its translation (float64; zero for members left in place).
    """
    index = torch.arange(means.shape[0], device=means.device)
    offset = torch.zeros(means.shape[0], 3, dtype=torch.float64, device=means.device)
    for edit in edits:
        current = means.detach()[index].to(torch.float64) + offset
        if edit.kind == "remove":
            keep = ~in_box(current, edit.box)
            index, offset = index[keep], offset[keep]
            continue
        source = in_box(current, edit.box)
        keep = ~in_box(current, edit.target)
        shift = edit.offset.to(offset)
        index = torch.cat([index[keep], index[source]])
        offset = torch.cat([offset[keep], offset[source] + shift])
    return index, offset


def edit_gaussians(
    gaussians: Gaussians, leaf_ids: Int[Tensor, " N"], edits: Sequence[BoxEdit], tree: KDTree
) -> Tuple[Gaussians, Int[Tensor, " M"]]:
    """The Gaussians of the edited scene and their owning leaves.

    Members left in place keep their leaf; a translated copy belongs to the leaf that holds its new
    mean, so the render keeps the (leaf order, depth) rule.

    Args:
        gaussians: the N activated Gaussians.
        leaf_ids: [N] owning leaf of each.
        edits: the edit list.
        tree: the kd-tree (for the copies' leaves).
    """
    index, offset = edit_point_set(edits, gaussians.means)
    picked = gaussians.take(index)
    moved = (offset != 0).any(dim=-1)
    means = picked.means + offset.to(picked.means)
    leaves = leaf_ids[index].clone()
    if bool(moved.any()):
        leaves[moved] = assign_leaves(tree, means[moved]).to(leaves.device)
    return picked._replace(means=means), leaves


def mix_codes(
    codes: Float[Tensor, "I D"], image: int, to_image: Optional[int] = None, t: float = 0.0
) -> Float[Tensor, " D"]:
    """Appearance code between two training images: ``(1 - t) codes[image] + t codes[to_image]``.

    ``torch.lerp`` returns either end exactly at t = 0 and t = 1, so the ends equal the images' own codes.
    """
    start = codes[image]
    end = codes[image if to_image is None else to_image]
    return torch.lerp(start, end, float(t))


def grid_block_boxes(aabb: Float[Tensor, "2 3"], blocks: Tuple[int, int]) -> Float[Tensor, "B 2 3"]:
    """The boxes of a ``blocks = (bx, by)`` x-y grid over ``aabb`` (block ``ix * by + iy``), float64.

    Each spans the box's whole height.  The box's outer faces are moved out by one float64 step so
    that half-open containment keeps points on the far faces, which the grid routes to the last block.
    """
    aabb = aabb.detach().to(torch.float64).cpu()
    lo = aabb[0]
    hi = torch.nextafter(aabb[1], torch.full_like(aabb[1], float("inf")))
    bx, by = blocks
    xs = torch.linspace(float(aabb[0, 0]), float(aabb[1, 0]), bx + 1, dtype=torch.float64)
    ys = torch.linspace(float(aabb[0, 1]), float(aabb[1, 1]), by + 1, dtype=torch.float64)
    xs[0], xs[-1], ys[0], ys[-1] = lo[0], hi[0], lo[1], hi[1]
    boxes = torch.empty(bx * by, 2, 3, dtype=torch.float64)
    for ix in range(bx):
        for iy in range(by):
            boxes[ix * by + iy] = torch.tensor([[xs[ix], ys[iy], lo[2]], [xs[ix + 1], ys[iy + 1], hi[2]]])
    return boxes
