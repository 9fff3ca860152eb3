// Multi-branch plane x line features: launchers (csrc/BlockFeaturesCUDA.cu), called by
// BlockFeatures.cpp.
//
// The function is core/grid_features.py ``sample_block_features`` (the torch twin): for every
// point n (block-local coordinates in [-1, 1], block b = block_index[n]) and factor k,
//   features[n, k*C : (k+1)*C] = bilinear(plane_k[b], u, v) * linear(line_k[b or 0], w)
// with align_corners texel placement (-1 = centre of texel 0, +1 = centre of texel R-1),
// coordinates clamped to the grid, and the last cell used on the far border.
// All factors (levels x mode pairs) and all blocks are sampled in one launch: the per-factor
// pointers and sizes travel in a FactorTable passed by value as a kernel parameter.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace landmark {

// Factors sampled in one launch (e.g. 4 levels x 3 mode pairs = 12); the table stays far
// below the 4 KB kernel-parameter limit.
constexpr int kMaxGridFactors = 32;

struct FactorTable {
    const float *plane[kMaxGridFactors]; // [B, Rv, Ru, C]
    const float *line[kMaxGridFactors];  // [Bl, Rl, C], Bl = B or 1 (shared line)
    float *v_plane[kMaxGridFactors];     // backward: [B, Rv, Ru, C] accumulated; else null
    float *v_line[kMaxGridFactors];      // backward: [Bl, Rl, C] accumulated; else null
    int rows[kMaxGridFactors];           // Rv >= 2
    int cols[kMaxGridFactors];           // Ru >= 2
    int line_size[kMaxGridFactors];      // Rl >= 2
    int shared_line[kMaxGridFactors];    // 1: the line has Bl == 1 and serves every block
    int axes[kMaxGridFactors][3];        // world axes (u, v, w) of the factor, a permutation of 0 1 2
    int num_factors;                     // K
    int num_blocks;                      // B
    int channels;                        // C, the same for every factor
    int vec;                             // floats per load / store: 4, 2 or 1 (C and alignment)
    int64_t num_points;                  // N
};

void launch_block_features_fwd(
    const FactorTable &table,
    const at::Tensor &points,      // [N, 3] block-local coordinates
    const at::Tensor &block_index, // [N] int64
    at::Tensor &features           // [N, K * C] out
);

void launch_block_features_bwd(
    const FactorTable &table,      // with v_plane / v_line set (zero-initialised)
    const at::Tensor &points,      // [N, 3]
    const at::Tensor &block_index, // [N] int64
    const at::Tensor &v_features,  // [N, K * C]
    at::Tensor &v_points,          // [N, 3] out, zero-initialised, or empty (no point gradient)
    int points_per_thread          // 1, 4 or 8 consecutive points per thread
);

} // namespace landmark
