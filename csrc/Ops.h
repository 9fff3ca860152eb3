// Host functions bound in ext.cpp (one _fwd / _bwd pair per op).
#pragma once

#include <torch/extension.h>
#include <tuple>
#include <vector>

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

// Sort one camera's tile intersections (gsplat keys tile << 32 | depth, unsorted) by
// (tile, position of the entry's value, depth) with a stable radix sort over the bits in use.
// Returns offsets [num_tiles] int32 (first entry of each tile) and the sorted values [M] int32.
std::tuple<at::Tensor, at::Tensor> sort_tile_leaf_depth(
    const at::Tensor &isect_ids,      // [M] int64
    const at::Tensor &values,         // [M] int32, indices into value_position
    const at::Tensor &value_position, // [V] int32 leaf position of each value
    int64_t position_bits, int64_t tile_bits, int64_t num_tiles
);

// Multi-branch plane x line features of N points, all K factors and all blocks in one launch
// (twin: core/grid_features.py sample_block_features).  Returns features [N, K * C].
// poison: fill the output with NaN first (tests prove every element is written).
at::Tensor block_features_fwd(
    const std::vector<at::Tensor> &planes, // K x [B, Rv_k, Ru_k, C] float32
    const std::vector<at::Tensor> &lines,  // K x [B or 1, Rl_k, C] float32
    const at::Tensor &points,              // [N, 3] block-local coordinates
    const at::Tensor &block_index,         // [N] int64 in [0, B)
    const std::vector<int64_t> &axes,      // [K * 3] world axes (u, v, w) per factor
    bool poison
);

// Returns the gradients of the planes (K x [B, Rv_k, Ru_k, C]), of the lines
// (K x [B or 1, Rl_k, C]) and of the points ([N, 3], empty unless points_grad).
std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor> block_features_bwd(
    const std::vector<at::Tensor> &planes, // K x [B, Rv_k, Ru_k, C]
    const std::vector<at::Tensor> &lines,  // K x [B or 1, Rl_k, C]
    const at::Tensor &points,              // [N, 3]
    const at::Tensor &block_index,         // [N] int64
    const std::vector<int64_t> &axes,      // [K * 3]
    const at::Tensor &v_features,          // [N, K * C]
    bool points_grad, int64_t points_per_thread
);

// clip mode's boundary sharing (core/clip.py share_leaves(reach_boxes(...))): copies as
// (gaussian, leaf, box) int64 rows in (gaussian, leaf) order; box -1 for unshared Gaussians.
std::tuple<at::Tensor, at::Tensor, at::Tensor> share_leaves_cuda(
    const at::Tensor &means2d,   // [N, 2] float32
    const at::Tensor &conics,    // [N, 3] float32
    const at::Tensor &depths,    // [N] float32
    const at::Tensor &radii,     // [N] int32
    const at::Tensor &opacities, // [N] float32
    const at::Tensor &camera,    // [16] float32 (core/clip.py clip_camera)
    const at::Tensor &boxes,     // [L, 2, 3] float64 (unbounded_leaf_boxes)
    int64_t width, int64_t height, int64_t tile_size, double alpha_min, double reach_margin
);

// The copies' tile intersections of clip mode in one go (share_leaves_cuda + gsplat's
// isect_tiles on the copies + sort_tile_leaf_depth + the box of each entry): returns
// isect_offsets [TH, TW] int32, flatten_ids [M] int32 and isect_boxes [M] int32 (-1: unclipped).
std::tuple<at::Tensor, at::Tensor, at::Tensor> clip_intersections_cuda(
    const at::Tensor &means2d,       // [N, 2] float32
    const at::Tensor &conics,        // [N, 3] float32
    const at::Tensor &depths,        // [N] float32
    const at::Tensor &radii,         // [N] int32
    const at::Tensor &opacities,     // [N] float32
    const at::Tensor &camera,        // [16] float32
    const at::Tensor &boxes,         // [L, 2, 3] float64
    const at::Tensor &leaf_position, // [L] int32, a permutation of 0..L-1
    int64_t width, int64_t height, int64_t tile_size, double alpha_min, double reach_margin
);

} // namespace landmark
