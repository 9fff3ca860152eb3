"""One partial render: a set of Gaussians, one camera, sorted by (leaf position, depth).

This is the unit every caller composes: the single-device model renders all its leaves as one
partial, a rank renders its own leaves as one partial, and ``composite`` joins partials in the
camera's leaf order.  Two backends compute the same function:

- ``gsplat``: gsplat's CUDA projection, SH and rasteriser.  gsplat sorts tile intersections by
  (tile, depth); we re-key them by (tile, leaf position, depth) before its rasteriser runs, so
  one launch renders all leaves of the partial in leaf order (the one-pass multi-leaf rule).
- ``torch``: the pure-torch reference in ``raster_ref`` (CPU, and the twin in GPU tests).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Literal, NamedTuple, Optional, Sequence, Tuple

import torch
from jaxtyping import Float, Int
from torch import Tensor

from landmark_plugin.core.raster_ref import (
    Projection,
    RasterSettings,
    gaussian_colors,
    project_gaussians,
    rasterize,
)
from landmark_plugin.core.sh import camera_center

Backend = Literal["auto", "gsplat", "torch"]


class Gaussians(NamedTuple):
    """Activated Gaussian parameters (what a rasteriser consumes)."""

    means: Float[Tensor, "N 3"]
    quats: Float[Tensor, "N 4"]  # wxyz, not necessarily normalised
    scales: Float[Tensor, "N 3"]  # linear scales (exp of the log-scale parameters)
    opacities: Float[Tensor, "N"]  # in [0, 1]
    sh: Float[Tensor, "N K 3"]  # SH coefficients, or K=1 with plain colours when sh_degree is None
    features: Optional[Float[Tensor, "N F"]] = None  # per-Gaussian appearance features, if the model has them

    def fields(self) -> list:
        """The tensors this set holds, in field order (``features`` only when present): what row
        operations (selection, sends between ranks, concatenation) act on."""
        return [t for t in self if t is not None]

    def take(self, index: Tensor) -> "Gaussians":
        """The Gaussians ``index`` (a [N] bool mask or row indices) selects."""
        return Gaussians(*(t[index] for t in self.fields()))

    def rows(self) -> Float[Tensor, "N D"]:
        """The set as one [N, D] matrix, its fields flattened side by side: what a send between
        ranks carries (``from_rows`` is the inverse)."""
        return torch.cat([t.reshape(t.shape[0], -1) for t in self.fields()], dim=1)

    def from_rows(self, rows: Float[Tensor, "M D"]) -> "Gaussians":
        """Gaussians laid out as ``rows()`` lays out this set (received rows), in this set's dtypes."""
        columns = split_columns(rows, [tuple(t.shape[1:]) for t in self.fields()])
        return Gaussians(*(c.to(t.dtype) for c, t in zip(columns, self.fields())))


def split_columns(rows: Tensor, tails: Sequence[Tuple[int, ...]]) -> List[Tensor]:
    """[N, D] rows cut into one [N, *tail] tensor per trailing shape, in order: the inverse of
    concatenating per-row tensors flattened along dim 1."""
    out, col = [], 0
    for tail in tails:
        width = math.prod(tail)
        out.append(rows[:, col : col + width].reshape((rows.shape[0], *tail)))
        col += width
    return out


@dataclass
class Partial:
    """A premultiplied partial image and what densification needs from it."""

    color: Float[Tensor, "H W D"]  # sum_i c_i a_i T_i (RGB, then expected-depth numerator if asked)
    transmittance: Float[Tensor, "H W 1"]  # prod_i (1 - a_i)
    means2d: Float[Tensor, "1 N 2"]  # screen means; their .grad / .absgrad drive densification
    radii: Int[Tensor, "1 N"]  # 0 for culled Gaussians


def resolve_backend(backend: Backend, device: torch.device) -> Literal["gsplat", "torch"]:
    """``auto`` picks gsplat on CUDA tensors and the torch reference elsewhere."""
    if backend == "auto":
        return "gsplat" if device.type == "cuda" else "torch"
    if backend == "gsplat" and device.type != "cuda":
        raise ValueError("backend='gsplat' needs CUDA tensors; use backend='torch' (or 'auto') on CPU")
    return backend


