// Python bindings of csrc/ (loaded by landmark_plugin/cuda.py).
#include "Ops.h"

#include <torch/extension.h>

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("clip_rasterize_fwd", &landmark::clip_rasterize_fwd, "box-clipped rasteriser, forward");
    m.def("clip_rasterize_bwd", &landmark::clip_rasterize_bwd, "box-clipped rasteriser, backward");
}
