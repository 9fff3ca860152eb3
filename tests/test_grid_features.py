"""Exactness of the multi-branch grid core (landmark_plugin/core/grid_features.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from landmark_plugin.core.grid_features import (
    MODES,
    average_seams,
    resample_factor,
    route_points,
    sample_block_features,
    sample_lines,
    sample_planes,
    seam_mismatch,
    tie_seams,
)

# float32 gather vs grid_sample: both interpolate the same 4 texels and differ only in the
# summation order, i.e. by float32 rounding: 1e-6 absolute, plus 1e-6 relative because the
# products of two N(0, 1) factors reach ~10 where one ulp is ~1e-6.
TOL_F32 = 1e-6
RTOL_F32 = 1e-6
# float64 paths that must agree up to rounding
TOL_F64 = 1e-12

BLOCKS = [(1, 1), (2, 1), (1, 3), (3, 2)]


def _random_factors(blocks, mode, shape=(5, 7, 4), channels=3, shared_line=False, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    num_blocks = blocks[0] * blocks[1]
    planes, lines = [], []
    for k, (u, v, w) in enumerate(MODES[mode]):
        rows, cols, size = shape[v], shape[u], shape[w]
        planes.append(torch.randn(num_blocks, rows, cols, channels, generator=gen, dtype=dtype))
        lines.append(torch.randn(1 if shared_line else num_blocks, size, channels, generator=gen, dtype=dtype))
    return planes, lines


def _consistent(planes, lines, blocks, mode):
    axes = MODES[mode]
    planes = [average_seams(p, blocks, (v, u)) for p, (u, v, _) in zip(planes, axes)]
    lines = [average_seams(l, blocks, (w,)) for l, (_, _, w) in zip(lines, axes)]
    return planes, lines


@pytest.mark.parametrize("blocks", BLOCKS)
def test_routing_every_point_in_exactly_one_block(blocks):
    gen = torch.Generator().manual_seed(1)
    unit = torch.rand(4000, 3, generator=gen)
    # add points exactly on the seams and on the box faces
    seams = torch.rand(200, 3, generator=gen)
    seams[:100, 0] = torch.randint(0, blocks[0] + 1, (100,), generator=gen) / blocks[0]
    seams[100:, 1] = torch.randint(0, blocks[1] + 1, (100,), generator=gen) / blocks[1]
    unit = torch.cat([unit, seams, torch.zeros(1, 3), torch.ones(1, 3)])
    block_index, local = route_points(unit, blocks)
    assert block_index.dtype == torch.long and block_index.shape == (unit.shape[0],)
    assert block_index.min() >= 0 and block_index.max() < blocks[0] * blocks[1]
    assert local.min() >= -1 and local.max() <= 1
    # the block's box contains the point, and (block, local) maps back to the point
    ix, iy = block_index // blocks[1], block_index % blocks[1]
    back_x = (ix + (local[:, 0] + 1) / 2) / blocks[0]
    back_y = (iy + (local[:, 1] + 1) / 2) / blocks[1]
    back = torch.stack([back_x, back_y, (local[:, 2] + 1) / 2], -1)
    torch.testing.assert_close(back, unit, atol=1e-6, rtol=0)
    # exactly one block: membership in the half-open cells [i, i+1) (last cell closed)
    for b in range(blocks[0] * blocks[1]):
        bx, by = b // blocks[1], b % blocks[1]
        in_x = (unit[:, 0] * blocks[0] >= bx) & ((unit[:, 0] * blocks[0] < bx + 1) | (bx == blocks[0] - 1))
        in_y = (unit[:, 1] * blocks[1] >= by) & ((unit[:, 1] * blocks[1] < by + 1) | (by == blocks[1] - 1))
        assert torch.equal(in_x & in_y, block_index == b)


def _loop_reference(planes, lines, points, block_index, axes):
    """Block by block with torch's grid_sample: an independent implementation."""
    out = torch.zeros(points.shape[0], sum(p.shape[-1] for p in planes), dtype=points.dtype)
    for b in range(planes[0].shape[0]):
        mask = block_index == b
        if not mask.any():
            continue
        pts = points[mask]
        feats = []
        for plane, line, (u, v, w) in zip(planes, lines, axes):
            grid = torch.stack([pts[:, u], pts[:, v]], -1)[None, :, None]  # [1, n, 1, 2]
            pf = F.grid_sample(plane[b].permute(2, 0, 1)[None], grid, align_corners=True)[0, :, :, 0].T
            lb = line[0 if line.shape[0] == 1 else b]
            lgrid = torch.stack([torch.zeros_like(pts[:, w]), pts[:, w]], -1)[None, :, None]
            lf = F.grid_sample(lb.permute(1, 0)[None, :, :, None], lgrid, align_corners=True)[0, :, :, 0].T
            feats.append(pf * lf)
        out[mask] = torch.cat(feats, -1)
    return out


