// Sort one camera's tile intersections by (tile, leaf position, depth) in one radix sort.
//
// gsplat's isect_tiles(sort=False) gives keys `tile << 32 | depth_bits` in generation order.
// The one-pass multi-leaf rule needs the leaf position between tile and depth.  torch.sort on
// the widened int64 key sorts all 64 bits and is not stable; cub's radix sort over only the
// bits in use (31 + position_bits + tile_bits) is what gsplat's own sort costs, and stable,
// so with a single leaf position the order equals gsplat's sorted order exactly.  Binned
// Gaussians lie in front of the camera (gsplat culls z <= near_plane), so a depth's sign bit
// is always 0 and the key keeps only its 31 other bits: at 16 leaves and 1080p that is 48
// bits, six 8-bit radix passes instead of seven.
#include "Common.h"
#include "Ops.h"
#include "SortIntersections.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cub/cub.cuh>

namespace landmark {

namespace {

__global__ void leaf_keys_kernel(
    const int64_t n,
    const int64_t *__restrict__ isect_ids,
    const int32_t *__restrict__ values,
    const int32_t *__restrict__ value_position,
    const int position_bits,
    int64_t *__restrict__ keys
) {
    const int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (i >= n) return;
    const int64_t key = isect_ids[i];
    const int64_t tile = key >> 32;
    const int64_t depth_bits = key & kDepthMask;
    const int64_t position = value_position[values[i]];
    keys[i] = (tile << (kDepthBits + position_bits)) | (position << kDepthBits) | depth_bits;
}

// offsets[t] = first sorted entry whose tile is >= t (searchsorted left over the tiles).
__global__ void tile_offsets_kernel(
    const int64_t n,
    const int64_t *__restrict__ sorted_keys,
    const int shift,
    const int64_t num_tiles,
    int32_t *__restrict__ offsets
) {
    const int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (i > n) return;
    const int64_t previous = i == 0 ? -1 : (sorted_keys[i - 1] >> shift);
    const int64_t current = i == n ? num_tiles : (sorted_keys[i] >> shift);
    for (int64_t t = previous + 1; t <= current && t < num_tiles; ++t) offsets[t] = (int32_t)i;
}

} // namespace

TileSorted sort_tiles_stable(const at::Tensor &keys, const at::Tensor &values, int position_bits,
                             int tile_bits, int64_t num_tiles) {
    const int64_t n = keys.numel();
    TORCH_CHECK(n < (int64_t)INT32_MAX, "more than 2^31 intersections in one camera");
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    TileSorted out{at::empty({num_tiles}, keys.options().dtype(at::kInt)), at::empty_like(keys),
                   at::empty_like(values)};
    const int threads = 256;
    if (n > 0) {
        const int end_bit = kDepthBits + position_bits + tile_bits;
        size_t temp_bytes = 0;
        C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(
            nullptr, temp_bytes, keys.data_ptr<int64_t>(), out.keys.data_ptr<int64_t>(),
            values.data_ptr<int32_t>(), out.values.data_ptr<int32_t>(), (int)n, 0, end_bit, stream));
        at::Tensor temp = at::empty({(int64_t)temp_bytes}, keys.options().dtype(at::kByte));
        C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(
            temp.data_ptr(), temp_bytes, keys.data_ptr<int64_t>(), out.keys.data_ptr<int64_t>(),
            values.data_ptr<int32_t>(), out.values.data_ptr<int32_t>(), (int)n, 0, end_bit, stream));
    }
    tile_offsets_kernel<<<(n + 1 + threads - 1) / threads, threads, 0, stream>>>(
        n, out.keys.data_ptr<int64_t>(), kDepthBits + position_bits, num_tiles, out.offsets.data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return out;
}

std::tuple<at::Tensor, at::Tensor> sort_tile_leaf_depth(
    const at::Tensor &isect_ids,
    const at::Tensor &values,
    const at::Tensor &value_position,
    int64_t position_bits,
    int64_t tile_bits,
    int64_t num_tiles
) {
    LMK_DEVICE_GUARD(isect_ids);
    LMK_CHECK_INPUT(isect_ids);
    LMK_CHECK_INPUT(values);
    LMK_CHECK_INPUT(value_position);
    LMK_CHECK_DTYPE(isect_ids, at::kLong);
    LMK_CHECK_DTYPE(values, at::kInt);
    LMK_CHECK_DTYPE(value_position, at::kInt);
    TORCH_CHECK(isect_ids.numel() == values.numel(), "isect_ids and values must have one entry each");
    TORCH_CHECK(position_bits >= 1 && tile_bits >= 1 && kDepthBits + position_bits + tile_bits <= 63,
                "sort key of ", kDepthBits, " + ", position_bits, " + ", tile_bits, " bits does not fit 63 bits");
    const int64_t n = isect_ids.numel();
    at::Tensor keys = at::empty_like(isect_ids);
    if (n > 0) {
        const int threads = 256;
        leaf_keys_kernel<<<(n + threads - 1) / threads, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
            n, isect_ids.data_ptr<int64_t>(), values.data_ptr<int32_t>(), value_position.data_ptr<int32_t>(),
            (int)position_bits, keys.data_ptr<int64_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    TileSorted sorted = sort_tiles_stable(keys, values, (int)position_bits, (int)tile_bits, num_tiles);
    return {sorted.offsets, sorted.values};
}

} // namespace landmark
