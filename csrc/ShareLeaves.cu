// Boundary sharing of clip mode: which leaves each Gaussian's copies go to, and the copies'
// tile intersections sorted for the one-pass clipped rasteriser.
//
// The CUDA version of core/clip.py's ``share_leaves(reach_boxes(...))`` (read its docstring
// for the geometry).  One thread per Gaussian computes its reach box in float64 with the
// twin's operations in the twin's order -- products and sums rounded one at a time
// (__dmul_rn / __dadd_rn keep nvcc from contracting them into FMAs the twin does not do) --
// and tests it against every leaf box.
//
// share_leaves_cuda: pass 1 counts the leaves met, an exclusive scan (torch.cumsum on the
// host side) gives each Gaussian its first output row, pass 2 writes (gaussian, leaf, box)
// rows in (gaussian, leaf) order, exactly the twin's nonzero() order.
//
// clip_intersections_cuda (twin: core/render_clip.py _clip_intersections_torch) goes
// straight to the sorted tile entries of the copies: pass 1 counts leaves x tiles per
// Gaussian (and keeps the set of leaves met when there are at most 32), pass 2 writes each
// copy's (tile, leaf position, depth) keys in (gaussian, leaf, tile) order -- the order
// gsplat's isect_tiles gives the copies -- and the stable radix sort orders them.  The sorted value is the Gaussian id with the top bit set for a shared
// copy; a last pass splits it into flatten_ids and the box (the leaf at the key's position).
// Building the copies first and running gsplat's isect_tiles on them moved every copy
// through a dozen gathers and casts; this is one pass over the Gaussians and one sort.
#include "Common.h"
#include "Ops.h"
#include "SortIntersections.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

