// Multi-branch plane x line feature kernels (forward and backward); see BlockFeatures.h.
//
// Layout: blockIdx.y is the factor k (so every per-factor size and pointer read from the
// table is uniform over a thread block: constant-cache broadcasts), and along x one thread
// handles one vector of VEC channels of one point (forward) or of `P` consecutive points
// (backward).  The VEC-wide lanes of a point read its 4 plane rows and 2 line rows as
// contiguous channels-last segments (coalesced, 16-byte loads when C % 4 == 0) and write a
// contiguous slice of the [N, K*C] output.
//
// The tap arithmetic (texel index, weights, the 4 + 2 weighted sums) uses explicitly rounded
// float ops in the order of the torch twin, so both pick the same texels, also exactly on
// texel and block borders.
//
// Backward scatters with atomics (one vector atomic per row on sm_90).  Samples come ray
// by ray, so consecutive points often share their plane cell and line cell (proposal
// sampling puts many samples near one surface): a backward thread walks P consecutive
// points and sums their contributions in registers while the cell stays the same, issuing
// the atomics only when it changes -- fewer atomics, and less contention on shared lines.
#include "BlockFeatures.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>

namespace landmark {
namespace {

constexpr int kThreads = 256;

// ---- VEC-wide loads, stores and atomics (VEC = 4, 2, 1) --------------------------------

template <int VEC> struct Vec { float v[VEC]; };

template <int VEC> __device__ __forceinline__ Vec<VEC> load(const float *p);
template <> __device__ __forceinline__ Vec<4> load<4>(const float *p) {
    const float4 q = __ldg(reinterpret_cast<const float4 *>(p));
    return Vec<4>{{q.x, q.y, q.z, q.w}};
}
template <> __device__ __forceinline__ Vec<2> load<2>(const float *p) {
    const float2 q = __ldg(reinterpret_cast<const float2 *>(p));
    return Vec<2>{{q.x, q.y}};
}
template <> __device__ __forceinline__ Vec<1> load<1>(const float *p) { return Vec<1>{{__ldg(p)}}; }

template <int VEC> __device__ __forceinline__ void store(float *p, const Vec<VEC> &x);
template <> __device__ __forceinline__ void store<4>(float *p, const Vec<4> &x) {
    *reinterpret_cast<float4 *>(p) = make_float4(x.v[0], x.v[1], x.v[2], x.v[3]);
}
template <> __device__ __forceinline__ void store<2>(float *p, const Vec<2> &x) {
    *reinterpret_cast<float2 *>(p) = make_float2(x.v[0], x.v[1]);
}
template <> __device__ __forceinline__ void store<1>(float *p, const Vec<1> &x) { *p = x.v[0]; }

template <int VEC> __device__ __forceinline__ void atomic_add(float *p, const Vec<VEC> &x) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    // one vector reduction per row segment (sm_90 global float2 / float4 atomics)
    if constexpr (VEC == 4) {
        atomicAdd(reinterpret_cast<float4 *>(p), make_float4(x.v[0], x.v[1], x.v[2], x.v[3]));
    } else if constexpr (VEC == 2) {
        atomicAdd(reinterpret_cast<float2 *>(p), make_float2(x.v[0], x.v[1]));
    } else {
        atomicAdd(p, x.v[0]);
    }
#else
#pragma unroll
    for (int j = 0; j < VEC; ++j) atomicAdd(p + j, x.v[j]);
#endif
}

// ---- taps ------------------------------------------------------------------------------

// core/grid_features.py _linear_taps: x = clamp((coord + 1) * 0.5 * (size - 1), 0, size - 1),
// lower texel i0 = min(floor(x), size - 2), upper weight x - i0.  `inside`: the clamp passes
// the coordinate's gradient (torch's clamp backward is zero on the bounds themselves).
struct Tap {
    int i0;
    float w;
    bool inside;
};

__device__ __forceinline__ Tap linear_tap(float coord, int size) {
    const float hi = static_cast<float>(size - 1);
    const float x = __fmul_rn(__fmul_rn(__fadd_rn(coord, 1.f), 0.5f), hi);
    const float xc = fminf(fmaxf(x, 0.f), hi);
    const float i0 = fminf(floorf(xc), static_cast<float>(size - 2));
    return Tap{static_cast<int>(i0), __fsub_rn(xc, i0), x > 0.f && x < hi};
}

// One factor's sizes and pointers, read once per thread (uniform over the thread block).
struct Factor {
    const float *plane, *line;
    float *v_plane, *v_line;
    int rows, cols, line_size, shared_line, u, v, w;
};

__device__ __forceinline__ Factor factor(const FactorTable &t, int k) {
    return Factor{t.plane[k], t.line[k], t.v_plane[k], t.v_line[k], t.rows[k], t.cols[k], t.line_size[k],
                  t.shared_line[k], t.axes[k][0], t.axes[k][1], t.axes[k][2]};
}

// Where point n reads factor f: first plane row (texel (iv, iu) of its block), first line
// row, the upper-texel weights, and whether the point is valid (finite coordinates, block in
// [0, B)); an invalid point reads nothing and gets NaN features, never a wild address.
struct PointTaps {
    int64_t plane_row, line_row;
    Tap tu, tv, tw;
    bool valid;
};

__device__ __forceinline__ PointTaps point_taps(
    const Factor &f, int num_blocks, const float *__restrict__ points, const int64_t *__restrict__ block_index,
    int64_t n
) {
    PointTaps p;
    const float u = points[3 * n + f.u], v = points[3 * n + f.v], w = points[3 * n + f.w];
    const int64_t b = block_index[n];
    p.valid = b >= 0 && b < num_blocks && u == u && v == v && w == w; // x == x: not NaN
    p.tu = linear_tap(p.valid ? u : 0.f, f.cols);
    p.tv = linear_tap(p.valid ? v : 0.f, f.rows);
    p.tw = linear_tap(p.valid ? w : 0.f, f.line_size);
    const int64_t block = p.valid ? b : 0;
    p.plane_row = (block * f.rows + p.tv.i0) * f.cols + p.tu.i0;
    p.line_row = (f.shared_line ? 0 : block) * f.line_size + p.tw.i0;
    return p;
}

// Bilinear weights of texels (iv, iu), (iv, iu+1), (iv+1, iu), (iv+1, iu+1), as the twin.
__device__ __forceinline__ void plane_weights(const PointTaps &p, float wt[4]) {
    const float ou = __fsub_rn(1.f, p.tu.w), ov = __fsub_rn(1.f, p.tv.w);
    wt[0] = __fmul_rn(ou, ov);
    wt[1] = __fmul_rn(p.tu.w, ov);
    wt[2] = __fmul_rn(ou, p.tv.w);
    wt[3] = __fmul_rn(p.tu.w, p.tv.w);
}

// The 4 plane rows and 2 line rows of one point at channel offset c.
template <int VEC> struct Rows {
    Vec<VEC> p[4], l[2];
};

template <int VEC>
__device__ __forceinline__ Rows<VEC> load_rows(const Factor &f, const PointTaps &p, int64_t channels, int c) {
    Rows<VEC> r;
    const float *plane = f.plane + p.plane_row * channels + c;
    const int64_t down = static_cast<int64_t>(f.cols) * channels;
    r.p[0] = load<VEC>(plane);
    r.p[1] = load<VEC>(plane + channels);
    r.p[2] = load<VEC>(plane + down);
    r.p[3] = load<VEC>(plane + down + channels);
    const float *line = f.line + p.line_row * channels + c;
    r.l[0] = load<VEC>(line);
    r.l[1] = load<VEC>(line + channels);
    return r;
}

// Plane and line values of channel j (the twin's weighted sums, in its order).
template <int VEC>
__device__ __forceinline__ void values(const Rows<VEC> &r, const float wt[4], float lw0, float lw1, int j,
                                       float &plane, float &line) {
    plane = __fadd_rn(__fadd_rn(__fadd_rn(__fmul_rn(r.p[0].v[j], wt[0]), __fmul_rn(r.p[1].v[j], wt[1])),
                                __fmul_rn(r.p[2].v[j], wt[2])),
                      __fmul_rn(r.p[3].v[j], wt[3]));
    line = __fadd_rn(__fmul_rn(r.l[0].v[j], lw0), __fmul_rn(r.l[1].v[j], lw1));
}

// Work item -> (point or point group, first channel).  32-bit division when the items fit
// (always, short of billions of points): 64-bit division is a long instruction sequence.
__device__ __forceinline__ void split_item(int64_t item, int64_t items, int lanes, int vec, int64_t &index, int &c) {
    if (items <= 0xffffffffll) {
        const uint32_t i = static_cast<uint32_t>(item), q = i / static_cast<uint32_t>(lanes);
        index = q;
        c = static_cast<int>(i - q * static_cast<uint32_t>(lanes)) * vec;
    } else {
        index = item / lanes;
        c = static_cast<int>(item - index * lanes) * vec;
    }
}

// ---- forward ---------------------------------------------------------------------------

template <int VEC>
__global__ void __launch_bounds__(kThreads) block_features_fwd_kernel(
    const __grid_constant__ FactorTable t,
    const float *__restrict__ points,       // [N, 3]
    const int64_t *__restrict__ block_index, // [N]
    float *__restrict__ features            // [N, K * C]
) {
    const int lanes = t.channels / VEC;
    const int64_t items = t.num_points * lanes;
    const int64_t item = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    if (item >= items) return;
    int64_t n;
    int c;
    split_item(item, items, lanes, VEC, n, c);
    const int k = blockIdx.y;
    const Factor f = factor(t, k);
    const PointTaps p = point_taps(f, t.num_blocks, points, block_index, n);
    Vec<VEC> out;
    if (p.valid) {
        const Rows<VEC> r = load_rows<VEC>(f, p, t.channels, c);
        float wt[4];
        plane_weights(p, wt);
        const float lw0 = __fsub_rn(1.f, p.tw.w);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
            float plane, line;
            values<VEC>(r, wt, lw0, p.tw.w, j, plane, line);
            out.v[j] = __fmul_rn(plane, line);
        }
    } else {
#pragma unroll
        for (int j = 0; j < VEC; ++j) out.v[j] = __int_as_float(0x7fc00000); // NaN
    }
    const int64_t width = static_cast<int64_t>(t.num_factors) * t.channels;
    store<VEC>(features + n * width + static_cast<int64_t>(k) * t.channels + c, out);
}

