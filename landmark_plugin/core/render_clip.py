"""One partial render in ``clip`` mode: box-clipped leaves with boundary sharing, one pass.

The counterpart of ``render.render_partial`` (``plain`` mode).  For one camera: project,
hand every visible Gaussian to each leaf its ray points can reach (``clip.sharing_copies``),
then render all copies in one pass sorted per pixel by (leaf position, depth), each copy
clipped to its leaf's box.  The result equals the ordinary render of the same Gaussians
(DESIGN.md section 3), and gradients of all copies reach the Gaussians' parameters.

Backends compute the same function:
- ``gsplat``: gsplat's projection, SH and tile intersection (on the copies), re-keyed by
  (tile, leaf position, depth), then the box-clipped CUDA kernel (``landmark_plugin.cuda``);
- ``torch``: the twin (``clip.rasterize_clipped`` on ``raster_ref``), CPU or GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from landmark_plugin.core.binning import tile_ranges
from landmark_plugin.core.clip import _REACH_MARGIN, Copies, clip_camera, rasterize_clipped, sharing_copies
from landmark_plugin.core.projection import Projection, RasterSettings
from landmark_plugin.core.render import (
    Backend,
    Gaussians,
    Partial,
    _sort_by_tile_leaf_depth_torch,
    _torch_inputs,
    project,
    resolve_backend,
)
from landmark_plugin.core.sh import camera_center


@dataclass(frozen=True, eq=False)
class ClipLeaves:
    """The leaves a clipped partial renders into.

    Attributes:
        boxes: [L, 2, 3] leaf boxes with outer faces at infinity (``clip.unbounded_leaf_boxes``).
        leaf_position: [L] int64 place of each leaf in the camera's front-to-back order.
    """

    boxes: Float[Tensor, "L 2 3"]
    leaf_position: Int[Tensor, " L"]


def render_partial_clipped(
    gaussians: Gaussians,
    leaves: ClipLeaves,
    viewmat: Float[Tensor, "4 4"],
    K: Float[Tensor, "3 3"],
    width: int,
    height: int,
    sh_degree: Optional[int],
    settings: RasterSettings = RasterSettings(),
    with_depth: bool = False,
    backend: Backend = "auto",
    absgrad: bool = False,
    allow_fallback: bool = False,
    leaf_mask: Optional[Bool[Tensor, " L"]] = None,
) -> Partial:
    """Render ``gaussians`` as one clipped partial over ``leaves`` (one pass).

    Args:
        gaussians: activated parameters, N Gaussians (any leaves; sharing decides who draws).
        leaves: boxes and camera leaf order.
        viewmat, K: [4, 4] world->camera (OpenCV) and [3, 3] intrinsics.
        width, height: image size.
        sh_degree: SH degree, or None when ``gaussians.sh`` holds plain colours [N, 1, 3].
        settings: rasterisation constants.
        with_depth: append camera z as a last channel.
        backend: ``gsplat`` (CUDA kernel), ``torch`` (twin) or ``auto`` (by device).
        absgrad: fill ``means2d.absgrad`` for densification.
        allow_fallback: on CUDA, use the twin when the kernel cannot be built (warned once)
            instead of raising ``cuda.CudaUnavailable``.
        leaf_mask: [L] the leaves this partial draws (a rank's part); copies that land in the
            other leaves are left to the partials of those leaves.  Sharing is still decided
            over all L boxes, so a copy is clipped exactly as in the whole render.  None: all.

    Returns:
        Partial with [H, W, D] colour, [H, W, 1] transmittance, [1, N, 2] means2d, [1, N] radii.
    """
    which = resolve_backend(backend, gaussians.means.device)
    if which == "gsplat":
        from landmark_plugin import cuda

        if cuda.require(allow_fallback) is not None:
            return _clipped_cuda(
                gaussians, leaves, viewmat, K, width, height, sh_degree, settings, with_depth, absgrad, leaf_mask
            )
    return _clipped_torch(gaussians, leaves, viewmat, K, width, height, sh_degree, settings, with_depth, leaf_mask, absgrad)


@torch.no_grad()
def reached_leaves(
    gaussians: Gaussians,
    boxes: Float[Tensor, "L 2 3"],
    viewmat: Float[Tensor, "4 4"],
    K: Float[Tensor, "3 3"],
    width: int,
    height: int,
    settings: RasterSettings = RasterSettings(),
    backend: Backend = "auto",
) -> tuple[Copies, Int[Tensor, " N"]]:
    """The sharing copies of ``gaussians`` for one camera, as ``render_partial_clipped`` of
    the same backend decides them (same projection, same sharing rule): which leaves each
    Gaussian is drawn in.  A rank sends a Gaussian to every rank owning one of its leaves.

    Returns:
        the copies (gaussian, leaf, box) and [N] the projection's radii (0: culled).
    """
    which = resolve_backend(backend, gaussians.means.device)
    proj = project(gaussians, viewmat, K, width, height, settings, which)
    camera = clip_camera(viewmat, K).to(gaussians.means.device)
    opacities = proj.opacities(gaussians.opacities)
    copies = sharing_copies(proj, opacities, camera, boxes, width, height, settings, use_kernel=which == "gsplat")
    return copies, proj.radii


def _keep_masked_entries(
    proj: Projection,
    opacities: Float[Tensor, " N"],
    camera: Float[Tensor, " 16"],
    leaves: ClipLeaves,
    width: int,
    height: int,
    settings: RasterSettings,
    entries: tuple[Tensor, Tensor, Tensor],
    leaf_mask: Bool[Tensor, " L"],
) -> tuple[Tensor, Tensor, Tensor]:
    """Drop the sorted tile entries (``clip_intersections``) of copies outside ``leaf_mask``.

    An entry names its leaf through its box, except a Gaussian's only copy (box -1): its leaf
    comes from the same sharing decision (``sharing_copies``).  Entries stay in order; the
    tile offsets are recounted.
    """
    offsets, flatten_ids, boxes = entries
    copies = sharing_copies(proj, opacities, camera, leaves.boxes, width, height, settings)
    only = copies.box < 0
    single = torch.full((proj.means2d.shape[0],), -1, dtype=torch.int64, device=flatten_ids.device)
    single[copies.gaussian[only]] = copies.leaf[only]
    leaf = torch.where(boxes >= 0, boxes.long(), single[flatten_ids.long()])
    keep = (leaf >= 0) & leaf_mask.to(leaf.device)[leaf.clamp(min=0)]
    num_tiles, total = offsets.numel(), flatten_ids.shape[0]
    entry = torch.arange(total, device=leaf.device, dtype=torch.int32)
    tile = torch.searchsorted(offsets.reshape(-1).contiguous(), entry, right=True) - 1
    counts = torch.bincount(tile[keep], minlength=num_tiles)
    kept_offsets = (torch.cumsum(counts, 0) - counts).to(torch.int32).view_as(offsets)
    return kept_offsets, flatten_ids[keep].contiguous(), boxes[keep].contiguous()


def _clipped_torch(gaussians, leaves, viewmat, K, width, height, sh_degree, settings, with_depth, leaf_mask,
                   absgrad=False) -> Partial:
    t = _torch_inputs(gaussians, viewmat, K, width, height, sh_degree, settings, with_depth, absgrad)
    camera = clip_camera(viewmat, K).to(gaussians.means.device)
    copies = sharing_copies(t.proj, t.opacities, camera, leaves.boxes, width, height, settings)
    if leaf_mask is not None:
        copies = copies.take(torch.nonzero(leaf_mask.to(copies.leaf.device)[copies.leaf]).flatten())
    color, trans = rasterize_clipped(
        t.proj, t.colors, t.opacities, copies, leaves.boxes, camera, width, height, settings,
        leaf_position=leaves.leaf_position, absgrad=t.absgrad,
    )
    return Partial(color, trans, t.means2d, t.proj.radii[None])


def clip_intersections(
    proj: Projection,
    opacities: Float[Tensor, " N"],
    camera: Float[Tensor, " 16"],
    leaves: ClipLeaves,
    width: int,
    height: int,
    settings: RasterSettings = RasterSettings(),
) -> tuple[Int[Tensor, "TH TW"], Int[Tensor, " M"], Int[Tensor, " M"]]:
    """The tile intersections of the sharing copies, sorted by (tile, leaf position, depth):
    the entries the box-clipped rasteriser walks.

    Each copy (``clip.sharing_copies``) is binned to its Gaussian's tiles by gsplat's
    ``isect_tiles`` rule.  On CUDA one csrc/ op goes from the projection to the sorted
    entries; elsewhere (or without the kernels) the torch twin below gives the same
    entries in the same order.

    Returns:
        isect_offsets [TH, TW] int32 (first entry of each tile), flatten_ids [M] int32
        (Gaussian of each entry) and isect_boxes [M] int32 (box of each entry, -1 = unclipped).
    """
    if proj.means2d.is_cuda:
        from landmark_plugin import cuda

        if cuda.require(allow_fallback=True) is not None:
            return cuda.clip_intersections(
                proj.means2d, proj.conics, proj.depths, proj.radii, opacities, camera, leaves.boxes,
                leaves.leaf_position, width, height, settings, _REACH_MARGIN,
            )
    return _clip_intersections_torch(proj, opacities, camera, leaves, width, height, settings)


def _clip_intersections_torch(proj, opacities, camera, leaves, width, height, settings):
    """Twin of ``cuda.clip_intersections``: sharing copies, each copy's tiles in gsplat's
    order (rows, then columns), one stable sort by (tile, leaf position, depth)."""
    copies = sharing_copies(proj, opacities, camera, leaves.boxes, width, height, settings, use_kernel=False)
    ts = settings.tile_size
    tiles_x, tiles_y = math.ceil(width / ts), math.ceil(height / ts)
    g = copies.gaussian
    rect = tile_ranges(proj.means2d[g], proj.radii[g], ts, width, height)  # [C, 4] x0 x1 y0 y1
    columns = rect[:, 1] - rect[:, 0]
    count = columns * (rect[:, 3] - rect[:, 2])
    copy = torch.repeat_interleave(torch.arange(g.shape[0], device=g.device), count)
    within = torch.arange(copy.shape[0], device=g.device) - (torch.cumsum(count, 0) - count)[copy]
    tile = (rect[copy, 2] + within // columns[copy]) * tiles_x + rect[copy, 0] + within % columns[copy]
    depth_bits = proj.depths.detach().to(torch.float32).view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    isect_ids = (tile << 32) | depth_bits[g[copy]]
    num_positions = int(leaves.leaf_position.shape[0])
    offsets, order = _sort_by_tile_leaf_depth_torch(
        isect_ids, copy, leaves.leaf_position.to(g.device)[copies.leaf], num_positions, tiles_x * tiles_y
    )
    return (
        offsets.view(tiles_y, tiles_x),
        g[order].to(torch.int32),
        copies.box[order].to(torch.int32),
    )


def _clipped_cuda(
    gaussians, leaves, viewmat, K, width, height, sh_degree, settings, with_depth, absgrad, leaf_mask
) -> Partial:
    from gsplat.cuda._wrapper import spherical_harmonics

    from landmark_plugin.cuda import rasterize_clipped as rasterize_clipped_cuda

    projected = project(gaussians, viewmat, K, width, height, settings, "gsplat")
    means2d, conics, depths = projected.means2d[None], projected.conics[None], projected.depths[None]
    radii = projected.radii[None]  # [1, N]
    if sh_degree is None:
        colors = gaussians.sh[:, 0, :]
    else:
        dirs = gaussians.means[None] - camera_center(viewmat)
        colors = spherical_harmonics(sh_degree, dirs, gaussians.sh[None], masks=radii > 0)[0]
        colors = torch.clamp_min(colors + 0.5, 0.0)
    if with_depth:
        colors = torch.cat([colors, depths[0, :, None]], dim=-1)
    camera = clip_camera(viewmat, K).to(gaussians.means.device)
    opacities = projected.opacities(gaussians.opacities)
    proj = Projection(means2d[0].detach(), conics[0].detach(), depths[0].detach(), radii[0])
    entries = clip_intersections(proj, opacities.detach(), camera, leaves, width, height, settings)
    if leaf_mask is not None:
        entries = _keep_masked_entries(
            proj, opacities.detach(), camera, leaves, width, height, settings, entries, leaf_mask
        )
    offsets, flatten_ids, isect_boxes = entries
    color, trans = rasterize_clipped_cuda(
        means2d, conics, colors, opacities, depths[0], leaves.boxes, camera, width, height,
        offsets, flatten_ids, isect_boxes, settings, absgrad=absgrad,
    )
    return Partial(color, trans, means2d, radii)
