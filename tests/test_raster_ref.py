"""The torch reference rasteriser against an obviously-correct per-pixel loop, autograd,
and gsplat 1.4.0's own torch twins (projection, SH, tile binning).

Scene and camera helpers here are reused by test_composite.py and test_gsplat_parity.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from landmark_plugin.core.composite import paste_partial
from landmark_plugin.core.raster_ref import (
    Projection,
    RasterSettings,
    footprint_window,
    project_gaussians,
    quat_scale_to_covar,
    rasterize,
    render_ref,
    tile_ranges,
)
from landmark_plugin.core.sh import camera_center, gaussian_colors, sh_to_color

TOL64 = dict(rtol=1e-10, atol=1e-10)
"""float64, same rule evaluated in a different order: only rounding differs."""
TOL64_GSPLAT = dict(rtol=1e-9, atol=1e-9)
"""float64 against gsplat's torch twins (different but equivalent formulas)."""


# ----------------------------------------------------------------------------- helpers


def random_gaussians(
    n: int,
    seed: int,
    dtype: torch.dtype = torch.float64,
    low: float = -1.0,
    high: float = 1.0,
    scale_range: tuple[float, float] = (0.02, 0.2),
    opacity_range: tuple[float, float] = (0.05, 0.95),
    color_dim: int = 3,
) -> dict[str, torch.Tensor]:
    """Random Gaussians with means uniform in the box [low, high]^3."""
    g = torch.Generator().manual_seed(seed)
    lo_s, hi_s = math.log(scale_range[0]), math.log(scale_range[1])
    return dict(
        means=low + (high - low) * torch.rand(n, 3, generator=g, dtype=dtype),
        quats=torch.randn(n, 4, generator=g, dtype=dtype),
        scales=torch.exp(lo_s + (hi_s - lo_s) * torch.rand(n, 3, generator=g, dtype=dtype)),
        opacities=opacity_range[0] + (opacity_range[1] - opacity_range[0]) * torch.rand(n, generator=g, dtype=dtype),
        colors=torch.rand(n, color_dim, generator=g, dtype=dtype),
    )


def look_at(eye, target, dtype=torch.float64) -> torch.Tensor:
    """[4, 4] world-to-camera (OpenCV: x right, y down, z forward), world up = +z."""
    eye_t, target_t = torch.tensor(eye, dtype=dtype), torch.tensor(target, dtype=dtype)
    forward = target_t - eye_t
    forward = forward / forward.norm()
    up = torch.tensor([0.0, 0.0, 1.0], dtype=dtype)
    if torch.linalg.cross(forward, up).norm() < 1e-6:  # looking straight up / down
        up = torch.tensor([0.0, 1.0, 0.0], dtype=dtype)
    right = torch.linalg.cross(forward, up)
    right = right / right.norm()
    down = torch.linalg.cross(forward, right)
    rot = torch.stack([right, down, forward])
    view = torch.eye(4, dtype=dtype)
    view[:3, :3], view[:3, 3] = rot, -rot @ eye_t
    return view


def intrinsics(width: int, height: int, fov_deg: float = 60.0, dtype=torch.float64) -> torch.Tensor:
    """[3, 3] pinhole intrinsics with a slightly off-centre principal point."""
    f = 0.5 * width / math.tan(math.radians(fov_deg) / 2)
    return torch.tensor([[f, 0.0, 0.52 * width], [0.0, 1.05 * f, 0.47 * height], [0.0, 0.0, 1.0]], dtype=dtype)


