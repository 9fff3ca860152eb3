"""Multi-branch plane x line features: the functional core of landmark-grid.

The scene box is cut into a uniform x-y grid of ``bx * by`` blocks (branches).  Block
``b = ix * by + iy`` covers ``[ix, ix + 1] / bx`` of the box in x and ``[iy, iy + 1] / by`` in
y (unit-cube coordinates) and the whole box in z.  Each block owns VM factors: a *factor* is a
feature plane over two world axes (u, v) times a feature line over a third axis, e.g. the x-y
plane times the z line for aerial scenes.  Storage keeps blocks as the leading dimension so the
parallel strategies can shard them without reshaping:

    plane: [B, Rv, Ru, C]   texels of the block-local plane, channels last
    line:  [B, Rl, C]       (or [1, Rl, C]: one line shared by every block)

Channels are last so a point's C values are one contiguous row: sampling is one
``index_select`` of 4 (plane) or 2 (line) rows per point over the flattened [B*Rv*Ru, C] view,
for all blocks at once, with exact integer block routing (no float "block coordinate" that
could leak weight into a neighbouring block, as a 3-D grid_sample over stacked blocks would).

Texel placement (align_corners): block-local coordinate -1 is the centre of texel 0 and +1 the
centre of texel R-1, so every block grid includes its seam texels.

Seam scheme.  The seam between blocks ix and ix+1 is stored twice: as texel R-1 along x of
block ix and as texel 0 of block ix+1 (likewise in y; a corner texel up to four times).  On the
seam, bilinear interpolation reads only that texel row, so both blocks return the same plane
features exactly when the two copies are equal.  The copies are kept equal by treating them as
one tied parameter: ``tie_seams`` sums the gradients of all copies and gives every copy the
sum (that is the gradient of the single shared value), initial values are made equal with
``average_seams``, and upsampling with align_corners maps border texels onto border texels.
Equal values, equal gradients and the element-wise optimiser updates (Adam, with equal moment
states) keep the copies bit-identical.  Duplicating the seam (rather than reading a neighbour's
texel) keeps each block self-contained, which is what sharding blocks over ranks needs; a
sharded run only has to exchange the seam rows of the gradient.

Lines along z are not split by blocks, so per-block z lines have no seams; a point on an x-y
seam therefore gets the same *plane* features from both blocks, and the same full features
when the line is shared (``[1, Rl, C]``).

On CUDA, ``block_features`` samples with the fused kernel of csrc/ (all blocks and factors in
one launch, ``landmark_plugin.cuda_grid.sample_block_features``); ``sample_block_features`` here is
its torch twin and the reference.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

FactorAxes = Tuple[int, int, int]
"""World axes (u, v, line) of one factor: plane over axes u (texel columns) and v (rows)
times the line over the third axis.  0 = x, 1 = y, 2 = z."""

MODES = {
    "xy-z": ((0, 1, 2),),
    "vm": ((0, 1, 2), (0, 2, 1), (1, 2, 0)),
}
"""Named factorisations.  ``xy-z``: the ground plane times the height line (city scenes, as in
LandMark); ``vm``: TensoRF's three plane/line pairs (objects)."""


def route_points(
    unit_positions: Float[Tensor, "N 3"], blocks: Tuple[int, int]
) -> Tuple[Int[Tensor, " N"], Float[Tensor, "N 3"]]:
    """Block index and block-local coordinates of points.

    Args:
        unit_positions: [N, 3] positions in the unit cube of the scene box (clamped to [0, 1]).
        blocks: (bx, by) blocks along x and y.

    Returns:
        block_index: [N] int64 in [0, bx*by), ``ix * by + iy``.
        local: [N, 3] block-local coordinates in [-1, 1] (z spans the whole box).

    A point exactly on an inner seam goes to the block on its high side (local -1); points on
    the box's far faces stay in the last block (local +1).
    """
    p = unit_positions.clamp(0.0, 1.0)
    scale = p.new_tensor([blocks[0], blocks[1]])
    scaled = p[:, :2] * scale
    cell = torch.minimum(scaled.floor(), scale - 1)
    local_xy = (scaled - cell) * 2.0 - 1.0
    ix, iy = cell.long().unbind(-1)
    local = torch.cat([local_xy, p[:, 2:] * 2.0 - 1.0], dim=-1)
    return ix * blocks[1] + iy, local


