"""Which kd-tree leaves a camera can draw anything of: a conservative bound of the projection's cull.

Streaming leaves from host memory (``gaussians/offload.py``) uploads only the leaves a batch's
cameras need.  The render stays exact only if no leaf left behind holds a Gaussian the
projection (``core.projection.project_gaussians``, gsplat's rule) would keep, so the test here
bounds that rule rather than approximating the frustum:

* a Gaussian is culled unless its mean's depth lies in [near, far], so a leaf whose box of means
  lies wholly in front of ``near`` or behind ``far`` draws nothing;
* a kept Gaussian's screen footprint is its projected mean +- its radius ceil(3 sqrt(v)), where v
  is at most the largest eigenvalue of J Sigma J^T plus ``eps2d`` plus 0.1 (gsplat's floor
  under the discriminant).  ||J Sigma J^T|| <= s_max^2 ||J||_F^2 and, with the Jacobian's
  x/z and y/z clamped to the limits L_x, L_y, ||J||_F^2 <= (fx^2 (1 + L_x^2) + fy^2 (1 + L_y^2)) / z^2,
  s_max the largest linear scale of the leaf's Gaussians;
* so the footprint meets the image only if the mean lies inside the view frustum widened, in
  world units, by 3 s_max sqrt(A) / f on every side (the radius and the mean's distance from the
  image both scale with 1 / z): six half-spaces, linear in the mean.

A leaf is let go when its box of means lies wholly outside one of them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from landmark_plugin.core.projection import RasterSettings

_CORNERS = torch.tensor([[(i >> 0) & 1, (i >> 1) & 1, (i >> 2) & 1] for i in range(8)], dtype=torch.bool)


@dataclass
class LeafBounds:
    """Per leaf: the box of its Gaussians' means and their largest linear scale.  An empty
    leaf has lo > hi."""

    lo: Float[Tensor, "L 3"]
    hi: Float[Tensor, "L 3"]
    max_scale: Float[Tensor, " L"]

    @staticmethod
    def of(means: Float[Tensor, "N 3"], scales: Float[Tensor, "N 3"], leaf_ids: Int[Tensor, " N"], num_leaves: int) -> "LeafBounds":
        """``scales`` linear (not log)."""
        means, scales = means.detach().double(), scales.detach().double()
        index = leaf_ids.long()[:, None].expand(-1, 3)
        lo = torch.full((num_leaves, 3), math.inf, dtype=torch.float64, device=means.device)
        hi = torch.full((num_leaves, 3), -math.inf, dtype=torch.float64, device=means.device)
        lo = lo.scatter_reduce(0, index, means, "amin")
        hi = hi.scatter_reduce(0, index, means, "amax")
        smax = torch.zeros(num_leaves, dtype=torch.float64, device=means.device)
        smax = smax.scatter_reduce(0, leaf_ids.long(), scales.amax(dim=1), "amax")
        return LeafBounds(lo, hi, smax)

    def update_(self, other: "LeafBounds", leaves: Bool[Tensor, " L"]) -> None:
        """Take ``other``'s bounds for the leaves marked in ``leaves``."""
        self.lo[leaves], self.hi[leaves], self.max_scale[leaves] = other.lo[leaves], other.hi[leaves], other.max_scale[leaves]


def leaves_in_view(
    bounds: LeafBounds, viewmat: Float[Tensor, "4 4"], K: Float[Tensor, "3 3"], width: int, height: int,
    settings: RasterSettings = RasterSettings(),
) -> Bool[Tensor, " L"]:
    """[L] leaves that may hold a Gaussian the projection keeps for this camera (see module doc)."""
    viewmat, K = viewmat.detach().double().to(bounds.lo.device), K.detach().double().to(bounds.lo.device)
    nonempty = (bounds.lo <= bounds.hi).all(dim=1)
    lo, hi = torch.where(nonempty[:, None], bounds.lo, 0.0), torch.where(nonempty[:, None], bounds.hi, 0.0)
    corners = torch.where(_CORNERS.to(lo.device), hi[:, None, :], lo[:, None, :])  # [L, 8, 3]
    cam = corners @ viewmat[:3, :3].T + viewmat[:3, 3]
    planes, margins = _kept_halfspaces(bounds.max_scale, K, width, height, settings)
    # A leaf goes when all its corners (so its whole box, a convex set) lie outside one half-space.
    inside = (cam @ planes[:, :3].T + planes[:, 3]) <= margins[:, None, :]  # [L, 8, 6]
    return nonempty & inside.any(dim=1).all(dim=1)


def _kept_halfspaces(
    max_scale: Float[Tensor, " L"], K: Float[Tensor, "3 3"], width: int, height: int, settings: RasterSettings,
) -> tuple:
    """Six half-spaces n . p + d <= margin (camera coordinates) that hold the mean p of every
    Gaussian the projection keeps, per leaf: [6, 4] (n, d) and [L, 6] margins.

    The depth slab near <= z <= far, and one per image side: a kept Gaussian's footprint reaches
    over the image edge, u - r < width with u = fx x / z + cx and r <= 3 s sqrt(A) / z + c0
    (A = fx^2 (1 + L_x^2) + fy^2 (1 + L_y^2) bounds z^2 ||J||_F^2, c0 the blur, the discriminant's
    floor and the rounding), which times z / fx > 0 reads x - z (width - cx + c0) / fx < 3 s sqrt(A) / fx:
    linear in p, so the test is depth-independent."""
    fx, fy, cx, cy = (float(v) for v in (K[0, 0], K[1, 1], K[0, 2], K[1, 2]))
    lim_x = max(width - cx, cx) / fx + 0.3 * (0.5 * width / fx)
    lim_y = max(height - cy, cy) / fy + 0.3 * (0.5 * height / fy)
    a = math.sqrt(fx**2 * (1 + lim_x**2) + fy**2 * (1 + lim_y**2))
    c0 = 3.0 * math.sqrt(settings.eps2d + 0.1) + 2.0
    planes = torch.tensor([
        [0.0, 0.0, -1.0, settings.near_plane],  # z >= near
        [0.0, 0.0, 1.0, -settings.far_plane],  # z <= far
        [1.0, 0.0, -(width - cx + c0) / fx, 0.0],  # right edge
        [-1.0, 0.0, -(cx + c0) / fx, 0.0],  # left edge
        [0.0, 1.0, -(height - cy + c0) / fy, 0.0],  # bottom edge
        [0.0, -1.0, -(cy + c0) / fy, 0.0],  # top edge
    ], dtype=torch.float64, device=max_scale.device)
    reach = 3.0 * max_scale * a
    zero = torch.zeros_like(max_scale)
    margins = torch.stack([zero, zero, reach / fx, reach / fx, reach / fy, reach / fy], dim=1)
    return planes, margins + 1e-9
