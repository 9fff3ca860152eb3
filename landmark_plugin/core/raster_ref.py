"""Torch reference rasteriser: gsplat 1.4.0's classic 3DGS rule, differentiable by autograd.

It reproduces ``gsplat.rasterization(packed=False)`` (``rasterize_mode`` classic or antialiased,
see ``core/projection.py``) for one pinhole camera, on CPU or GPU, in float32 or float64:

* projection (``fully_fused_projection``): see ``core/projection.py``;
* tile binning (``isect_tiles``): a Gaussian is a candidate for the pixels of every tile
  its [mean2d - radius, mean2d + radius] square touches, in (depth, index) order per tile;
* per pixel (``rasterize_to_pixels``), centre (x + 0.5, y + 0.5): sigma = 0.5 (a dx^2 +
  c dy^2) + b dx dy with d = mean2d - pixel, skipped if sigma < 0; alpha = min(alpha_max,
  opacity exp(-sigma)), skipped if alpha < alpha_min; a Gaussian after which T would be
  <= min_transmittance ends the pixel and is itself excluded.

Output is the premultiplied colour sum_i c_i a_i T_i (no background) and the final T.

Vectorised without per-tile padding.  For every Gaussian, only the pixels of its tiles
inside the ellipse where alpha can reach alpha_min are generated (an exact pruning: all
other pixels are skipped by gsplat too), row interval by row interval, in front-to-back
order.  alpha is computed once, with autograd; the entries are grouped by pixel (stable
sort), gsplat's early termination becomes a mask from a no-grad cumulative product (the
decision is piecewise constant), and the kept entries are composited with an exclusive
cumulative product per pixel, so no 1 / (1 - alpha) appears in the forward pass.  Large
windows are processed in bands of pixel rows, each recomputed in backward, to bound memory.
"""

from __future__ import annotations

import functools

from typing import NamedTuple, Optional

import torch
import torch.utils.checkpoint
from jaxtyping import Bool, Float, Int
from torch import Tensor

from landmark_plugin.core.binning import (  # re-exported: the reference's public API
    PixelMask,
    Window,
    _bands,
    _candidate_rows,
    _ranges,
    _Rows,
    footprint_window,
    sort_rank,
    tile_ranges,
)
from landmark_plugin.core.projection import (  # re-exported: the reference's public API
    Projection,
    RasterSettings,
    perspective_projection,
    project_gaussians,
    quat_scale_to_covar,
    world_to_camera,
)
from landmark_plugin.core.sh import camera_center, gaussian_colors

__all__ = [
    "Projection",
    "RasterSettings",
    "Window",
    "footprint_window",
    "perspective_projection",
    "project_gaussians",
    "quat_scale_to_covar",
    "rasterize",
    "rasterize_groups",
    "render_ref",
    "sort_rank",
    "tile_ranges",
    "world_to_camera",
]


def _alpha(
    geometry: Float[Tensor, "E 6"],
    px: Float[Tensor, " E"],
    py: Float[Tensor, " E"],
    settings: RasterSettings,
) -> tuple[Float[Tensor, " E"], Bool[Tensor, " E"]]:
    """alpha of a Gaussian at a pixel centre and whether it counts (sigma >= 0 and
    alpha >= alpha_min), gsplat's formula term by term.

    Args:
        geometry: [E, 6] mean2d x, y, conic a, b, c and opacity per entry.
        px, py: [E] pixel centres.
    """
    mx, my, a, b, c, opacity = geometry.unbind(-1)  # one stack in backward, not six slices
    dx, dy = mx - px, my - py
    sigma = 0.5 * (a * dx * dx + c * dy * dy) + b * dx * dy
    alpha = torch.clamp_max(opacity * torch.exp(-sigma), settings.alpha_max)
    return alpha, (sigma >= 0) & (alpha >= settings.alpha_min)


class _Runs(NamedTuple):
    """Entries grouped by pixel ("runs"), front to back within a run."""

    pixel: Int[Tensor, " R"]  # the pixel of every run
    length: Int[Tensor, " R"]
    run: Int[Tensor, " E"]  # run of every entry
    slot: Int[Tensor, " E"]  # place of every entry within its run


def _pixel_runs(pixel: Int[Tensor, " E"]) -> _Runs:
    pix_run, run_len = torch.unique_consecutive(pixel, return_counts=True)
    run = torch.repeat_interleave(torch.arange(pix_run.shape[0], device=pixel.device), run_len)
    slot = torch.arange(pixel.shape[0], device=pixel.device) - (torch.cumsum(run_len, 0) - run_len)[run]
    return _Runs(pix_run, run_len, run, slot)


