// Multi-branch plane x line features: input checks, factor table, output allocation.
#include "BlockFeatures.h"
#include "Common.h"
#include "Ops.h"

#include <limits>

namespace landmark {

namespace {

bool aligned(const void *p, int bytes) { return reinterpret_cast<uintptr_t>(p) % bytes == 0; }

void check_float_input(const at::Tensor &t, const char *what, int64_t k) {
    TORCH_CHECK(t.is_cuda(), what, "[", k, "] must be a CUDA tensor");
    TORCH_CHECK(t.is_contiguous(), what, "[", k, "] must be contiguous");
    TORCH_CHECK(t.scalar_type() == at::kFloat, what, "[", k, "] must be float32");
}

int checked_int(int64_t value, const char *what) {
    TORCH_CHECK(value <= std::numeric_limits<int>::max(), what, " (", value, ") does not fit int32");
    return static_cast<int>(value);
}

// Checks every input and fills pointers and sizes (backward pointers stay null).
FactorTable make_table(
    const std::vector<at::Tensor> &planes, const std::vector<at::Tensor> &lines,
    const at::Tensor &points, const at::Tensor &block_index, const std::vector<int64_t> &axes
) {
    const int64_t num_factors = static_cast<int64_t>(planes.size());
    TORCH_CHECK(num_factors >= 1 && num_factors <= kMaxGridFactors, "between 1 and ", kMaxGridFactors,
                " factors per launch, got ", num_factors);
    TORCH_CHECK(static_cast<int64_t>(lines.size()) == num_factors, "one line per plane: ", num_factors,
                " planes, ", lines.size(), " lines");
    TORCH_CHECK(static_cast<int64_t>(axes.size()) == 3 * num_factors, "axes must hold (u, v, w) per factor");
    LMK_CHECK_INPUT(points);
    LMK_CHECK_DTYPE(points, at::kFloat);
    LMK_CHECK_INPUT(block_index);
    LMK_CHECK_DTYPE(block_index, at::kLong);
    TORCH_CHECK(points.dim() == 2 && points.size(1) == 3, "points must be [N, 3]");
    TORCH_CHECK(block_index.dim() == 1 && block_index.size(0) == points.size(0), "block_index must be [N]");
    TORCH_CHECK(block_index.device() == points.device(), "block_index is on another device than the points");

    FactorTable t{};
    t.num_factors = static_cast<int>(num_factors);
    t.num_blocks = checked_int(planes[0].dim() == 4 ? planes[0].size(0) : 0, "blocks");
    t.channels = checked_int(planes[0].dim() == 4 ? planes[0].size(3) : 0, "channels");
    t.num_points = points.size(0);
    TORCH_CHECK(t.num_blocks >= 1 && t.channels >= 1, "planes[0] must be [B, Rv, Ru, C] with B, C >= 1");
    bool vec4 = t.channels % 4 == 0, vec2 = t.channels % 2 == 0;
    for (int64_t k = 0; k < num_factors; ++k) {
        const at::Tensor &plane = planes[k], &line = lines[k];
        check_float_input(plane, "planes", k);
        check_float_input(line, "lines", k);
        TORCH_CHECK(plane.device() == points.device() && line.device() == points.device(),
                    "factor ", k, " is on another device than the points");
        TORCH_CHECK(plane.dim() == 4 && plane.size(0) == t.num_blocks && plane.size(3) == t.channels,
                    "planes[", k, "] must be [", t.num_blocks, ", Rv, Ru, ", t.channels, "]");
        TORCH_CHECK(plane.size(1) >= 2 && plane.size(2) >= 2, "planes[", k, "] needs >= 2 texels per side");
        TORCH_CHECK(line.dim() == 3 && (line.size(0) == 1 || line.size(0) == t.num_blocks) &&
                        line.size(2) == t.channels,
                    "lines[", k, "] must be [", t.num_blocks, " or 1, Rl, ", t.channels, "]");
        TORCH_CHECK(line.size(1) >= 2, "lines[", k, "] needs >= 2 texels");
        bool seen[3] = {false, false, false};
        for (int j = 0; j < 3; ++j) {
            const int64_t a = axes[3 * k + j];
            TORCH_CHECK(a >= 0 && a < 3 && !seen[a], "axes of factor ", k, " must be a permutation of 0 1 2");
            seen[a] = true;
            t.axes[k][j] = static_cast<int>(a);
        }
        t.plane[k] = plane.data_ptr<float>();
        t.line[k] = line.data_ptr<float>();
        t.rows[k] = checked_int(plane.size(1), "plane rows");
        t.cols[k] = checked_int(plane.size(2), "plane columns");
        t.line_size[k] = checked_int(line.size(1), "line texels");
        t.shared_line[k] = line.size(0) == 1 ? 1 : 0;
        vec4 &= aligned(t.plane[k], 16) && aligned(t.line[k], 16);
        vec2 &= aligned(t.plane[k], 8) && aligned(t.line[k], 8);
    }
    t.vec = vec4 ? 4 : (vec2 ? 2 : 1);
    return t;
}

// Vector width usable with an extra [N, K*C] buffer too (fresh allocations are aligned).
void narrow_vec(FactorTable &t, const at::Tensor &buffer) {
    while (t.vec > 1 && !aligned(buffer.data_ptr(), 4 * t.vec)) t.vec /= 2;
}

} // namespace

at::Tensor block_features_fwd(
    const std::vector<at::Tensor> &planes, const std::vector<at::Tensor> &lines,
    const at::Tensor &points, const at::Tensor &block_index, const std::vector<int64_t> &axes,
    bool poison
) {
    LMK_DEVICE_GUARD(points);
    FactorTable t = make_table(planes, lines, points, block_index, axes);
    const int64_t width = static_cast<int64_t>(t.num_factors) * t.channels;
    at::Tensor features = poison
        ? at::full({t.num_points, width}, std::numeric_limits<float>::quiet_NaN(), points.options())
        : at::empty({t.num_points, width}, points.options());
    launch_block_features_fwd(t, points, block_index, features);
    return features;
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, at::Tensor> block_features_bwd(
    const std::vector<at::Tensor> &planes, const std::vector<at::Tensor> &lines,
    const at::Tensor &points, const at::Tensor &block_index, const std::vector<int64_t> &axes,
    const at::Tensor &v_features, bool points_grad, int64_t points_per_thread
) {
    LMK_DEVICE_GUARD(points);
    FactorTable t = make_table(planes, lines, points, block_index, axes);
    LMK_CHECK_INPUT(v_features);
    LMK_CHECK_DTYPE(v_features, at::kFloat);
    TORCH_CHECK(v_features.dim() == 2 && v_features.size(0) == t.num_points &&
                    v_features.size(1) == static_cast<int64_t>(t.num_factors) * t.channels,
                "v_features must be [N, K * C] = [", t.num_points, ", ", t.num_factors * t.channels, "]");
    TORCH_CHECK(points_per_thread == 1 || points_per_thread == 4 || points_per_thread == 8,
                "points_per_thread must be 1, 4 or 8");
    narrow_vec(t, v_features);
    std::vector<at::Tensor> v_planes, v_lines;
    for (int k = 0; k < t.num_factors; ++k) {
        // accumulated by atomics: zero-initialised
        v_planes.push_back(at::zeros_like(planes[k]));
        v_lines.push_back(at::zeros_like(lines[k]));
        t.v_plane[k] = v_planes.back().data_ptr<float>();
        t.v_line[k] = v_lines.back().data_ptr<float>();
    }
    at::Tensor v_points = points_grad ? at::zeros_like(points) : at::empty({0}, points.options());
    launch_block_features_bwd(t, points, block_index, v_features, v_points, static_cast<int>(points_per_thread));
    return std::make_tuple(v_planes, v_lines, v_points);
}

} // namespace landmark
