// Python bindings of csrc/ (loaded by landmark_plugin/cuda.py).
#include "Ops.h"

#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("clip_rasterize_fwd", &landmark::clip_rasterize_fwd, "box-clipped rasteriser, forward");
    m.def("clip_rasterize_bwd", &landmark::clip_rasterize_bwd, "box-clipped rasteriser, backward");
    m.def("sort_tile_leaf_depth", &landmark::sort_tile_leaf_depth, "radix sort of intersections by (tile, leaf position, depth)");
    m.def("share_leaves_cuda", &landmark::share_leaves_cuda, "clip mode boundary sharing (copies per leaf)");
    m.def("clip_intersections_cuda", &landmark::clip_intersections_cuda, "clip mode copies' sorted tile intersections");
    m.def("block_features_fwd", &landmark::block_features_fwd, "multi-branch plane x line features, forward");
    m.def("block_features_bwd", &landmark::block_features_bwd, "multi-branch plane x line features, backward");
}
