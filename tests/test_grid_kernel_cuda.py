"""csrc/ fused plane x line feature kernel on the GPU against its torch twin
(core/grid_features.py ``sample_block_features``).

Kernel and twin pick the same texels with the same float32 operations (the kernel mirrors the
twin's rounding op by op), so the forward differs at most by the order of a few additions;
it is compared on every element of outputs poisoned with NaN before the kernel runs, so an
element the kernel failed to write would show.  Gradients are sums over many points whose
order differs (atomics, register runs) and are compared relative to their largest value.
Inputs: several levels (every factor has its own sizes), per-block and shared lines, channel
counts that take the 4-, 2- and 1-wide paths, and points on block seams, on the box faces,
on texel centres and outside [-1, 1].
"""

from __future__ import annotations

import pytest
import torch

from landmark_plugin import cuda, cuda_grid
from landmark_plugin.core.grid_features import MODES, block_features, route_points, sample_block_features

from test_grid_kernel import make_points, random_factors

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="needs a CUDA device (the CPU side is tested in test_grid_kernel.py)"),
]

FWD_TOL = 1e-5
"""Kernel vs twin forward, absolute and relative (float32; same texels and weights, the sums
may round differently: products of two N(0, 1) factors reach ~10, where one ulp is ~1e-6)."""
GRAD_REL = 1e-4
"""Kernel vs twin gradients: max |difference| / max |twin| per tensor (float32 sums over up to
thousands of points per texel, in different orders)."""


@pytest.fixture(scope="module")
def ext():
    try:
        return cuda.load()
    except cuda.CudaUnavailable as err:
        pytest.fail(f"a CUDA device is present but the kernels do not build: {err}")


def _both(planes, lines, local, block_index, axes, cotangent, poison=True):
    """Forward outputs and gradients (planes..., lines..., points) of kernel and twin."""
    out = {}
    for who in ("kernel", "twin"):
        # point gradients: test_point_gradients_match_twin
        leaves = [t.detach().clone().requires_grad_(True) for t in (*planes, *lines)]
        k = len(planes)
        args = (leaves[:k], leaves[k:], local.detach(), block_index, axes)
        features = cuda_grid.sample_block_features(*args, poison=poison) if who == "kernel" else sample_block_features(*args)
        grads = torch.autograd.grad((features * cotangent).sum(), leaves)
        out[who] = (features.detach(), grads)
    return out


def _assert_grads_close(kernel_grads, twin_grads, names):
    for name, a, b in zip(names, kernel_grads, twin_grads):
        rel = float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
        assert rel <= GRAD_REL, f"gradient of {name} differs by {rel:.2e} (relative to its max)"


CASES = [
    # blocks, mode, levels, channels, shared line
    ((1, 1), "vm", 2, 3, False),     # 1-wide path, 6 factors
    ((2, 3), "xy-z", 3, 16, False),  # 4-wide (density components)
    ((2, 3), "xy-z", 3, 16, True),   # shared line: every block's points add into one line
    ((3, 2), "vm", 2, 6, True),      # 2-wide
    ((8, 8), "xy-z", 3, 48, False),  # the field's appearance grid shape
    ((2, 2), "vm", 1, 1, False),     # one channel
]


@pytest.mark.parametrize("blocks, mode, levels, channels, shared_line", CASES)
def test_kernel_matches_twin(ext, blocks, mode, levels, channels, shared_line):
    planes, lines, axes = random_factors(blocks, mode, levels, channels, shared_line, seed=channels, device="cuda")
    block_index, local = make_points(blocks, n=6000, seed=levels, device="cuda")
    assert (local.abs() == 1).any(dim=1).sum() > 300, "the points must include seams and faces"
    width = len(axes) * channels
    g = torch.Generator(device="cuda").manual_seed(5)
    cotangent = torch.randn(local.shape[0], width, device="cuda", generator=g)
    out = _both(planes, lines, local, block_index, axes, cotangent)
    (kf, kg), (tf, tg) = out["kernel"], out["twin"]
    assert kf.shape == (local.shape[0], width)
    assert torch.isfinite(kf).all(), "an output element was not written (still NaN)"
    torch.testing.assert_close(kf, tf, atol=FWD_TOL, rtol=FWD_TOL)
    names = [f"plane {k}" for k in range(len(planes))] + [f"line {k}" for k in range(len(lines))]
    _assert_grads_close(kg, tg, names)


def _ray_points(blocks, rays=300, samples=64, seed=3, device="cuda"):
    """Samples along random rays in ray order, bunched near a surface as proposal sampling
    leaves them: runs of consecutive points in one cell (the backward's register runs)."""
    gen = torch.Generator().manual_seed(seed)
    origin = torch.rand(rays, 1, 3, generator=gen)
    direction = torch.nn.functional.normalize(torch.randn(rays, 1, 3, generator=gen), dim=-1)
    surface = torch.rand(rays, 1, 1, generator=gen)
    t = surface + 0.02 * torch.randn(rays, samples, 1, generator=gen).sort(dim=1).values
    block_index, local = route_points((origin + t * direction).reshape(-1, 3), blocks)
    return block_index.to(device), local.to(device)


