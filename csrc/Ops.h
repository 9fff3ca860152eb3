// Host functions bound in ext.cpp (one _fwd / _bwd pair per op).
#pragma once

#include <torch/extension.h>
#include <tuple>

namespace landmark {

// Returns render [H, W, D], transmittance [H, W, 1], last_ids [H, W] int32.
// poison: fill the outputs with NaN / INT_MIN first (tests prove every pixel is written).
std::tuple<at::Tensor, at::Tensor, at::Tensor> clip_rasterize_fwd(
    const at::Tensor &means2d,       // [N, 2]
    const at::Tensor &conics,        // [N, 3]
    const at::Tensor &colors,        // [N, D]
    const at::Tensor &opacities,     // [N]
    const at::Tensor &depths,        // [N]
    const at::Tensor &boxes,         // [B, 2, 3]
    const at::Tensor &camera,        // [16]
    const at::Tensor &isect_offsets, // [TH, TW] int32
    const at::Tensor &flatten_ids,   // [M] int32
    const at::Tensor &isect_boxes,   // [M] int32
    int64_t width, int64_t height, int64_t tile_size,
    double alpha_min, double alpha_max, double min_transmittance,
    bool poison
);

// Returns v_means2d [N, 2], v_means2d_abs [N, 2] (empty unless absgrad), v_conics [N, 3],
// v_colors [N, D], v_opacities [N].
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> clip_rasterize_bwd(
    const at::Tensor &means2d,       // [N, 2]
    const at::Tensor &conics,        // [N, 3]
    const at::Tensor &colors,        // [N, D]
    const at::Tensor &opacities,     // [N]
    const at::Tensor &depths,        // [N]
    const at::Tensor &boxes,         // [B, 2, 3]
    const at::Tensor &camera,        // [16]
    const at::Tensor &isect_offsets, // [TH, TW] int32
    const at::Tensor &flatten_ids,   // [M] int32
    const at::Tensor &isect_boxes,   // [M] int32
    int64_t width, int64_t height, int64_t tile_size,
    double alpha_min, double alpha_max, double min_transmittance,
    const at::Tensor &transmittance, // [H, W, 1]
    const at::Tensor &last_ids,      // [H, W] int32
    const at::Tensor &v_render,      // [H, W, D]
    const at::Tensor &v_transmittance, // [H, W, 1]
    bool absgrad
);

} // namespace landmark
