"""The fused plane x line feature kernel's CPU side: dispatch to the torch twin, argument checks.

The kernel itself is compared with the twin in test_grid_kernel_cuda.py (GPU); the helpers
here build its multi-level inputs for both files.
"""

from __future__ import annotations

import pytest
import torch

from landmark_plugin import cuda_grid
from landmark_plugin.core.grid_features import (
    MODES,
    average_seams,
    block_features,
    route_points,
    sample_block_features,
)


def random_factors(blocks, mode, levels, channels, shared_line=False, seed=0, device="cpu", dtype=torch.float32,
                   cells=(8, 6, 4)):
    """Planes and lines of ``levels`` levels (level l has cells // 2**l per axis, so every factor
    has its own sizes), seam copies made consistent as in the field."""
    gen = torch.Generator().manual_seed(seed)
    num_blocks = blocks[0] * blocks[1]
    planes, lines, axes = [], [], []
    for level in range(levels):
        size = [max(1, c >> level) + 1 for c in cells]  # texels per world axis
        for u, v, w in MODES[mode]:
            plane = torch.randn(num_blocks, size[v], size[u], channels, generator=gen, dtype=dtype)
            line = torch.randn(1 if shared_line else num_blocks, size[w], channels, generator=gen, dtype=dtype)
            planes.append(average_seams(plane, blocks, (v, u)).to(device))
            lines.append(average_seams(line, blocks, (w,)).to(device))
            axes.append((u, v, w))
    return planes, lines, axes


