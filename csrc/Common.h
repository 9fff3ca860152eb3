// Macros and small device helpers shared by every op in csrc/.
#pragma once

#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#define LMK_CHECK_CUDA(x) TORCH_CHECK((x).is_cuda(), #x " must be a CUDA tensor")
#define LMK_CHECK_CONTIGUOUS(x) TORCH_CHECK((x).is_contiguous(), #x " must be contiguous")
#define LMK_CHECK_INPUT(x)                                                                 \
    LMK_CHECK_CUDA(x);                                                                     \
    LMK_CHECK_CONTIGUOUS(x)
#define LMK_CHECK_DTYPE(x, dtype) TORCH_CHECK((x).scalar_type() == (dtype), #x " must be " #dtype)
#define LMK_DEVICE_GUARD(x) const at::cuda::OptionalCUDAGuard device_guard(device_of(x))

namespace landmark {

// Colour channel counts the rasteriser kernels are compiled for; callers pad to the next.
constexpr int kClipChannels[] = {1, 2, 3, 4, 8, 16, 32, 64};

} // namespace landmark