def _run_products(factor: Float[Tensor, " E"], runs: _Runs) -> tuple[Float[Tensor, " E"], Float[Tensor, " R"]]:
    """Per run, the product of the factors before each entry (exclusive) and of all of
    them; differentiable, and sequential like gsplat's loop (no log / exp, no division).

    Runs are padded to [runs, longest] only within buckets of similar length (up to a
    power of two), so one crowded pixel does not pad every other pixel to its length.
    """
    bucket = torch.ceil(torch.log2(runs.length.to(torch.float64))).long()  # length <= 2**bucket
    entry_bucket = bucket[runs.run]
    # index_select / index_copy throughout: their backward is a gather or an index_add, where
    # advanced indexing's is an accumulating index_put (serial on the CPU).
    all_entries, all_before, all_runs, all_total = [], [], [], []
    for b in torch.unique(bucket).tolist():
        run_ids = (bucket == b).nonzero()[:, 0]
        entries = (entry_bucket == b).nonzero()[:, 0]
        local = torch.full_like(runs.length, -1)
        local[run_ids] = torch.arange(run_ids.shape[0], device=run_ids.device)
        flat = local[runs.run[entries]] * 2**b + runs.slot[entries]
        padded = factor.new_ones(run_ids.shape[0] * 2**b).index_copy(0, flat, factor.index_select(0, entries))
        incl = torch.cumprod(padded.view(run_ids.shape[0], 2**b), dim=1)
        excl = torch.cat([torch.ones_like(incl[:, :1]), incl[:, :-1]], dim=1)
        all_entries.append(entries)
        all_before.append(excl.reshape(-1).index_select(0, flat))
        all_runs.append(run_ids)
        all_total.append(incl[:, -1])
    t_before = factor.new_empty(factor.shape[0]).index_copy(0, torch.cat(all_entries), torch.cat(all_before))
    t_total = factor.new_empty(runs.length.shape[0]).index_copy(0, torch.cat(all_runs), torch.cat(all_total))
    return t_before, t_total


def _accumulate(
    colors: Float[Tensor, "N D"],
    gaussian: Int[Tensor, " E"],
    alpha: Float[Tensor, " E"],
    pixel: Int[Tensor, " E"],
    num_pixels: int,
    min_transmittance: float,
) -> tuple[Float[Tensor, "P D"], Float[Tensor, " P"]]:
    """sum_i c_i a_i T_i and the final T per pixel, T_i the exclusive product of (1 - a_j)
    along the pixel (entries grouped by pixel, front first); differentiable.

    gsplat's early termination: T only falls along a pixel, so "T after the entry >
    min_transmittance" keeps exactly the prefix before the first entry that would take T to
    min_transmittance or below (that entry is excluded too).  The products of the kept prefix
    are those of the whole run, so one pass serves both: the decision (piecewise constant, no
    gradient), the kept entries' weights, and the final T, which is the exclusive product at
    the first excluded entry.
    """
    premult = colors.new_zeros(num_pixels, colors.shape[1])
    trans = alpha.new_ones(num_pixels)
    if alpha.numel() == 0:
        return premult, trans
    runs = _pixel_runs(pixel)
    t_before, t_final = _run_products(1.0 - alpha, runs)
    weight = alpha * t_before
    if min_transmittance > 0:
        kept = (t_before * (1.0 - alpha)).detach() > min_transmittance
        num_kept = torch.zeros_like(runs.length).index_add_(0, runs.run, kept.long())
        ended = num_kept < runs.length
        first_out = (torch.cumsum(runs.length, 0) - runs.length + num_kept)[ended]
        t_final = t_final.index_copy(0, torch.nonzero(ended)[:, 0], t_before.index_select(0, first_out))
        index = torch.nonzero(kept)[:, 0]
        gaussian, weight, pixel = gaussian[index], weight.index_select(0, index), pixel[index]
    premult = premult.index_add(0, pixel, weight[:, None] * colors.index_select(0, gaussian))
    return premult, trans.index_copy(0, runs.pixel, t_final)


