"""Pure scheduling math of the distributed step: parts, packing, owners, part order, crops."""

from __future__ import annotations

import pytest
import torch

from landmark_plugin.core.order import camera_leaf_order
from landmark_plugin.core.partition import build_kdtree
from landmark_plugin.core.schedule import Parts, assign_owners, content_rect, pack_cameras, part_order


@pytest.mark.parametrize("depth,world_size", [(2, 1), (2, 2), (3, 4), (3, 3), (2, 3)])
def test_parts_cover_every_leaf_once(depth, world_size):
    parts = Parts.of(depth, world_size)
    leaves = sorted(f + k for f, n in zip(parts.first_leaf, parts.num_leaves) for k in range(n))
    assert leaves == list(range(2**depth))
    assert sorted(set(parts.rank)) == list(range(world_size))
    assert torch.equal(parts.leaf_part()[torch.tensor(parts.first_leaf)], torch.arange(len(parts)))


def test_pack_cameras_respects_max_load_and_batch_size():
    visible = torch.tensor([[1, 1], [1, 0], [1, 0], [0, 1]], dtype=torch.bool)  # 4 cameras, 2 parts
    rank = [0, 1]
    assert pack_cameras(visible, rank, 2, max_batch_size=4, max_load=2) == 2  # rank 0 would get a 3rd task
    assert pack_cameras(visible, rank, 2, max_batch_size=4, max_load=3) == 4
    assert pack_cameras(visible, rank, 2, max_batch_size=1, max_load=8) == 1
    assert pack_cameras(visible[:0], rank, 2, max_batch_size=4, max_load=2) == 0
    heavy = torch.ones(2, 4, dtype=torch.bool)  # rank 0 owns 3 parts: 3 tasks from one camera
    assert pack_cameras(heavy, [0, 0, 0, 1], 2, max_batch_size=4, max_load=2) == 1  # never empty


def test_assign_owners_prefers_a_rendering_rank_and_balances():
    visible = torch.tensor([[1, 0], [1, 0], [0, 1], [0, 0]], dtype=torch.bool)
    assert assign_owners(visible, [0, 1], 2).tolist() == [0, 0, 1, 1]


def test_part_order_follows_camera_leaf_order():
    pts = torch.rand(200, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    tree = build_kdtree(pts, 3)
    parts = Parts.of(3, 4)
    for origin in ([-5.0, 0.5, 0.5], [5.0, 0.5, 0.5], [0.5, -5.0, 0.5], [0.3, 0.6, 0.4]):
        order = camera_leaf_order(tree, torch.tensor(origin, dtype=torch.float64))
        got = part_order(order, parts)
        # flattening the parts in that order gives the leaf order (parts are contiguous in it)
        part_of_leaf = parts.leaf_part()[order]
        runs = [int(p) for i, p in enumerate(part_of_leaf) if i == 0 or p != part_of_leaf[i - 1]]
        assert got == runs and len(runs) == len(parts)


def test_content_rect_is_the_tight_window():
    color, trans = torch.zeros(6, 8, 3), torch.ones(6, 8, 1)
    assert content_rect(color, trans) == (0, 0, 0, 0)
    color[2, 3, 1] = 0.5
    trans[4, 6, 0] = 0.9
    assert content_rect(color, trans) == (3, 2, 7, 5)  # (x0, y0, x1, y1)


def test_locality_order_covers_every_camera_once_and_keeps_neighbours_together():
    from landmark_plugin.core.schedule import locality_order

    g = torch.Generator().manual_seed(0)
    points = torch.rand(200, 3, generator=g, dtype=torch.float64) * 10
    lo, hi = torch.zeros(3, dtype=torch.float64), torch.full((3,), 10.0, dtype=torch.float64)
    order = locality_order(points, lo, hi, 8, torch.Generator().manual_seed(1))
    assert sorted(order) == list(range(200))
    step = lambda o: float((points[o[1:]] - points[o[:-1]]).norm(dim=1).mean())  # noqa: E731
    shuffled = torch.randperm(200, generator=g).tolist()
    assert step(order) < 0.6 * step(shuffled), "consecutive cameras look at nearby places"
    other = locality_order(points, lo, hi, 8, torch.Generator().manual_seed(2))
    assert other != order and sorted(other) == list(range(200)), "a new run order per epoch"
    runs = lambda o: sorted(tuple(sorted(o[i : i + 8])) for i in range(0, 200, 8))  # noqa: E731
    assert runs(other) == runs(order), "the runs themselves stay whole"