// ---- backward --------------------------------------------------------------------------

// Gradient rows summed in registers while consecutive points hit the same cell.
template <int VEC, int TAPS> struct RunSum {
    int64_t row = -1;
    Vec<VEC> g[TAPS];

    // Before adding a point's contributions: flush the running sums if it is in another cell.
    __device__ __forceinline__ void begin(int64_t next, float *base, int64_t channels, int64_t down, int c) {
        if (next == row) return;
        flush(base, channels, down, c);
        row = next;
#pragma unroll
        for (int i = 0; i < TAPS; ++i)
#pragma unroll
            for (int j = 0; j < VEC; ++j) g[i].v[j] = 0.f;
    }

    // Tap i of the cell is row + offset(i): (0, 1, down, down + 1) for planes, (0, 1) for lines.
    __device__ __forceinline__ void flush(float *base, int64_t channels, int64_t down, int c) {
        if (row < 0) return;
        float *first = base + row * channels + c;
        atomic_add<VEC>(first, g[0]);
        atomic_add<VEC>(first + channels, g[1]);
        if constexpr (TAPS == 4) {
            atomic_add<VEC>(first + down * channels, g[2]);
            atomic_add<VEC>(first + (down + 1) * channels, g[3]);
        }
    }
};

// POINT_GRADS: also d loss / d points (only when they need it: it keeps all rows live).
template <int VEC, int P, bool POINT_GRADS>
__global__ void __launch_bounds__(kThreads, 2) block_features_bwd_kernel(
    const __grid_constant__ FactorTable t,
    const float *__restrict__ points,       // [N, 3]
    const int64_t *__restrict__ block_index, // [N]
    const float *__restrict__ v_features,   // [N, K * C]
    float *__restrict__ v_points            // [N, 3], used if POINT_GRADS
) {
    const int lanes = t.channels / VEC;
    const int64_t item = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
    const int64_t items = (t.num_points + P - 1) / P * lanes;
    if (item >= items) return;
    int64_t group;
    int c;
    split_item(item, items, lanes, VEC, group, c);
    const int k = blockIdx.y;
    const Factor f = factor(t, k);
    const int64_t channels = t.channels;
    const int64_t width = static_cast<int64_t>(t.num_factors) * channels;
    RunSum<VEC, 4> plane_sum;
    RunSum<VEC, 2> line_sum;
    const int64_t begin = group * P;
    const int64_t end = min(begin + P, t.num_points);
#pragma unroll 1
    for (int64_t n = begin; n < end; ++n) {
        const PointTaps p = point_taps(f, t.num_blocks, points, block_index, n);
        if (!p.valid) continue;
        const Rows<VEC> r = load_rows<VEC>(f, p, channels, c);
        const Vec<VEC> g = load<VEC>(v_features + n * width + k * channels + c);
        float wt[4];
        plane_weights(p, wt);
        const float lw0 = __fsub_rn(1.f, p.tw.w);
        plane_sum.begin(p.plane_row, f.v_plane, channels, f.cols, c);
        line_sum.begin(p.line_row, f.v_line, channels, 0, c);
        float du = 0.f, dv = 0.f, dw = 0.f;
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
            float plane, line;
            values<VEC>(r, wt, lw0, p.tw.w, j, plane, line);
            const float g_plane = g.v[j] * line; // d loss / d plane value
            const float g_line = g.v[j] * plane; // d loss / d line value
#pragma unroll
            for (int i = 0; i < 4; ++i) plane_sum.g[i].v[j] += g_plane * wt[i];
            line_sum.g[0].v[j] += g_line * lw0;
            line_sum.g[1].v[j] += g_line * p.tw.w;
            if constexpr (POINT_GRADS) {
                // derivatives of the weighted sums by the upper-texel weights
                const float ou = 1.f - p.tu.w, ov = 1.f - p.tv.w;
                du += g_plane * (ov * (r.p[1].v[j] - r.p[0].v[j]) + p.tv.w * (r.p[3].v[j] - r.p[2].v[j]));
                dv += g_plane * (ou * (r.p[2].v[j] - r.p[0].v[j]) + p.tu.w * (r.p[3].v[j] - r.p[1].v[j]));
                dw += g_line * (r.l[1].v[j] - r.l[0].v[j]);
            }
        }
        if constexpr (POINT_GRADS) {
            // weight = x - i0 with x = clamp((coord + 1) * 0.5 * (size - 1)): d weight / d coord
            float *vp = v_points + 3 * n;
            if (p.tu.inside) atomicAdd(vp + f.u, du * (0.5f * (f.cols - 1)));
            if (p.tv.inside) atomicAdd(vp + f.v, dv * (0.5f * (f.rows - 1)));
            if (p.tw.inside) atomicAdd(vp + f.w, dw * (0.5f * (f.line_size - 1)));
        }
    }
    plane_sum.flush(f.v_plane, channels, f.cols, c);
    line_sum.flush(f.v_line, channels, 0, c);
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