def rasterize(
    proj: Projection,
    colors: Float[Tensor, "N D"],
    opacities: Float[Tensor, " N"],
    width: int,
    height: int,
    settings: RasterSettings = RasterSettings(),
    group: Optional[Int[Tensor, " N"]] = None,
    window: Optional[Window] = None,
    pixel_mask: Optional[PixelMask] = None,
    absgrad: Optional[Tensor] = None,
    absgrad_rows: Optional[Int[Tensor, " N"]] = None,
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
        pixel_mask: optional rule (Gaussian index, pixel x, pixel y) -> bool; entries where
            it is False are skipped like alpha < alpha_min, before early termination
            (the box clip of ``core/clip.py``).  Evaluated without gradients.
        absgrad: optional [M, 2] buffer that backward adds gsplat's ``absgrad`` to: per
            Gaussian, the sum over pixels of the absolute value of each pixel's gradient with
            respect to its screen mean (what splatfacto's densification threshold is set for).
        absgrad_rows: [N] row of ``absgrad`` of every projected Gaussian (default: the same
            row), e.g. the Gaussian of every sharing copy.

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
    rows = _candidate_rows(proj, opacities, rank, width, height, settings, window)
    # One gather (and one scatter in backward) for the per-Gaussian geometry.
    geometry = torch.cat([proj.means2d, proj.conics, opacities[:, None].to(proj.means2d)], dim=1)
    bands = _bands(rows, window, settings.max_candidates)
    # Autograd would keep every band's per-entry tensors until backward, so the bands would
    # bound only the temporaries.  With several bands each is recomputed in backward instead
    # (the same ops, so the same values): what stays saved is one band's rows, not its entries.
    recompute = len(bands) > 1 and torch.is_grad_enabled() and (geometry.requires_grad or colors.requires_grad)
    # The absgrad buffer is written in backward: bound to the function, not an input that the
    # recomputation would check for in-place changes.
    band_fn = functools.partial(_rasterize_band, absgrad=absgrad, absgrad_rows=absgrad_rows)
    colors_out, trans_out = [], []
    for band_y0, band_y1 in bands:
        in_band = (rows.y >= band_y0) & (rows.y < band_y1)
        band_rows = _Rows(*(t[in_band] for t in rows))
        args = (geometry, colors, band_rows, (x0, band_y0, x1, band_y1), settings, pixel_mask)
        if recompute:
            c, t = torch.utils.checkpoint.checkpoint(band_fn, *args, use_reentrant=False)
        else:
            c, t = band_fn(*args)
        colors_out.append(c)
        trans_out.append(t)
    premult, trans = torch.cat(colors_out), torch.cat(trans_out)
    return premult + anchor, trans + anchor


def _rasterize_band(
    geometry: Float[Tensor, "N 6"],
    colors: Float[Tensor, "N D"],
    rows: _Rows,
    band: Window,
    settings: RasterSettings,
    pixel_mask: Optional[PixelMask] = None,
    absgrad: Optional[Tensor] = None,
    absgrad_rows: Optional[Tensor] = None,
) -> tuple[Float[Tensor, "h w D"], Float[Tensor, "h w 1"]]:
    """Rasterise the candidate rows of one band of the window.

    Args:
        geometry: [N, 6] per Gaussian: mean2d (2), conic (3), opacity.
        colors: [N, D] per Gaussian features.
        rows: candidate rows inside the band, in front-to-back order.
        band: (x0, y0, x1, y1) of the band.
        settings: rasterisation constants.
        pixel_mask: optional extra skip rule (see ``rasterize``).
        absgrad, absgrad_rows: see ``rasterize``.
    """
    x0, y0, x1, y1 = band
    h, w = y1 - y0, x1 - x0
    row, xs = _ranges(rows.x_lo, rows.x_hi, rows.x_hi - rows.x_lo)
    g, ys = rows.gaussian[row], rows.y[row]
    dtype = geometry.dtype
    per_entry = geometry.index_select(0, g)
    if absgrad is not None and per_entry.requires_grad:
        # An entry is one (pixel, Gaussian) pair, so its gradient is that pixel's alone.  A hook
        # on the original tensor fires once also when the band is recomputed in backward.
        rows = g if absgrad_rows is None else absgrad_rows[g]
        per_entry.register_hook(lambda grad: _add_absgrad(absgrad, rows, grad))
    alpha, valid = _alpha(per_entry, xs.to(dtype) + 0.5, ys.to(dtype) + 0.5, settings)
    if pixel_mask is not None:
        with torch.no_grad():
            valid = valid & pixel_mask(g, xs, ys)
    # Candidates come in front-to-back order; a stable sort by pixel keeps it per pixel.
    pixel = (ys - y0) * w + (xs - x0)
    key = torch.where(valid, pixel, h * w)
    key = key.int() if h * w < 2**31 - 1 else key  # int32 keys sort about twice as fast
    by_pixel = torch.sort(key, stable=True).indices[: int(valid.sum())]
    alpha, pixel = alpha.index_select(0, by_pixel), pixel[by_pixel]
    premult, trans = _accumulate(colors, g[by_pixel], alpha, pixel, h * w, settings.min_transmittance)
    return premult.reshape(h, w, -1), trans.reshape(h, w, 1)


def _add_absgrad(absgrad: Tensor, rows: Tensor, grad: Tensor) -> None:
    """Backward hook of the per-entry geometry: |d loss / d mean2d| of each entry into its row."""
    absgrad.index_add_(0, rows, grad[:, :2].abs().to(absgrad.dtype))


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
    return rasterize(proj, colors, proj.opacities(opacities), width, height, settings, group)
