"""render_partial: the gsplat backend (re-keyed tile sort) equals its torch twin, and a one-pass
partial over several leaves equals the composite of per-leaf partials."""

from __future__ import annotations

import math

import pytest
import torch

from landmark_plugin.core.composite import composite
from landmark_plugin.core.order import camera_leaf_order, order_positions
from landmark_plugin.core.partition import assign_leaves, build_kdtree
from landmark_plugin.core.raster_ref import RasterSettings
from landmark_plugin.core.render import Gaussians, camera_center, render_partial

NO_TERMINATION = RasterSettings(min_transmittance=0.0)


def random_scene(n: int, device: str, dtype=torch.float32, seed: int = 0, sh_degree: int = 1):
    g = torch.Generator().manual_seed(seed)
    means = (torch.rand(n, 3, generator=g) - 0.5) * 2.0
    quats = torch.randn(n, 4, generator=g)
    scales = torch.exp(torch.rand(n, 3, generator=g) * 1.5 - 4.0)
    opacities = torch.rand(n, generator=g) * 0.9 + 0.05
    sh = torch.randn(n, (sh_degree + 1) ** 2, 3, generator=g) * 0.3
    tensors = [t.to(device=device, dtype=dtype) for t in (means, quats, scales, opacities, sh)]
    return Gaussians(*tensors)


def look_at(eye, target, device, dtype=torch.float32):
    """world->camera (OpenCV) for a camera at ``eye`` looking at ``target``."""
    eye, target = torch.tensor(eye, dtype=dtype), torch.tensor(target, dtype=dtype)
    forward = torch.nn.functional.normalize(target - eye, dim=0)
    right = torch.nn.functional.normalize(torch.linalg.cross(forward, torch.tensor([0.0, 0.0, 1.0], dtype=dtype)), dim=0)
    down = torch.linalg.cross(forward, right)
    R = torch.stack([right, down, forward])  # rows: camera axes in world coordinates
    viewmat = torch.eye(4, dtype=dtype)
    viewmat[:3, :3] = R
    viewmat[:3, 3] = -R @ eye
    return viewmat.to(device)


def intrinsics(width, height, fov_deg, device, dtype=torch.float32):
    f = 0.5 * width / math.tan(math.radians(fov_deg) / 2)
    return torch.tensor([[f, 0, width / 2], [0, f, height / 2], [0, 0, 1]], dtype=dtype, device=device)


def leaf_positions(gaussians: Gaussians, depth: int, viewmat):
    tree = build_kdtree(gaussians.means.detach(), depth)
    order = camera_leaf_order(tree, camera_center(viewmat))
    leaves = assign_leaves(tree, gaussians.means.detach())
    return leaves, order_positions(order)[leaves], order


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_one_pass_partial_equals_composite_of_leaf_partials(depth):
    """CPU twin of the gsplat one-pass path: sorting by (leaf position, depth) in one render is
    the front-to-back composite of each leaf's own partial (float64, termination off)."""
    dtype = torch.float64
    gaussians = random_scene(300, "cpu", dtype, seed=depth)
    viewmat = look_at([2.5, -1.5, 1.2], [0.0, 0.0, 0.0], "cpu", dtype)
    K = intrinsics(40, 30, 60.0, "cpu", dtype)
    leaves, position, order = leaf_positions(gaussians, depth, viewmat)
    whole = render_partial(gaussians, position, viewmat, K, 40, 30, 1, NO_TERMINATION, with_depth=True, backend="torch")
    colors, transmittances = [], []
    for leaf in order.tolist():
        mask = leaves == leaf
        part = render_partial(
            gaussians.take(mask), position[mask], viewmat, K, 40, 30, 1, NO_TERMINATION,
            with_depth=True, backend="torch",
        )
        colors.append(part.color)
        transmittances.append(part.transmittance)
    color, transmittance = composite(colors, transmittances, None)
    assert torch.allclose(color, whole.color, atol=1e-10, rtol=0)
    assert torch.allclose(transmittance, whole.transmittance, atol=1e-10, rtol=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (gsplat kernels); the CPU twin above runs everywhere")
@pytest.mark.parametrize("depth", [0, 2, 3])
def test_gsplat_backend_equals_torch_twin(depth):
    width, height = 300, 200
    gaussians = random_scene(5000, "cuda", seed=10 + depth, sh_degree=2)
    gaussians = Gaussians(*(t.requires_grad_(True) for t in gaussians.fields()))
    viewmat = look_at([2.2, -1.8, 1.0], [0.0, 0.0, 0.0], "cuda")
    K = intrinsics(width, height, 70.0, "cuda")
    _, position, _ = leaf_positions(gaussians, depth, viewmat)
    settings = RasterSettings()
    outs = {}
    for backend in ("gsplat", "torch"):
        part = render_partial(gaussians, position, viewmat, K, width, height, 2, settings, with_depth=True, backend=backend)
        cotangent = torch.randn(part.color.shape, generator=torch.Generator("cuda").manual_seed(1), device="cuda")
        loss = (part.color * cotangent).sum() + (part.transmittance * cotangent[..., :1]).sum()
        grads = torch.autograd.grad(loss, list(gaussians))
        outs[backend] = (part.color.detach(), part.transmittance.detach(), grads)
    (c1, t1, g1), (c2, t2, g2) = outs["gsplat"], outs["torch"]
    # Both run in float32 with hard thresholds (alpha >= 1/255, T > 1e-4): a Gaussian sitting on
    # a threshold can be kept by one and dropped by the other, which moves that pixel by up to
    # about alpha_min * |colour|.  So: nearly every pixel within 1e-4, and the rare flips bounded.
    for name, a, b, scale in (
        ("rgb", c1[..., :3], c2[..., :3], 1.0),
        ("depth", c1[..., 3], c2[..., 3], float(c2[..., 3].abs().max().clamp_min(1.0))),
        ("transmittance", t1, t2, 1.0),
    ):
        err = ((a - b).abs() / scale).flatten()
        assert torch.quantile(err, 0.999) <= 1e-4, f"{name}: 99.9% quantile {torch.quantile(err, 0.999):.2e}"
        assert err.max() <= 4.0 / 255.0, f"{name}: max error {err.max():.2e} exceeds a threshold flip"
    for name, a, b in zip(Gaussians._fields, g1, g2):
        scale = b.abs().max().clamp_min(1e-8)
        assert ((a - b).abs().max() / scale) <= 1e-3, f"gradient of {name} differs"


@pytest.mark.parametrize("features", [None, 5])
def test_gaussian_rows_round_trip_every_field_in_its_dtype(features):
    """What sends between ranks carry: ``rows()`` lays every field side by side, ``from_rows``
    rebuilds the same set (appearance features included, in their own dtype) from any rows laid
    out that way, so received copies are Gaussians like the sender's."""
    g = random_scene(7, "cpu", dtype=torch.float64, sh_degree=1)
    if features is not None:
        g = g._replace(features=torch.randn(7, features, dtype=torch.float32))
    rows = g.rows()
    assert rows.shape == (7, 3 + 4 + 3 + 1 + 4 * 3 + (features or 0))
    back = g.from_rows(rows)
    assert len(back.fields()) == len(g.fields())
    for a, b in zip(back.fields(), g.fields()):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    picked = g.from_rows(rows[[4, 1]])  # a subset, as a receiver gets it
    for a, b in zip(picked.fields(), g.take(torch.tensor([4, 1])).fields()):
        assert torch.equal(a, b)
