"""The CUDA kernels of csrc/, built on first use, and their typed wrappers.

Importing this module compiles nothing.  The first call of a kernel wrapper (or of
``load()``) JIT-builds csrc/ with ``torch.utils.cpp_extension.load`` into
``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``), for the compute
capability of the GPU present unless ``TORCH_CUDA_ARCH_LIST`` says otherwise; later
processes reuse the cached build, and a change of the sources rebuilds it.  When a build
is impossible (a torch without CUDA, no GPU, no nvcc, no ninja, a compiler error) the
wrappers raise ``CudaUnavailable`` with the reason; ``require(allow_fallback=True)`` lets a
caller that accepts the torch twin (core/) carry on instead, with a one-time warning.

Every kernel has a same-named twin in core/ computing the same function:
``rasterize_clipped`` here is ``core.clip.rasterize_clipped`` on gsplat's tile
intersections; ``cuda_grid.sample_block_features`` (the grid's kernel, in its own module) is
``core.grid_features.sample_block_features``.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path
from types import ModuleType
from typing import Optional

import torch
from jaxtyping import Float, Int
from torch import Tensor

from landmark_plugin.core.projection import RasterSettings

EXTENSION_NAME = "landmark_plugin_csrc"
CHANNELS = (1, 2, 3, 4, 8, 16, 32, 64)
"""Colour channel counts the rasteriser is compiled for; others are zero-padded up."""

_module: Optional[ModuleType] = None
_failure: Optional[str] = None
_warned = False


class CudaUnavailable(RuntimeError):
    """csrc/ cannot be built or run here; the message says why."""


def csrc_dir() -> Path:
    """Folder of the kernel sources (installed as the package ``landmark_plugin.csrc``)."""
    import landmark_plugin.csrc as csrc

    return Path(csrc.__file__).resolve().parent


def sources() -> list[Path]:
    folder = csrc_dir()
    return sorted(folder.glob("*.cpp")) + sorted(folder.glob("*.cu"))


def why_unavailable() -> Optional[str]:
    """The reason csrc/ cannot be built on this machine without trying, or None."""
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is built without CUDA"
    if not torch.cuda.is_available():
        return "no CUDA device is visible (torch.cuda.is_available() is False)"
    from torch.utils import cpp_extension

    cuda_home = cpp_extension.CUDA_HOME
    nvcc = Path(cuda_home, "bin", "nvcc") if cuda_home else None
    if nvcc is None or not nvcc.exists():
        if shutil.which("nvcc") is None:
            return "nvcc is not found: install the CUDA toolkit and set CUDA_HOME or put nvcc on PATH"
    if shutil.which("ninja") is None and not _ninja_module():
        return "ninja is not installed (pip install ninja): torch's JIT build needs it"
    if not sources():
        return f"no kernel sources in {csrc_dir()}"
    return None


def _ninja_module() -> bool:
    try:
        from torch.utils.cpp_extension import verify_ninja_availability

        verify_ninja_availability()
        return True
    except Exception:  # noqa: BLE001 - any failure means no ninja
        return False


def _arch_list() -> str:
    """TORCH_CUDA_ARCH_LIST for the GPUs present, e.g. "9.0" on H100 / H200."""
    caps = sorted({torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())})
    return ";".join(f"{major}.{minor}" for major, minor in caps)


def load(verbose: bool = False) -> ModuleType:
    """Build (first time) and import the extension; raise ``CudaUnavailable`` if impossible.

    The outcome is cached for the process: a failed build is not retried.
    """
    global _module, _failure
    if _module is not None:
        return _module
    if _failure is not None:
        raise CudaUnavailable(_failure)
    reason = why_unavailable()
    if reason is not None:
        _failure = f"landmark_plugin CUDA kernels unavailable: {reason}"
        raise CudaUnavailable(_failure)
    from torch.utils import cpp_extension

    previous = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if previous is None:
        os.environ["TORCH_CUDA_ARCH_LIST"] = _arch_list()
    try:
        _module = cpp_extension.load(
            name=EXTENSION_NAME,
            sources=[str(p) for p in sources()],
            extra_include_paths=[str(csrc_dir())],
            extra_cflags=["-O3"],
            extra_cuda_cflags=["-O3", "--expt-relaxed-constexpr"],
            verbose=verbose,
        )
    except Exception as err:  # noqa: BLE001 - compiler / linker errors come in many types
        _failure = f"landmark_plugin CUDA kernels failed to build from {csrc_dir()}: {type(err).__name__}: {err}"
        raise CudaUnavailable(_failure) from err
    finally:
        if previous is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
    return _module


def available() -> bool:
    """Whether the kernels can be used (builds them on the first call)."""
    try:
        load()
        return True
    except CudaUnavailable:
        return False


def require(allow_fallback: bool) -> Optional[ModuleType]:
    """The extension, or None when it is unavailable and the caller accepts the torch twin
    (warned once); raises ``CudaUnavailable`` otherwise."""
    global _warned
    try:
        return load()
    except CudaUnavailable as err:
        if not allow_fallback:
            raise
        if not _warned:
            warnings.warn(f"{err}; falling back to the torch twin (slow)", RuntimeWarning, stacklevel=2)
            _warned = True
        return None


# ---------------------------------------------------------------------------------------
# box-clipped rasteriser


def padded_channels(channels: int) -> int:
    """The smallest compiled channel count that holds ``channels``."""
    for c in CHANNELS:
        if c >= channels:
            return c
    raise ValueError(f"at most {CHANNELS[-1]} colour channels are supported, got {channels}")


class _ClipRasterize(torch.autograd.Function):
    """Forward calls ``clip_rasterize_fwd``, backward ``clip_rasterize_bwd``."""

    @staticmethod
    def forward(ctx, means2d, conics, colors, opacities, depths, boxes, camera, isect_offsets,
                flatten_ids, isect_boxes, width, height, settings, absgrad, poison):
        fixed = (depths, boxes, camera, isect_offsets, flatten_ids, isect_boxes)
        knobs = (width, height, settings.tile_size, settings.alpha_min, settings.alpha_max,
                 settings.min_transmittance)
        render, trans, last_ids = load().clip_rasterize_fwd(
            means2d.contiguous(), conics.contiguous(), colors.contiguous(), opacities.contiguous(),
            *fixed, *knobs, poison,
        )
        ctx.save_for_backward(means2d, conics, colors, opacities, *fixed, trans, last_ids)
        ctx.knobs, ctx.absgrad, ctx.render_shape = knobs, absgrad, render.shape
        return render, trans

    @staticmethod
    def backward(ctx, v_render, v_trans):
        means2d, conics, colors, opacities, *fixed, trans, last_ids = ctx.saved_tensors
        v_render = trans.new_zeros(ctx.render_shape) if v_render is None else v_render
        v_trans = torch.zeros_like(trans) if v_trans is None else v_trans
        v_means2d, v_abs, v_conics, v_colors, v_opacities = load().clip_rasterize_bwd(
            means2d.contiguous(), conics.contiguous(), colors.contiguous(), opacities.contiguous(),
            *fixed, *ctx.knobs, trans, last_ids, v_render.contiguous(), v_trans.contiguous(), ctx.absgrad,
        )
        if ctx.absgrad:
            means2d.absgrad = v_abs.view_as(means2d)
        grads = (v_means2d.view_as(means2d), v_conics.view_as(conics), v_colors.view_as(colors),
                 v_opacities.view_as(opacities))
        return grads + (None,) * 11


def rasterize_clipped(
    means2d: Float[Tensor, "*c N 2"],
    conics: Float[Tensor, "*c N 3"],
    colors: Float[Tensor, "N D"],
    opacities: Float[Tensor, " N"],
    depths: Float[Tensor, " N"],
    boxes: Float[Tensor, "L 2 3"],
    camera: Float[Tensor, " 16"],
    width: int,
    height: int,
    isect_offsets: Int[Tensor, "*c TH TW"],
    flatten_ids: Int[Tensor, " M"],
    isect_boxes: Int[Tensor, " M"],
    settings: RasterSettings = RasterSettings(),
    absgrad: bool = False,
    poison: bool = False,
) -> tuple[Float[Tensor, "H W D"], Float[Tensor, "H W 1"]]:
    """Box-clipped rasterisation of one camera's tile intersections (CUDA kernel).

    Entry e of the intersection list draws Gaussian ``flatten_ids[e]`` and counts at a pixel
    only if the point on the pixel's ray at the Gaussian's depth lies in box
    ``isect_boxes[e]`` (-1: always); otherwise gsplat's per-pixel rule.  Sorting entries
    by (tile, leaf position, depth) renders several leaves in one pass.  Copies of a
    Gaussian (several entries with the same id in one tile) add their gradients.

    Args:
        means2d, conics: [N, 2], [N, 3] (or [1, N, ...]) from gsplat's projection.
        colors: [N, D] features (RGB, depth as a channel, ...); padded to a compiled count.
        opacities: [N] in [0, 1].
        depths: [N] camera z (the clip test's depth; no gradient).
        boxes: [L, 2, 3] leaf boxes (``core.clip.unbounded_leaf_boxes``); cast to float32.
        camera: [16] from ``core.clip.clip_camera``.
        width, height: image size.
        isect_offsets: [TH, TW] int32 first entry per tile (gsplat's isect_offset_encode).
        flatten_ids: [M] int32 Gaussian per entry.
        isect_boxes: [M] int32 box per entry, -1 for none.
        settings: tile size and gsplat's thresholds.
        absgrad: also store sum |per-pixel d loss / d means2d| in ``means2d.absgrad``.
        poison: fill outputs with NaN before the kernel (tests: every pixel is written).

    Returns:
        [H, W, D] premultiplied colour (no background) and [H, W, 1] transmittance.
    """
    channels = colors.shape[-1]
    padded = padded_channels(channels)
    if padded != channels:
        colors = torch.cat([colors, colors.new_zeros(colors.shape[0], padded - channels)], dim=-1)
    f32 = dict(device=means2d.device, dtype=torch.float32)
    render, trans = _ClipRasterize.apply(
        means2d, conics, colors, opacities,
        depths.detach().to(**f32).contiguous(), boxes.detach().to(**f32).contiguous(),
        camera.detach().to(**f32).contiguous(), isect_offsets.to(torch.int32).contiguous(),
        flatten_ids.to(torch.int32).contiguous(), isect_boxes.to(torch.int32).contiguous(),
        width, height, settings, absgrad, poison,
    )
    return render[..., :channels], trans


# ---------------------------------------------------------------------------------------
# intersection sort of the one-pass multi-leaf rule


def sort_tile_leaf_depth(
    isect_ids: Int[Tensor, " M"],
    values: Int[Tensor, " M"],
    value_position: Int[Tensor, " V"],
    num_positions: int,
    num_tiles: int,
) -> tuple[Int[Tensor, " T"], Int[Tensor, " M"]]:
    """Stable radix sort of gsplat's unsorted tile intersections by (tile, leaf position, depth).

    Twin: ``core.render._sort_by_tile_leaf_depth_torch`` (same keys; ties keep their order here).

    Args:
        isect_ids: [M] int64 keys ``tile << 32 | depth bits`` from ``isect_tiles(sort=False)``.
        values: [M] the payload of each entry (Gaussian or copy index).
        value_position: [V] leaf position of each value, looked up through ``values``.
        num_positions: an upper bound on the positions.
        num_tiles: tiles of the image.

    Returns:
        offsets [num_tiles] int32 and the sorted values [M] int32.
    """
    position_bits = max(1, (num_positions - 1).bit_length())
    tile_bits = max(1, num_tiles.bit_length())
    return load().sort_tile_leaf_depth(
        isect_ids.contiguous(), values.to(torch.int32).contiguous(), value_position.to(torch.int32).contiguous(),
        position_bits, tile_bits, num_tiles,
    )


# ---------------------------------------------------------------------------------------
# clip mode's boundary sharing


def _sharing_inputs(means2d, conics, depths, radii, opacities, camera, boxes) -> list[Tensor]:
    """The sharing kernels' inputs: float32 (float64 boxes), flat, contiguous, no grad."""
    f32 = dict(device=means2d.device, dtype=torch.float32)
    return [
        means2d.detach().reshape(-1, 2).to(**f32).contiguous(),
        conics.detach().reshape(-1, 3).to(**f32).contiguous(),
        depths.detach().reshape(-1).to(**f32).contiguous(),
        radii.reshape(-1).to(torch.int32).contiguous(),
        opacities.detach().reshape(-1).to(**f32).contiguous(),
        camera.detach().to(**f32).contiguous(),
        boxes.detach().to(device=means2d.device, dtype=torch.float64).contiguous(),
    ]


def share_leaves(
    means2d: Float[Tensor, "N 2"],
    conics: Float[Tensor, "N 3"],
    depths: Float[Tensor, " N"],
    radii: Int[Tensor, " N"],
    opacities: Float[Tensor, " N"],
    camera: Float[Tensor, " 16"],
    boxes: Float[Tensor, "L 2 3"],
    width: int,
    height: int,
    settings: RasterSettings,
    reach_margin: float,
) -> tuple[Int[Tensor, " M"], Int[Tensor, " M"], Int[Tensor, " M"]]:
    """Copies (gaussian, leaf, box) of clip mode's sharing rule, in (gaussian, leaf) order.

    Twin: ``core.clip.share_leaves(core.clip.reach_boxes(...), boxes)``.
    """
    return load().share_leaves_cuda(
        *_sharing_inputs(means2d, conics, depths, radii, opacities, camera, boxes),
        width, height, settings.tile_size, float(settings.alpha_min), float(reach_margin),
    )


def clip_intersections(
    means2d: Float[Tensor, "N 2"],
    conics: Float[Tensor, "N 3"],
    depths: Float[Tensor, " N"],
    radii: Int[Tensor, " N"],
    opacities: Float[Tensor, " N"],
    camera: Float[Tensor, " 16"],
    boxes: Float[Tensor, "L 2 3"],
    leaf_position: Int[Tensor, " L"],
    width: int,
    height: int,
    settings: RasterSettings,
    reach_margin: float,
) -> tuple[Int[Tensor, "TH TW"], Int[Tensor, " M"], Int[Tensor, " M"]]:
    """The tile intersections of clip mode's copies, sorted by (tile, leaf position, depth),
    straight from the projection (sharing, binning and sort in one op).

    Twin: ``core.render_clip._clip_intersections_torch`` (the same entries in the same order).

    Args:
        leaf_position: [L] place of each leaf in the camera's order, a permutation of 0..L-1.

    Returns:
        isect_offsets [TH, TW] int32, flatten_ids [M] int32 (Gaussian of each entry) and
        isect_boxes [M] int32 (box of each entry, -1 = unclipped).
    """
    return load().clip_intersections_cuda(
        *_sharing_inputs(means2d, conics, depths, radii, opacities, camera, boxes),
        leaf_position.to(device=means2d.device, dtype=torch.int32).contiguous(),
        width, height, settings.tile_size, float(settings.alpha_min), float(reach_margin),
    )
