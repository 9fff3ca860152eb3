"""Camera leaf order (front to back along every ray) and conservative leaf visibility."""

from __future__ import annotations

import pytest
import torch

from landmark_plugin.core.order import (
    camera_leaf_order,
    leaves_on_screen,
    order_positions,
    visible_leaves,
)
from landmark_plugin.core.partition import assign_leaves, build_kdtree

from test_raster_ref import intrinsics, look_at


def _tree(depth: int, seed: int, axis_rule: str = "widest"):
    g = torch.Generator().manual_seed(seed)
    spread = torch.tensor([2.0, 1.0, 0.4], dtype=torch.float64)
    points = torch.randn(2000, 3, generator=g, dtype=torch.float64) * spread
    return build_kdtree(points, depth, axis_rule=axis_rule)


def _slab_entry(boxes: torch.Tensor, origin: torch.Tensor, dirs: torch.Tensor):
    """Ray-box slab test: entry distance (clamped at 0) and whether each ray meets each box.

    boxes [L, 2, 3], origin [3], dirs [R, 3] -> ([R, L], [R, L]).
    """
    inv = 1.0 / dirs[:, None, :]  # [R, 1, 3]
    t0 = (boxes[None, :, 0] - origin) * inv
    t1 = (boxes[None, :, 1] - origin) * inv
    t_near = torch.minimum(t0, t1).amax(-1)
    t_far = torch.maximum(t0, t1).amin(-1)
    hit = (t_far > t_near.clamp(min=0)) & (t_far > 0)
    return t_near.clamp(min=0), hit


@pytest.mark.parametrize("depth", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("where", ["inside", "outside"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_order_is_front_to_back_for_every_ray(depth, where, seed):
    tree = _tree(depth, seed, axis_rule="xy" if seed == 2 else "widest")
    boxes = tree.leaf_boxes()
    g = torch.Generator().manual_seed(100 + seed)
    lo, hi = tree.bounds[0], tree.bounds[1]
    crossings = 0
    for _ in range(8):
        if where == "inside":
            origin = lo + (hi - lo) * torch.rand(3, generator=g, dtype=torch.float64)
        else:
            direction = torch.randn(3, generator=g, dtype=torch.float64)
            origin = 0.5 * (lo + hi) + direction / direction.norm() * (hi - lo).norm() * 1.5
        order = camera_leaf_order(tree, origin)
        assert sorted(order.tolist()) == list(range(tree.num_leaves))
        position = order_positions(order)
        dirs = torch.randn(300, 3, generator=g, dtype=torch.float64)
        if where == "outside":  # aim most rays at the box
            target = lo + (hi - lo) * torch.rand(300, 3, generator=g, dtype=torch.float64)
            dirs = target - origin
        entry, hit = _slab_entry(boxes, origin, dirs)
        # Per ray, the leaves it meets sorted by entry distance must have rising positions.
        by_entry = torch.argsort(torch.where(hit, entry, torch.inf), dim=1)
        pos = position[by_entry].double()
        met = hit.gather(1, by_entry)
        rising = (pos[:, 1:] > pos[:, :-1]) | ~met[:, 1:]
        assert rising.all(), f"rays {(~rising.all(1)).nonzero()[:, 0].tolist()} meet leaves out of order"
        crossings += int((hit.sum(1) - 1).clamp(min=0).sum())
    if depth >= 2:
        assert crossings > 100, "rays must cross several leaves"


def test_order_positions_is_inverse():
    tree = _tree(3, 0)
    order = camera_leaf_order(tree, torch.tensor([0.1, -5.0, 2.0], dtype=torch.float64))
    position = order_positions(order)
    assert torch.equal(order[position], torch.arange(8))
    # The origin's own leaf comes first.
    origin = torch.tensor([[0.3, 0.2, 0.1]], dtype=torch.float64)
    assert camera_leaf_order(tree, origin[0])[0] == assign_leaves(tree, origin)[0]


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_visible_leaves_keeps_every_visible_point(seed):
    depth = 4
    tree = _tree(depth, seed)
    lo, hi = tree.bounds[0], tree.bounds[1]
    width, height, near = 64, 48, 0.1
    K = intrinsics(width, height, fov_deg=50.0)
    g = torch.Generator().manual_seed(seed)
    eye = (0.5 * (lo + hi) + torch.tensor([0.3, -0.2, 0.1], dtype=torch.float64) * (hi - lo)).tolist()
    target = (lo + (hi - lo) * torch.rand(3, generator=g, dtype=torch.float64)).tolist()
    if seed % 2:  # from the middle along +x: the leaves behind must go
        eye = (0.5 * (lo + hi)).tolist()
        target = (0.5 * (lo + hi) + torch.tensor([1.0, 0.1, 0.05], dtype=torch.float64)).tolist()
    viewmat = look_at(eye, target)
    visible = visible_leaves(tree, viewmat, K, width, height, near)

    points = lo + (hi - lo) * torch.rand(100_000, 3, generator=g, dtype=torch.float64)
    cam = points @ viewmat[:3, :3].T + viewmat[:3, 3]
    u = K[0, 0] * cam[:, 0] / cam[:, 2] + K[0, 2]
    v = K[1, 1] * cam[:, 1] / cam[:, 2] + K[1, 2]
    seen = (cam[:, 2] > near) & (u >= 0) & (u <= width) & (v >= 0) & (v <= height)
    assert seen.sum() > 100
    needed = torch.zeros(tree.num_leaves, dtype=torch.bool)
    needed[assign_leaves(tree, points[seen])] = True
    assert not (needed & ~visible).any(), "a leaf holding a visible point was culled"
    if seed % 2:
        assert (~visible).any(), "the leaves behind the camera should be culled"


def test_visible_leaves_behind_camera():
    tree = _tree(2, 0)
    lo, hi = tree.bounds[0], tree.bounds[1]
    eye = [float(hi[0]) + 5.0, 0.0, 0.0]
    viewmat = look_at(eye, [float(hi[0]) + 10.0, 0.0, 0.0])  # facing away from the scene
    assert not visible_leaves(tree, viewmat, intrinsics(32, 32), 32, 32, 0.01).any()


def test_leaves_on_screen():
    radii = torch.tensor([0, 3, 0, 5, 0], dtype=torch.int32)
    leaf_ids = torch.tensor([0, 1, 2, 1, 3])
    assert leaves_on_screen(radii, leaf_ids, 4).tolist() == [False, True, False, False]
