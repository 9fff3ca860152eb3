"""The torch reference (depth 0, one partial) against gsplat 1.4.0 on CUDA.

Both run in float32.  Two kinds of difference are expected and bounded separately:
* arithmetic: gsplat's kernels use fused / fast-math float32 (``__expf``, FMA), torch
  uses its own kernels and summation order — about 1e-6 per pixel;
* decisions at thresholds: a (pixel, Gaussian) whose alpha lies within float32 rounding
  of alpha_min = 1/255, a pixel whose T lands within rounding of min_transmittance, or a
  radius at an integer boundary flips between "counted" and "skipped".  Each flip moves
  a pixel by up to ~1/255 of a colour (alpha_min) or more (termination), and with ~10^7
  (pixel, Gaussian) pairs a handful of flips is expected.  So the 1e-4 bound is asserted
  on all but a tiny fraction of pixels, and the rest is bounded loosely.

Seen on an H100 (gsplat 1.4.0, torch 2.11): colour / alpha / expected depth agree to
< 1e-5 on every pixel but one of 60 000 in one scene (a threshold flip of 2.4e-3).
"""

from __future__ import annotations

import pytest
import torch

from landmark_plugin.core.composite import expected_depth
from landmark_plugin.core.raster_ref import RasterSettings, project_gaussians, render_ref

from test_raster_ref import intrinsics, look_at, random_gaussians

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

ATOL_F32 = 1e-4
"""Per-pixel agreement of colour, alpha and expected depth (float32 arithmetic)."""
MIN_AGREEING = 0.999
"""Fraction of pixels that must agree to ATOL_F32 (the rest are threshold flips)."""
ATOL_FLIP = 0.1
"""Loose bound for flipped pixels: one alpha_min flip moves a pixel by ~1/255; a
termination flip by up to min_T / (1 - alpha_max) = 0.1 of a colour."""
GRAD_REL_L2 = 1e-4
"""Relative L2 difference of float32 gradients (different accumulation orders)."""
WIDTH, HEIGHT = 300, 200


def _gsplat():
    try:
        import gsplat  # noqa: F401
        from gsplat.rendering import rasterization
    except Exception as err:  # noqa: BLE001 - any failure means gsplat cannot run here
        pytest.skip(f"gsplat is not importable ({type(err).__name__}: {err})")
    return rasterization


def _scene(seed: int, sh_degree: int | None, n: int = 10_000):
    params = random_gaussians(n, seed, dtype=torch.float32, scale_range=(0.005, 0.08), opacity_range=(0.05, 0.99))
    params = {k: v.cuda() for k, v in params.items()}
    if sh_degree is not None:
        g = torch.Generator().manual_seed(seed + 100)
        params["colors"] = (torch.randn(n, (sh_degree + 1) ** 2, 3, generator=g) * 0.3).cuda()
    eye = [[2.2, -2.4, 1.2], [0.2, -0.3, 0.1], [-1.5, 2.0, 2.5]][seed % 3]  # outside, inside, above
    viewmat = look_at(eye, [0.0, 0.0, 0.0], dtype=torch.float32).cuda()
    K = intrinsics(WIDTH, HEIGHT, fov_deg=70.0, dtype=torch.float32).cuda()
    return params, viewmat, K


