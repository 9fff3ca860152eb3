// Boundary sharing of clip mode in two launches: which leaves each Gaussian's copies go to.
//
// The CUDA version of core/clip.py's ``share_leaves(reach_boxes(...))`` (read its docstring
// for the geometry).  One thread per Gaussian computes its reach box in float64 with the
// twin's operations in the twin's order -- products and sums rounded one at a time
// (__dmul_rn / __dadd_rn keep nvcc from contracting them into FMAs the twin does not do) --
// and tests it against every leaf box.  Pass 1 counts the leaves met, an exclusive scan
// (torch.cumsum on the host side) gives each Gaussian its first output row, pass 2 writes
// (gaussian, leaf, box) rows in (gaussian, leaf) order, exactly the twin's nonzero() order.
#include "Common.h"
#include "Ops.h"

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

// The reach box of Gaussian i, [lo, hi] per world axis; false when it reaches nothing.
__device__ bool reach_box(const ShareArgs &a, int64_t i, double lo[3], double hi[3]) {
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
    // tiles the Gaussian is binned to: gsplat's rule in float32, as raster_ref.tile_ranges
    const int tiles_x = (a.width + a.tile_size - 1) / a.tile_size;
    const int tiles_y = (a.height + a.tile_size - 1) / a.tile_size;
    const float ts = (float)a.tile_size;
    const float rf = (float)a.radii[i] / ts;
    const float txc = a.means2d[2 * i] / ts, tyc = a.means2d[2 * i + 1] / ts;
    const double tx0 = fminf(fmaxf(floorf(txc - rf), 0.f), (float)tiles_x);
    const double tx1 = fminf(fmaxf(ceilf(txc + rf), 0.f), (float)tiles_x);
    const double ty0 = fminf(fmaxf(floorf(tyc - rf), 0.f), (float)tiles_y);
    const double ty1 = fminf(fmaxf(ceilf(tyc + rf), 0.f), (float)tiles_y);
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

__global__ void count_kernel(ShareArgs a, int64_t *__restrict__ counts) {
    const int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x;
    if (i >= a.n) return;
    double lo[3], hi[3];
    int64_t count = 0;
    if (reach_box(a, i, lo, hi))
        for (int leaf = 0; leaf < a.num_leaves; ++leaf) count += meets(a, leaf, lo, hi);
    counts[i] = count;
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

} // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> share_leaves_cuda(
    const at::Tensor &means2d, const at::Tensor &conics, const at::Tensor &depths, const at::Tensor &radii,
    const at::Tensor &opacities, const at::Tensor &camera, const at::Tensor &boxes,
    int64_t width, int64_t height, int64_t tile_size, double alpha_min, double reach_margin
) {
    LMK_DEVICE_GUARD(means2d);
    for (const at::Tensor *t : {&means2d, &conics, &depths, &opacities, &camera}) {
        LMK_CHECK_INPUT(*t);
        TORCH_CHECK(t->scalar_type() == at::kFloat, "share_leaves_cuda: float32 inputs expected");
    }
    LMK_CHECK_INPUT(radii);
    LMK_CHECK_DTYPE(radii, at::kInt);
    LMK_CHECK_INPUT(boxes);
    LMK_CHECK_DTYPE(boxes, at::kDouble);
    const int64_t n = depths.numel();
    TORCH_CHECK(means2d.numel() == 2 * n && conics.numel() == 3 * n && radii.numel() == n && opacities.numel() == n,
                "share_leaves_cuda: means2d [N,2], conics [N,3], radii [N], opacities [N] expected");
    TORCH_CHECK(camera.numel() == 16 && boxes.dim() == 3 && boxes.size(1) == 2 && boxes.size(2) == 3,
                "share_leaves_cuda: camera [16] and boxes [L,2,3] expected");
    ShareArgs a{means2d.data_ptr<float>(), conics.data_ptr<float>(), depths.data_ptr<float>(),
                radii.data_ptr<int32_t>(), opacities.data_ptr<float>(), camera.data_ptr<float>(),
                boxes.data_ptr<double>(), n, (int)boxes.size(0), (int)width, (int)height, (int)tile_size,
                alpha_min, reach_margin};
    auto long_options = depths.options().dtype(at::kLong);
    at::Tensor counts = at::empty({n}, long_options);
    cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
    const int threads = 256;
    const int64_t blocks = (n + threads - 1) / threads;
    if (n > 0) {
        count_kernel<<<blocks, threads, 0, stream>>>(a, counts.data_ptr<int64_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    at::Tensor ends = counts.cumsum(0);
    const int64_t total = n > 0 ? ends[n - 1].item<int64_t>() : 0;  // one sync: the output size
    at::Tensor gaussian = at::empty({total}, long_options);
    at::Tensor leaf = at::empty({total}, long_options);
    at::Tensor box = at::empty({total}, long_options);
    if (total > 0) {
        write_kernel<<<blocks, threads, 0, stream>>>(
            a, counts.data_ptr<int64_t>(), ends.data_ptr<int64_t>(), gaussian.data_ptr<int64_t>(),
            leaf.data_ptr<int64_t>(), box.data_ptr<int64_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    return {gaussian, leaf, box};
}

} // namespace landmark
