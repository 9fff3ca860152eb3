// The stable (tile, leaf position, depth) radix sort shared by the ops that build sort keys
// (SortIntersections.cu from gsplat's keys, ShareLeaves.cu from the sharing copies).
#pragma once

#include <torch/extension.h>

namespace landmark {

struct TileSorted {
    at::Tensor offsets; // [num_tiles] int32: first sorted entry of each tile
    at::Tensor keys;    // [M] int64, sorted
    at::Tensor values;  // [M] int32, in key order (ties keep their input order)
};

// Keys `tile << (32 + position_bits) | position << 32 | depth bits`, sorted stably over only
// the 32 + position_bits + tile_bits bits in use (what gsplat's own sort costs).
TileSorted sort_tiles_stable(const at::Tensor &keys, const at::Tensor &values, int position_bits,
                             int tile_bits, int64_t num_tiles);

} // namespace landmark