def _linear_taps(coord: Float[Tensor, " N"], size: int) -> Tuple[Int[Tensor, " N"], Float[Tensor, " N"]]:
    """Lower texel index and the upper texel's weight for linear interpolation (align_corners)."""
    raw = (coord + 1.0) * 0.5 * (size - 1)
    # Clamped coordinates pass no gradient, on the bounds included.  Spelled out rather than left
    # to clamp's backward, whose value exactly on a bound differs across torch versions and
    # devices (0 on CPU torch 2.14; the fused kernel in csrc/ follows this rule).
    inside = (raw > 0.0) & (raw < size - 1)
    x = torch.where(inside, raw, raw.detach().clamp(0.0, size - 1))
    # the last cell is [size-2, size-1]: a point on the far border uses weight 1 on texel size-1
    i0 = x.floor().clamp(max=size - 2)
    return i0.long(), x - i0


def sample_planes(
    plane: Float[Tensor, "B Rv Ru C"],
    block_index: Int[Tensor, " N"],
    u: Float[Tensor, " N"],
    v: Float[Tensor, " N"],
) -> Float[Tensor, "N C"]:
    """Bilinear plane features of N points, each in its own block, in one gather.

    Args:
        plane: [B, Rv, Ru, C] block planes, Ru, Rv >= 2.
        block_index: [N] block of each point.
        u, v: [N] block-local coordinates in [-1, 1] along the plane's columns and rows.
    """
    num_blocks, rows, cols, channels = plane.shape
    iu, wu = _linear_taps(u, cols)
    iv, wv = _linear_taps(v, rows)
    base = (block_index * rows + iv) * cols + iu
    index = torch.stack([base, base + 1, base + cols, base + cols + 1])  # [4, N]
    weight = torch.stack([(1 - wu) * (1 - wv), wu * (1 - wv), (1 - wu) * wv, wu * wv])  # [4, N]
    taps = plane.reshape(num_blocks * rows * cols, channels).index_select(0, index.reshape(-1))
    return (taps.view(4, -1, channels) * weight[..., None].to(taps.dtype)).sum(0)


def sample_lines(
    line: Float[Tensor, "Bl Rl C"], block_index: Int[Tensor, " N"], w: Float[Tensor, " N"]
) -> Float[Tensor, "N C"]:
    """Linear line features of N points; a line with Bl == 1 is shared by all blocks.

    Args:
        line: [Bl, Rl, C] block lines (Bl = B) or one shared line (Bl = 1), Rl >= 2.
        block_index: [N] block of each point.
        w: [N] block-local coordinate in [-1, 1] along the line.
    """
    num_lines, size, channels = line.shape
    iw, ww = _linear_taps(w, size)
    base = iw if num_lines == 1 else block_index * size + iw
    index = torch.stack([base, base + 1])  # [2, N]
    weight = torch.stack([1 - ww, ww])  # [2, N]
    taps = line.reshape(num_lines * size, channels).index_select(0, index.reshape(-1))
    return (taps.view(2, -1, channels) * weight[..., None].to(taps.dtype)).sum(0)


def sample_block_features(
    planes: Sequence[Float[Tensor, "B Rv Ru C"]],
    lines: Sequence[Float[Tensor, "Bl Rl C"]],
    points: Float[Tensor, "N 3"],
    block_index: Int[Tensor, " N"],
    axes: Sequence[FactorAxes],
) -> Float[Tensor, "N F"]:
    """Plane x line features of points in block-local coordinates, all blocks in one pass.

    Args:
        planes: per factor k, [B, Rv_k, Ru_k, C_k] block planes.
        lines: per factor k, [B or 1, Rl_k, C_k] block lines (or one shared line).
        points: [N, 3] block-local coordinates in [-1, 1] (from ``route_points``).
        block_index: [N] block of each point.
        axes: per factor k, the world axes (u, v, line) of plane k and line k.

    Returns:
        [N, sum_k C_k]: factor k's channels are plane_k(u, v) * line_k(w), in factor order.
    """
    features = []
    for plane, line, (u_axis, v_axis, w_axis) in zip(planes, lines, axes):
        plane_features = sample_planes(plane, block_index, points[:, u_axis], points[:, v_axis])
        features.append(plane_features * sample_lines(line, block_index, points[:, w_axis]))
    return torch.cat(features, dim=-1)