dim3 make_grid(int64_t items, int num_factors) {
    const int64_t blocks = ceil_div(items, kThreads);
    TORCH_CHECK(blocks <= 0x7fffffff, "too many points for one launch (", items, " work items): split them");
    return dim3(static_cast<unsigned>(blocks), static_cast<unsigned>(num_factors));
}

template <int VEC>
void fwd_with_vec(const FactorTable &t, const at::Tensor &points, const at::Tensor &block_index, at::Tensor &features) {
    const dim3 grid = make_grid(t.num_points * (t.channels / VEC), t.num_factors);
    block_features_fwd_kernel<VEC><<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        t, points.data_ptr<float>(), block_index.data_ptr<int64_t>(), features.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <int VEC, int P>
void bwd_with(const FactorTable &t, const at::Tensor &points, const at::Tensor &block_index,
              const at::Tensor &v_features, at::Tensor &v_points) {
    const int64_t items = ceil_div(t.num_points, P) * (t.channels / VEC);
    const dim3 grid = make_grid(items, t.num_factors);
    const auto stream = c10::cuda::getCurrentCUDAStream();
    if (v_points.numel() > 0) {
        block_features_bwd_kernel<VEC, P, true><<<grid, kThreads, 0, stream>>>(
            t, points.data_ptr<float>(), block_index.data_ptr<int64_t>(), v_features.data_ptr<float>(),
            v_points.data_ptr<float>());
    } else {
        block_features_bwd_kernel<VEC, P, false><<<grid, kThreads, 0, stream>>>(
            t, points.data_ptr<float>(), block_index.data_ptr<int64_t>(), v_features.data_ptr<float>(), nullptr);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <int VEC>
void bwd_with_vec(const FactorTable &t, const at::Tensor &points, const at::Tensor &block_index,
                  const at::Tensor &v_features, at::Tensor &v_points, int points_per_thread) {
    switch (points_per_thread) {
    case 1: bwd_with<VEC, 1>(t, points, block_index, v_features, v_points); break;
    case 4: bwd_with<VEC, 4>(t, points, block_index, v_features, v_points); break;
    case 8: bwd_with<VEC, 8>(t, points, block_index, v_features, v_points); break;
    default: TORCH_CHECK(false, "points_per_thread must be 1, 4 or 8, got ", points_per_thread);
    }
}

} // namespace

void launch_block_features_fwd(
    const FactorTable &table, const at::Tensor &points, const at::Tensor &block_index, at::Tensor &features
) {
    if (table.num_points == 0) return;
    switch (table.vec) {
    case 4: fwd_with_vec<4>(table, points, block_index, features); break;
    case 2: fwd_with_vec<2>(table, points, block_index, features); break;
    default: fwd_with_vec<1>(table, points, block_index, features);
    }
}

void launch_block_features_bwd(
    const FactorTable &table, const at::Tensor &points, const at::Tensor &block_index,
    const at::Tensor &v_features, at::Tensor &v_points, int points_per_thread
) {
    if (table.num_points == 0) return;
    switch (table.vec) {
    case 4: bwd_with_vec<4>(table, points, block_index, v_features, v_points, points_per_thread); break;
    case 2: bwd_with_vec<2>(table, points, block_index, v_features, v_points, points_per_thread); break;
    default: bwd_with_vec<1>(table, points, block_index, v_features, v_points, points_per_thread);
    }
}

} // namespace landmark