def render_partial(
    gaussians: Gaussians,
    leaf_position: Int[Tensor, "N"],
    viewmat: Float[Tensor, "4 4"],
    K: Float[Tensor, "3 3"],
    width: int,
    height: int,
    sh_degree: Optional[int],
    settings: RasterSettings = RasterSettings(),
    with_depth: bool = False,
    backend: Backend = "auto",
    absgrad: bool = False,
    num_leaf_positions: Optional[int] = None,
) -> Partial:
    """Render ``gaussians`` as one partial, sorted per pixel by (leaf_position, depth).

    Args:
        gaussians: activated parameters, N Gaussians.
        leaf_position: [N] position of each Gaussian's leaf in the camera's front-to-back leaf order.
        viewmat: [4, 4] world->camera (OpenCV: x right, y down, z forward).
        K: [3, 3] pinhole intrinsics for a ``width`` x ``height`` image.
        sh_degree: SH degree to evaluate, or None when ``gaussians.sh`` holds plain colours [N, 1, 3].
        with_depth: append the camera-z channel (its composite / (1 - T) is the expected depth).
        absgrad: also accumulate |per-pixel gradient| into ``means2d.absgrad`` (both backends).
        num_leaf_positions: an upper bound on ``leaf_position`` (e.g. the number of leaves);
            given, it spares a device->host sync per render.
    """
    which = resolve_backend(backend, gaussians.means.device)
    if which == "gsplat":
        if num_leaf_positions is None:
            num_leaf_positions = int(leaf_position.max().item()) + 1 if leaf_position.numel() else 1
        return _render_partial_gsplat(
            gaussians, leaf_position, viewmat, K, width, height, sh_degree, settings, with_depth, absgrad,
            num_leaf_positions,
        )
    return _render_partial_torch(gaussians, leaf_position, viewmat, K, width, height, sh_degree, settings, with_depth, absgrad)


def _colors(gaussians: Gaussians, campos: Tensor, sh_degree: Optional[int]) -> Tensor:
    if sh_degree is None:
        return gaussians.sh[:, 0, :]
    return gaussian_colors(gaussians.sh, gaussians.means, campos, sh_degree)


def project(
    gaussians: Gaussians,
    viewmat: Float[Tensor, "4 4"],
    K: Float[Tensor, "3 3"],
    width: int,
    height: int,
    settings: RasterSettings,
    backend: Literal["gsplat", "torch"],
) -> Projection:
    """The projection every render of ``backend`` uses: gsplat's CUDA ``fully_fused_projection``
    or its torch twin (``projection.project_gaussians``); compensations in antialiased mode."""
    if backend == "torch":
        return project_gaussians(gaussians.means, gaussians.quats, gaussians.scales, viewmat, K, width, height, settings)
    from gsplat.cuda._wrapper import fully_fused_projection

    radii, means2d, depths, conics, compensations = fully_fused_projection(
        gaussians.means, None, gaussians.quats, gaussians.scales, viewmat[None], K[None], width, height,
        eps2d=settings.eps2d, near_plane=settings.near_plane, far_plane=settings.far_plane,
        radius_clip=settings.radius_clip, packed=False, calc_compensations=settings.rasterize_mode == "antialiased",
    )  # radii [1, N], means2d [1, N, 2], depths [1, N], conics [1, N, 3], compensations [1, N] or None
    return Projection(means2d[0], conics[0], depths[0], radii[0], None if compensations is None else compensations[0])


class TorchInputs(NamedTuple):
    """What the torch renders (plain and clipped) hand their rasteriser."""

    proj: Projection  # its means2d is ``means2d[0]``
    means2d: Tensor  # [1, N, 2] the tensor whose gradient (and ``.absgrad``) densification reads
    colors: Tensor  # [N, D] colours, camera z appended with depth
    opacities: Tensor  # [N] (antialiased: times the compensation)
    absgrad: Optional[Tensor]  # [N, 2] ``means2d.absgrad[0]``, filled in backward; None when not asked


def _torch_inputs(gaussians, viewmat, K, width, height, sh_degree, settings, with_depth, absgrad) -> TorchInputs:
    proj = project(gaussians, viewmat, K, width, height, settings, "torch")
    means2d = proj.means2d[None]
    proj = proj._replace(means2d=means2d[0])
    buffer = None
    if absgrad and torch.is_grad_enabled() and means2d.requires_grad:
        means2d.absgrad = torch.zeros_like(means2d)  # where gsplat puts it
        buffer = means2d.absgrad[0]
    colors = _colors(gaussians, camera_center(viewmat), sh_degree)
    if with_depth:
        colors = torch.cat([colors, proj.depths[:, None]], dim=-1)
    return TorchInputs(proj, means2d, colors, proj.opacities(gaussians.opacities), buffer)


def _render_partial_torch(gaussians, leaf_position, viewmat, K, width, height, sh_degree, settings, with_depth,
                          absgrad=False):
    t = _torch_inputs(gaussians, viewmat, K, width, height, sh_degree, settings, with_depth, absgrad)
    color, transmittance = rasterize(t.proj, t.colors, t.opacities, width, height, settings, group=leaf_position,
                                     absgrad=t.absgrad)
    return Partial(color, transmittance, t.means2d, t.proj.radii[None])