@pytest.mark.parametrize("blocks", BLOCKS)
@pytest.mark.parametrize("mode", ["xy-z", "vm"])
@pytest.mark.parametrize("shared_line", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batched_sampling_equals_block_loop(blocks, mode, shared_line, dtype):
    planes, lines = _random_factors(blocks, mode, shared_line=shared_line, dtype=dtype)
    gen = torch.Generator().manual_seed(2)
    block_index, local = route_points(torch.rand(3000, 3, generator=gen, dtype=dtype), blocks)
    batched = sample_block_features(planes, lines, local, block_index, MODES[mode])
    reference = _loop_reference(planes, lines, local, block_index, MODES[mode])
    assert batched.shape == (3000, 3 * len(MODES[mode]))
    if dtype == torch.float64:
        torch.testing.assert_close(batched, reference, atol=TOL_F64, rtol=0)
    else:
        torch.testing.assert_close(batched, reference, atol=TOL_F32, rtol=RTOL_F32)


@pytest.mark.parametrize("blocks", [(2, 1), (1, 2), (3, 2), (3, 3)])
@pytest.mark.parametrize("mode", ["xy-z", "vm"])
def test_seam_points_give_same_plane_features_from_both_blocks(blocks, mode):
    planes, lines = _consistent(*_random_factors(blocks, mode, seed=3), blocks, mode)
    gen = torch.Generator().manual_seed(4)
    n = 500
    for axis in (0, 1):
        if blocks[axis] == 1:
            continue
        # a point on the seam between block i and i+1 along `axis`, seen from both sides
        low_cell = torch.randint(0, blocks[axis] - 1, (n,), generator=gen)
        other_cell = torch.randint(0, blocks[1 - axis], (n,), generator=gen)
        local = torch.rand(n, 3, generator=gen) * 2 - 1
        # include seam corners: sometimes put the other coordinate on a seam too
        local[: n // 4, 1 - axis] = torch.where(torch.rand(n // 4, generator=gen) < 0.5, -1.0, 1.0)
        cells_low = [None, None]
        cells_low[axis], cells_low[1 - axis] = low_cell, other_cell
        cells_high = list(cells_low)
        cells_high[axis] = low_cell + 1
        local_low, local_high = local.clone(), local.clone()
        local_low[:, axis], local_high[:, axis] = 1.0, -1.0
        b_low = cells_low[0] * blocks[1] + cells_low[1]
        b_high = cells_high[0] * blocks[1] + cells_high[1]
        for plane, (u, v, _) in zip(planes, MODES[mode]):
            if axis not in (u, v):
                continue  # this plane is not cut by this seam
            f_low = sample_planes(plane, b_low, local_low[:, u], local_low[:, v])
            f_high = sample_planes(plane, b_high, local_high[:, u], local_high[:, v])
            torch.testing.assert_close(f_low, f_high, atol=TOL_F32, rtol=0)
        for line, (_, _, w) in zip(lines, MODES[mode]):
            if w == axis:  # lines along a split axis are cut by the seam as well
                f_low = sample_lines(line, b_low, local_low[:, w])
                f_high = sample_lines(line, b_high, local_high[:, w])
                torch.testing.assert_close(f_low, f_high, atol=TOL_F32, rtol=0)


def test_seam_points_give_same_full_features_with_a_shared_line():
    blocks, mode = (3, 2), "xy-z"
    planes, lines = _consistent(*_random_factors(blocks, mode, shared_line=True, seed=5), blocks, mode)
    local = torch.rand(300, 3) * 2 - 1
    low, high = local.clone(), local.clone()
    low[:, 0], high[:, 0] = 1.0, -1.0
    cell_y = torch.randint(0, 2, (300,))
    f_low = sample_block_features(planes, lines, low, 0 * 2 + cell_y, MODES[mode])
    f_high = sample_block_features(planes, lines, high, 1 * 2 + cell_y, MODES[mode])
    torch.testing.assert_close(f_low, f_high, atol=TOL_F32, rtol=0)


@pytest.mark.parametrize("blocks", [(2, 2), (3, 1), (2, 3)])
@pytest.mark.parametrize("mode", ["xy-z", "vm"])
def test_tied_block_gradient_equals_gradient_of_one_global_grid(blocks, mode):
    """Duplicated seam texels with tie_seams on the gradient == one stitched grid, cut into blocks.

    A factor is stitched along the split axes it spans (one global plane over those axes); along
    split axes it does not span, every block row keeps its own factor, as in the model.
    """
    cells = (4, 3, 5)  # per block, along x, y, z
    channels = 2
    axes = MODES[mode]
    num_blocks = blocks[0] * blocks[1]
    gen = torch.Generator().manual_seed(6)

    def global_shape(spatial_axes):
        lead = [1 if a in spatial_axes else blocks[a] for a in (0, 1)]
        size = [cells[a] * (blocks[a] if a in (0, 1) else 1) + 1 for a in spatial_axes]
        return (*lead, *size, channels)

    def cut(tensor, spatial_axes, b):
        cell = (b // blocks[1], b % blocks[1])
        tensor = tensor[tuple(0 if a in spatial_axes else cell[a] for a in (0, 1))]
        for dim, axis in enumerate(spatial_axes):
            if axis in (0, 1):
                tensor = tensor.narrow(dim, cell[axis] * cells[axis], cells[axis] + 1)
        return tensor

    spatial = [(v, u) for u, v, _ in axes] + [(w,) for _, _, w in axes]
    globals_ = [
        torch.randn(global_shape(s), generator=gen, dtype=torch.float64).requires_grad_() for s in spatial
    ]

    def blockify(tensors):
        return [torch.stack([cut(t, s, b) for b in range(num_blocks)]) for t, s in zip(tensors, spatial)]

    block_index, local = route_points(torch.rand(2000, 3, generator=gen, dtype=torch.float64), blocks)
    weights = torch.randn(2000, channels * len(axes), generator=gen, dtype=torch.float64)

    def loss(factors):
        k = len(axes)
        return (sample_block_features(factors[:k], factors[k:], local, block_index, axes) * weights).sum()

    # stitched path: gradient w.r.t. the global grids, then cut into blocks
    loss(blockify(globals_)).backward()
    expected = blockify([g.grad for g in globals_])
    # block path: independent leaves with duplicated seams, gradient tied afterwards
    leaves = [t.detach().clone().requires_grad_() for t in blockify(globals_)]
    loss(leaves).backward()
    for leaf, e, s in zip(leaves, expected, spatial):
        torch.testing.assert_close(tie_seams(leaf.grad, blocks, s), e, atol=TOL_F64, rtol=0)


def test_average_seams_is_a_projection():
    blocks = (3, 2)
    x = torch.randn(6, 5, 4, 3, dtype=torch.float64)
    assert seam_mismatch(x, blocks, (1, 0)) > 0
    y = average_seams(x, blocks, (1, 0))
    assert seam_mismatch(y, blocks, (1, 0)) == 0
    torch.testing.assert_close(average_seams(y, blocks, (1, 0)), y, atol=TOL_F64, rtol=0)
    # interior texels are untouched
    torch.testing.assert_close(y[:, 1:-1, 1:-1], x[:, 1:-1, 1:-1], atol=0, rtol=0)


@pytest.mark.parametrize("mode", ["xy-z", "vm"])
def test_integer_upsampling_keeps_the_function(mode):
    blocks = (2, 3)
    planes, lines = _consistent(*_random_factors(blocks, mode, seed=7), blocks, mode)
    block_index, local = route_points(torch.rand(5000, 3), blocks)
    before = sample_block_features(planes, lines, local, block_index, MODES[mode])
    for factor in (2, 3):
        up_planes = [resample_factor(p, [(s - 1) * factor + 1 for s in p.shape[1:3]]) for p in planes]
        up_lines = [resample_factor(l, [(l.shape[1] - 1) * factor + 1]) for l in lines]
        after = sample_block_features(up_planes, up_lines, local, block_index, MODES[mode])
        assert (after - before).abs().max() <= 1e-5  # spec: <= 1e-3; exact up to float32 rounding
        for p, (u, v, _) in zip(up_planes, MODES[mode]):
            assert seam_mismatch(p, blocks, (v, u)) == 0


def test_clamped_coordinates_pass_no_gradient_on_the_bounds():
    """The twin's rule for d features / d coordinates at the clamp bounds is explicit (zero on
    and beyond the bounds), whatever clamp's backward does in this torch version."""
    from landmark_plugin.core.grid_features import _linear_taps

    coord = torch.tensor([-1.5, -1.0, -0.2, 1.0, 1.5], requires_grad=True)
    _, weight = _linear_taps(coord, 5)
    (grad,) = torch.autograd.grad(weight.sum(), coord)
    assert grad.tolist() == [0.0, 0.0, 2.0, 0.0, 0.0]


@pytest.mark.parametrize("limit", [1, 40, 700])
def test_resample_in_pieces_equals_one_call(monkeypatch, limit):
    """Grids past interpolate's INT_MAX-element limit resample in pieces of blocks and channels;
    the pieces give the one-call result exactly (each block and channel resamples alone)."""
    import landmark_plugin.core.grid_features as grid_features

    gen = torch.Generator().manual_seed(0)
    plane, line = torch.randn(5, 4, 6, 7, generator=gen), torch.randn(5, 6, 7, generator=gen)
    whole = {"plane": resample_factor(plane, [7, 11]), "line": resample_factor(line, [11])}
    monkeypatch.setattr(grid_features, "INTERPOLATE_MAX_ELEMENTS", limit)
    torch.testing.assert_close(resample_factor(plane, [7, 11]), whole["plane"], atol=0, rtol=0)
    torch.testing.assert_close(resample_factor(line, [11]), whole["line"], atol=0, rtol=0)
