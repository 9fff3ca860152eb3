"""Exactness of the model-parallel layouts of landmark-grid (landmark_plugin/core/grid_parallel.py):
shard / merge round trips, sub-planes that sample like their block's plane, regulariser shares
that add up to the model's values (also where blocks or sub-planes do not divide evenly over the
ranks), and clear refusals of layouts that leave a rank without a share."""

from __future__ import annotations

import pytest
import torch

from landmark_plugin.core.grid_features import (
    MODES,
    average_seams,
    factors_l1,
    plane_tv,
    route_points,
    sample_block_features,
)
from landmark_plugin.core.grid_parallel import (
    XY_PLANE,
    FactorShard,
    GridLayout,
    channels_to_factor_major,
    check_layout,
    choose_split,
    even_counts,
    merge_factor,
    shard_factor,
    stitch_planes,
    subdivide_planes,
)

TOL_F64 = 1e-12  # float64 paths that differ only in rounding (block-local coordinates of sub-planes)


def _planes(blocks, rows=5, cols=7, channels=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    plane = torch.randn(blocks[0] * blocks[1], rows, cols, channels, generator=gen, dtype=torch.float64)
    return average_seams(plane, blocks, XY_PLANE)  # consistent seam copies, as the model keeps them


@pytest.mark.parametrize("blocks,split", [((1, 1), (2, 1)), ((1, 1), (2, 2)), ((2, 3), (3, 2)), ((2, 1), (1, 4))])
def test_sub_planes_stitch_back_and_sample_like_the_plane(blocks, split):
    plane = _planes(blocks, rows=1 + 4 * split[1], cols=1 + 3 * split[0])
    fine = subdivide_planes(plane, blocks, split)
    fine_blocks = (blocks[0] * split[0], blocks[1] * split[1])
    assert fine.shape[0] == fine_blocks[0] * fine_blocks[1]
    assert torch.equal(stitch_planes(fine, blocks, split), plane)
    # sampled as blocks of their own (fine routing, one shared line) they give the plane's features
    gen = torch.Generator().manual_seed(3)
    unit = torch.rand(3000, 3, generator=gen, dtype=torch.float64)
    seams = torch.rand(200, 3, generator=gen, dtype=torch.float64)  # points exactly on sub-plane seams
    seams[:100, 0] = torch.randint(0, fine_blocks[0] + 1, (100,), generator=gen) / fine_blocks[0]
    seams[100:, 1] = torch.randint(0, fine_blocks[1] + 1, (100,), generator=gen) / fine_blocks[1]
    unit = torch.cat([unit, seams])
    line = torch.randn(1, 4, 3, generator=gen, dtype=torch.float64)
    coarse = sample_block_features([plane], [line], *reversed(route_points(unit, blocks)), MODES["xy-z"])
    finer = sample_block_features([fine], [line], *reversed(route_points(unit, fine_blocks)), MODES["xy-z"])
    torch.testing.assert_close(finer, coarse, rtol=0, atol=TOL_F64)


@pytest.mark.parametrize(
    "layout",
    [
        GridLayout("branch", (2, 2), 2),
        GridLayout("branch", (3, 2), 6),
        GridLayout("plane", (2, 1), 4, (2, 2)),
        GridLayout("plane", (1, 1), 2, (1, 2)),
        GridLayout("channel", (2, 2), 3),
        GridLayout("channel", (2, 2), 4),  # uneven: 2, 2, 1, 1 of the 6 channels
        GridLayout("branch", (2, 2), 3),  # uneven: 2, 1, 1 blocks
        GridLayout("plane", (2, 1), 3, (1, 2)),  # uneven: 2, 1, 1 sub-planes
        GridLayout("plane", (1, 1), 3, (4, 2)),  # uneven: 3, 3, 2 sub-planes
    ],
)
def test_shards_merge_back_and_partition_the_model(layout):
    plane = _planes(layout.blocks, rows=9, cols=9, channels=6)
    pieces = [shard_factor(plane, "plane", layout, r) for r in range(layout.parts)]
    assert torch.equal(merge_factor(pieces, "plane", layout), plane)
    if layout.strategy == "channel":
        assert [p.shape[-1] for p in pieces] == even_counts(6, layout.parts)
        assert all(p.shape[:3] == plane.shape[:3] for p in pieces)
    else:
        counts = [p.shape[0] for p in pieces]
        assert sum(counts) == layout.num_fine_blocks and max(counts) - min(counts) <= 1 and min(counts) >= 1
        assert counts == sorted(counts, reverse=True) == layout.block_counts()
        owner = layout.block_owner()
        assert torch.equal(torch.bincount(owner, minlength=layout.parts), torch.tensor(counts))
        assert torch.equal(owner, torch.sort(owner).values), "every rank holds a run of consecutive fine blocks"
    if layout.strategy != "plane":  # lines: blocks or channels like the planes
        line = torch.randn(layout.blocks[0] * layout.blocks[1], 5, 6, dtype=torch.float64)
        lines = [shard_factor(line, "line", layout, r) for r in range(layout.parts)]
        assert torch.equal(merge_factor(lines, "line", layout), line)


@pytest.mark.parametrize(
    "layout,shared",
    [
        (GridLayout("branch", (2, 2), 4), False),
        (GridLayout("branch", (2, 2), 2), True),
        (GridLayout("plane", (2, 1), 4, (2, 2)), True),
        (GridLayout("plane", (1, 1), 3, (3, 1)), True),
        (GridLayout("plane", (2, 2), 3, (1, 2)), True),  # 3, 3, 2 sub-planes
        (GridLayout("plane", (1, 1), 3, (2, 2)), True),  # 2, 1, 1 sub-planes
        (GridLayout("branch", (2, 2), 3), False),  # 2, 1, 1 blocks, lines per block
        (GridLayout("channel", (2, 2), 2), False),
        (GridLayout("channel", (1, 2), 2), True),
        (GridLayout("channel", (2, 2), 3), False),  # 2, 1, 1 of the 4 channels
    ],
)
def test_regulariser_shares_add_up_to_the_model(layout, shared):
    planes = [_planes(layout.blocks, rows=7, cols=7, channels=4, seed=s) for s in range(2)]
    gen = torch.Generator().manual_seed(9)
    line_blocks = 1 if shared else layout.blocks[0] * layout.blocks[1]
    lines = [torch.randn(line_blocks, 5, 4, generator=gen, dtype=torch.float64) for _ in range(2)]
    tv_total, l1_total = 0.0, 0.0
    for rank in range(layout.parts):
        share = FactorShard(layout, rank, replicated_lines=shared and layout.strategy != "channel", channels=4)
        mine = [shard_factor(p, "plane", layout, rank) for p in planes]
        my_lines = lines if share.replicated_lines else [shard_factor(l, "line", layout, rank) for l in lines]
        tv_total += sum(share.plane_tv(p) for p in mine) / len(mine)
        l1_total += share.l1(mine, my_lines)
    torch.testing.assert_close(tv_total, sum(plane_tv(p) for p in planes) / 2, rtol=0, atol=TOL_F64)
    torch.testing.assert_close(l1_total, factors_l1([*planes, *lines]), rtol=0, atol=TOL_F64)


@pytest.mark.parametrize("parts", [2, 3])
def test_channels_gathered_by_rank_are_reordered_factor_by_factor(parts):
    full = torch.arange(2 * 12, dtype=torch.float64).view(2, 12)  # 2 points, 3 factors x 4 channels
    layout = GridLayout("channel", (1, 1), parts)  # 3 ranks: 2, 1 and 1 channels of every factor
    per_rank = [torch.cat([f[:, slice(*layout.channel_range(4, r))] for f in full.split(4, dim=1)], 1) for r in range(parts)]
    assert torch.equal(channels_to_factor_major(per_rank, 3), full)  # per rank [N, F * c_r], as all_gather_cat delivers


def test_layouts_that_leave_a_rank_empty_are_refused_with_the_reason():
    check_layout("branch", (2, 2), 3)  # uneven (2, 1, 1 blocks) is fine
    with pytest.raises(ValueError, match=r"only 2x2 = 4 blocks, fewer than the ranks"):
        check_layout("branch", (2, 2), 5)
    check_layout("channel", (2, 2), 4, channels=[8, 6])  # uneven (2, 2, 1, 1 of 6) is fine
    with pytest.raises(ValueError, match=r"components \[3\] are fewer than the ranks"):
        check_layout("channel", (2, 2), 4, channels=[8, 3])
    with pytest.raises(ValueError, match="model-parallel size must be 1"):
        check_layout("none", (2, 2), 2)
    with pytest.raises(ValueError, match="shared z line"):
        check_layout("plane", (2, 2), 2, shared_lines=False)
    with pytest.raises(ValueError, match="cut into at most 2 sub-planes of whole cells over the 1x1 blocks, fewer than"):
        choose_split(3, (1, 1), [(4, 1), (2, 3)])


def test_split_is_even_where_the_cells_allow_else_as_even_as_they_allow():
    assert choose_split(4, (1, 1), [(8, 8), (4, 2)]) == (2, 2)  # square sub-planes where every plane divides
    assert choose_split(4, (1, 1), [(8, 8), (4, 1)]) == (4, 1)  # ... else the split that divides them all
    assert choose_split(2, (2, 2), [(8, 8)]) == (1, 2)  # every block over every rank, as before
    # 3 ranks, cells that do not divide by 3: the fewest texels on the largest rank (seams counted):
    # 4x2 sub-planes of 2x2 cells, 3, 3 and 2 of them (27 texels; 2x2 sub-planes: 2, 1, 1 of 15)
    assert choose_split(3, (1, 1), [(8, 4)]) == (4, 2)
    assert GridLayout("plane", (1, 1), 3, (4, 2)).block_counts() == [3, 3, 2]
    assert choose_split(4, (2, 2), [(6, 3)]) == (1, 1)  # no 4-way cut of (6, 3) cells, but 4 blocks


@pytest.mark.parametrize(
    "layout",
    [
        GridLayout("branch", (2, 2), 2),
        GridLayout("plane", (1, 1), 4, (2, 2)),
        GridLayout("channel", (2, 1), 2),
        GridLayout("branch", (2, 2), 3),
        GridLayout("plane", (2, 1), 3, (1, 2)),
    ],
)
def test_checkpoint_shards_and_adam_moments_round_trip(layout):
    """shard_grid_state (resume on another layout) then merge_grid_shards (landmark-merge) gives the
    checkpoint back: factors and their Adam moments cut and joined alike, the rest replicated."""
    from landmark_plugin.grid.sharded_state import merge_grid_shards, shard_grid_state

    plane = _planes(layout.blocks, rows=9, cols=9, channels=4)
    line = torch.randn(1 if layout.strategy == "plane" else layout.blocks[0] * layout.blocks[1], 5, 4, dtype=torch.float64)
    keys = {"_model.field.density.planes.0": "plane"}
    if layout.strategy != "plane":  # a shared line under plane parallelism stays replicated
        keys["_model.field.density.lines.0"] = "line"
    pipeline = {"_model.field.density.planes.0": plane, "_model.field.density.lines.0": line,
                "_model.field.decoder.weight": torch.randn(3, 2, dtype=torch.float64)}
    names = {"grids": ["_model.field.density.planes.0", "_model.field.density.lines.0"], "decoder": ["_model.field.decoder.weight"]}
    moments = lambda t: {"step": torch.tensor(3.0), "exp_avg": t * 0.5, "exp_avg_sq": t.square()}  # noqa: E731
    optimizers = {
        "grids": {"state": {0: moments(plane), 1: moments(line)}, "param_groups": [{"params": [0, 1]}]},
        "decoder": {"state": {0: moments(pipeline["_model.field.decoder.weight"])}, "param_groups": [{"params": [0]}]},
    }
    merged = {"step": 3, "pipeline": pipeline, "optimizers": optimizers, "resume": {"format": 1}}
    shards = [shard_grid_state(merged, layout, r, keys, names) for r in range(layout.parts)]
    assert shards[0]["pipeline"]["_model.field.density.planes.0"].numel() < plane.numel()
    back = merge_grid_shards(shards)
    assert back["step"] == 3 and back["resume"] == {"format": 1}
    for key, value in pipeline.items():
        assert torch.equal(back["pipeline"][key], value), key
    for group, opt in optimizers.items():
        for index, state in opt["state"].items():
            for kind, value in state.items():
                assert torch.equal(back["optimizers"][group]["state"][index][kind], value), (group, index, kind)
