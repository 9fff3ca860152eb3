"""Torch reference rasteriser: gsplat 1.4.0's classic 3DGS rule, differentiable by autograd.

It reproduces ``gsplat.rasterization(rasterize_mode="classic", packed=False)`` for one
pinhole camera, on CPU or GPU, in float32 or float64:

* projection (``fully_fused_projection``): covariance from a normalised quaternion and
  linear scales, EWA Jacobian with camera-space x/z, y/z clamped to 1.3 x the half field
  of view beyond the principal point, ``eps2d`` added to the 2D covariance, conic = its
  inverse, radius = ceil(3 sqrt(b + sqrt(max(0.01, b^2 - det)))) with b = trace / 2, and
  radius 0 for depth outside [near, far], det <= 0, radius <= radius_clip, or a footprint
  square fully off-screen;
* tile binning (``isect_tiles``): a Gaussian is a candidate for the pixels of every tile
  its [mean2d - radius, mean2d + radius] square touches, in (depth, index) order per tile;
* per pixel (``rasterize_to_pixels``), centre (x + 0.5, y + 0.5): sigma = 0.5 (a dx^2 +
  c dy^2) + b dx dy with d = mean2d - pixel, skipped if sigma < 0; alpha = min(alpha_max,
  opacity exp(-sigma)), skipped if alpha < alpha_min; a Gaussian after which T would be
  <= min_transmittance ends the pixel and is itself excluded.

Output is the premultiplied colour sum_i c_i a_i T_i (no background) and the final T.

Vectorised in two passes.  Pass 1 (no grad) evaluates every (pixel, candidate) of a chunk
of tiles in a padded [tiles, tile_px, K] layout and decides which candidates are kept
(the decision is piecewise constant, so it needs no gradient).  Pass 2 recomputes alpha
with grad only for the kept (pixel, Gaussian) entries and composites them with an
exclusive cumulative product per pixel, so no 1 / (1 - alpha) appears in the forward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from landmark_plugin.core.sh import camera_center, gaussian_colors

Window = tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, half-open


@dataclass(frozen=True)
class RasterSettings:
    """Constants of the rasterisation rule (gsplat 1.4.0 defaults)."""

    near_plane: float = 0.01
    """Gaussians with camera depth below this are culled."""
    far_plane: float = 1e10
    """Gaussians with camera depth above this are culled."""
    eps2d: float = 0.3
    """Screen-space blur added to the 2D covariance diagonal (pixels^2)."""
    tile_size: int = 16
    """Tile edge in pixels; candidates are binned per tile."""
    alpha_min: float = 1.0 / 255.0
    """Contributions with a smaller alpha are skipped."""
    alpha_max: float = 0.999
    """Alpha is clamped to this."""
    min_transmittance: float = 1e-4
    """A pixel ends before the Gaussian that would drop T to this or below; 0 disables."""
    radius_clip: float = 0.0
    """Gaussians with a screen radius (pixels) at or below this are culled."""
    chunk_elements: int = 2**21
    """Memory bound: (pixel, candidate) pairs evaluated at once in the no-grad pass."""


class Projection(NamedTuple):
    """Screen-space Gaussians of one camera (rows with radius 0 are culled)."""

    means2d: Float[Tensor, "N 2"]
    conics: Float[Tensor, "N 3"]
    depths: Float[Tensor, " N"]
    radii: Int[Tensor, " N"]

    def take(self, index: Int[Tensor, " M"]) -> "Projection":
        """The rows ``index`` (differentiable)."""
        return Projection(*(t[index] for t in self))


def quat_scale_to_covar(
    quats: Float[Tensor, "N 4"], scales: Float[Tensor, "N 3"]
) -> Float[Tensor, "N 3 3"]:
    """World covariance R S S^T R^T from wxyz quaternions (normalised here) and scales."""
    w, x, y, z = F.normalize(quats, p=2, dim=-1).unbind(-1)
    rot = torch.stack(
        [
            1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
        ],
        dim=-1,
    ).reshape(-1, 3, 3)
    m = rot * scales[:, None, :]
    return m @ m.transpose(-1, -2)


def world_to_camera(
    means: Float[Tensor, "N 3"], covars: Float[Tensor, "N 3 3"], viewmat: Float[Tensor, "4 4"]
) -> tuple[Float[Tensor, "N 3"], Float[Tensor, "N 3 3"]]:
    """Means and covariances in camera space (viewmat = world-to-camera)."""
    rot, trans = viewmat[:3, :3], viewmat[:3, 3]
    return means @ rot.T + trans, rot @ covars @ rot.T


def perspective_projection(
    means_c: Float[Tensor, "N 3"],
    covars_c: Float[Tensor, "N 3 3"],
    K: Float[Tensor, "3 3"],
    width: int,
    height: int,
) -> tuple[Float[Tensor, "N 2"], Float[Tensor, "N 2 2"]]:
    """EWA projection of camera-space Gaussians with positive depth.

    The Jacobian uses x/z and y/z clamped to the field of view widened by 30 % of its
    half-angle tangent on each side (gsplat's limits), which keeps far off-axis splats
    from exploding; the mean itself is projected unclamped.
    """
    x, y, z = means_c.unbind(-1)
    fx, fy, cx, cy = K[0, 0], K[1, 1], K[0, 2], K[1, 2]
    lim_x_pos = (width - cx) / fx + 0.3 * (0.5 * width / fx)
    lim_x_neg = cx / fx + 0.3 * (0.5 * width / fx)
    lim_y_pos = (height - cy) / fy + 0.3 * (0.5 * height / fy)
    lim_y_neg = cy / fy + 0.3 * (0.5 * height / fy)
    rz = 1.0 / z
    tx = z * torch.minimum(torch.maximum(x * rz, -lim_x_neg), lim_x_pos)
    ty = z * torch.minimum(torch.maximum(y * rz, -lim_y_neg), lim_y_pos)
    zero = torch.zeros_like(z)
    jac = torch.stack(
        [fx * rz, zero, -fx * tx * rz * rz, zero, fy * rz, -fy * ty * rz * rz], dim=-1
    ).reshape(-1, 2, 3)
    cov2d = jac @ covars_c @ jac.transpose(-1, -2)
    means2d = torch.stack([fx * x * rz + cx, fy * y * rz + cy], dim=-1)
    return means2d, cov2d


def project_gaussians(
    means: Float[Tensor, "N 3"],
    quats: Float[Tensor, "N 4"],
    scales: Float[Tensor, "N 3"],
    viewmat: Float[Tensor, "4 4"],
    K: Float[Tensor, "3 3"],
    width: int,
    height: int,
    settings: RasterSettings = RasterSettings(),
) -> Projection:
    """gsplat's ``fully_fused_projection`` (classic, unpacked) for one camera.

    Args:
        means: [N, 3] world centres.
        quats: [N, 4] wxyz rotations, not necessarily normalised.
        scales: [N, 3] linear scales.
        viewmat: [4, 4] world-to-camera (OpenCV convention).
        K: [3, 3] pinhole intrinsics.
        width, height: image size in pixels.
        settings: near/far, eps2d, radius_clip.

    Returns:
        Projection with [N, 2] means2d, [N, 3] conics (a, b, c of the inverse blurred
        covariance), [N] camera depths and [N] int32 radii (0 = culled).
    """
    means_c, covars_c = world_to_camera(means, quat_scale_to_covar(quats, scales), viewmat)
    depth = means_c[:, 2]
    depth_ok = (depth >= settings.near_plane) & (depth <= settings.far_plane)
    # Culled rows get a harmless depth so no inf / nan can reach the backward pass.
    safe_c = torch.where(depth_ok[:, None], means_c, torch.ones_like(means_c))
    means2d, cov2d = perspective_projection(safe_c, covars_c, K.to(means), width, height)
    a = cov2d[:, 0, 0] + settings.eps2d
    b = cov2d[:, 0, 1]
    c = cov2d[:, 1, 1] + settings.eps2d
    det = a * c - b * b
    det_ok = det > 0
    inv_det = 1.0 / torch.where(det_ok, det, torch.ones_like(det))
    conics = torch.stack([c * inv_det, -b * inv_det, a * inv_det], dim=-1)
    radius = _screen_radius(a.detach(), c.detach(), det.detach())
    mx, my = means2d[:, 0].detach(), means2d[:, 1].detach()
    on_screen = (mx + radius > 0) & (mx - radius < width) & (my + radius > 0) & (my - radius < height)
    keep = depth_ok & det_ok & (radius > settings.radius_clip) & on_screen
    radii = torch.where(keep, radius, torch.zeros_like(radius)).to(torch.int32)
    return Projection(means2d=means2d, conics=conics, depths=depth, radii=radii)


def _screen_radius(
    a: Float[Tensor, " N"], c: Float[Tensor, " N"], det: Float[Tensor, " N"]
) -> Float[Tensor, " N"]:
    """ceil(3 sigma) of the larger eigenvalue, the 0.01 floor under the discriminant as
    in gsplat (it also keeps sqrt away from negative rounding noise)."""
    b = 0.5 * (a + c)
    v1 = b + torch.sqrt(torch.clamp_min(b * b - det, 0.01))
    return torch.ceil(3.0 * torch.sqrt(torch.clamp_min(v1, 0.0)))


def sort_rank(
    depths: Float[Tensor, " N"], group: Optional[Int[Tensor, " N"]] = None
) -> Int[Tensor, " N"]:
    """Position of every Gaussian in the (group, depth, index) order (int64); gsplat's
    per-tile radix sort on (tile, depth bits) is stable, so equal depths keep index order."""
    order = torch.sort(depths.detach(), stable=True).indices
    if group is not None:
        order = order[torch.sort(group[order], stable=True).indices]
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.shape[0], device=order.device)
    return rank


def tile_ranges(
    means2d: Float[Tensor, "N 2"], radii: Int[Tensor, " N"], tile_size: int, width: int, height: int
) -> Int[Tensor, "N 4"]:
    """gsplat's ``isect_tiles`` rule: the tiles [x_min, x_max) x [y_min, y_max) that a
    Gaussian is binned into, from floor / ceil of (mean2d -/+ radius) / tile_size clamped to
    the tile grid; culled Gaussians (radius 0) get an empty range."""
    tiles_x, tiles_y = math.ceil(width / tile_size), math.ceil(height / tile_size)
    m = means2d.detach()
    r = radii.to(m.dtype) / tile_size
    cx, cy = m[:, 0] / tile_size, m[:, 1] / tile_size
    out = torch.stack(
        [
            torch.floor(cx - r).clamp(0, tiles_x), torch.ceil(cx + r).clamp(0, tiles_x),
            torch.floor(cy - r).clamp(0, tiles_y), torch.ceil(cy + r).clamp(0, tiles_y),
        ],
        dim=-1,
    ).long()
    return torch.where((radii > 0)[:, None], out, torch.zeros_like(out))


def footprint_window(proj: Projection, width: int, height: int, tile_size: int = 16) -> Window:
    """Tile-aligned pixel window covering every tile that some Gaussian of ``proj`` is
    binned to (``tile_ranges``); (0, 0, 0, 0) when all are culled.

    A partial rendered over this window (``rasterize(..., window=...)``) and pasted back
    (``composite.paste_partial``) equals the full-image partial exactly: outside the
    window no Gaussian is a candidate, so colour is 0 and T is 1 there.
    """
    tiles = tile_ranges(proj.means2d, proj.radii, tile_size, width, height)
    used = proj.radii > 0
    if not bool(used.any()):
        return (0, 0, 0, 0)
    t = tiles[used]
    x0, x1 = int(t[:, 0].min()) * tile_size, min(int(t[:, 1].max()) * tile_size, width)
    y0, y1 = int(t[:, 2].min()) * tile_size, min(int(t[:, 3].max()) * tile_size, height)
    return (x0, y0, x1, y1)


def _level_set(
    proj: Projection, opacities: Float[Tensor, " N"], settings: RasterSettings
) -> Float[Tensor, " N"]:
    """Largest sigma at which alpha can still reach alpha_min, slightly inflated.

    alpha >= alpha_min needs opacity exp(-sigma) >= alpha_min, i.e. sigma <= ln(opacity /
    alpha_min).  The inflation (1e-3 relative plus 1e-3) covers float32 rounding of sigma
    and exp in the rasteriser, so the bound never drops a pixel the rasteriser keeps.
    """
    o = opacities.detach().to(torch.float64)
    s = torch.log(o / settings.alpha_min)
    return torch.where(o > 0, s + 1e-3 * s.abs() + 1e-3, torch.full_like(s, -1.0))


def _ranges(lo: Tensor, hi: Tensor, count: Tensor) -> tuple[Int[Tensor, " M"], Int[Tensor, " M"]]:
    """Expand per-item half-open integer ranges: (item id, value) of every element."""
    item = torch.repeat_interleave(torch.arange(count.shape[0], device=count.device), count)
    offset = torch.arange(item.shape[0], device=count.device) - (torch.cumsum(count, 0) - count)[item]
    return item, lo[item] + offset


@torch.no_grad()
def _candidates(
    proj: Projection,
    opacities: Float[Tensor, " N"],
    rank: Int[Tensor, " N"],
    width: int,
    height: int,
    settings: RasterSettings,
    window: Window,
) -> tuple[Int[Tensor, " E"], Int[Tensor, " E"], Int[Tensor, " E"]]:
    """(Gaussian, x, y) of every pixel where a Gaussian can count, in ``rank`` order.

    gsplat evaluates a Gaussian at every pixel of the tiles its radius square touches
    (``tile_ranges``) and skips it where alpha < alpha_min, where it changes nothing.  So
    only pixels of those tiles inside the ellipse sigma <= ln(opacity / alpha_min)
    (``_level_set``) need evaluating: per row dy the ellipse is an interval of dx.  The
    geometry is done in float64 with one pixel of margin, so it is conservative: it only
    leaves out pixels that gsplat skips too, and the result is exact.
    """
    order = torch.argsort(rank)  # Gaussians in front-to-back order
    tiles = tile_ranges(proj.means2d, proj.radii, settings.tile_size, width, height)[order]
    ts, (x0, y0, x1, y1) = settings.tile_size, window
    m = proj.means2d.detach()[order].to(torch.float64)
    a, b, c = proj.conics.detach()[order].to(torch.float64).unbind(-1)
    s = _level_set(proj, opacities, settings)[order]
    det = a * c - b * b
    usable = (proj.radii[order] > 0) & (s >= 0) & (det > 0) & (a > 0)
    det, a_safe = torch.where(usable, det, 1.0), torch.where(usable, a, 1.0)
    s = s.clamp(min=0.0)
    # Rows: the ellipse spans |dy| <= sqrt(2 a s / det) around the mean.
    reach_y = torch.sqrt(2.0 * a_safe * s / det)
    y_lo = torch.ceil(m[:, 1] - reach_y - 0.5).long() - 1
    y_hi = torch.floor(m[:, 1] + reach_y - 0.5).long() + 2
    y_lo = torch.maximum(y_lo, (tiles[:, 2] * ts).clamp(min=y0))
    y_hi = torch.minimum(y_hi, (tiles[:, 3] * ts).clamp(max=y1))
    rows = torch.where(usable, (y_hi - y_lo).clamp(min=0), 0)
    row_g, row_y = _ranges(y_lo, y_hi, rows)
    # Columns of each row: 0.5 a dx^2 + b dy dx + 0.5 c dy^2 <= s with d = mean - pixel.
    dy = m[row_g, 1] - (row_y.to(torch.float64) + 0.5)
    disc = torch.sqrt((2.0 * a_safe[row_g] * s[row_g] - det[row_g] * dy * dy).clamp(min=0.0))
    centre = m[row_g, 0] + b[row_g] * dy / a_safe[row_g]  # pixel x of the row's sigma minimum
    half = disc / a_safe[row_g]
    x_lo = torch.ceil(centre - half - 0.5).long() - 1
    x_hi = torch.floor(centre + half - 0.5).long() + 2
    x_lo = torch.maximum(x_lo, (tiles[row_g, 0] * ts).clamp(min=x0))
    x_hi = torch.minimum(x_hi, (tiles[row_g, 1] * ts).clamp(max=x1))
    row_pix, xs = _ranges(x_lo, x_hi, (x_hi - x_lo).clamp(min=0))
    return order[row_g[row_pix]], xs, row_y[row_pix]


def _alpha(
    means2d: Float[Tensor, "*b 2"],
    conics: Float[Tensor, "*b 3"],
    opacities: Float[Tensor, " *b"],
    px: Float[Tensor, " *b"],
    py: Float[Tensor, " *b"],
    settings: RasterSettings,
) -> tuple[Float[Tensor, " *b"], Bool[Tensor, " *b"]]:
    """alpha of a Gaussian at a pixel centre and whether it counts (sigma >= 0 and
    alpha >= alpha_min), gsplat's formula term by term."""
    dx, dy = means2d[..., 0] - px, means2d[..., 1] - py
    sigma = 0.5 * (conics[..., 0] * dx * dx + conics[..., 2] * dy * dy) + conics[..., 1] * dx * dy
    alpha = torch.clamp_max(opacities * torch.exp(-sigma), settings.alpha_max)
    return alpha, (sigma >= 0) & (alpha >= settings.alpha_min)


def _pixel_runs(
    pixel: Int[Tensor, " E"],
) -> tuple[Int[Tensor, " R"], Int[Tensor, " E"], Int[Tensor, " E"], int]:
    """For entries grouped by pixel: the distinct pixels, each entry's run and its slot
    within the run, and the longest run (for a padded [runs, slots] layout)."""
    pix_run, run_len = torch.unique_consecutive(pixel, return_counts=True)
    run = torch.repeat_interleave(torch.arange(pix_run.shape[0], device=pixel.device), run_len)
    slot = torch.arange(pixel.shape[0], device=pixel.device) - (torch.cumsum(run_len, 0) - run_len)[run]
    return pix_run, run, slot, int(run_len.max()) if run_len.numel() else 1


@torch.no_grad()
def _kept_by_termination(
    alpha: Float[Tensor, " E"], pixel: Int[Tensor, " E"], min_transmittance: float
) -> Bool[Tensor, " E"]:
    """gsplat's early termination as a mask over entries grouped by pixel, front first.

    T only falls along a pixel, so "T after the entry > min_transmittance" keeps exactly
    the prefix before the first entry that would take T to min_transmittance or below
    (that entry is excluded too).
    """
    if min_transmittance <= 0:
        return torch.ones_like(pixel, dtype=torch.bool)
    pix_run, run, slot, width = _pixel_runs(pixel)
    one_minus = torch.ones(pix_run.shape[0], width, dtype=alpha.dtype, device=alpha.device)
    one_minus[run, slot] = 1.0 - alpha
    return torch.cumprod(one_minus, dim=1)[run, slot] > min_transmittance


def _accumulate(
    colors: Float[Tensor, "E D"],
    alpha: Float[Tensor, " E"],
    pixel: Int[Tensor, " E"],
    num_pixels: int,
) -> tuple[Float[Tensor, "P D"], Float[Tensor, " P"]]:
    """sum_i c_i a_i T_i and the final T per pixel, T_i the exclusive product of (1 - a_j)
    along the pixel (entries grouped by pixel, front first); differentiable."""
    pix_run, run, slot, width = _pixel_runs(pixel)
    one_minus = torch.ones(pix_run.shape[0], width, dtype=alpha.dtype, device=alpha.device)
    one_minus = one_minus.index_put((run, slot), 1.0 - alpha)
    t_incl = torch.cumprod(one_minus, dim=1)  # [runs, width]
    t_excl = torch.cat([torch.ones_like(t_incl[:, :1]), t_incl[:, :-1]], dim=1)
    weight = alpha * t_excl[run, slot]
    premult = colors.new_zeros(num_pixels, colors.shape[1]).index_add(0, pixel, weight[:, None] * colors)
    trans = alpha.new_ones(num_pixels).index_put((pix_run,), t_incl[:, -1])
    return premult, trans


def rasterize(
    proj: Projection,
    colors: Float[Tensor, "N D"],
    opacities: Float[Tensor, " N"],
    width: int,
    height: int,
    settings: RasterSettings = RasterSettings(),
    group: Optional[Int[Tensor, " N"]] = None,
    window: Optional[Window] = None,
) -> tuple[Float[Tensor, "H W D"], Float[Tensor, "H W 1"]]:
    """Alpha-composite projected Gaussians front to back (gsplat's per-pixel rule).

    Args:
        proj: projection of N Gaussians for this camera.
        colors: [N, D] per-Gaussian features (RGB, depth, ...).
        opacities: [N] opacities in [0, 1].
        width, height: full image size (tiles are laid on the full image).
        settings: rasterisation constants.
        group: [N] optional int keys; candidates are sorted by (group, depth) instead of
            depth (e.g. the place of the Gaussian's leaf in the camera's leaf order).
        window: optional (x0, y0, x1, y1) pixel rectangle; only it is rendered, with
            exactly the values the full render has there.

    Returns:
        [h, w, D] premultiplied colour (no background) and [h, w, 1] transmittance, with
        (h, w) the window's size (the image by default).
    """
    window = window if window is not None else (0, 0, width, height)
    x0, y0, x1, y1 = window
    if not (0 <= x0 <= x1 <= width and 0 <= y0 <= y1 <= height):
        raise ValueError(f"window {window} is not inside the {width}x{height} image")
    h, w = y1 - y0, x1 - x0
    # Keeps every output in the graph, so backward works even when nothing is drawn.
    anchor = 0.0 * (colors.sum() + opacities.sum() + proj.means2d.sum() + proj.conics.sum())
    if colors.shape[0] == 0 or h == 0 or w == 0:
        return colors.new_zeros(h, w, colors.shape[1]) + anchor, colors.new_ones(h, w, 1) + anchor
    rank = sort_rank(proj.depths, group)
    g, xs, ys = _candidates(proj, opacities, rank, width, height, settings, window)
    # One gather (and one scatter in backward) for all per-Gaussian inputs.
    packed = torch.cat([proj.means2d, proj.conics, opacities[:, None].to(colors), colors], dim=1)[g]
    dtype = packed.dtype
    alpha, valid = _alpha(
        packed[:, 0:2], packed[:, 2:5], packed[:, 5], xs.to(dtype) + 0.5, ys.to(dtype) + 0.5, settings
    )
    # Candidates come in rank order; a stable sort by pixel keeps that order per pixel.
    pixel = (ys - y0) * w + (xs - x0)
    by_pixel = torch.sort(torch.where(valid, pixel, h * w), stable=True).indices[: int(valid.sum())]
    alpha, pixel = alpha[by_pixel], pixel[by_pixel]
    kept = _kept_by_termination(alpha.detach(), pixel, settings.min_transmittance)
    order = by_pixel[kept]
    premult, trans = _accumulate(packed[order, 6:], alpha[kept], pixel[kept], h * w)
    return (premult + anchor).reshape(h, w, -1), (trans + anchor).reshape(h, w, 1)


def rasterize_groups(
    proj: Projection,
    colors: Float[Tensor, "N D"],
    opacities: Float[Tensor, " N"],
    group: Int[Tensor, " N"],
    num_groups: int,
    width: int,
    height: int,
    settings: RasterSettings = RasterSettings(),
    window: Optional[Window] = None,
) -> tuple[Float[Tensor, "G H W D"], Float[Tensor, "G H W 1"]]:
    """One partial (premultiplied colour, T) per group, each rendered on its own (its
    own early termination), e.g. one per leaf; feed them to ``composite`` in order.

    Args:
        group: [N] group id in [0, G) of every Gaussian.
        num_groups: G.
        (others as in ``rasterize``)

    Returns:
        [G, h, w, D] and [G, h, w, 1].
    """
    colors_out, trans_out = [], []
    for k in range(num_groups):
        index = (group == k).nonzero(as_tuple=True)[0]
        c, t = rasterize(
            proj.take(index), colors[index], opacities[index], width, height, settings, None, window
        )
        colors_out.append(c)
        trans_out.append(t)
    return torch.stack(colors_out), torch.stack(trans_out)


def render_ref(
    means: Float[Tensor, "N 3"],
    quats: Float[Tensor, "N 4"],
    scales: Float[Tensor, "N 3"],
    opacities: Float[Tensor, " N"],
    colors_or_sh: Float[Tensor, "N ..."],
    viewmat: Float[Tensor, "4 4"],
    K: Float[Tensor, "3 3"],
    width: int,
    height: int,
    settings: RasterSettings = RasterSettings(),
    sh_degree: Optional[int] = None,
    render_depth: bool = False,
    group: Optional[Int[Tensor, " N"]] = None,
) -> tuple[Float[Tensor, "H W D"], Float[Tensor, "H W 1"]]:
    """Project, colour and rasterise, like ``gsplat.rasterization`` for one camera.

    Args:
        means, quats, scales: [N, 3], [N, 4], [N, 3] Gaussian geometry.
        opacities: [N] in [0, 1].
        colors_or_sh: [N, D] colours, or [N, K, 3] SH coefficients when ``sh_degree`` is set
            (then colours are max(SH + 0.5, 0) as gsplat computes them).
        viewmat, K: [4, 4] world-to-camera and [3, 3] intrinsics.
        width, height: image size.
        settings: rasterisation constants.
        sh_degree: SH degree to evaluate, or None for plain colours.
        render_depth: append camera-space z as a last channel ("RGB+ED" before the division
            by alpha; see ``composite.expected_depth``).
        group: [N] optional sort groups (see ``rasterize``).

    Returns:
        [H, W, D (+1)] premultiplied colour and [H, W, 1] transmittance.
    """
    proj = project_gaussians(means, quats, scales, viewmat, K, width, height, settings)
    if sh_degree is not None:
        colors = gaussian_colors(colors_or_sh, means, camera_center(viewmat.to(means)), sh_degree)
    else:
        colors = colors_or_sh
    if render_depth:
        colors = torch.cat([colors, proj.depths[:, None]], dim=-1)
    return rasterize(proj, colors, opacities, width, height, settings, group)
