// Box-clipped rasteriser: launchers (csrc/ClipRasterizeCUDA.cu), called by ClipRasterize.cpp.
//
// Single camera.  Intersections come from gsplat's isect_tiles (or the one-pass re-key of
// core/render.py): sorted by tile, then by whatever order the caller wants per pixel
// (depth, or leaf position then depth).  Entry e renders Gaussian flatten_ids[e] clipped
// to box isect_boxes[e] (-1: no clip): it counts at pixel p only if the point on p's ray at
// the Gaussian's depth, camera.centre + depth * Rc ((u - cx) / fx, (v - cy) / fy, 1), lies in
// [lo, hi) of that box.  Otherwise gsplat 1.4.0's per-pixel rule.
#pragma once

#include <ATen/core/Tensor.h>

namespace landmark {

struct ClipRasterSettings {
    int width;
    int height;
    int tile_size;
    float alpha_min;         // entries with a smaller alpha are skipped
    float alpha_max;         // alpha is clamped to this
    float min_transmittance; // a pixel ends before the entry that takes T to this or below
};

void launch_clip_rasterize_fwd(
    const at::Tensor &means2d,      // [N, 2]
    const at::Tensor &conics,       // [N, 3]
    const at::Tensor &colors,       // [N, D], D one of kClipChannels
    const at::Tensor &opacities,    // [N]
    const at::Tensor &depths,       // [N] camera z
    const at::Tensor &boxes,        // [B, 2, 3] min / max corners
    const at::Tensor &camera,       // [16] Rc (row major), centre, fx, fy, cx, cy
    const at::Tensor &isect_offsets, // [TH, TW] int32 first entry of each tile
    const at::Tensor &flatten_ids,  // [M] int32 Gaussian of each entry
    const at::Tensor &isect_boxes,  // [M] int32 box of each entry, -1 = unclipped
    const ClipRasterSettings &settings,
    at::Tensor &render,             // [H, W, D] out: premultiplied colour
    at::Tensor &transmittance,      // [H, W, 1] out: final T
    at::Tensor &last_ids            // [H, W] int32 out: last counted entry, -1 if none
);

void launch_clip_rasterize_bwd(
    const at::Tensor &means2d,      // [N, 2]
    const at::Tensor &conics,       // [N, 3]
    const at::Tensor &colors,       // [N, D]
    const at::Tensor &opacities,    // [N]
    const at::Tensor &depths,       // [N]
    const at::Tensor &boxes,        // [B, 2, 3]
    const at::Tensor &camera,       // [16]
    const at::Tensor &isect_offsets, // [TH, TW] int32
    const at::Tensor &flatten_ids,  // [M] int32
    const at::Tensor &isect_boxes,  // [M] int32
    const ClipRasterSettings &settings,
    const at::Tensor &transmittance, // [H, W, 1] from the forward pass
    const at::Tensor &last_ids,     // [H, W] int32 from the forward pass
    const at::Tensor &v_render,     // [H, W, D]
    const at::Tensor &v_transmittance, // [H, W, 1]
    at::Tensor &v_means2d,          // [N, 2] out, zero-initialised (accumulated)
    at::Tensor &v_means2d_abs,      // [N, 2] out or empty: sum of |per-pixel v_means2d|
    at::Tensor &v_conics,           // [N, 3] out, zero-initialised
    at::Tensor &v_colors,           // [N, D] out, zero-initialised
    at::Tensor &v_opacities         // [N] out, zero-initialised
);

} // namespace landmark