def brute_force_rasterize(
    proj: Projection,
    colors: torch.Tensor,
    opacities: torch.Tensor,
    width: int,
    height: int,
    settings: RasterSettings,
    group: torch.Tensor | None = None,
    tile_culling: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """gsplat's rule written as plain Python loops over pixels and Gaussians.

    Returns premultiplied colour [H, W, D], T [H, W, 1] and how many pixels terminated.
    """
    m2d, con, dep = proj.means2d.tolist(), proj.conics.tolist(), proj.depths.tolist()
    radii, cols, opac = proj.radii.tolist(), colors.tolist(), opacities.tolist()
    grp = group.tolist() if group is not None else [0] * len(radii)
    ts = settings.tile_size
    tiles_x, tiles_y = math.ceil(width / ts), math.ceil(height / ts)
    order = sorted(range(len(radii)), key=lambda i: (grp[i], dep[i], i))
    ranges = {}
    for i in order:  # isect_tiles: [floor((m - r) / s), ceil((m + r) / s)) in the tile grid
        r = radii[i] / ts
        cx, cy = m2d[i][0] / ts, m2d[i][1] / ts
        ranges[i] = (
            min(max(math.floor(cx - r), 0), tiles_x), min(max(math.ceil(cx + r), 0), tiles_x),
            min(max(math.floor(cy - r), 0), tiles_y), min(max(math.ceil(cy + r), 0), tiles_y),
        )
    out = torch.zeros(height, width, colors.shape[1], dtype=torch.float64)
    trans = torch.ones(height, width, 1, dtype=torch.float64)
    terminated = 0
    for y in range(height):
        for x in range(width):
            tx, ty = x // ts, y // ts
            t, acc = 1.0, [0.0] * colors.shape[1]
            for i in order:
                if radii[i] <= 0:
                    continue
                x_lo, x_hi, y_lo, y_hi = ranges[i]
                if tile_culling and not (x_lo <= tx < x_hi and y_lo <= ty < y_hi):
                    continue
                dx, dy = m2d[i][0] - (x + 0.5), m2d[i][1] - (y + 0.5)
                a, b, c = con[i]
                sigma = 0.5 * (a * dx * dx + c * dy * dy) + b * dx * dy
                alpha = min(settings.alpha_max, opac[i] * math.exp(-sigma))
                if sigma < 0 or alpha < settings.alpha_min:
                    continue
                next_t = t * (1.0 - alpha)
                if settings.min_transmittance > 0 and next_t <= settings.min_transmittance:
                    terminated += 1
                    break
                for k in range(len(acc)):
                    acc[k] += cols[i][k] * alpha * t
                t = next_t
            out[y, x] = torch.tensor(acc, dtype=torch.float64)
            trans[y, x, 0] = t
    return out, trans, terminated


def dense_scene(seed: int, n: int = 50, width: int = 40, height: int = 36):
    """Opaque, overlapping Gaussians in front of a camera: tiles, partial tiles and early
    termination all occur."""
    params = random_gaussians(
        n, seed, low=-0.6, high=0.6, scale_range=(0.05, 0.35), opacity_range=(0.6, 0.99)
    )
    viewmat = look_at([0.3, -1.4, 0.4], [0.0, 0.0, 0.0])
    return params, viewmat, intrinsics(width, height), width, height


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("min_transmittance", [1e-4, 0.0])
@pytest.mark.parametrize("grouped", [False, True])
def test_matches_brute_force(seed, min_transmittance, grouped):
    params, viewmat, K, width, height = dense_scene(seed)
    settings = RasterSettings(min_transmittance=min_transmittance)
    proj = project_gaussians(params["means"], params["quats"], params["scales"], viewmat, K, width, height, settings)
    g = torch.Generator().manual_seed(seed)
    group = torch.randint(0, 3, (params["means"].shape[0],), generator=g) if grouped else None
    color, trans = rasterize(proj, params["colors"], params["opacities"], width, height, settings, group)
    ref_color, ref_trans, terminated = brute_force_rasterize(
        proj, params["colors"], params["opacities"], width, height, settings, group
    )
    torch.testing.assert_close(color, ref_color, **TOL64)
    torch.testing.assert_close(trans, ref_trans, **TOL64)
    assert (proj.radii > 0).sum() > 10
    if min_transmittance > 0:
        assert terminated > 20, "the scene must exercise early termination"


def test_tile_culling_matters():
    """A single opaque Gaussian whose 3-sigma square ends mid-tile: gsplat still draws
    it on the rest of those tiles (alpha > 1/255 there) and nowhere beyond them."""
    settings = RasterSettings()
    proj = Projection(
        means2d=torch.tensor([[21.0, 22.0]], dtype=torch.float64),
        conics=torch.tensor([[1 / 4.0, 0.0, 1 / 4.0]], dtype=torch.float64),  # sigma = 2 px
        depths=torch.tensor([1.0], dtype=torch.float64),
        radii=torch.tensor([6], dtype=torch.int32),
    )
    colors, opac = torch.ones(1, 1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    color, trans = rasterize(proj, colors, opac, 48, 48, settings)
    ref, ref_t, _ = brute_force_rasterize(proj, colors, opac, 48, 48, settings)
    no_cull, _, _ = brute_force_rasterize(proj, colors, opac, 48, 48, settings, tile_culling=False)
    torch.testing.assert_close(color, ref, **TOL64)
    torch.testing.assert_close(trans, ref_t, **TOL64)
    assert (no_cull - ref).abs().max() > 1e-3, "the case must depend on tile culling"
    assert (color[:, 32:] == 0).all() and (color[32:] == 0).all()


@pytest.mark.parametrize("window", [(16, 0, 40, 20), (5, 3, 33, 29), (0, 0, 40, 36), (7, 7, 7, 20)])
def test_window_equals_crop(window):
    params, viewmat, K, width, height = dense_scene(3)
    settings = RasterSettings()
    proj = project_gaussians(params["means"], params["quats"], params["scales"], viewmat, K, width, height, settings)
    full_c, full_t = rasterize(proj, params["colors"], params["opacities"], width, height, settings)
    crop_c, crop_t = rasterize(proj, params["colors"], params["opacities"], width, height, settings, window=window)
    x0, y0, x1, y1 = window
    torch.testing.assert_close(crop_c, full_c[y0:y1, x0:x1], **TOL64)
    torch.testing.assert_close(crop_t, full_t[y0:y1, x0:x1], **TOL64)


def _banded_render(max_candidates: int):
    """Image, T, gradients of every input, and the bytes autograd kept between forward and backward."""
    params, viewmat, K, width, height = dense_scene(6)
    inputs = {k: params[k].clone().requires_grad_(True) for k in ("means", "quats", "scales", "opacities", "colors")}
    saved = []

    def pack(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        proj = project_gaussians(inputs["means"], inputs["quats"], inputs["scales"], viewmat, K, width, height)
        image, trans = rasterize(proj, inputs["colors"], inputs["opacities"], width, height,
                                 RasterSettings(max_candidates=max_candidates))
    weights = torch.linspace(0.5, 1.5, image.numel(), dtype=image.dtype).reshape(image.shape)
    ((image * weights).sum() + trans.square().sum()).backward()
    return image.detach(), trans.detach(), {k: v.grad for k, v in inputs.items()}, sum(saved)


def test_bands_do_not_change_the_result_and_keep_one_band_for_backward():
    image, trans, grads, whole_bytes = _banded_render(2**22)
    banded_image, banded_trans, banded_grads, banded_bytes = _banded_render(300)
    torch.testing.assert_close(banded_image, image, rtol=0, atol=0)
    torch.testing.assert_close(banded_trans, trans, rtol=0, atol=0)
    for name, grad in grads.items():  # only the order of summing over bands differs
        torch.testing.assert_close(banded_grads[name], grad, rtol=0, atol=1e-12, msg=name)
        assert grad.abs().max() > 0, name
    # recomputed in backward, the bands' per-entry tensors are not kept: what stays is the
    # per-Gaussian inputs and per-row bookkeeping
    assert banded_bytes < whole_bytes / 3, (banded_bytes, whole_bytes)


def test_footprint_window_paste_equals_full():
    params, viewmat, K, width, height = dense_scene(4, n=6)
    params["means"] = params["means"] * 0.3 + torch.tensor([0.3, 0.0, 0.2], dtype=torch.float64)
    settings = RasterSettings()
    proj = project_gaussians(params["means"], params["quats"], params["scales"], viewmat, K, width, height, settings)
    window = footprint_window(proj, width, height, settings.tile_size)
    assert window != (0, 0, width, height), "the group should cover only part of the image"
    full = rasterize(proj, params["colors"], params["opacities"], width, height, settings)
    crop = rasterize(proj, params["colors"], params["opacities"], width, height, settings, window=window)
    pasted = paste_partial(*crop, window, width, height)
    torch.testing.assert_close(pasted[0], full[0], **TOL64)
    torch.testing.assert_close(pasted[1], full[1], **TOL64)


@pytest.mark.parametrize(
    "scene, min_transmittance",
    [("translucent", 1e-4), ("translucent", 0.0), ("opaque", 1e-4), ("opaque", 0.0)],
)
def test_gradcheck(scene, min_transmittance):
    """Autograd through projection, SH colours and rasterisation matches finite
    differences (float64, tiny scenes away from the rule's discontinuities).  The opaque
    scene stacks Gaussians so that pixels terminate early."""
    opacity = (0.6, 0.9) if scene == "translucent" else (0.97, 0.99)
    spread = 0.3 if scene == "translucent" else 0.08
    params = random_gaussians(5, 7, low=-spread, high=spread, scale_range=(0.08, 0.2), opacity_range=opacity)
    sh = torch.randn(5, 4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(8)) * 0.3
    viewmat, K = look_at([0.2, -1.5, 0.4], [0.0, 0.0, 0.0]), intrinsics(20, 18)
    settings = RasterSettings(min_transmittance=min_transmittance)

    def render(means, quats, scales, opacities, coeffs, settings=settings):
        return render_ref(
            means, quats, scales, opacities, coeffs, viewmat, K, 20, 18, settings, sh_degree=1, render_depth=True
        )

    inputs = tuple(
        t.clone().requires_grad_(True)
        for t in (params["means"], params["quats"], params["scales"], params["opacities"], sh)
    )
    if scene == "opaque" and min_transmittance > 0:
        no_stop = render(*inputs, settings=RasterSettings(min_transmittance=0.0))[1]
        assert (render(*inputs)[1] - no_stop).abs().max() > 1e-6, "pixels must terminate early"
    # fast_mode checks random projections of the Jacobian (all inputs, all outputs).
    assert torch.autograd.gradcheck(render, inputs, eps=1e-6, atol=1e-6, rtol=1e-4, fast_mode=True)


@pytest.mark.parametrize("case", ["no_gaussians", "all_behind_camera"])
def test_empty(case):
    n = 0 if case == "no_gaussians" else 5
    params = random_gaussians(n, 0)
    viewmat = look_at([0.0, -3.0, 0.0], [0.0, -6.0, 0.0])  # looking away from the box
    leaves = [t.requires_grad_(True) for t in (params["means"], params["opacities"], params["colors"])]
    color, trans = render_ref(
        leaves[0], params["quats"], params["scales"], leaves[1], leaves[2], viewmat, intrinsics(24, 16), 24, 16,
        render_depth=True,
    )
    assert color.shape == (16, 24, 4) and trans.shape == (16, 24, 1)
    assert (color == 0).all() and (trans == 1).all()
    (color.sum() + trans.sum()).backward()  # the graph stays connected
    assert all(t.grad is not None and (t.grad == 0).all() for t in leaves)


def test_float32_matches_float64():
    params, viewmat, K, width, height = dense_scene(5)
    out = {}
    for dtype in (torch.float32, torch.float64):
        p = {k: v.to(dtype) for k, v in params.items()}
        out[dtype] = render_ref(
            p["means"], p["quats"], p["scales"], p["opacities"], p["colors"], viewmat.to(dtype), K.to(dtype),
            width, height,
        )
    torch.testing.assert_close(out[torch.float32][0].double(), out[torch.float64][0], rtol=0, atol=2e-4)
    torch.testing.assert_close(out[torch.float32][1].double(), out[torch.float64][1], rtol=0, atol=2e-4)


# ------------------------------------------------------------ gsplat's torch twins (CPU)


def _gsplat_torch_impl():
    try:
        from gsplat.cuda import _torch_impl
    except Exception as err:  # noqa: BLE001 - any import failure means "not available"
        pytest.skip(f"gsplat is not importable ({type(err).__name__}: {err}); cannot compare with its torch twins")
    return _torch_impl


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_projection_matches_gsplat_torch(seed):
    impl = _gsplat_torch_impl()
    params = random_gaussians(500, seed, low=-2.0, high=2.0, scale_range=(0.01, 0.5))
    width, height = 64, 48
    viewmat, K = look_at([0.5, -3.0, 1.0], [0.0, 0.0, 0.2]), intrinsics(width, height, fov_deg=70)
    settings = RasterSettings(rasterize_mode="antialiased")
    ours = project_gaussians(params["means"], params["quats"], params["scales"], viewmat, K, width, height, settings)
    covars, _ = impl._quat_scale_to_covar_preci(params["quats"], params["scales"], compute_preci=False)
    torch.testing.assert_close(quat_scale_to_covar(params["quats"], params["scales"]), covars, **TOL64_GSPLAT)
    radii, means2d, depths, conics, compensations = impl._fully_fused_projection(
        params["means"], covars, viewmat[None], K[None], width, height, eps2d=settings.eps2d,
        near_plane=settings.near_plane, far_plane=settings.far_plane, calc_compensations=True,
    )
    visible = ours.radii > 0
    assert 50 < int(visible.sum()) < 500, "the scene must have both culled and visible Gaussians"
    assert torch.equal(ours.radii, radii[0])
    torch.testing.assert_close(ours.means2d[visible], means2d[0][visible], **TOL64_GSPLAT)
    torch.testing.assert_close(ours.conics[visible], conics[0][visible], **TOL64_GSPLAT)
    torch.testing.assert_close(ours.depths, depths[0], **TOL64_GSPLAT)
    # antialiased mode: the opacity compensation of gsplat's rasterize_mode="antialiased"
    torch.testing.assert_close(ours.compensations[visible], compensations[0][visible], **TOL64_GSPLAT)
    assert float(ours.compensations[visible].min()) < 0.5 < float(ours.compensations[visible].max())
    classic = project_gaussians(params["means"], params["quats"], params["scales"], viewmat, K, width, height)
    assert classic.compensations is None and torch.equal(classic.radii, ours.radii)

    tiles = tile_ranges(ours.means2d, ours.radii, 16, width, height)
    tiles_per_gauss, _, _ = impl._isect_tiles(
        means2d[:, visible], radii[:, visible], depths[:, visible], 16, math.ceil(width / 16), math.ceil(height / 16)
    )
    counts = (tiles[:, 1] - tiles[:, 0]) * (tiles[:, 3] - tiles[:, 2])
    assert torch.equal(counts[visible].int(), tiles_per_gauss[0])


@pytest.mark.parametrize("degree", [0, 1, 2, 3, 4])
def test_sh_matches_gsplat_torch(degree):
    impl = _gsplat_torch_impl()
    g = torch.Generator().manual_seed(degree)
    coeffs = torch.randn(200, 25, 3, generator=g, dtype=torch.float64)
    dirs = torch.randn(200, 3, generator=g, dtype=torch.float64) * 3.0
    expected = impl._spherical_harmonics(degree, dirs, coeffs)
    torch.testing.assert_close(sh_to_color(coeffs, dirs, degree), expected, **TOL64_GSPLAT)


def test_gaussian_colors_rule():
    """rasterization(): dirs = means - inverse(viewmat)[:3, 3]; colour = max(SH + 0.5, 0)."""
    params = random_gaussians(50, 3)
    viewmat = look_at([0.5, -3.0, 1.0], [0.0, 0.0, 0.0])
    coeffs = torch.randn(50, 9, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    campos = camera_center(viewmat)
    torch.testing.assert_close(campos, torch.tensor([0.5, -3.0, 1.0], dtype=torch.float64), **TOL64)
    colors = gaussian_colors(coeffs, params["means"], campos, 2)
    expected = torch.clamp_min(sh_to_color(coeffs, params["means"] - campos, 2) + 0.5, 0.0)
    torch.testing.assert_close(colors, expected, rtol=0, atol=0)
    assert (colors == 0).any() and (colors > 0.5).any()