@pytest.mark.parametrize("points_per_thread", [1, 4, 8])
def test_backward_register_runs_match_twin(ext, monkeypatch, points_per_thread):
    """Every compiled points-per-thread variant, on ray-ordered points where runs are long."""
    monkeypatch.setattr(cuda_grid, "GRID_POINTS_PER_THREAD", points_per_thread)
    blocks = (3, 3)
    planes, lines, axes = random_factors(blocks, "xy-z", 3, 16, seed=2, device="cuda", cells=(6, 6, 5))
    block_index, local = _ray_points(blocks)
    flat = (block_index * 1000 + (local[:, 0] * 3).floor()).tolist()
    assert sum(a == b for a, b in zip(flat, flat[1:])) > local.shape[0] // 2, "runs must be common"
    cotangent = torch.randn(local.shape[0], 3 * 16, device="cuda", generator=torch.Generator(device="cuda").manual_seed(1))
    out = _both(planes, lines, local, block_index, axes, cotangent)
    torch.testing.assert_close(out["kernel"][0], out["twin"][0], atol=FWD_TOL, rtol=FWD_TOL)
    _assert_grads_close(out["kernel"][1], out["twin"][1], ["plane 0", "plane 1", "plane 2", "line 0", "line 1",
                                                            "line 2"])


@pytest.mark.parametrize("blocks, mode, levels, channels, shared_line", CASES[:4])
def test_point_gradients_match_twin(ext, blocks, mode, levels, channels, shared_line):
    """d features / d points of the kernel equal the twin's (the rule of ``_linear_taps``: no
    gradient on and beyond the clamp bounds), on seams, faces, texel centres and ray samples
    (what the camera optimiser's pose gradients flow through)."""
    planes, lines, axes = random_factors(blocks, mode, levels, channels, shared_line, seed=channels, device="cuda")
    on_faces = make_points(blocks, n=6000, seed=levels, device="cuda")
    along_rays = _ray_points(blocks)
    block_index = torch.cat([on_faces[0], along_rays[0]])
    local = torch.cat([on_faces[1], along_rays[1]])
    width = len(axes) * channels
    cotangent = torch.randn(local.shape[0], width, device="cuda", generator=torch.Generator(device="cuda").manual_seed(7))
    grads = {}
    for who, sample in (("kernel", cuda_grid.sample_block_features), ("twin", sample_block_features)):
        leaves = [t.detach().clone().requires_grad_(True) for t in (*planes, *lines, local)]
        k = len(planes)
        features = sample(leaves[:k], leaves[k:2 * k], leaves[-1], block_index, axes)
        grads[who] = torch.autograd.grad((features * cotangent).sum(), leaves)
    names = [f"plane {k}" for k in range(len(planes))] + [f"line {k}" for k in range(len(lines))]
    _assert_grads_close(grads["kernel"][:-1], grads["twin"][:-1], names)
    # per point (no sums over points here): elementwise against the twin's scale
    kernel_points, twin_points = grads["kernel"][-1], grads["twin"][-1]
    assert float(twin_points.abs().max()) > 0
    torch.testing.assert_close(kernel_points, twin_points, atol=1e-4 * float(twin_points.abs().max()), rtol=1e-4)


def test_points_needing_a_gradient_take_the_kernel(ext):
    """The dispatcher sends points that need a gradient (camera optimisation) to the kernel too."""
    planes, lines, axes = random_factors((2, 2), "xy-z", 2, 4, seed=1, device="cuda")
    block_index, local = make_points((2, 2), n=500, seed=1, device="cuda")
    local = local.clone().requires_grad_(True)
    got = block_features(planes, lines, local, block_index, axes, backend="auto")
    want = cuda_grid.sample_block_features(planes, lines, local, block_index, axes)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    (grad,) = torch.autograd.grad(got.sum(), local)
    (twin_grad,) = torch.autograd.grad(sample_block_features(planes, lines, local, block_index, axes).sum(), local)
    assert float(grad.abs().max()) > 0
    torch.testing.assert_close(grad, twin_grad, atol=1e-4 * float(twin_grad.abs().max()), rtol=1e-4)


def test_contended_texels_sum_exactly(ext):
    """20000 points in one cell of one shared line: the texel gradients are sums of 20000 terms
    (register runs plus atomics); compared with the float64 twin."""
    planes, lines, axes = random_factors((2, 2), "xy-z", 1, 8, shared_line=True, seed=4, device="cuda")
    n = 20_000
    local = torch.tensor([[0.1, -0.3, 0.2]], device="cuda").expand(n, 3).contiguous()
    block_index = torch.full((n,), 3, device="cuda", dtype=torch.long)
    cotangent = torch.rand(n, 8, device="cuda", generator=torch.Generator(device="cuda").manual_seed(0))
    leaves = [t.clone().requires_grad_(True) for t in (*planes, *lines)]
    features = cuda_grid.sample_block_features(leaves[:1], leaves[1:], local, block_index, axes)
    kernel = torch.autograd.grad((features * cotangent).sum(), leaves)
    ref_leaves = [t.double().requires_grad_(True) for t in (*planes, *lines)]
    ref = sample_block_features(ref_leaves[:1], ref_leaves[1:], local.double(), block_index, axes)
    twin = torch.autograd.grad((ref * cotangent.double()).sum(), ref_leaves)
    _assert_grads_close([g.double() for g in kernel], twin, ["plane", "line"])


