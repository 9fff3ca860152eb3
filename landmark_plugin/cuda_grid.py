"""The CUDA kernel of the multi-branch plane x line features (csrc/), and its typed wrapper.

Built and loaded with the rest of csrc/ by ``landmark_plugin.cuda.load``; its twin in core/ is
``core.grid_features.sample_block_features``, which computes the same function.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from landmark_plugin.cuda import load

MAX_GRID_FACTORS = 32
"""Factors (levels x mode pairs) one launch of the feature kernel takes (csrc kMaxGridFactors)."""
GRID_POINTS_PER_THREAD = 4
"""Consecutive points a backward thread walks, summing their gradients in registers while they
share a texel cell (samples along a ray often do); 1, 4 or 8."""


def block_features_unsupported(
    planes: Sequence[Tensor], lines: Sequence[Tensor], points: Tensor, block_index: Tensor,
    axes: Sequence[Sequence[int]],
) -> Optional[str]:
    """Why the fused feature kernel cannot take these arguments, or None when it can.

    Checks everything but the kernel's availability: shapes, float32, one channel count for
    all factors (the twin also allows different ones), CUDA tensors on one device.
    """
    count = len(planes)
    if count == 0 or len(lines) != count or len(axes) != count:
        return f"needs one line and one axes triple per plane ({count} planes, {len(lines)} lines, {len(axes)} axes)"
    if count > MAX_GRID_FACTORS:
        return f"at most {MAX_GRID_FACTORS} factors per launch, got {count}"
    if points.dim() != 2 or points.shape[1] != 3:
        return f"points must be [N, 3], got {tuple(points.shape)}"
    if tuple(block_index.shape) != (points.shape[0],) or block_index.dtype.is_floating_point:
        return f"block_index must be [N] = [{points.shape[0]}] integers, got {tuple(block_index.shape)} {block_index.dtype}"
    if planes[0].dim() != 4:
        return f"planes[0] must be [B, Rv, Ru, C], got {tuple(planes[0].shape)}"
    blocks, channels = planes[0].shape[0], planes[0].shape[3]
    for k, (plane, line, factor_axes) in enumerate(zip(planes, lines, axes)):
        if plane.dim() != 4 or plane.shape[0] != blocks or plane.shape[3] != channels or min(plane.shape[1:3]) < 2:
            return (f"planes[{k}] must be [{blocks}, Rv, Ru, {channels}] with Rv, Ru >= 2 (one channel count for "
                    f"all factors), got {tuple(plane.shape)}")
        if line.dim() != 3 or line.shape[0] not in (1, blocks) or line.shape[2] != channels or line.shape[1] < 2:
            return f"lines[{k}] must be [{blocks} or 1, Rl, {channels}] with Rl >= 2, got {tuple(line.shape)}"
        if sorted(int(a) for a in factor_axes) != [0, 1, 2]:
            return f"axes[{k}] must be a permutation of (0, 1, 2), got {tuple(factor_axes)}"
    tensors = [points, *planes, *lines]
    if any(t.dtype != torch.float32 for t in tensors):
        return "the kernel takes float32 planes, lines and points only"
    if not all(t.is_cuda and t.device == points.device for t in [*tensors, block_index]):
        return "planes, lines, points and block_index must be CUDA tensors on one device"
    return None


class _BlockFeatures(torch.autograd.Function):
    """Forward calls ``block_features_fwd``, backward ``block_features_bwd``."""

    @staticmethod
    def forward(ctx, points, block_index, axes, num_factors, poison, *factors):
        planes, lines = list(factors[:num_factors]), list(factors[num_factors:])
        features = load().block_features_fwd(planes, lines, points, block_index, axes, poison)
        ctx.save_for_backward(points, block_index, *factors)
        ctx.axes, ctx.num_factors = axes, num_factors
        return features

    @staticmethod
    def backward(ctx, v_features):
        points, block_index, *factors = ctx.saved_tensors
        count, points_grad = ctx.num_factors, ctx.needs_input_grad[0]
        v_planes, v_lines, v_points = load().block_features_bwd(
            factors[:count], factors[count:], points, block_index, ctx.axes, v_features.contiguous(), points_grad,
            GRID_POINTS_PER_THREAD,
        )
        return (v_points if points_grad else None, None, None, None, None, *v_planes, *v_lines)


def sample_block_features(
    planes: Sequence[Float[Tensor, "B Rv Ru C"]],
    lines: Sequence[Float[Tensor, "Bl Rl C"]],
    points: Float[Tensor, "N 3"],
    block_index: Int[Tensor, " N"],
    axes: Sequence[Sequence[int]],
    poison: bool = False,
) -> Float[Tensor, "N F"]:
    """Plane x line features of points in their blocks, all factors in one launch (CUDA kernel).

    Twin: ``core.grid_features.sample_block_features`` (same function, same output layout,
    gradients to planes, lines and points).  A point with a NaN coordinate or a block index
    outside [0, B) gets NaN features and no gradient (the twin raises an indexing error).

    Args:
        planes: per factor k, [B, Rv_k, Ru_k, C] float32 block planes (channels last).
        lines: per factor k, [B or 1, Rl_k, C] float32 block lines (1: shared by all blocks).
        points: [N, 3] block-local coordinates in [-1, 1] (``core.grid_features.route_points``).
        block_index: [N] block of each point.
        axes: per factor k, the world axes (u, v, line) of plane k and line k.
        poison: fill the output with NaN before the kernel (tests: every element is written).

    Returns:
        [N, K * C]: factor k's channels are plane_k(u, v) * line_k(w), in factor order.

    Raises:
        ValueError: arguments the kernel does not take (``block_features_unsupported``).
        CudaUnavailable: the kernels cannot be built here.
    """
    reason = block_features_unsupported(planes, lines, points, block_index, axes)
    if reason is not None:
        raise ValueError(f"cuda.sample_block_features: {reason}")
    load()
    flat_axes = [int(a) for factor_axes in axes for a in factor_axes]
    factors = [t.contiguous() for t in (*planes, *lines)]
    return _BlockFeatures.apply(
        points.contiguous(), block_index.long().contiguous(), flat_axes, len(planes), poison, *factors
    )
