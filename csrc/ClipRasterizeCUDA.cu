// Box-clipped rasteriser kernels (forward and backward); see ClipRasterize.h for the rule.
//
// One block per tile, one thread per pixel; entries are staged through shared memory in
// batches of one per thread, as in gsplat.  The per-entry decisions (sigma, alpha, the
// clip test) use explicitly rounded float ops (__fmul_rn, __fadd_rn, ...) in the order of
// the torch twin (core/raster_ref.py _alpha, core/clip.py ray_points), so twin and kernel
// count exactly the same (pixel, entry) pairs; only the accumulation rounds differently.
#include "ClipRasterize.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

namespace landmark {
namespace {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kCameraFloats = 16; // Rc (9, row major), centre (3), fx, fy, cx, cy

// Per-entry staging area in dynamic shared memory (struct of arrays, [block] each).  The boxes
// themselves are not staged: only shared copies (a few percent of the entries) test one, and
// the few boxes of a tree stay in L1 / L2, while staging six floats per entry cost every
// entry shared memory and occupancy.
struct Staged {
    float4 *geom;  // x, y, opacity, depth
    float4 *conic; // a, b, c, Gaussian index (int bits)
    int *box_id;   // -1: unclipped
    float *rgb;    // [block * CDIM] (backward only)
};

__device__ __forceinline__ Staged stage_layout(float *smem, int block, bool with_rgb) {
    Staged st;
    st.geom = reinterpret_cast<float4 *>(smem);
    st.conic = st.geom + block;
    st.box_id = reinterpret_cast<int *>(st.conic + block);
    st.rgb = with_rgb ? reinterpret_cast<float *>(st.box_id + block) : nullptr;
    return st;
}

size_t stage_bytes(int block, int channels, bool with_rgb) {
    return static_cast<size_t>(block) *
           (2 * sizeof(float4) + sizeof(int) + (with_rgb ? channels * sizeof(float) : 0));
}

template <int CDIM>
__device__ __forceinline__ void stage_entry(
    const Staged &st, int slot, int entry, bool with_rgb, const float2 *__restrict__ means2d,
    const float *__restrict__ conics, const float *__restrict__ colors,
    const float *__restrict__ opacities, const float *__restrict__ depths,
    const int32_t *__restrict__ flatten_ids, const int32_t *__restrict__ isect_boxes
) {
    const int g = flatten_ids[entry];
    const float2 xy = means2d[g];
    st.geom[slot] = make_float4(xy.x, xy.y, opacities[g], depths[g]);
    st.conic[slot] = make_float4(conics[3 * g], conics[3 * g + 1], conics[3 * g + 2], __int_as_float(g));
    st.box_id[slot] = isect_boxes[entry];
    if (with_rgb) {
#pragma unroll
        for (int k = 0; k < CDIM; ++k) st.rgb[CDIM * slot + k] = colors[static_cast<int64_t>(g) * CDIM + k];
    }
}

// Unnormalised world direction of the ray through pixel centre (px, py).
__device__ __forceinline__ void pixel_direction(const float *cam, float px, float py, float dir[3]) {
    const float u = __fdiv_rn(__fsub_rn(px, cam[14]), cam[12]);
    const float v = __fdiv_rn(__fsub_rn(py, cam[15]), cam[13]);
#pragma unroll
    for (int j = 0; j < 3; ++j) {
        dir[j] = __fadd_rn(__fadd_rn(__fmul_rn(cam[3 * j], u), __fmul_rn(cam[3 * j + 1], v)), cam[3 * j + 2]);
    }
}

// Whether the ray point at `depth` lies in [lo, hi) of the box (6 floats in global memory).
__device__ __forceinline__ bool ray_point_in_box(const float *cam, const float dir[3], float depth,
                                                 const float *__restrict__ box) {
    bool in = true;
#pragma unroll
    for (int j = 0; j < 3; ++j) {
        const float p = __fadd_rn(cam[9 + j], __fmul_rn(depth, dir[j]));
        in &= (p >= __ldg(box + j)) && (p < __ldg(box + 3 + j));
    }
    return in;
}

// gsplat's sigma and alpha at a pixel centre, rounded op by op like the torch twin.
__device__ __forceinline__ float entry_alpha(
    const float4 &geom, const float4 &conic, float px, float py, float alpha_max, float &sigma,
    float &vis, float &dx, float &dy
) {
    dx = __fsub_rn(geom.x, px);
    dy = __fsub_rn(geom.y, py);
    const float quad = __fadd_rn(__fmul_rn(__fmul_rn(conic.x, dx), dx), __fmul_rn(__fmul_rn(conic.z, dy), dy));
    sigma = __fadd_rn(__fmul_rn(0.5f, quad), __fmul_rn(__fmul_rn(conic.y, dx), dy));
    vis = expf(-sigma);
    return fminf(__fmul_rn(geom.z, vis), alpha_max);
}

__device__ __forceinline__ bool entry_counts(
    const Staged &st, int t, const float *__restrict__ boxes, const float *cam, const float dir[3], float px,
    float py, const ClipRasterSettings &s, float &alpha, float &vis, float &dx, float &dy
) {
    float sigma;
    alpha = entry_alpha(st.geom[t], st.conic[t], px, py, s.alpha_max, sigma, vis, dx, dy);
    if (sigma < 0.f || alpha < s.alpha_min) return false;
    const int b = st.box_id[t];
    return b < 0 || ray_point_in_box(cam, dir, st.geom[t].w, boxes + 6 * b);
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(kFullMask, v, offset);
    return v;
}

__device__ __forceinline__ int warp_max(int v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v = max(v, __shfl_xor_sync(kFullMask, v, offset));
    return v;
}

struct TileRange {
    int start, end;
};

__device__ __forceinline__ TileRange tile_range(const int32_t *offsets, int tile, int num_tiles, int n_isects) {
    return TileRange{offsets[tile], tile + 1 < num_tiles ? offsets[tile + 1] : n_isects};
}

template <int CDIM>
__global__ void clip_rasterize_fwd_kernel(
    const float2 *__restrict__ means2d,      // [N]
    const float *__restrict__ conics,        // [N, 3]
    const float *__restrict__ colors,        // [N, CDIM]
    const float *__restrict__ opacities,     // [N]
    const float *__restrict__ depths,        // [N]
    const float *__restrict__ boxes,         // [B, 6]
    const float *__restrict__ camera,        // [16]
    const int32_t *__restrict__ offsets,     // [TH * TW]
    const int32_t *__restrict__ flatten_ids, // [M]
    const int32_t *__restrict__ isect_boxes, // [M]
    const int n_isects, const ClipRasterSettings s, const int tiles_x, const int tiles_y,
    float *__restrict__ render,       // [H, W, CDIM]
    float *__restrict__ transmittance, // [H, W]
    int32_t *__restrict__ last_ids     // [H, W]
) {
    extern __shared__ float4 smem4[]; // float4: 16-byte aligned staging
    float *smem = reinterpret_cast<float *>(smem4);
    __shared__ float cam[kCameraFloats];
    const int block = blockDim.x * blockDim.y;
    const int tr = threadIdx.y * blockDim.x + threadIdx.x;
    if (tr < kCameraFloats) cam[tr] = camera[tr];
    const Staged st = stage_layout(smem, block, false);
    __syncthreads();

    const int ix = blockIdx.x * s.tile_size + threadIdx.x;
    const int iy = blockIdx.y * s.tile_size + threadIdx.y;
    const bool inside = ix < s.width && iy < s.height;
    const float px = static_cast<float>(ix) + 0.5f;
    const float py = static_cast<float>(iy) + 0.5f;
    float dir[3];
    pixel_direction(cam, px, py, dir);
    const TileRange range = tile_range(offsets, blockIdx.y * tiles_x + blockIdx.x, tiles_x * tiles_y, n_isects);

    float T = 1.f;
    int last = -1;
    float out[CDIM];
#pragma unroll
    for (int k = 0; k < CDIM; ++k) out[k] = 0.f;
    bool done = !inside;
    for (int batch_start = range.start; batch_start < range.end; batch_start += block) {
        if (__syncthreads_count(done) == block) break; // also guards the staging area
        if (batch_start + tr < range.end) {
            stage_entry<CDIM>(st, tr, batch_start + tr, false, means2d, conics, colors, opacities,
                              depths, flatten_ids, isect_boxes);
        }
        __syncthreads();
        const int count = min(block, range.end - batch_start);
        for (int t = 0; t < count && !done; ++t) {
            float alpha, vis, dx, dy;
            if (!entry_counts(st, t, boxes, cam, dir, px, py, s, alpha, vis, dx, dy)) continue;
            const float next_T = __fmul_rn(T, __fsub_rn(1.f, alpha));
            if (next_T <= s.min_transmittance) { // this entry ends the pixel and is excluded
                done = true;
                break;
            }
            const float weight = __fmul_rn(alpha, T);
            const int64_t g = __float_as_int(st.conic[t].w);
#pragma unroll
            for (int k = 0; k < CDIM; ++k) out[k] += colors[g * CDIM + k] * weight;
            last = batch_start + t;
            T = next_T;
        }
    }
    if (inside) {
        const int64_t pix = static_cast<int64_t>(iy) * s.width + ix;
#pragma unroll
        for (int k = 0; k < CDIM; ++k) render[pix * CDIM + k] = out[k];
        transmittance[pix] = T;
        last_ids[pix] = last;
    }
}

template <int CDIM>
__global__ void clip_rasterize_bwd_kernel(
    const float2 *__restrict__ means2d,      // [N]
    const float *__restrict__ conics,        // [N, 3]
    const float *__restrict__ colors,        // [N, CDIM]
    const float *__restrict__ opacities,     // [N]
    const float *__restrict__ depths,        // [N]
    const float *__restrict__ boxes,         // [B, 6]
    const float *__restrict__ camera,        // [16]
    const int32_t *__restrict__ offsets,     // [TH * TW]
    const int32_t *__restrict__ flatten_ids, // [M]
    const int32_t *__restrict__ isect_boxes, // [M]
    const int n_isects, const ClipRasterSettings s, const int tiles_x, const int tiles_y,
    const float *__restrict__ transmittance,   // [H, W]
    const int32_t *__restrict__ last_ids,      // [H, W]
    const float *__restrict__ v_render,        // [H, W, CDIM]
    const float *__restrict__ v_transmittance, // [H, W]
    float2 *__restrict__ v_means2d,            // [N]
    float2 *__restrict__ v_means2d_abs,        // [N] or nullptr
    float *__restrict__ v_conics,              // [N, 3]
    float *__restrict__ v_colors,              // [N, CDIM]
    float *__restrict__ v_opacities            // [N]
) {
    extern __shared__ float4 smem4[]; // float4: 16-byte aligned staging
    float *smem = reinterpret_cast<float *>(smem4);
    __shared__ float cam[kCameraFloats];
    const int block = blockDim.x * blockDim.y;
    const int tr = threadIdx.y * blockDim.x + threadIdx.x;
    const int lane = tr & 31;
    if (tr < kCameraFloats) cam[tr] = camera[tr];
    const Staged st = stage_layout(smem, block, true);
    __syncthreads();

    const int ix = blockIdx.x * s.tile_size + threadIdx.x;
    const int iy = blockIdx.y * s.tile_size + threadIdx.y;
    const bool inside = ix < s.width && iy < s.height;
    const int64_t pix = inside ? static_cast<int64_t>(iy) * s.width + ix : 0;
    const float px = static_cast<float>(ix) + 0.5f;
    const float py = static_cast<float>(iy) + 0.5f;
    float dir[3];
    pixel_direction(cam, px, py, dir);
    const TileRange range = tile_range(offsets, blockIdx.y * tiles_x + blockIdx.x, tiles_x * tiles_y, n_isects);

    const float T_final = inside ? transmittance[pix] : 1.f;
    const int last = inside ? last_ids[pix] : -1;
    const float v_T = inside ? v_transmittance[pix] : 0.f;
    float v_out[CDIM], behind[CDIM]; // d loss / d colour, and sum of contributions behind
#pragma unroll
    for (int k = 0; k < CDIM; ++k) {
        v_out[k] = inside ? v_render[pix * CDIM + k] : 0.f;
        behind[k] = 0.f;
    }
    float T = T_final;
    const int warp_last = warp_max(last);

    for (int batch_end = range.end - 1; batch_end >= range.start; batch_end -= block) {
        __syncthreads(); // the previous batch is no longer read
        if (batch_end - tr >= range.start) {
            stage_entry<CDIM>(st, tr, batch_end - tr, true, means2d, conics, colors, opacities,
                              depths, flatten_ids, isect_boxes);
        }
        __syncthreads();
        const int count = min(block, batch_end + 1 - range.start);
        // Slot t holds entry batch_end - t: back to front; skip what no lane of the warp counted.
        for (int t = max(0, batch_end - warp_last); t < count; ++t) {
            float alpha = 0.f, vis = 0.f, dx = 0.f, dy = 0.f;
            bool valid = inside && batch_end - t <= last;
            if (valid) valid = entry_counts(st, t, boxes, cam, dir, px, py, s, alpha, vis, dx, dy);
            if (!__any_sync(kFullMask, valid)) continue;
            float v_rgb[CDIM];
            float v_a = 0.f, v_b = 0.f, v_c = 0.f, v_x = 0.f, v_y = 0.f, v_o = 0.f;
#pragma unroll
            for (int k = 0; k < CDIM; ++k) v_rgb[k] = 0.f;
            if (valid) {
                const float4 geom = st.geom[t], conic = st.conic[t];
                const float ra = 1.f / (1.f - alpha);
                T *= ra; // T before this entry
                const float weight = alpha * T;
                float v_alpha = -T_final * ra * v_T;
#pragma unroll
                for (int k = 0; k < CDIM; ++k) {
                    const float c = st.rgb[CDIM * t + k];
                    v_rgb[k] = weight * v_out[k];
                    v_alpha += (c * T - behind[k] * ra) * v_out[k];
                    behind[k] += c * weight;
                }
                if (geom.z * vis <= s.alpha_max) { // alpha not clamped
                    const float v_sigma = -geom.z * vis * v_alpha;
                    v_a = 0.5f * v_sigma * dx * dx;
                    v_b = v_sigma * dx * dy;
                    v_c = 0.5f * v_sigma * dy * dy;
                    v_x = v_sigma * (conic.x * dx + conic.y * dy);
                    v_y = v_sigma * (conic.y * dx + conic.z * dy);
                    v_o = vis * v_alpha;
                }
            }
            float abs_x = fabsf(v_x), abs_y = fabsf(v_y);
#pragma unroll
            for (int k = 0; k < CDIM; ++k) v_rgb[k] = warp_sum(v_rgb[k]);
            v_a = warp_sum(v_a);
            v_b = warp_sum(v_b);
            v_c = warp_sum(v_c);
            v_x = warp_sum(v_x);
            v_y = warp_sum(v_y);
            v_o = warp_sum(v_o);
            if (v_means2d_abs != nullptr) {
                abs_x = warp_sum(abs_x);
                abs_y = warp_sum(abs_y);
            }
            if (lane == 0) {
                const int64_t g = __float_as_int(st.conic[t].w);
#pragma unroll
                for (int k = 0; k < CDIM; ++k) atomicAdd(v_colors + g * CDIM + k, v_rgb[k]);
                atomicAdd(v_conics + 3 * g, v_a);
                atomicAdd(v_conics + 3 * g + 1, v_b);
                atomicAdd(v_conics + 3 * g + 2, v_c);
                atomicAdd(&v_means2d[g].x, v_x);
                atomicAdd(&v_means2d[g].y, v_y);
                if (v_means2d_abs != nullptr) {
                    atomicAdd(&v_means2d_abs[g].x, abs_x);
                    atomicAdd(&v_means2d_abs[g].y, abs_y);
                }
                atomicAdd(v_opacities + g, v_o);
            }
        }
    }
}

struct Grid {
    dim3 blocks, threads;
    int tiles_x, tiles_y;
};

Grid make_grid(const ClipRasterSettings &s) {
    const int tiles_x = (s.width + s.tile_size - 1) / s.tile_size;
    const int tiles_y = (s.height + s.tile_size - 1) / s.tile_size;
    return Grid{dim3(tiles_x, tiles_y, 1), dim3(s.tile_size, s.tile_size, 1), tiles_x, tiles_y};
}

template <typename Kernel>
void allow_shared_memory(Kernel kernel, size_t bytes) {
    if (bytes > 48 * 1024) {
        const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                     static_cast<int>(bytes));
        TORCH_CHECK(err == cudaSuccess, "cannot give the rasteriser ", bytes,
                    " bytes of shared memory (", cudaGetErrorString(err), "); use a smaller tile_size");
    }
}

template <int CDIM>
void fwd_with_channels(
    const at::Tensor &means2d, const at::Tensor &conics, const at::Tensor &colors,
    const at::Tensor &opacities, const at::Tensor &depths, const at::Tensor &boxes,
    const at::Tensor &camera, const at::Tensor &isect_offsets, const at::Tensor &flatten_ids,
    const at::Tensor &isect_boxes, const ClipRasterSettings &s, at::Tensor &render,
    at::Tensor &transmittance, at::Tensor &last_ids
) {
    const Grid grid = make_grid(s);
    const int block = s.tile_size * s.tile_size;
    const size_t bytes = stage_bytes(block, CDIM, false);
    allow_shared_memory(clip_rasterize_fwd_kernel<CDIM>, bytes);
    clip_rasterize_fwd_kernel<CDIM><<<grid.blocks, grid.threads, bytes, c10::cuda::getCurrentCUDAStream()>>>(
        reinterpret_cast<const float2 *>(means2d.data_ptr<float>()), conics.data_ptr<float>(),
        colors.data_ptr<float>(), opacities.data_ptr<float>(), depths.data_ptr<float>(),
        boxes.data_ptr<float>(), camera.data_ptr<float>(), isect_offsets.data_ptr<int32_t>(),
        flatten_ids.data_ptr<int32_t>(), isect_boxes.data_ptr<int32_t>(),
        static_cast<int>(flatten_ids.numel()), s, grid.tiles_x, grid.tiles_y,
        render.data_ptr<float>(), transmittance.data_ptr<float>(), last_ids.data_ptr<int32_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <int CDIM>
void bwd_with_channels(
    const at::Tensor &means2d, const at::Tensor &conics, const at::Tensor &colors,
    const at::Tensor &opacities, const at::Tensor &depths, const at::Tensor &boxes,
    const at::Tensor &camera, const at::Tensor &isect_offsets, const at::Tensor &flatten_ids,
    const at::Tensor &isect_boxes, const ClipRasterSettings &s, const at::Tensor &transmittance,
    const at::Tensor &last_ids, const at::Tensor &v_render, const at::Tensor &v_transmittance,
    at::Tensor &v_means2d, at::Tensor &v_means2d_abs, at::Tensor &v_conics, at::Tensor &v_colors,
    at::Tensor &v_opacities
) {
    const Grid grid = make_grid(s);
    const int block = s.tile_size * s.tile_size;
    const size_t bytes = stage_bytes(block, CDIM, true);
    allow_shared_memory(clip_rasterize_bwd_kernel<CDIM>, bytes);
    clip_rasterize_bwd_kernel<CDIM><<<grid.blocks, grid.threads, bytes, c10::cuda::getCurrentCUDAStream()>>>(
        reinterpret_cast<const float2 *>(means2d.data_ptr<float>()), conics.data_ptr<float>(),
        colors.data_ptr<float>(), opacities.data_ptr<float>(), depths.data_ptr<float>(),
        boxes.data_ptr<float>(), camera.data_ptr<float>(), isect_offsets.data_ptr<int32_t>(),
        flatten_ids.data_ptr<int32_t>(), isect_boxes.data_ptr<int32_t>(),
        static_cast<int>(flatten_ids.numel()), s, grid.tiles_x, grid.tiles_y,
        transmittance.data_ptr<float>(), last_ids.data_ptr<int32_t>(), v_render.data_ptr<float>(),
        v_transmittance.data_ptr<float>(), reinterpret_cast<float2 *>(v_means2d.data_ptr<float>()),
        v_means2d_abs.numel() > 0 ? reinterpret_cast<float2 *>(v_means2d_abs.data_ptr<float>()) : nullptr,
        v_conics.data_ptr<float>(), v_colors.data_ptr<float>(), v_opacities.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#define LMK_CLIP_CHANNEL_SWITCH(channels, CALL)                                            \
    switch (channels) {                                                                    \
    case 1: CALL(1); break;                                                                \
    case 2: CALL(2); break;                                                                \
    case 3: CALL(3); break;                                                                \
    case 4: CALL(4); break;                                                                \
    case 8: CALL(8); break;                                                                \
    case 16: CALL(16); break;                                                              \
    case 32: CALL(32); break;                                                              \
    case 64: CALL(64); break;                                                              \
    default: TORCH_CHECK(false, "unsupported number of channels: ", channels);             \
    }

} // namespace

void launch_clip_rasterize_fwd(
    const at::Tensor &means2d, const at::Tensor &conics, const at::Tensor &colors,
    const at::Tensor &opacities, const at::Tensor &depths, const at::Tensor &boxes,
    const at::Tensor &camera, const at::Tensor &isect_offsets, const at::Tensor &flatten_ids,
    const at::Tensor &isect_boxes, const ClipRasterSettings &settings, at::Tensor &render,
    at::Tensor &transmittance, at::Tensor &last_ids
) {
    if (settings.width == 0 || settings.height == 0) return;
#define LMK_FWD(C)                                                                         \
    fwd_with_channels<C>(means2d, conics, colors, opacities, depths, boxes, camera,       \
                         isect_offsets, flatten_ids, isect_boxes, settings, render,        \
                         transmittance, last_ids)
    LMK_CLIP_CHANNEL_SWITCH(colors.size(-1), LMK_FWD)
#undef LMK_FWD
}

void launch_clip_rasterize_bwd(
    const at::Tensor &means2d, const at::Tensor &conics, const at::Tensor &colors,
    const at::Tensor &opacities, const at::Tensor &depths, const at::Tensor &boxes,
    const at::Tensor &camera, const at::Tensor &isect_offsets, const at::Tensor &flatten_ids,
    const at::Tensor &isect_boxes, const ClipRasterSettings &settings,
    const at::Tensor &transmittance, const at::Tensor &last_ids, const at::Tensor &v_render,
    const at::Tensor &v_transmittance, at::Tensor &v_means2d, at::Tensor &v_means2d_abs,
    at::Tensor &v_conics, at::Tensor &v_colors, at::Tensor &v_opacities
) {
    if (settings.width == 0 || settings.height == 0 || flatten_ids.numel() == 0) return;
#define LMK_BWD(C)                                                                         \
    bwd_with_channels<C>(means2d, conics, colors, opacities, depths, boxes, camera,       \
                         isect_offsets, flatten_ids, isect_boxes, settings, transmittance, \
                         last_ids, v_render, v_transmittance, v_means2d, v_means2d_abs,    \
                         v_conics, v_colors, v_opacities)
    LMK_CLIP_CHANNEL_SWITCH(colors.size(-1), LMK_BWD)
#undef LMK_BWD
}

} // namespace landmark
