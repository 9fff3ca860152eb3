// Box-clipped rasteriser: input checks, output allocation, launcher calls.
#include "ClipRasterize.h"
#include "Common.h"
#include "Ops.h"

#include <climits>
#include <limits>

namespace landmark {

namespace {

ClipRasterSettings make_settings(
    int64_t width, int64_t height, int64_t tile_size, double alpha_min, double alpha_max,
    double min_transmittance
) {
    TORCH_CHECK(width >= 0 && height >= 0, "image size must be non-negative");
    TORCH_CHECK(tile_size >= 1 && tile_size <= 32 && (tile_size * tile_size) % 32 == 0,
                "tile_size must be 8, 16, 24 or 32 (one thread per pixel, whole warps)");
    return ClipRasterSettings{
        static_cast<int>(width), static_cast<int>(height), static_cast<int>(tile_size),
        static_cast<float>(alpha_min), static_cast<float>(alpha_max),
        static_cast<float>(min_transmittance)};
}

void check_inputs(
    const at::Tensor &means2d, const at::Tensor &conics, const at::Tensor &colors,
    const at::Tensor &opacities, const at::Tensor &depths, const at::Tensor &boxes,
    const at::Tensor &camera, const at::Tensor &isect_offsets, const at::Tensor &flatten_ids,
    const at::Tensor &isect_boxes, const ClipRasterSettings &s
) {
    for (const at::Tensor *t : {&means2d, &conics, &colors, &opacities, &depths, &boxes, &camera}) {
        LMK_CHECK_INPUT(*t);
        LMK_CHECK_DTYPE(*t, at::kFloat);
    }
    for (const at::Tensor *t : {&isect_offsets, &flatten_ids, &isect_boxes}) {
        LMK_CHECK_INPUT(*t);
        LMK_CHECK_DTYPE(*t, at::kInt);
    }
    const int64_t n = opacities.numel();
    TORCH_CHECK(means2d.numel() == 2 * n, "means2d must be [N, 2]");
    TORCH_CHECK(conics.numel() == 3 * n, "conics must be [N, 3]");
    TORCH_CHECK(depths.numel() == n, "depths must be [N]");
    TORCH_CHECK(colors.dim() >= 1 && colors.numel() == n * colors.size(-1), "colors must be [N, D]");
    bool supported = false;
    for (int c : kClipChannels) supported |= colors.size(-1) == c;
    TORCH_CHECK(supported, "colors has ", colors.size(-1), " channels; pad to 1, 2, 3, 4, 8, 16, 32 or 64");
    TORCH_CHECK(boxes.numel() % 6 == 0, "boxes must be [B, 2, 3]");
    TORCH_CHECK(camera.numel() == 16, "camera must have 16 floats (see core/clip.py clip_camera)");
    const int64_t tiles_x = (s.width + s.tile_size - 1) / s.tile_size;
    const int64_t tiles_y = (s.height + s.tile_size - 1) / s.tile_size;
    TORCH_CHECK(isect_offsets.numel() == tiles_x * tiles_y, "isect_offsets must be [", tiles_y, ", ", tiles_x, "]");
    TORCH_CHECK(isect_boxes.numel() == flatten_ids.numel(), "isect_boxes must match flatten_ids");
}

} // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> clip_rasterize_fwd(
    const at::Tensor &means2d, const at::Tensor &conics, const at::Tensor &colors,
    const at::Tensor &opacities, const at::Tensor &depths, const at::Tensor &boxes,
    const at::Tensor &camera, const at::Tensor &isect_offsets, const at::Tensor &flatten_ids,
    const at::Tensor &isect_boxes, int64_t width, int64_t height, int64_t tile_size,
    double alpha_min, double alpha_max, double min_transmittance, bool poison
) {
    LMK_DEVICE_GUARD(means2d);
    const ClipRasterSettings s =
        make_settings(width, height, tile_size, alpha_min, alpha_max, min_transmittance);
    check_inputs(means2d, conics, colors, opacities, depths, boxes, camera, isect_offsets,
                 flatten_ids, isect_boxes, s);
    const int64_t channels = colors.size(-1);
    const auto fopts = means2d.options();
    const auto iopts = means2d.options().dtype(at::kInt);
    at::Tensor render, transmittance, last_ids;
    if (poison) {
        const float nan = std::numeric_limits<float>::quiet_NaN();
        render = at::full({height, width, channels}, nan, fopts);
        transmittance = at::full({height, width, 1}, nan, fopts);
        last_ids = at::full({height, width}, INT_MIN, iopts);
    } else {
        render = at::empty({height, width, channels}, fopts);
        transmittance = at::empty({height, width, 1}, fopts);
        last_ids = at::empty({height, width}, iopts);
    }
    launch_clip_rasterize_fwd(means2d, conics, colors, opacities, depths, boxes, camera,
                              isect_offsets, flatten_ids, isect_boxes, s, render, transmittance,
                              last_ids);
    return std::make_tuple(render, transmittance, last_ids);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> clip_rasterize_bwd(
    const at::Tensor &means2d, const at::Tensor &conics, const at::Tensor &colors,
    const at::Tensor &opacities, const at::Tensor &depths, const at::Tensor &boxes,
    const at::Tensor &camera, const at::Tensor &isect_offsets, const at::Tensor &flatten_ids,
    const at::Tensor &isect_boxes, int64_t width, int64_t height, int64_t tile_size,
    double alpha_min, double alpha_max, double min_transmittance,
    const at::Tensor &transmittance, const at::Tensor &last_ids, const at::Tensor &v_render,
    const at::Tensor &v_transmittance, bool absgrad
) {
    LMK_DEVICE_GUARD(means2d);
    const ClipRasterSettings s =
        make_settings(width, height, tile_size, alpha_min, alpha_max, min_transmittance);
    check_inputs(means2d, conics, colors, opacities, depths, boxes, camera, isect_offsets,
                 flatten_ids, isect_boxes, s);
    for (const at::Tensor *t : {&transmittance, &v_render, &v_transmittance}) {
        LMK_CHECK_INPUT(*t);
        LMK_CHECK_DTYPE(*t, at::kFloat);
    }
    LMK_CHECK_INPUT(last_ids);
    LMK_CHECK_DTYPE(last_ids, at::kInt);
    const int64_t pixels = width * height;
    TORCH_CHECK(transmittance.numel() == pixels && v_transmittance.numel() == pixels,
                "transmittance and its gradient must be [H, W, 1]");
    TORCH_CHECK(last_ids.numel() == pixels, "last_ids must be [H, W]");
    TORCH_CHECK(v_render.numel() == pixels * colors.size(-1), "v_render must be [H, W, D]");
    const int64_t n = opacities.numel();
    at::Tensor v_means2d = at::zeros({n, 2}, means2d.options());
    at::Tensor v_means2d_abs = absgrad ? at::zeros({n, 2}, means2d.options()) : at::empty({0}, means2d.options());
    at::Tensor v_conics = at::zeros({n, 3}, means2d.options());
    at::Tensor v_colors = at::zeros({n, colors.size(-1)}, means2d.options());
    at::Tensor v_opacities = at::zeros({n}, means2d.options());
    launch_clip_rasterize_bwd(means2d, conics, colors, opacities, depths, boxes, camera,
                              isect_offsets, flatten_ids, isect_boxes, s, transmittance, last_ids,
                              v_render, v_transmittance, v_means2d, v_means2d_abs, v_conics,
                              v_colors, v_opacities);
    return std::make_tuple(v_means2d, v_means2d_abs, v_conics, v_colors, v_opacities);
}

} // namespace landmark
