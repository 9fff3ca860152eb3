"""Front-to-back order of kd-tree leaves for one camera, and leaf visibility.

Why one order serves every pixel: all rays of a pinhole camera start at its centre ``o``.
At every split plane, a ray from ``o`` can only cross from ``o``'s side to the other side,
never back, so every point of the near child that the ray meets comes before every point
of the far child.  Recursing gives one order of the (convex, disjoint) leaves that is
front-to-back along every ray, for ``o`` inside or outside the scene box.
"""

from __future__ import annotations

from typing import Optional

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from landmark_plugin.core.partition import KDTree


def camera_leaf_order(tree: KDTree, origin: Float[Tensor, " 3"]) -> Int[Tensor, " L"]:
    """Leaves in front-to-back order for rays starting at ``origin``.

    Visits the child on the origin's side of each split plane first (the side that
    ``assign_leaves`` would give the origin, so ties follow the ownership rule).

    Args:
        tree: the kd-tree.
        origin: [3] camera centre in world coordinates.

    Returns:
        [L] int64 leaf ids, nearest first.
    """
    o = origin.detach().to(tree.device, torch.float64)
    nodes = torch.zeros(1, dtype=torch.int64, device=tree.device)
    for _ in range(tree.depth):
        right_first = (o[tree.split_axis[nodes]] >= tree.split_value[nodes]).long()
        near = 2 * nodes + 1 + right_first
        far = 2 * nodes + 2 - right_first
        nodes = torch.stack([near, far], dim=1).reshape(-1)
    return nodes - (tree.num_leaves - 1)


def order_positions(order: Int[Tensor, " L"]) -> Int[Tensor, " L"]:
    """Inverse permutation: ``positions[leaf]`` is the leaf's place in ``order``.

    ``positions[leaf_of_gaussian]`` is the group key of a single render sorted by
    (leaf order, depth).
    """
    positions = torch.empty_like(order)
    positions[order] = torch.arange(order.shape[0], device=order.device)
    return positions


def frustum_planes(
    viewmat: Float[Tensor, "4 4"],
    K: Float[Tensor, "3 3"],
    width: int,
    height: int,
    near: float,
    far: Optional[float] = None,
) -> Float[Tensor, "P 4"]:
    """World-space half-spaces ``n . x + d >= 0`` whose intersection is the view frustum.

    In camera space (OpenCV: x right, y down, z forward) pixel ``u = fx x / z + cx`` lies in
    [0, width] iff ``fx x + cx z >= 0`` and ``(width - cx) z - fx x >= 0`` (for z > 0), and
    likewise for v; together with ``z >= near`` (and ``z <= far``) these bound the frustum.
    Skew is ignored, as gsplat does.

    Args:
        viewmat: [4, 4] world-to-camera.
        K: [3, 3] intrinsics.
        width, height: image size in pixels.
        near: near plane distance.
        far: optional far plane distance.

    Returns:
        [P, 4] rows (n_x, n_y, n_z, d), P = 5 or 6.
    """
    fx, fy, cx, cy = (float(K[0, 0]), float(K[1, 1]), float(K[0, 2]), float(K[1, 2]))
    cam_planes = [
        [0.0, 0.0, 1.0, -near],
        [fx, 0.0, cx, 0.0],
        [-fx, 0.0, width - cx, 0.0],
        [0.0, fy, cy, 0.0],
        [0.0, -fy, height - cy, 0.0],
    ]
    if far is not None:
        cam_planes.append([0.0, 0.0, -1.0, far])
    planes = torch.tensor(cam_planes, dtype=torch.float64, device=viewmat.device)
    # A camera-space plane (n, d) applied to p_c = R p + t is (R^T n, n . t + d) in world.
    view = viewmat.detach().to(torch.float64)
    rot, trans = view[:3, :3], view[:3, 3]
    normals = planes[:, :3] @ rot
    offsets = planes[:, :3] @ trans + planes[:, 3]
    return torch.cat([normals, offsets[:, None]], dim=1)


def boxes_in_frustum(
    boxes: Float[Tensor, "L 2 3"], planes: Float[Tensor, "P 4"]
) -> Bool[Tensor, " L"]:
    """Conservative box-frustum test: a box is out only if all 8 corners lie strictly
    outside one plane (then it cannot meet the convex frustum)."""
    corner_bits = torch.tensor(
        [[(c >> a) & 1 for a in range(3)] for c in range(8)], device=boxes.device
    )  # [8, 3]: which corner takes max on each axis
    b = boxes.to(torch.float64)
    corners = torch.where(corner_bits.bool()[None], b[:, None, 1], b[:, None, 0])  # [L, 8, 3]
    side = corners @ planes[:, :3].T + planes[:, 3]  # [L, 8, P]
    return ~(side < 0).all(dim=1).any(dim=1)


def visible_leaves(
    tree: KDTree,
    viewmat: Float[Tensor, "4 4"],
    K: Float[Tensor, "3 3"],
    width: int,
    height: int,
    near: float,
    far: Optional[float] = None,
    boxes: Optional[Float[Tensor, "L 2 3"]] = None,
) -> Bool[Tensor, " L"]:
    """Leaves whose box may meet the view frustum (conservative: never drops a leaf
    that holds a visible point of its box).

    The test only knows boxes.  ``tree.leaf_boxes()`` stops at ``tree.bounds``, so the
    caller must pass ``boxes`` that cover everything a leaf can draw: at least
    ``tree.leaf_boxes(expand_to=means)`` when Gaussians have left the bounds, and boxes
    grown by the Gaussians' extent when splats near a leaf's faces must not be culled
    (a splat whose centre is off-screen can still cover pixels).  For an exact answer
    after projection, use ``leaves_on_screen``.

    Args:
        tree: the kd-tree (for its boxes when ``boxes`` is None).
        viewmat: [4, 4] world-to-camera (OpenCV).
        K: [3, 3] intrinsics.
        width, height: image size.
        near: near plane.
        far: optional far plane.
        boxes: [L, 2, 3] boxes to test instead of ``tree.leaf_boxes()``.

    Returns:
        [L] bool.
    """
    leaf_boxes = tree.leaf_boxes() if boxes is None else boxes
    planes = frustum_planes(viewmat, K, width, height, near, far)
    return boxes_in_frustum(leaf_boxes.to(planes.device), planes)


def leaves_on_screen(
    radii: Int[Tensor, " N"], leaf_ids: Int[Tensor, " N"], num_leaves: int
) -> Bool[Tensor, " L"]:
    """Exact visibility after projection: a leaf matters iff one of its Gaussians has a
    non-zero screen radius (gsplat culls the rest).

    Args:
        radii: [N] screen radii from the projection (0 = culled).
        leaf_ids: [N] owning leaf of each Gaussian.
        num_leaves: L.
    """
    counts = torch.bincount(leaf_ids[radii > 0], minlength=num_leaves)
    return counts > 0