FEATURE_BACKENDS = ("auto", "cuda", "torch")
"""Who computes ``block_features``: see there."""


def block_features(
    planes: Sequence[Float[Tensor, "B Rv Ru C"]],
    lines: Sequence[Float[Tensor, "Bl Rl C"]],
    points: Float[Tensor, "N 3"],
    block_index: Int[Tensor, " N"],
    axes: Sequence[FactorAxes],
    backend: str = "auto",
) -> Float[Tensor, "N F"]:
    """``sample_block_features`` on the fused CUDA kernel where it applies, else on the twin.

    Args:
        planes, lines, points, block_index, axes: as ``sample_block_features``.
        backend: ``auto``: the kernel (``landmark_plugin.cuda_grid.sample_block_features``) for CUDA
            inputs it takes (float32, one channel count), the twin otherwise, also when the kernel
            cannot be built (warned once) and under ``torch.use_deterministic_algorithms`` (the
            kernel's gradient atomics sum in no fixed order); ``cuda``: the kernel or an error;
            ``torch``: the twin.
    """
    if backend not in FEATURE_BACKENDS:
        raise ValueError(f"backend must be one of {FEATURE_BACKENDS}, got {backend!r}")
    if backend == "cuda":
        from landmark_plugin import cuda_grid

        return cuda_grid.sample_block_features(planes, lines, points, block_index, axes)
    if backend == "auto" and points.is_cuda and not torch.are_deterministic_algorithms_enabled():
        from landmark_plugin import cuda, cuda_grid

        supported = cuda_grid.block_features_unsupported(planes, lines, points, block_index, axes) is None
        if supported and cuda.require(allow_fallback=True) is not None:
            return cuda_grid.sample_block_features(planes, lines, points, block_index, axes)
    return sample_block_features(planes, lines, points, block_index, axes)


def _split_axes(spatial_axes: Sequence[Optional[int]], blocks: Tuple[int, int]):
    """(dimension of the [bx, by, *spatial, C] view, blocks along it) for each split world axis."""
    for dim, axis in enumerate(spatial_axes):
        if axis in (0, 1) and blocks[axis] > 1:
            yield 2 + dim, axis


def tie_seams(
    values: Float[Tensor, "B *spatial C"], blocks: Tuple[int, int], spatial_axes: Sequence[Optional[int]]
) -> Float[Tensor, "B *spatial C"]:
    """Every copy of a seam texel replaced by the sum over its copies (out of place).

    Applied to gradients, this is the gradient of one shared seam value (see the module doc).

    Args:
        values: [B, *spatial, C] block factor (plane [B, Rv, Ru, C] or line [B, Rl, C]).
        blocks: (bx, by), B = bx * by.
        spatial_axes: world axis of each spatial dimension (e.g. (v_axis, u_axis) for a plane).
    """
    if values.shape[0] == 1 and blocks[0] * blocks[1] != 1:  # a shared line has no copies
        return values
    out = values.reshape(blocks[0], blocks[1], *values.shape[1:]).clone()
    # ties along x, then along y: a corner texel ends with the sum of its four copies
    for dim, axis in _split_axes(spatial_axes, blocks):
        low = out.narrow(axis, 0, blocks[axis] - 1).select(dim, -1)
        high = out.narrow(axis, 1, blocks[axis] - 1).select(dim, 0)
        total = low + high
        low.copy_(total)
        high.copy_(total)
    return out.reshape(values.shape)