def test_invalid_points_get_nan_and_no_gradient(ext):
    """A block index outside [0, B) or a NaN coordinate: NaN features, nothing read or written;
    the other points are unaffected."""
    blocks = (2, 2)
    planes, lines, axes = random_factors(blocks, "vm", 1, 4, seed=6, device="cuda")
    block_index, local = make_points(blocks, n=500, device="cuda")
    bad = torch.zeros(local.shape[0], dtype=torch.bool, device="cuda")
    bad[[3, 50, 99]] = True
    block_index, local = block_index.clone(), local.clone()
    block_index[3], block_index[50], local[99, 2] = -1, 4, float("nan")
    cotangent = torch.rand(local.shape[0], 12, device="cuda") * (~bad)[:, None]
    leaves = [t.clone().requires_grad_(True) for t in (*planes, *lines)]
    features = cuda_grid.sample_block_features(leaves[:3], leaves[3:6], local, block_index, axes, poison=True)
    grads = torch.autograd.grad((features * cotangent).nan_to_num().sum(), leaves)
    assert torch.isnan(features[bad]).all() and torch.isfinite(features[~bad]).all()
    # the twin cannot take the bad points (it raises an indexing error): compare on the rest
    good = _both(planes, lines, local[~bad], block_index[~bad], axes, cotangent[~bad])
    torch.testing.assert_close(features[~bad].detach(), good["twin"][0], atol=FWD_TOL, rtol=FWD_TOL)
    _assert_grads_close(grads, good["twin"][1], [f"factor tensor {i}" for i in range(6)])
    assert all(torch.isfinite(g).all() for g in grads)


def test_no_points(ext):
    planes, lines, axes = random_factors((2, 1), "xy-z", 2, 4, device="cuda")
    leaves = [t.clone().requires_grad_(True) for t in (*planes, *lines)]
    local = torch.zeros(0, 3, device="cuda")
    features = cuda_grid.sample_block_features(leaves[:2], leaves[2:], local, torch.zeros(0, dtype=torch.long, device="cuda"),
                                          axes)
    assert features.shape == (0, 8)
    grads = torch.autograd.grad(features.sum(), leaves)
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


def test_dispatch_uses_the_kernel_on_cuda(ext, monkeypatch):
    """``block_features`` (auto) and the field's BlockFactors run the kernel on float32 CUDA
    inputs, and the twin in float64 and under deterministic algorithms."""
    calls = []
    kernel = cuda_grid.sample_block_features
    monkeypatch.setattr(cuda_grid, "sample_block_features", lambda *a, **k: calls.append(1) or kernel(*a, **k))
    planes, lines, axes = random_factors((2, 2), "vm", 2, 8, device="cuda")
    block_index, local = make_points((2, 2), n=200, device="cuda")
    twin = sample_block_features(planes, lines, local, block_index, axes)
    torch.testing.assert_close(block_features(planes, lines, local, block_index, axes), twin,
                               atol=FWD_TOL, rtol=FWD_TOL)
    assert len(calls) == 1
    block_features([p.double() for p in planes], [x.double() for x in lines], local.double(), block_index, axes)
    assert len(calls) == 1, "float64 goes to the twin"
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        block_features(planes, lines, local, block_index, axes)
    finally:
        torch.use_deterministic_algorithms(previous)
    assert len(calls) == 1, "deterministic runs use the twin (the kernel's atomics sum in no fixed order)"


def test_field_factors_on_kernel_equal_twin(ext):
    """BlockFactors (seam-tying gradient hooks included) with backend cuda vs torch, through a
    loss like the density field's (sum over channels: a stride-0 incoming gradient)."""
    pytest.importorskip("nerfstudio")
    from landmark_plugin.grid.factors import BlockFactors

    blocks, axes = (3, 2), MODES["vm"] * 2
    cells = [[6, 5, 4]] * 3 + [[3, 3, 2]] * 3
    torch.manual_seed(0)
    factors = BlockFactors(blocks, axes, cells, channels=16, shared_line=False, init_scale=0.5).cuda()
    block_index, local = make_points(blocks, n=4000, device="cuda")
    weights = torch.rand(local.shape[0], device="cuda")
    results = []
    for backend in ("cuda", "torch"):
        factors.backend = backend
        factors.zero_grad()
        features = factors(local, block_index)
        (features.sum(dim=-1) * weights).sum().backward()
        results.append((features.detach(), [p.grad.clone() for p in factors.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0], atol=FWD_TOL, rtol=FWD_TOL)
    _assert_grads_close(results[0][1], results[1][1], [n for n, _ in factors.named_parameters()])