namespace landmark {

namespace {

__device__ __forceinline__ double mul(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ double add(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ double sub(double a, double b) { return __dsub_rn(a, b); }

struct ShareArgs {
    const float *means2d;   // [N, 2]
    const float *conics;    // [N, 3]
    const float *depths;    // [N]
    const int32_t *radii;   // [N]
    const float *opacities; // [N]
    const float *camera;    // [16]
    const double *boxes;    // [L, 2, 3]
    int64_t n;
    int num_leaves;
    int width, height, tile_size;
    double alpha_min;
    double reach_margin;
};

struct TileRect {
    int x0, x1, y0, y1; // tiles [x0, x1) x [y0, y1)
};

__host__ __device__ __forceinline__ int tiles_along(int pixels, int tile_size) {
    return (pixels + tile_size - 1) / tile_size;
}

// The tiles Gaussian i is binned to: gsplat's isect_tiles rule in float32 (floor / ceil of
// (mean -/+ radius) / tile_size clamped to the grid), as raster_ref.tile_ranges.
__device__ __forceinline__ TileRect tile_rect(const ShareArgs &a, int64_t i) {
    const float tiles_x = (float)tiles_along(a.width, a.tile_size);
    const float tiles_y = (float)tiles_along(a.height, a.tile_size);
    const float ts = (float)a.tile_size;
    const float rf = (float)a.radii[i] / ts;
    const float txc = a.means2d[2 * i] / ts, tyc = a.means2d[2 * i + 1] / ts;
    return TileRect{(int)fminf(fmaxf(floorf(txc - rf), 0.f), tiles_x), (int)fminf(fmaxf(ceilf(txc + rf), 0.f), tiles_x),
                    (int)fminf(fmaxf(floorf(tyc - rf), 0.f), tiles_y), (int)fminf(fmaxf(ceilf(tyc + rf), 0.f), tiles_y)};
}

// The reach box of Gaussian i, [lo, hi] per world axis; false when it reaches nothing.
__device__ bool reach_box(const ShareArgs &a, int64_t i, double lo[3], double hi[3]) {
    if (a.radii[i] <= 0) return false; // culled: skip the float64 work (the usable test below agrees)
    double cam[16];
#pragma unroll
    for (int k = 0; k < 16; ++k) cam[k] = (double)a.camera[k];
    const double fx = cam[12], fy = cam[13], cx = cam[14], cy = cam[15];
    const double m0 = (double)a.means2d[2 * i], m1 = (double)a.means2d[2 * i + 1];
    const double ca = (double)a.conics[3 * i], cb = (double)a.conics[3 * i + 1], cc = (double)a.conics[3 * i + 2];
    const double z = (double)a.depths[i];
    const double o = (double)a.opacities[i];
    double det = sub(mul(ca, cc), mul(cb, cb));
    double level = -1.0;
    if (o > 0) {
        const double s = log(o / a.alpha_min);
        level = add(add(s, mul(1e-2, fabs(s))), 1e-2);
    }
    const bool usable = a.radii[i] > 0 && level >= 0 && det > 0;
    if (!usable) return false;
    const double sxx = cc / det, sxy = -cb / det, syy = ca / det;
    const double zx = z / fx, zy = z / fy;
    const double r2 = fmax(mul(2.0, level), 0.0);
    const TileRect t = tile_rect(a, i);
    const double tx0 = t.x0, tx1 = t.x1, ty0 = t.y0, ty1 = t.y1;
    const double dx_lo = sub(add(mul(tx0, (double)a.tile_size), 0.5), m0);
    const double dx_hi = sub(sub(fmin(mul(tx1, (double)a.tile_size), (double)a.width), 0.5), m0);
    const double dy_lo = sub(add(mul(ty0, (double)a.tile_size), 0.5), m1);
    const double dy_hi = sub(sub(fmin(mul(ty1, (double)a.tile_size), (double)a.height), 0.5), m1);
    const double u = (m0 - cx) / fx, v = (m1 - cy) / fy;
    double centre_cam_max = fmax(fmax(fabs(cam[9]), fabs(cam[10])), fabs(cam[11]));
#pragma unroll
    for (int j = 0; j < 3; ++j) {
        const double wx = mul(cam[3 * j], zx), wy = mul(cam[3 * j + 1], zy);
        const double quad = add(add(mul(mul(wx, wx), sxx), mul(mul(mul(2.0, wx), wy), sxy)), mul(mul(wy, wy), syy));
        const double half = sqrt(mul(r2, quad));
        const double ex = mul(wx, dx_lo), ey = mul(wx, dx_hi);
        const double fl = mul(wy, dy_lo), fh = mul(wy, dy_hi);
        const double rect_lo = add(fmin(ex, ey), fmin(fl, fh));
        const double rect_hi = add(fmax(ex, ey), fmax(fl, fh));
        const double direction = add(add(mul(cam[3 * j], u), mul(cam[3 * j + 1], v)), cam[3 * j + 2]);
        const double along = mul(z, direction);
        const double centre = add(cam[9 + j], along);
        const double l = fmax(-half, rect_lo), h = fmin(half, rect_hi);
        const double margin = add(
            mul(a.reach_margin, add(add(add(centre_cam_max, fabs(centre)), fabs(along)), half)), 1e-12);
        lo[j] = sub(add(centre, l), margin);
        hi[j] = add(add(centre, h), margin);
    }
    return true;
}

__device__ __forceinline__ bool meets(const ShareArgs &a, int leaf, const double lo[3], const double hi[3]) {
    const double *box = a.boxes + 6 * leaf;
    bool ok = true;
#pragma unroll
    for (int j = 0; j < 3; ++j) ok = ok && (lo[j] < box[3 + j]) && (hi[j] >= box[j]);
    return ok;
}

// Leaves met by Gaussian i (0 when it reaches nothing).
__device__ __forceinline__ int leaves_met(const ShareArgs &a, int64_t i, double lo[3], double hi[3]) {
    if (!reach_box(a, i, lo, hi)) return 0;
    int met = 0;
    for (int leaf = 0; leaf < a.num_leaves; ++leaf) met += meets(a, leaf, lo, hi);
    return met;
}

__global__ void count_kernel(ShareArgs a, int64_t *__restrict__ counts) {
    const int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (i >= a.n) return;
    double lo[3], hi[3];
    counts[i] = leaves_met(a, i, lo, hi);
}

__global__ void write_kernel(
    ShareArgs a, const int64_t *__restrict__ counts, const int64_t *__restrict__ ends,
    int64_t *__restrict__ gaussian, int64_t *__restrict__ leaf_out, int64_t *__restrict__ box_out
) {
    const int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (i >= a.n || counts[i] == 0) return;
    double lo[3], hi[3];
    reach_box(a, i, lo, hi);
    int64_t row = ends[i] - counts[i];
    const bool shared = counts[i] > 1;
    for (int leaf = 0; leaf < a.num_leaves; ++leaf) {
        if (!meets(a, leaf, lo, hi)) continue;
        gaussian[row] = i;
        leaf_out[row] = leaf;
        box_out[row] = shared ? leaf : -1;
        ++row;
    }
}

__device__ __forceinline__ int64_t tile_count(const TileRect &t) {
    return (int64_t)(t.x1 - t.x0) * (t.y1 - t.y0);
}

// Pass 1: entries per Gaussian (leaves met x tiles), and with at most kMaskLeaves leaves the
// set of leaves met, so pass 2 needs no float64 work.
constexpr int kMaskLeaves = 32;

__global__ void isect_count_kernel(ShareArgs a, int64_t *__restrict__ counts, uint32_t *__restrict__ leaf_masks) {
    const int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (i >= a.n) return;
    const int64_t tiles = tile_count(tile_rect(a, i));
    double lo[3], hi[3];
    uint32_t mask = 0;
    int met = 0;
    if (tiles > 0 && reach_box(a, i, lo, hi)) {
        for (int leaf = 0; leaf < a.num_leaves; ++leaf) {
            if (!meets(a, leaf, lo, hi)) continue;
            ++met;
            if (leaf < kMaskLeaves) mask |= 1u << leaf;
        }
    }
    counts[i] = met * tiles;
    if (leaf_masks != nullptr) leaf_masks[i] = mask;
}

constexpr int32_t kSharedBit = INT32_MIN; // top bit of a sorted value: the copy is clipped

// Pass 2: each copy's (tile, leaf position, depth) keys, copies in leaf order, tiles row by
// row.  kMasks: the leaves come from pass 1's masks; otherwise from the reach box again.
template <bool kMasks>
__global__ void isect_write_kernel(
    ShareArgs a, const uint32_t *__restrict__ leaf_masks, const int32_t *__restrict__ leaf_position,
    int position_bits, const int64_t *__restrict__ counts, const int64_t *__restrict__ ends,
    int64_t *__restrict__ keys, int32_t *__restrict__ values
) {
    const int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (i >= a.n || counts[i] == 0) return;
    const TileRect t = tile_rect(a, i);
    const int tiles_x = tiles_along(a.width, a.tile_size);
    const int64_t depth_bits = (int64_t)(uint32_t)__float_as_int(a.depths[i]) & kDepthMask;
    int64_t row = ends[i] - counts[i];
    auto write_copy = [&](int leaf, bool shared) {
        const int64_t position_key = ((int64_t)leaf_position[leaf] << kDepthBits) | depth_bits;
        const int32_t value = (int32_t)i | (shared ? kSharedBit : 0);
        for (int ty = t.y0; ty < t.y1; ++ty) {
            for (int tx = t.x0; tx < t.x1; ++tx) {
                keys[row] = ((int64_t)(ty * tiles_x + tx) << (kDepthBits + position_bits)) | position_key;
                values[row] = value;
                ++row;
            }
        }
    };
    if (kMasks) {
        uint32_t mask = leaf_masks[i];
        const bool shared = __popc(mask) > 1;
        for (; mask != 0; mask &= mask - 1) write_copy(__ffs(mask) - 1, shared);
    } else {
        double lo[3], hi[3];
        const bool shared = leaves_met(a, i, lo, hi) > 1;
        for (int leaf = 0; leaf < a.num_leaves; ++leaf)
            if (meets(a, leaf, lo, hi)) write_copy(leaf, shared);
    }
}

__global__ void invert_positions_kernel(int num_leaves, const int32_t *__restrict__ leaf_position,
                                        int32_t *__restrict__ leaf_at) {
    const int leaf = blockIdx.x * blockDim.x + threadIdx.x;
    if (leaf < num_leaves) leaf_at[leaf_position[leaf]] = leaf;
}

__global__ void split_values_kernel(
    int64_t m, const int64_t *__restrict__ sorted_keys, const int32_t *__restrict__ sorted_values,
    const int32_t *__restrict__ leaf_at, int64_t position_mask, int32_t *__restrict__ flatten_ids,
    int32_t *__restrict__ isect_boxes
) {
    const int64_t e = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (e >= m) return;
    const int32_t value = sorted_values[e];
    flatten_ids[e] = value & INT32_MAX;
    isect_boxes[e] = value < 0 ? leaf_at[(sorted_keys[e] >> kDepthBits) & position_mask] : -1;
}

ShareArgs share_args(
    const at::Tensor &means2d, const at::Tensor &conics, const at::Tensor &depths, const at::Tensor &radii,
    const at::Tensor &opacities, const at::Tensor &camera, const at::Tensor &boxes,
    int64_t width, int64_t height, int64_t tile_size, double alpha_min, double reach_margin, const char *op
) {
    for (const at::Tensor *t : {&means2d, &conics, &depths, &opacities, &camera}) {
        LMK_CHECK_INPUT(*t);
        TORCH_CHECK(t->scalar_type() == at::kFloat, op, ": float32 inputs expected");
    }
    LMK_CHECK_INPUT(radii);
    LMK_CHECK_DTYPE(radii, at::kInt);
    LMK_CHECK_INPUT(boxes);
    LMK_CHECK_DTYPE(boxes, at::kDouble);
    const int64_t n = depths.numel();
    TORCH_CHECK(means2d.numel() == 2 * n && conics.numel() == 3 * n && radii.numel() == n && opacities.numel() == n,
                op, ": means2d [N,2], conics [N,3], radii [N], opacities [N] expected");
    TORCH_CHECK(camera.numel() == 16 && boxes.dim() == 3 && boxes.size(1) == 2 && boxes.size(2) == 3,
                op, ": camera [16] and boxes [L,2,3] expected");
    return ShareArgs{means2d.data_ptr<float>(), conics.data_ptr<float>(), depths.data_ptr<float>(),
                     radii.data_ptr<int32_t>(), opacities.data_ptr<float>(), camera.data_ptr<float>(),
                     boxes.data_ptr<double>(), n, (int)boxes.size(0), (int)width, (int)height, (int)tile_size,
                     alpha_min, reach_margin};
}

constexpr int kThreads = 256;

int64_t blocks_for(int64_t n) { return (n + kThreads - 1) / kThreads; }

} // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> share_leaves_cuda(
    const at::Tensor &means2d, const at::Tensor &conics, const at::Tensor &depths, const at::Tensor &radii,
    const at::Tensor &opacities, const at::Tensor &camera, const at::Tensor &boxes,
    int64_t width, int64_t height, int64_t tile_size, double alpha_min, double reach_margin
) {
    LMK_DEVICE_GUARD(means2d);
    const ShareArgs a = share_args(means2d, conics, depths, radii, opacities, camera, boxes, width, height,
                                   tile_size, alpha_min, reach_margin, "share_leaves_cuda");
    const int64_t n = a.n;
    auto long_options = depths.options().dtype(at::kLong);
    at::Tensor counts = at::empty({n}, long_options);
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    if (n > 0) {
        count_kernel<<<blocks_for(n), kThreads, 0, stream>>>(a, counts.data_ptr<int64_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    at::Tensor ends = counts.cumsum(0);
    const int64_t total = n > 0 ? ends[n - 1].item<int64_t>() : 0;  // one sync: the output size
    at::Tensor gaussian = at::empty({total}, long_options);
    at::Tensor leaf = at::empty({total}, long_options);
    at::Tensor box = at::empty({total}, long_options);
    if (total > 0) {
        write_kernel<<<blocks_for(n), kThreads, 0, stream>>>(
            a, counts.data_ptr<int64_t>(), ends.data_ptr<int64_t>(), gaussian.data_ptr<int64_t>(),
            leaf.data_ptr<int64_t>(), box.data_ptr<int64_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    return {gaussian, leaf, box};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> clip_intersections_cuda(
    const at::Tensor &means2d, const at::Tensor &conics, const at::Tensor &depths, const at::Tensor &radii,
    const at::Tensor &opacities, const at::Tensor &camera, const at::Tensor &boxes,
    const at::Tensor &leaf_position, int64_t width, int64_t height, int64_t tile_size, double alpha_min,
    double reach_margin
) {
    LMK_DEVICE_GUARD(means2d);
    const ShareArgs a = share_args(means2d, conics, depths, radii, opacities, camera, boxes, width, height,
                                   tile_size, alpha_min, reach_margin, "clip_intersections_cuda");
    LMK_CHECK_INPUT(leaf_position);
    LMK_CHECK_DTYPE(leaf_position, at::kInt);
    TORCH_CHECK(leaf_position.numel() == a.num_leaves, "clip_intersections_cuda: one leaf position per box expected");
    TORCH_CHECK(a.n < (int64_t)INT32_MAX, "clip_intersections_cuda: more than 2^31 - 1 Gaussians");
    const int64_t n = a.n;
    const int64_t num_tiles = (int64_t)tiles_along(a.width, a.tile_size) * tiles_along(a.height, a.tile_size);
    int position_bits = 1, tile_bits = 1;
    while ((int64_t(1) << position_bits) < a.num_leaves) ++position_bits;
    while ((int64_t(1) << tile_bits) <= num_tiles) ++tile_bits;
    TORCH_CHECK(kDepthBits + position_bits + tile_bits <= 63, "clip_intersections_cuda: ", a.num_leaves, " leaves and ",
                num_tiles, " tiles do not fit a 64-bit sort key");
    auto options = depths.options();
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    at::Tensor counts = at::empty({n}, options.dtype(at::kLong));
    const bool masks = a.num_leaves <= kMaskLeaves;
    at::Tensor leaf_masks = at::empty({masks ? n : 0}, options.dtype(at::kInt));
    uint32_t *masks_ptr = masks ? reinterpret_cast<uint32_t *>(leaf_masks.data_ptr<int32_t>()) : nullptr;
    if (n > 0) {
        isect_count_kernel<<<blocks_for(n), kThreads, 0, stream>>>(a, counts.data_ptr<int64_t>(), masks_ptr);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    at::Tensor ends = counts.cumsum(0);
    const int64_t m = n > 0 ? ends[n - 1].item<int64_t>() : 0;  // one sync: the entry count
    at::Tensor keys = at::empty({m}, options.dtype(at::kLong));
    at::Tensor values = at::empty({m}, options.dtype(at::kInt));
    if (m > 0) {
        auto write = masks ? isect_write_kernel<true> : isect_write_kernel<false>;
        write<<<blocks_for(n), kThreads, 0, stream>>>(
            a, masks_ptr, leaf_position.data_ptr<int32_t>(), position_bits, counts.data_ptr<int64_t>(),
            ends.data_ptr<int64_t>(), keys.data_ptr<int64_t>(), values.data_ptr<int32_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    TileSorted sorted = sort_tiles_stable(keys, values, position_bits, tile_bits, num_tiles);
    at::Tensor flatten_ids = at::empty({m}, options.dtype(at::kInt));
    at::Tensor isect_boxes = at::empty({m}, options.dtype(at::kInt));
    if (m > 0) {
        at::Tensor leaf_at = at::empty({a.num_leaves}, options.dtype(at::kInt));
        invert_positions_kernel<<<blocks_for(a.num_leaves), kThreads, 0, stream>>>(
            a.num_leaves, leaf_position.data_ptr<int32_t>(), leaf_at.data_ptr<int32_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        split_values_kernel<<<blocks_for(m), kThreads, 0, stream>>>(
            m, sorted.keys.data_ptr<int64_t>(), sorted.values.data_ptr<int32_t>(), leaf_at.data_ptr<int32_t>(),
            (int64_t(1) << position_bits) - 1, flatten_ids.data_ptr<int32_t>(), isect_boxes.data_ptr<int32_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    const int64_t tiles_y = tiles_along(a.height, a.tile_size), tiles_x = tiles_along(a.width, a.tile_size);
    return {sorted.offsets.view({tiles_y, tiles_x}), flatten_ids, isect_boxes};
}

} // namespace landmark