def average_seams(
    values: Float[Tensor, "B *spatial C"], blocks: Tuple[int, int], spatial_axes: Sequence[Optional[int]]
) -> Float[Tensor, "B *spatial C"]:
    """Every copy of a seam texel replaced by the mean of its copies (makes copies consistent)."""
    count = tie_seams(torch.ones_like(values[..., :1]), blocks, spatial_axes)
    return tie_seams(values, blocks, spatial_axes) / count


def seam_mismatch(
    values: Float[Tensor, "B *spatial C"], blocks: Tuple[int, int], spatial_axes: Sequence[Optional[int]]
) -> float:
    """Largest difference between two copies of a seam texel (0 when consistent)."""
    return float((average_seams(values, blocks, spatial_axes) - values).abs().max()) if values.numel() else 0.0


INTERPOLATE_MAX_ELEMENTS = 2**31 - 1
"""Largest output torch's interpolate takes in one call (its CUDA kernels index with int32)."""


def resample_factor(values: Float[Tensor, "B *spatial C"], size: Sequence[int]) -> Float[Tensor, "B *size C"]:
    """A plane or line resampled to ``size`` texels per spatial dimension (align_corners).

    With ``(new - 1)`` a multiple of ``(old - 1)`` along every dimension, the old texels lie on
    new texels and the (bi)linear function the factor represents is reproduced exactly; the
    border texels map onto border texels, so seam copies stay equal.
    """
    mode = "bilinear" if len(size) == 2 else "linear"
    out = values.new_empty(values.shape[0], *size, values.shape[-1])
    # torch's interpolate refuses outputs of INT_MAX elements or more (billion-parameter grids),
    # so blocks and channels go through it in pieces below that, written straight into ``out``
    # (which also spares a second full-size copy).
    texels = math.prod(size)
    channel_step = max(1, min(values.shape[-1], INTERPOLATE_MAX_ELEMENTS // texels))
    block_step = max(1, INTERPOLATE_MAX_ELEMENTS // (texels * channel_step))
    for b in range(0, values.shape[0], block_step):
        for c in range(0, values.shape[-1], channel_step):
            piece = values[b : b + block_step, ..., c : c + channel_step].movedim(-1, 1)
            resized = F.interpolate(piece, size=tuple(size), mode=mode, align_corners=True)
            out[b : b + block_step, ..., c : c + channel_step] = resized.movedim(1, -1)
    return out


def plane_tv(plane: Float[Tensor, "B Rv Ru C"]) -> Float[Tensor, ""]:
    """Total variation of block planes: mean squared difference of neighbouring texels.

    Differences are taken inside each block only; across a seam the two copies are equal, so
    the seam difference is zero anyway.
    """
    dv = (plane[:, 1:] - plane[:, :-1]).square().mean()
    du = (plane[:, :, 1:] - plane[:, :, :-1]).square().mean()
    return dv + du


def factors_l1(factors: Sequence[Tensor]) -> Float[Tensor, ""]:
    """Mean absolute value over all elements of the given planes and lines (sparsity prior)."""
    total = sum(f.abs().sum() for f in factors)
    count = sum(f.numel() for f in factors)
    return total / max(count, 1)  # type: ignore[return-value]


def block_cells(extent: Sequence[float], blocks: Tuple[int, int], cells: int) -> List[int]:
    """Texel cells per world axis of one block for a given cell count along its longest axis.

    Cells are square-ish (equal texel pitch on every axis, at least one cell per axis), so a
    flat city box gets short z lines and a cube gets equal planes and lines.

    Args:
        extent: (3,) size of the scene box.
        blocks: (bx, by).
        cells: cells along the block's longest axis.
    """
    block = [extent[0] / blocks[0], extent[1] / blocks[1], extent[2]]
    longest = max(block)
    return [max(1, round(cells * b / longest)) for b in block]


def factor_shapes(
    cells_xyz: Sequence[int], axes: Sequence[FactorAxes]
) -> List[Tuple[Tuple[int, int], int]]:
    """((Rv, Ru), Rl) texels per factor given cells per world axis (texels = cells + 1)."""
    return [((cells_xyz[v] + 1, cells_xyz[u] + 1), cells_xyz[w] + 1) for u, v, w in axes]