def make_points(blocks, n=3000, seed=1, device="cpu", texels=9):
    """(block_index, local) of random points plus the hard cases: points exactly on block seams
    and on the box faces (routed like the field's), texel centres of a ``texels`` grid, and a
    few coordinates outside [-1, 1] (clamped)."""
    gen = torch.Generator().manual_seed(seed)
    unit = torch.rand(n, 3, generator=gen)
    seams = torch.rand(400, 3, generator=gen)
    seams[:200, 0] = torch.randint(0, blocks[0] + 1, (200,), generator=gen) / blocks[0]
    seams[200:, 1] = torch.randint(0, blocks[1] + 1, (200,), generator=gen) / blocks[1]
    faces = torch.rand(300, 3, generator=gen)
    faces[torch.arange(300), torch.arange(300) % 3] = (torch.arange(300) // 3 % 2).float()  # 0 or 1
    block_index, local = route_points(torch.cat([unit, seams, faces, torch.zeros(1, 3), torch.ones(1, 3)]), blocks)
    num_blocks = blocks[0] * blocks[1]
    centres = -1.0 + 2.0 * torch.randint(0, texels, (300, 3), generator=gen) / (texels - 1)
    outside = (torch.rand(30, 3, generator=gen) * 2 - 1) * 1.3
    extra = torch.cat([centres, outside])
    block_index = torch.cat([block_index, torch.randint(0, num_blocks, (extra.shape[0],), generator=gen)])
    return block_index.to(device), torch.cat([local, extra]).to(device)


def test_auto_dispatch_on_cpu_is_the_twin():
    """On CPU ``block_features`` (auto) is the twin, forward and gradients, bit for bit."""
    planes, lines, axes = random_factors((2, 3), "vm", 2, 4)
    block_index, local = make_points((2, 3))
    outs, grads = [], []
    for fn in (block_features, sample_block_features):
        leaves = [t.clone().requires_grad_(True) for t in (*planes, *lines, local)]
        out = fn(leaves[: len(planes)], leaves[len(planes) : -1], leaves[-1], block_index, axes)
        outs.append(out.detach())
        grads.append(torch.autograd.grad(out.square().sum(), leaves))
    assert outs[0].shape == (local.shape[0], len(axes) * 4)
    assert torch.equal(outs[0], outs[1])
    assert all(torch.equal(a, b) for a, b in zip(*grads))


def test_field_backend_option_reaches_the_factors():
    pytest.importorskip("nerfstudio")
    from landmark_plugin.grid.field import GridDensityFieldConfig

    aabb = torch.tensor([[-1.0, -1.0, -0.2], [1.0, 1.0, 0.2]])
    assert GridDensityFieldConfig(cells=4).setup(aabb=aabb).density.backend == "auto"
    field = GridDensityFieldConfig(cells=4, feature_backend="torch").setup(aabb=aabb)
    assert field.density.backend == "torch"
    block_index, local = make_points((2, 2), n=50)
    features = field.density(local, block_index)  # CPU: the twin whatever the backend
    assert torch.equal(features, sample_block_features(
        list(field.density.planes), list(field.density.lines), local, block_index, field.density.axes))


def test_unknown_backend_and_cuda_backend_on_cpu_raise():
    planes, lines, axes = random_factors((1, 1), "xy-z", 1, 2)
    block_index, local = make_points((1, 1), n=10)
    with pytest.raises(ValueError, match="backend must be one of"):
        block_features(planes, lines, local, block_index, axes, backend="triton")
    with pytest.raises(ValueError, match="must be CUDA tensors"):
        block_features(planes, lines, local, block_index, axes, backend="cuda")


def _bad_inputs():
    """(name, transform of (planes, lines, points, block_index, axes), expected message)."""
    def with_plane(k, t):
        return lambda p, l, x, b, a: ([t if i == k else q for i, q in enumerate(p)], l, x, b, a)

    def with_line(k, t):
        return lambda p, l, x, b, a: (p, [t if i == k else q for i, q in enumerate(l)], x, b, a)

    return [
        ("channels differ", lambda p, l, x, b, a: with_line(1, l[1][..., :3])(*with_plane(1, p[1][..., :3])(p, l, x, b, a)),
         "one channel count"),
        ("line channels", lambda p, l, x, b, a: with_line(0, l[0][..., :3])(p, l, x, b, a), r"lines\[0\] must be"),
        ("missing line", lambda p, l, x, b, a: (p, l[:-1], x, b, a), "one line and one axes triple"),
        ("bad axes", lambda p, l, x, b, a: (p, l, x, b, [(0, 0, 2)] + list(a[1:])), "permutation"),
        ("one texel", lambda p, l, x, b, a: with_plane(0, p[0][:, :1])(p, l, x, b, a), "Rv, Ru >= 2"),
        ("line blocks", lambda p, l, x, b, a: with_line(0, torch.cat([l[0], l[0]]))(p, l, x, b, a), "or 1, Rl"),
        ("points shape", lambda p, l, x, b, a: (p, l, x[:, :2], b, a), r"points must be \[N, 3\]"),
        ("float index", lambda p, l, x, b, a: (p, l, x, b.float(), a), "block_index must be"),
        ("float64", lambda p, l, x, b, a: (p, l, x.double(), b, a), "float32"),
        ("too many", lambda p, l, x, b, a: (p * 17, l * 17, x, b, a * 17), "at most 32 factors"),
    ]


@pytest.mark.parametrize("name, change, message", _bad_inputs(), ids=[c[0] for c in _bad_inputs()])
def test_wrapper_rejects_bad_arguments_with_a_clear_error(name, change, message):
    planes, lines, axes = random_factors((2, 2), "vm", 1, 4)
    block_index, local = make_points((2, 2), n=20)
    args = change(planes, lines, local, block_index, axes)
    assert cuda_grid.block_features_unsupported(*args) is not None
    with pytest.raises(ValueError, match=message):
        cuda_grid.sample_block_features(*args)
    # the dispatcher never sends such arguments to the kernel: the twin takes what it can
    if name in ("channels differ", "float64"):
        assert torch.allclose(block_features(*args), sample_block_features(*args))


def test_valid_arguments_are_accepted_up_to_the_device():
    planes, lines, axes = random_factors((2, 2), "vm", 2, 4, shared_line=True)
    block_index, local = make_points((2, 2), n=20)
    assert cuda_grid.block_features_unsupported(planes, lines, local, block_index, axes) == (
        "planes, lines, points and block_index must be CUDA tensors on one device")


def test_points_that_need_a_gradient_are_accepted():
    """The fused kernel also differentiates with respect to the points (camera optimisation;
    checked against the twin on a GPU in test_grid_kernel_cuda.py): only the device is missing."""
    planes, lines, axes = random_factors((2, 2), "xy-z", 1, 4)
    block_index, local = make_points((2, 2), n=20)
    reason = cuda_grid.block_features_unsupported(planes, lines, local.requires_grad_(True), block_index, axes)
    assert reason == "planes, lines, points and block_index must be CUDA tensors on one device"
