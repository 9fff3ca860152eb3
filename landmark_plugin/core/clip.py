"""``clip`` mode of retina-gs in torch: the box clip rule and boundary sharing (DESIGN.md 3).

The rule (RetinaGS's).  Gaussian i counts at pixel p in leaf k only if the point on p's
ray at i's camera depth z_i lies in leaf k's box.  With pixel centre (u, v) that point is

    X = o + z_i * Rc ((u - cx) / fx, (v - cy) / fy, 1),

o the camera centre and Rc the camera-to-world rotation.  Leaf boxes are half open
(lo <= X < hi) and the tree's outer faces extend to infinity (``unbounded_leaf_boxes``),
so every point lies in exactly one leaf, the one ``assign_leaves`` gives it.

Why the composite is the ordinary render.  Along one ray, points of increasing depth
visit leaves in the camera's leaf order; a pair (i, p) is counted in exactly one leaf,
the one holding its ray point, provided i was handed to that leaf.  So the per-pixel
sequence "by leaf position, then depth" is the depth order of the unclipped render, and
one pass over all leaves (``rasterize_clipped`` with the leaf positions as groups) equals
the unpartitioned render exactly, early termination included; per-leaf partials composited
in leaf order equal it when early termination is off (each leaf stops on its own T).

Boundary sharing.  The ray point of (i, p) is X_i + Rc (dx z / fx, dy z / fy, 0) with
d = p - mean2d: an offset in the plane of the centre's depth maps to pixels exactly by
f / z.  The pixels where i can count are those of its tiles inside its level set
sigma(d) = d^T conic d / 2 <= ln(opacity / alpha_min).  The conic is the inverse of the
projection's blurred 2D covariance J Sigma J^T + eps2d I: the image of the ellipsoid under
the EWA Jacobian J (whose x/z, y/z terms gsplat clamps to the widened field of view) plus
the screen blur.  So the set of ray points is a flat ellipse in the centre's depth plane,
and its axis box (``reach_boxes``), cut by the image of the tile rectangle, bounds it
exactly up to a rounding margin; the naive axis box of the 3-sigma ellipsoid misses it at
oblique views.  A Gaussian is handed to every leaf whose box meets that region
(``share_leaves``); all copies index the owner's parameters, so autograd (or the kernel's
atomics) sums their gradients into the owner.

Rounding.  The clip test is always evaluated in float32, in the exact operation order of
the CUDA kernel (``csrc/ClipRasterizeCUDA.cu``), from the float32 camera of
``clip_camera``: twin and kernel take the same decisions, and float32 boxes still tile
space, so exactness holds whatever the twin's dtype.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from landmark_plugin.core.binning import Window, _level_set, tile_ranges
from landmark_plugin.core.partition import KDTree
from landmark_plugin.core.projection import Projection, RasterSettings
from landmark_plugin.core.raster_ref import rasterize

CAMERA_SIZE = 16
"""Floats in a clip camera: camera-to-world rotation (9, row major), centre (3), fx, fy, cx, cy."""

_REACH_MARGIN = 1e-5
"""Relative margin of the reach boxes: covers float32 rounding of the ray point (a few
ulps of |o| + z |d|) and of the float32 boxes, so sharing never misses a leaf."""

_SHARE_CELLS = 1 << 24
"""(Gaussian, leaf) pairs per chunk of the box-overlap test (bounds its temporaries)."""


class Copies(NamedTuple):
    """Who renders what: one row per (Gaussian, leaf) copy, sorted by (gaussian, leaf).

    Attributes:
        gaussian: [M] int64 index of the Gaussian (the owner's parameters).
        leaf: [M] int64 leaf that renders the copy (its position in the camera's leaf
            order is the copy's sort group).
        box: [M] int64 leaf box to clip against, or -1 where the Gaussian reaches no other
            leaf (every ray point lies in ``leaf``, so the test is skipped).
    """

    gaussian: Int[Tensor, " M"]
    leaf: Int[Tensor, " M"]
    box: Int[Tensor, " M"]

    def take(self, index: Int[Tensor, " K"]) -> "Copies":
        return Copies(*(t[index] for t in self))


def unbounded_leaf_boxes(tree: KDTree) -> Float[Tensor, "L 2 3"]:
    """Leaf boxes whose outer faces lie at -inf / +inf (float64): they tile all of space,
    and a point lies in the box of the leaf that ``assign_leaves`` gives it."""
    inf = torch.full((3,), math.inf, dtype=torch.float64, device=tree.device)
    return tree.leaf_boxes(root=torch.stack([-inf, inf]))


def clip_camera(viewmat: Float[Tensor, "4 4"], K: Float[Tensor, "3 3"]) -> Float[Tensor, " 16"]:
    """The float32 camera the clip rule uses: camera-to-world rotation (row major),
    camera centre, fx, fy, cx, cy (computed in float64, rounded once)."""
    view = viewmat.detach().to(torch.float64)
    k = K.detach().to(torch.float64)
    rot_c2w = view[:3, :3].T
    centre = -rot_c2w @ view[:3, 3]
    focal = torch.stack([k[0, 0], k[1, 1], k[0, 2], k[1, 2]])
    return torch.cat([rot_c2w.reshape(-1), centre, focal]).to(torch.float32)


def ray_points(
    camera: Float[Tensor, " 16"],
    px: Float[Tensor, " E"],
    py: Float[Tensor, " E"],
    depth: Float[Tensor, " E"],
) -> Float[Tensor, "E 3"]:
    """World points at camera depth ``depth`` on the rays through pixel centres (px, py).

    float32, one rounding per operation in the kernel's order:
    u = (px - cx) / fx, dir_j = (Rc[j,0] u + Rc[j,1] v) + Rc[j,2], X_j = o_j + z dir_j.
    """
    cam = camera.to(torch.float32)
    rot, centre = cam[:9].reshape(3, 3), cam[9:12]
    fx, fy, cx, cy = cam[12], cam[13], cam[14], cam[15]
    u = (px.to(torch.float32) - cx) / fx
    v = (py.to(torch.float32) - cy) / fy
    direction = rot[:, 0] * u[:, None] + rot[:, 1] * v[:, None] + rot[:, 2]
    return centre + depth.to(torch.float32)[:, None] * direction


def points_in_leaf_boxes(
    points: Float[Tensor, "E 3"], boxes32: Float[Tensor, "B 2 3"], box: Int[Tensor, " E"]
) -> Bool[Tensor, " E"]:
    """``lo <= X < hi`` on every axis for box ``box`` of each point; box -1 always passes."""
    b = boxes32[box.clamp(min=0)]
    inside = ((points >= b[:, 0]) & (points < b[:, 1])).all(dim=-1)
    return inside | (box < 0)


def reach_boxes(
    proj: Projection,
    opacities: Float[Tensor, " N"],
    camera: Float[Tensor, " 16"],
    width: int,
    height: int,
    settings: RasterSettings = RasterSettings(),
) -> Float[Tensor, "N 2 3"]:
    """World axis box of every ray point a Gaussian can be tested at (float64).

    The pixel offsets d = p - mean2d where a Gaussian can count lie in its level-set
    ellipse d^T conic d <= 2 ln(opacity / alpha_min) (inflated as ``raster_ref`` does for
    float32 rounding) and in its tile rectangle.  The ray point is the centre plus
    M d with M = Rc[:, :2] diag(z / fx, z / fy), so along world axis j the ellipse reaches
    +-sqrt(2 s w_j^T Sigma w_j) (w_j row j of M, Sigma = conic^-1 the blurred 2D
    covariance) and the rectangle its corners' extremes; the box is the intersection of
    the two, grown by a relative rounding margin.  Culled Gaussians get an empty box
    (lo = +inf, hi = -inf).

    Args:
        proj: the projection the rasteriser uses (means2d, conics, depths, radii).
        opacities: [N] in [0, 1].
        camera: [16] from ``clip_camera``.
        width, height: image size (tiles are laid on it).
        settings: alpha_min (level set) and tile size.

    Returns:
        [N, 2, 3] float64 min / max corners.
    """
    f64 = torch.float64
    cam = camera.to(f64)
    rot, centre_cam = cam[:9].reshape(3, 3), cam[9:12]
    fx, fy, cx, cy = cam[12], cam[13], cam[14], cam[15]
    m = proj.means2d.detach().to(f64)
    a, b, c = proj.conics.detach().to(f64).unbind(-1)
    z = proj.depths.detach().to(f64)
    det = a * c - b * b
    level = _level_set(proj, opacities, settings)
    usable = (proj.radii > 0) & (level >= 0) & (det > 0)
    det = torch.where(usable, det, torch.ones_like(det))
    sxx, sxy, syy = c / det, -b / det, a / det  # Sigma = conic^-1
    wx = rot[None, :, 0] * (z / fx)[:, None]  # [N, 3]: world offset per pixel of dx
    wy = rot[None, :, 1] * (z / fy)[:, None]
    r2 = (2.0 * level).clamp(min=0.0)[:, None]
    half = torch.sqrt(r2 * (wx * wx * sxx[:, None] + 2.0 * wx * wy * sxy[:, None] + wy * wy * syy[:, None]))
    # The tile rectangle in pixel offsets (pixel centres of the tiles the Gaussian is binned to).
    tiles = tile_ranges(proj.means2d.detach(), proj.radii, settings.tile_size, width, height).to(f64)
    ts = settings.tile_size
    dx_lo = tiles[:, 0] * ts + 0.5 - m[:, 0]
    dx_hi = torch.clamp_max(tiles[:, 1] * ts, width) - 0.5 - m[:, 0]
    dy_lo = tiles[:, 2] * ts + 0.5 - m[:, 1]
    dy_hi = torch.clamp_max(tiles[:, 3] * ts, height) - 0.5 - m[:, 1]
    ex, ey = wx * dx_lo[:, None], wx * dx_hi[:, None]
    fy_lo, fy_hi = wy * dy_lo[:, None], wy * dy_hi[:, None]
    rect_lo = torch.minimum(ex, ey) + torch.minimum(fy_lo, fy_hi)
    rect_hi = torch.maximum(ex, ey) + torch.maximum(fy_lo, fy_hi)
    # Centre: the ray point through mean2d at depth z, i.e. the camera-space mean.
    u, v = (m[:, 0] - cx) / fx, (m[:, 1] - cy) / fy
    direction = rot[None, :, 0] * u[:, None] + rot[None, :, 1] * v[:, None] + rot[None, :, 2]
    centre = centre_cam + z[:, None] * direction
    lo = torch.maximum(-half, rect_lo)
    hi = torch.minimum(half, rect_hi)
    margin = _REACH_MARGIN * (centre_cam.abs().max() + centre.abs() + (z[:, None] * direction).abs() + half) + 1e-12
    lo, hi = centre + lo - margin, centre + hi + margin
    empty = ~usable[:, None]
    lo = torch.where(empty, torch.full_like(lo, math.inf), lo)
    hi = torch.where(empty, torch.full_like(hi, -math.inf), hi)
    return torch.stack([lo, hi], dim=1)


def share_leaves(reach: Float[Tensor, "N 2 3"], boxes: Float[Tensor, "L 2 3"]) -> Copies:
    """Hand every Gaussian to each leaf whose (half-open) box meets its reach box.

    Args:
        reach: [N, 2, 3] closed boxes from ``reach_boxes``.
        boxes: [L, 2, 3] leaf boxes (``unbounded_leaf_boxes``).

    Returns:
        Copies sorted by (gaussian, leaf); ``box`` is -1 for Gaussians with one copy.
    """
    bx = boxes.to(torch.float64)
    pairs = []
    chunk = max(1, _SHARE_CELLS // max(1, bx.shape[0]))
    for start in range(0, reach.shape[0], chunk):
        r = reach[start : start + chunk].to(bx)
        meets = ((r[:, None, 0] < bx[None, :, 1]) & (r[:, None, 1] >= bx[None, :, 0])).all(dim=-1)
        index = meets.nonzero()
        index[:, 0] += start
        pairs.append(index)
    pairs = torch.cat(pairs) if pairs else torch.zeros(0, 2, dtype=torch.int64, device=reach.device)
    gaussian, leaf = pairs[:, 0], pairs[:, 1]
    count = torch.bincount(gaussian, minlength=reach.shape[0])
    box = torch.where(count[gaussian] > 1, leaf, torch.full_like(leaf, -1))
    return Copies(gaussian, leaf, box)


def share_everything(num_gaussians: int, num_leaves: int, device: torch.device | str = "cpu") -> Copies:
    """Every Gaussian in every leaf, always clipped (the reference sharing rule)."""
    gaussian = torch.arange(num_gaussians, device=device).repeat_interleave(num_leaves)
    leaf = torch.arange(num_leaves, device=device).repeat(num_gaussians)
    return Copies(gaussian, leaf, leaf.clone())


def sharing_copies(
    proj: Projection,
    opacities: Float[Tensor, " N"],
    camera: Float[Tensor, " 16"],
    boxes: Float[Tensor, "L 2 3"],
    width: int,
    height: int,
    settings: RasterSettings = RasterSettings(),
    use_kernel: bool = True,
) -> Copies:
    """``share_leaves(reach_boxes(...), boxes)``: the copies one camera needs.

    On CUDA tensors the csrc/ kernel computes the same copies in two launches (the twin's
    float64 steps take dozens of elementwise kernels per camera); ``use_kernel=False`` or
    a machine where it cannot be built uses the twin.
    """
    if use_kernel and proj.means2d.is_cuda:
        from landmark_plugin import cuda

        if cuda.require(allow_fallback=True) is not None:
            gaussian, leaf, box = cuda.share_leaves(
                proj.means2d, proj.conics, proj.depths, proj.radii, opacities, camera, boxes, width, height,
                settings, _REACH_MARGIN,
            )
            return Copies(gaussian, leaf, box)
    return share_leaves(reach_boxes(proj, opacities, camera, width, height, settings), boxes)


def clip_mask(
    copies: Copies,
    depths: Float[Tensor, " M"],
    boxes: Float[Tensor, "L 2 3"],
    camera: Float[Tensor, " 16"],
):
    """The clip rule as a ``raster_ref`` pixel mask over copies (entry = copy index)."""
    boxes32 = boxes.to(torch.float32)
    depths32 = depths.detach().to(torch.float32)

    def mask(entry: Int[Tensor, " E"], xs: Int[Tensor, " E"], ys: Int[Tensor, " E"]) -> Bool[Tensor, " E"]:
        px, py = xs.to(torch.float32) + 0.5, ys.to(torch.float32) + 0.5
        points = ray_points(camera, px, py, depths32[entry])
        return points_in_leaf_boxes(points, boxes32, copies.box[entry])

    return mask


def rasterize_clipped(
    proj: Projection,
    colors: Float[Tensor, "N D"],
    opacities: Float[Tensor, " N"],
    copies: Copies,
    boxes: Float[Tensor, "L 2 3"],
    camera: Float[Tensor, " 16"],
    width: int,
    height: int,
    settings: RasterSettings = RasterSettings(),
    leaf_position: Optional[Int[Tensor, " L"]] = None,
    window: Optional[Window] = None,
    absgrad: Optional[Tensor] = None,
) -> tuple[Float[Tensor, "H W D"], Float[Tensor, "H W 1"]]:
    """One partial of box-clipped copies, sorted per pixel by (leaf position, depth): the
    torch twin of the CUDA kernel's one-pass multi-leaf mode.

    Args:
        proj: projection of the N Gaussians.
        colors: [N, D] features (RGB, depth, ...).
        opacities: [N] in [0, 1].
        copies: M copies (``sharing_copies``); may hold several leaves.
        boxes: [L, 2, 3] leaf boxes (``unbounded_leaf_boxes``).
        camera: [16] from ``clip_camera``.
        width, height: image size.
        settings: rasterisation constants.
        leaf_position: [L] place of each leaf in the camera's leaf order (default: the
            leaf id); copies are sorted by it, then by depth.
        window: optional pixel rectangle (see ``raster_ref.rasterize``).
        absgrad: optional [N, 2] buffer for the N Gaussians' absgrad, every copy's added to its
            Gaussian's (see ``raster_ref.rasterize``).

    Returns:
        [h, w, D] premultiplied colour and [h, w, 1] transmittance; gradients of all copies
        reach the N Gaussians' inputs.
    """
    position = copies.leaf if leaf_position is None else leaf_position[copies.leaf]
    sub = proj.take(copies.gaussian)
    mask = clip_mask(copies, sub.depths, boxes, camera)
    return rasterize(
        sub, colors[copies.gaussian], opacities[copies.gaussian], width, height, settings,
        group=position, window=window, pixel_mask=mask, absgrad=absgrad, absgrad_rows=copies.gaussian,
    )


def rasterize_clipped_leaves(
    proj: Projection,
    colors: Float[Tensor, "N D"],
    opacities: Float[Tensor, " N"],
    copies: Copies,
    boxes: Float[Tensor, "L 2 3"],
    camera: Float[Tensor, " 16"],
    order: Int[Tensor, " L"],
    width: int,
    height: int,
    settings: RasterSettings = RasterSettings(),
) -> tuple[list[Float[Tensor, "H W D"]], list[Float[Tensor, "H W 1"]]]:
    """One clipped partial per leaf, in ``order`` (front to back), each with its own early
    termination (what a rank does for each of its leaves); feed them to ``composite``."""
    colors_out, trans_out = [], []
    for leaf in order.tolist():
        mine = copies.take((copies.leaf == leaf).nonzero()[:, 0])
        c, t = rasterize_clipped(proj, colors, opacities, mine, boxes, camera, width, height, settings)
        colors_out.append(c)
        trans_out.append(t)
    return colors_out, trans_out
