"""Tile binning of the torch reference rasteriser: which (Gaussian, pixel) pairs to evaluate.

gsplat's ``isect_tiles`` bins a Gaussian into every tile its [mean2d - radius, mean2d +
radius] square touches, sorted by (depth, index) per tile.  ``_candidate_rows`` narrows that
to the pixels of those tiles inside the ellipse where alpha can reach alpha_min (an exact
pruning), row by row; ``_bands`` cuts the window into bands of pixel rows of bounded size.
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

import torch
from jaxtyping import Float, Int
from torch import Tensor

from landmark_plugin.core.projection import Projection, RasterSettings

Window = tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels, half-open
PixelMask = Callable[[Tensor, Tensor, Tensor], Tensor]
"""(gaussian [E], pixel x [E], pixel y [E]) -> [E] bool: whether an entry may count."""


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
    alpha_min).  The inflation (1e-2 relative plus 1e-2) covers float32 rounding of sigma
    (whose terms can cancel for elongated splats) and of exp in the rasteriser, so the
    bound never drops a pixel the rasteriser keeps.
    """
    o = opacities.detach().to(torch.float64)
    s = torch.log(o / settings.alpha_min)
    return torch.where(o > 0, s + 1e-2 * s.abs() + 1e-2, torch.full_like(s, -1.0))


def _ranges(lo: Tensor, hi: Tensor, count: Tensor) -> tuple[Int[Tensor, " M"], Int[Tensor, " M"]]:
    """Expand per-item half-open integer ranges: (item id, value) of every element."""
    item = torch.repeat_interleave(torch.arange(count.shape[0], device=count.device), count)
    offset = torch.arange(item.shape[0], device=count.device) - (torch.cumsum(count, 0) - count)[item]
    return item, lo[item] + offset


class _Rows(NamedTuple):
    """Per (Gaussian, pixel row): the half-open x range where it can count, rows in
    front-to-back (rank) order of their Gaussians."""

    gaussian: Int[Tensor, " R"]
    y: Int[Tensor, " R"]
    x_lo: Int[Tensor, " R"]
    x_hi: Int[Tensor, " R"]


@torch.no_grad()
def _candidate_rows(
    proj: Projection,
    opacities: Float[Tensor, " N"],
    rank: Int[Tensor, " N"],
    width: int,
    height: int,
    settings: RasterSettings,
    window: Window,
) -> _Rows:
    """Where each Gaussian must be evaluated, row by row.

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
    return _Rows(order[row_g], row_y, x_lo, x_hi.clamp(min=x_lo))


def _bands(rows: _Rows, window: Window, budget: int) -> list[tuple[int, int]]:
    """Split the window's pixel rows into bands of about ``budget`` candidates each."""
    x0, y0, x1, y1 = window
    per_row = torch.zeros(y1 - y0, dtype=torch.int64, device=rows.y.device)
    per_row.index_add_(0, rows.y - y0, rows.x_hi - rows.x_lo)
    ends = torch.cumsum(per_row, 0)
    bands, start = [], 0
    while start < y1 - y0:
        done = int(ends[start - 1]) if start > 0 else 0
        stop = int(torch.searchsorted(ends, done + budget, right=True))
        stop = min(max(stop, start + 1), y1 - y0)
        bands.append((y0 + start, y0 + stop))
        start = stop
    return bands