def _agreement(ours: torch.Tensor, theirs: torch.Tensor, name: str) -> None:
    err = (ours - theirs).abs().amax(dim=-1)
    frac = float((err <= ATOL_F32).float().mean())
    print(f"{name}: max |diff| {float(err.max()):.3e}, pixels within {ATOL_F32}: {frac:.6f}")
    assert frac >= MIN_AGREEING, f"{name}: only {frac:.5f} of pixels agree to {ATOL_F32}"
    assert float(err.max()) <= ATOL_FLIP, f"{name}: a pixel differs by {float(err.max())}"


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_projection_matches_gsplat(seed):
    _gsplat()
    from gsplat.cuda._wrapper import fully_fused_projection

    params, viewmat, K = _scene(seed, None)
    settings = RasterSettings()
    ours = project_gaussians(params["means"], params["quats"], params["scales"], viewmat, K, WIDTH, HEIGHT, settings)
    radii, means2d, depths, conics, _ = fully_fused_projection(
        params["means"], None, params["quats"], params["scales"], viewmat[None], K[None], WIDTH, HEIGHT,
        eps2d=settings.eps2d, near_plane=settings.near_plane, far_plane=settings.far_plane,
    )
    same = ours.radii == radii[0]
    print(f"radii equal: {float(same.float().mean()):.6f}, visible {int((radii[0] > 0).sum())}")
    assert float(same.float().mean()) >= 0.999
    both = same & (ours.radii > 0)
    torch.testing.assert_close(ours.means2d[both], means2d[0][both], rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(ours.conics[both], conics[0][both], rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ours.depths[both], depths[0][both], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("seed, sh_degree, mode", [(0, None, "classic"), (1, None, "classic"), (2, None, "classic"),
                                                   (0, 3, "classic"), (1, 3, "classic"), (2, 3, "classic"),
                                                   (0, 3, "antialiased"), (1, None, "antialiased")])
def test_render_matches_gsplat_rasterization(seed, sh_degree, mode):
    rasterization = _gsplat()
    params, viewmat, K = _scene(seed, sh_degree)
    with torch.no_grad():
        ours_c, ours_t = render_ref(
            params["means"], params["quats"], params["scales"], params["opacities"], params["colors"],
            viewmat, K, WIDTH, HEIGHT, RasterSettings(rasterize_mode=mode), sh_degree=sh_degree, render_depth=True,
        )
        theirs_c, theirs_a, _ = rasterization(
            params["means"], params["quats"], params["scales"], params["opacities"], params["colors"],
            viewmat[None], K[None], WIDTH, HEIGHT, sh_degree=sh_degree, render_mode="RGB+ED",
            rasterize_mode=mode, packed=False,
        )
    assert float(theirs_a.mean()) > 0.2, "the scene must cover the image"
    _agreement(ours_c[..., :3], theirs_c[0, ..., :3], "colour")
    _agreement(1.0 - ours_t, theirs_a[0], "alpha")
    solid = (theirs_a[0, ..., 0] > 0.5)[..., None]  # ED divides by alpha: compare where it is not tiny
    ours_ed = expected_depth(ours_c[..., 3:], ours_t) * solid
    _agreement(ours_ed / ours_ed.amax(), theirs_c[0, ..., 3:] * solid / ours_ed.amax(), "expected depth (relative)")


@pytest.mark.parametrize("seed", [0, 1])
def test_gradients_match_gsplat(seed):
    """Same loss through both renderers; gsplat's hand-written backward against autograd."""
    rasterization = _gsplat()
    params, viewmat, K = _scene(seed, 3, n=3000)
    g = torch.Generator(device="cuda").manual_seed(seed)
    cot_c = torch.randn(HEIGHT, WIDTH, 3, device="cuda", generator=g)
    cot_a = torch.randn(HEIGHT, WIDTH, 1, device="cuda", generator=g)
    names = ["means", "quats", "scales", "opacities", "colors"]
    grads = {}
    for who in ("ours", "gsplat"):
        leaves = {k: params[k].clone().requires_grad_(True) for k in names}
        args = [leaves[k] for k in names]
        if who == "ours":
            color, trans = render_ref(*args, viewmat, K, WIDTH, HEIGHT, RasterSettings(), sh_degree=3)
            alpha = 1.0 - trans
        else:
            color, alpha, _ = rasterization(*args, viewmat[None], K[None], WIDTH, HEIGHT, sh_degree=3)
            color, alpha = color[0], alpha[0]
        loss = (color * cot_c).sum() + (alpha * cot_a).sum()
        grads[who] = dict(zip(names, torch.autograd.grad(loss, args)))
    for name in names:
        a, b = grads["ours"][name], grads["gsplat"][name]
        rel = float((a - b).norm() / b.norm().clamp_min(1e-12))
        print(f"grad {name}: relative L2 difference {rel:.3e}")
        # float32 backward passes accumulate in different orders (gsplat: per-pixel reverse
        # sweeps with T recovered by division; ours: autograd through cumprod).  Seen on an
        # H100: 3e-6 .. 2e-5.
        assert rel < GRAD_REL_L2, f"gradient of {name} differs by {rel:.2e} (relative L2)"


def test_reference_on_cuda_matches_cpu():
    params = random_gaussians(2000, 5, dtype=torch.float64, scale_range=(0.005, 0.08))
    viewmat, K = look_at([2.0, -2.0, 1.0], [0.0, 0.0, 0.0]), intrinsics(WIDTH, HEIGHT)
    args = [params[k] for k in ("means", "quats", "scales", "opacities", "colors")]
    cpu = render_ref(*args, viewmat, K, WIDTH, HEIGHT, render_depth=True)
    gpu = render_ref(*[a.cuda() for a in args], viewmat.cuda(), K.cuda(), WIDTH, HEIGHT, render_depth=True)
    torch.testing.assert_close(gpu[0].cpu(), cpu[0], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(gpu[1].cpu(), cpu[1], rtol=1e-9, atol=1e-9)