def _render_partial_gsplat(
    gaussians, leaf_position, viewmat, K, width, height, sh_degree, settings, with_depth, absgrad, num_leaf_positions
):
    from gsplat.cuda._wrapper import (
        isect_offset_encode,
        isect_tiles,
        rasterize_to_pixels,
        spherical_harmonics,
    )

    proj = project(gaussians, viewmat, K, width, height, settings, "gsplat")
    means2d, depths, conics, radii = proj.means2d[None], proj.depths[None], proj.conics[None], proj.radii[None]
    campos = camera_center(viewmat)
    if sh_degree is None:
        colors = gaussians.sh[None, :, 0, :]
    else:
        dirs = gaussians.means[None] - campos
        colors = spherical_harmonics(sh_degree, dirs, gaussians.sh[None], masks=radii > 0)
        colors = torch.clamp_min(colors + 0.5, 0.0)
    if with_depth:
        colors = torch.cat([colors, depths[..., None]], dim=-1)

    tile = settings.tile_size
    tiles_x, tiles_y = math.ceil(width / tile), math.ceil(height / tile)
    num_positions = num_leaf_positions
    if num_positions <= 1:
        _, isect_ids, flatten_ids = isect_tiles(means2d, radii, depths, tile, tiles_x, tiles_y, sort=True)
        offsets = isect_offset_encode(isect_ids, 1, tiles_x, tiles_y)
    else:
        _, isect_ids, flatten_ids = isect_tiles(means2d, radii, depths, tile, tiles_x, tiles_y, sort=False)
        offsets, flatten_ids = _sort_by_tile_leaf_depth(
            isect_ids, flatten_ids, leaf_position, num_positions, tiles_x * tiles_y
        )
        offsets = offsets.view(1, tiles_y, tiles_x)
    render, alpha = rasterize_to_pixels(
        means2d,
        conics,
        colors,
        proj.opacities(gaussians.opacities)[None],
        width,
        height,
        tile,
        offsets,
        flatten_ids,
        absgrad=absgrad,
    )
    return Partial(render[0], 1.0 - alpha[0], means2d, radii)


_DEPTH_BITS = 31
"""Bits of a (positive) float32 depth in the (tile, leaf position, depth) sort key."""


def _sort_by_tile_leaf_depth(
    isect_ids: Int[Tensor, "M"],
    flatten_ids: Int[Tensor, "M"],
    leaf_position: Int[Tensor, "N"],
    num_positions: int,
    num_tiles: int,
) -> tuple[Tensor, Tensor]:
    """Sort one camera's tile intersections by (tile, leaf position, depth).

    On CUDA the csrc/ radix sort does it over only the key bits in use (what gsplat's own sort
    costs); elsewhere, or when the kernels cannot be built, the torch twin below.

    Returns:
        offsets [num_tiles] int32 (first intersection of each tile) and the sorted flatten_ids.
    """
    if _DEPTH_BITS + max(1, (num_positions - 1).bit_length()) + max(1, num_tiles.bit_length()) > 63:
        raise ValueError(f"{num_positions} leaf positions and {num_tiles} tiles do not fit a 64-bit sort key")
    if isect_ids.is_cuda:
        from landmark_plugin import cuda

        if cuda.require(allow_fallback=True) is not None:
            return cuda.sort_tile_leaf_depth(isect_ids, flatten_ids, leaf_position, num_positions, num_tiles)
    return _sort_by_tile_leaf_depth_torch(isect_ids, flatten_ids, leaf_position, num_positions, num_tiles)


def _sort_by_tile_leaf_depth_torch(
    isect_ids: Int[Tensor, "M"],
    flatten_ids: Int[Tensor, "M"],
    leaf_position: Int[Tensor, "N"],
    num_positions: int,
    num_tiles: int,
) -> tuple[Tensor, Tensor]:
    """The torch twin of ``cuda.sort_tile_leaf_depth`` (a stable int64 sort of the widened key).

    gsplat's key is ``tile_id << 32 | depth_bits`` (one camera: no camera bits).  Positive
    float32 depths order like their bit patterns, so inserting the leaf position between the
    tile and the depth bits gives the lexicographic key in one int64 sort.  Binned Gaussians
    lie in front of the camera, so the depth's sign bit is 0 and the key keeps its other 31
    bits (``_DEPTH_BITS``, as the CUDA sort does: one radix pass fewer at 16 leaves).

    Returns:
        offsets [num_tiles] int32 (first intersection of each tile) and the sorted flatten_ids.
    """
    position_bits = max(1, (num_positions - 1).bit_length())
    tile_id = isect_ids >> 32
    depth_bits = isect_ids & ((1 << _DEPTH_BITS) - 1)
    position = leaf_position[flatten_ids.long()].to(torch.int64)
    key = (tile_id << (_DEPTH_BITS + position_bits)) | (position << _DEPTH_BITS) | depth_bits
    key, order = torch.sort(key, stable=True)
    sorted_tiles = key >> (_DEPTH_BITS + position_bits)
    tiles = torch.arange(num_tiles, device=key.device, dtype=sorted_tiles.dtype)
    offsets = torch.searchsorted(sorted_tiles, tiles).to(torch.int32)
    return offsets, flatten_ids[order].contiguous()
