"""kd-tree partition: ownership, tiling, balance, weighted medians, ranks, round trips."""

from __future__ import annotations

import math

import pytest
import torch

from landmark_plugin.core.partition import (
    KDTree,
    assign_leaves,
    build_kdtree,
    build_kdtree_with_leaves,
    leaf_counts,
    leaf_ranks,
    points_in_boxes,
    rank_subtrees,
    subtree_leaves,
)

VOLUME_RTOL = 1e-12
"""float64 box volumes: only rounding of sums differs."""


def _points(n: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    """Anisotropic cloud (a flat-ish city block) so widest-axis splits differ by level."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 3, generator=g, dtype=dtype) * torch.tensor([4.0, 2.0, 0.5], dtype=dtype)) - 1.0


@pytest.mark.parametrize("depth", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("axis_rule", ["widest", "xy"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_build_assign_tiling_balance(depth, axis_rule, dtype):
    points = _points(1001, depth, dtype)
    tree, built = build_kdtree_with_leaves(points, depth, axis_rule=axis_rule)
    leaves = assign_leaves(tree, points)
    assert tree.num_leaves == 2**depth
    assert torch.equal(built, leaves), "assign_leaves must reproduce the build"

    boxes = tree.leaf_boxes()
    inside = points_in_boxes(points, boxes)
    assert torch.equal(inside.sum(1), torch.ones(len(points), dtype=torch.long)), "one leaf per point"
    assert torch.equal(inside.float().argmax(1), leaves), "the owning leaf's box holds the point"

    # Tiling: volumes add up, boxes are disjoint, all inside bounds (so union = bounds).
    vol = (boxes[:, 1] - boxes[:, 0]).prod(-1)
    root_vol = (tree.bounds[1] - tree.bounds[0]).prod()
    assert (vol > 0).all()
    torch.testing.assert_close(vol.sum(), root_vol, rtol=VOLUME_RTOL, atol=0)
    assert (boxes[:, 0] >= tree.bounds[0]).all() and (boxes[:, 1] <= tree.bounds[1]).all()
    lo = torch.maximum(boxes[:, None, 0], boxes[None, :, 0])
    hi = torch.minimum(boxes[:, None, 1], boxes[None, :, 1])
    overlap = (hi - lo).clamp(min=0).prod(-1)
    assert (overlap - torch.diag(torch.diag(overlap))).max() == 0

    # Balanced to within one point per split: leaf counts differ by at most 1.
    counts = leaf_counts(leaves, tree.num_leaves)
    assert counts.sum() == len(points)
    assert counts.max() - counts.min() <= 1
    if axis_rule == "xy":
        assert tree.split_axis.tolist() == [lvl % 2 for lvl in range(depth) for _ in range(2**lvl)]


def test_left_gets_floor_half_at_every_node():
    points = _points(999, 5)
    tree, built = build_kdtree_with_leaves(points, 3)
    for level in range(3):
        # node of each point at this level = its leaf id shifted down to the level.
        node = built >> (3 - level)
        child = built >> (3 - level - 1)
        for m in range(2**level):
            n = int((node == m).sum())
            assert int((child == 2 * m).sum()) == n // 2


def test_weighted_median():
    """A heavy point pulls the split: left holds the light prefix up to half the weight."""
    x = torch.arange(10, dtype=torch.float32)
    points = torch.stack([x, torch.zeros(10), torch.zeros(10)], dim=1)
    weights = torch.ones(10)
    weights[8] = 20.0  # total 29: cumulative weight exceeds 14.5 first at x = 8
    bounds = torch.tensor([[-0.5, -1.0, -1.0], [9.5, 1.0, 1.0]], dtype=torch.float64)
    tree, built = build_kdtree_with_leaves(points, 1, bounds=bounds, weights=weights)
    assert tree.split_axis.tolist() == [0]
    assert tree.split_value.item() == 7.5
    assert built.tolist() == [0] * 8 + [1] * 2
    unit, _ = build_kdtree_with_leaves(points, 1, bounds=bounds)
    assert unit.split_value.item() == 4.5
    with pytest.raises(ValueError, match="non-negative"):
        build_kdtree(points, 1, weights=-weights)


def test_weighted_balance_random():
    points = _points(2000, 9)
    weights = torch.rand(2000, generator=torch.Generator().manual_seed(1)) * 3.0
    tree, built = build_kdtree_with_leaves(points, 3, weights=weights)
    assert torch.equal(built, assign_leaves(tree, points))
    per_leaf = torch.zeros(8, dtype=torch.float64).index_add_(0, built, weights.double())
    # Each split leaves at most one point's weight of imbalance (3 levels -> a few points).
    assert (per_leaf.max() - per_leaf.min()) < 4 * 3.0 * 3


def test_empty_nodes_and_ties():
    """Two points and depth 3: most nodes are empty and split at their box midpoint; ties
    go to one side, consistently with assign_leaves."""
    points = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    tree, built = build_kdtree_with_leaves(points, 3)
    assert torch.equal(built, assign_leaves(tree, points))
    boxes = tree.leaf_boxes()
    assert ((boxes[:, 1] - boxes[:, 0]) > 0).all()
    same = torch.zeros(50, 3)
    tree, built = build_kdtree_with_leaves(same, 2, bounds=torch.tensor([[-1.0] * 3, [1.0] * 3]))
    assert torch.equal(built, assign_leaves(tree, same))
    with pytest.raises(ValueError):
        build_kdtree(torch.zeros(0, 3), 2)
    empty_tree = build_kdtree(torch.zeros(0, 3), 2, bounds=torch.tensor([[0.0] * 3, [1.0] * 3]))
    assert empty_tree.leaf_boxes().shape == (4, 2, 3)


def test_outside_points_get_outer_leaves():
    points = _points(500, 2)
    tree = build_kdtree(points, 3)
    far = torch.tensor([[-100.0, 0.0, 0.0], [100.0, 50.0, -30.0], [0.0, 0.0, 1e6]])
    leaves = assign_leaves(tree, far)
    boxes = tree.leaf_boxes(expand_to=far * 2)  # grown past the points: half-open boxes
    inside = points_in_boxes(far, boxes)
    assert torch.equal(inside.float().argmax(1), leaves) and (inside.sum(1) == 1).all()


@pytest.mark.parametrize(
    "world_size, expected",
    [
        (1, [0] * 8),
        (2, [0, 0, 0, 0, 1, 1, 1, 1]),
        (4, [0, 0, 1, 1, 2, 2, 3, 3]),
        (3, [0, 0, 1, 1, 1, 2, 2, 2]),
        (8, list(range(8))),
    ],
)
def test_leaf_ranks(world_size, expected):
    assert leaf_ranks(8, world_size).tolist() == expected
    subtrees = rank_subtrees(3, world_size)
    covered = [leaf for nodes in subtrees for node in nodes for leaf in subtree_leaves(3, node)]
    assert covered == list(range(8)), "subtrees cover every leaf once, in order"
    for rank, nodes in enumerate(subtrees):
        assert sorted(leaf for node in nodes for leaf in subtree_leaves(3, node)) == [
            i for i, r in enumerate(expected) if r == rank
        ]
        if world_size & (world_size - 1) == 0:
            assert len(nodes) == 1, "a power-of-two world gives each rank one subtree"


def test_too_many_ranks():
    with pytest.raises(ValueError, match=r"depth 2 has 4 leaves.*5 ranks.*depth >= 3"):
        leaf_ranks(4, 5)


def test_dict_round_trip():
    tree = build_kdtree(_points(300, 4), 3)
    data = tree.to_dict()
    assert all(isinstance(v, (int, list)) for v in data.values())
    back = KDTree.from_dict(data)
    assert back.depth == tree.depth
    assert torch.equal(back.bounds, tree.bounds)
    assert torch.equal(back.split_axis, tree.split_axis)
    assert torch.equal(back.split_value, tree.split_value)
    with pytest.raises(ValueError):
        KDTree.from_dict({**data, "depth": 4})


def test_many_points_is_fast_and_balanced():
    """Vectorised build: 300k points, depth 8, well within a test budget on 2 cores."""
    points = torch.rand(300_000, 3, generator=torch.Generator().manual_seed(0))
    tree, built = build_kdtree_with_leaves(points, 8)
    counts = leaf_counts(built, 256)
    assert counts.max() - counts.min() <= 1 + 8  # float32 ties can shift a few points
    assert torch.equal(built, assign_leaves(tree, points))
    assert math.isclose(counts.float().mean().item(), 300_000 / 256)
