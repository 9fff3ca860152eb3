// The stable (tile, leaf position, depth) radix sort shared by the ops that build sort keys
// (SortIntersections.cu from gsplat's keys, ShareLeaves.cu from the sharing copies).
#pragma once

#include <torch/extension.h>

namespace landmark {

// Depth bits of a sort key: a positive float32's bits without the (zero) sign bit.
constexpr int kDepthBits = 31;
constexpr int64_t kDepthMask = (int64_t(1) << kDepthBits) - 1;

struct TileSorted {
    at::Tensor offsets; // [num_tiles] int32: first sorted entry of each tile
    at::Tensor keys;    // [M] int64, sorted
    at::Tensor values;  // [M] int32, in key order (ties keep their input order)
};

// Keys `tile << (31 + position_bits) | position << 31 | depth bits & kDepthMask`, sorted
// stably over only the 31 + position_bits + tile_bits bits in use (what gsplat's sort costs).
TileSorted sort_tiles_stable(const at::Tensor &keys, const at::Tensor &values, int position_bits,
                             int tile_bits, int64_t num_tiles);

} // namespace landmark
