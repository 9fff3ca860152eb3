"""The headline rule: compositing per-leaf partials in the camera's leaf order equals one
render of all Gaussians sorted by (leaf order, depth) — forward and gradients."""

from __future__ import annotations

import pytest
import torch

from landmark_plugin.core.composite import composite, expected_depth, paste_partial
from landmark_plugin.core.order import camera_leaf_order, order_positions
from landmark_plugin.core.partition import assign_leaves, build_kdtree
from landmark_plugin.core.raster_ref import (
    RasterSettings,
    footprint_window,
    project_gaussians,
    rasterize,
    rasterize_groups,
)
from landmark_plugin.core.sh import camera_center

from test_raster_ref import intrinsics, look_at, random_gaussians

EXACT = 1e-5
"""float64: the composite and the single render differ only by rounding (seen ~1e-15)."""
GRAD_RTOL, GRAD_ATOL = 1e-5, 1e-9
"""float64 gradients, relative (absolute floor for entries that are zero in both)."""

WIDTH, HEIGHT = 48, 40
CAMERAS = {
    "outside": ([1.5, -1.8, 0.9], [0.0, 0.0, 0.0]),
    "inside": ([0.15, -0.35, 0.1], [0.6, 1.0, -0.1]),
}


def _scene(seed: int, depth: int, camera: str, n: int = 80):
    """Gaussians in [-1, 1]^3, big enough that many straddle split planes; the kd-tree is
    built on their means; the inside camera sits in the box (some Gaussians behind it)."""
    params = random_gaussians(n, seed, scale_range=(0.04, 0.3), opacity_range=(0.3, 0.95), color_dim=3)
    params["means"][:, 2] *= 0.5  # flatter than wide: widest-axis splits differ per level
    tree = build_kdtree(params["means"], depth)
    eye, target = CAMERAS[camera]
    viewmat, K = look_at(eye, target), intrinsics(WIDTH, HEIGHT, fov_deg=75.0)
    inside = bool(((torch.tensor(eye) > tree.bounds[0]) & (torch.tensor(eye) < tree.bounds[1])).all())
    assert inside == (camera == "inside")
    return params, tree, viewmat, K


def _leaf_positions(params, tree, viewmat):
    leaf = assign_leaves(tree, params["means"])
    order = camera_leaf_order(tree, camera_center(viewmat))
    return order_positions(order)[leaf]


def _render_both(params, tree, viewmat, K, settings, background=None):
    """(composite of per-leaf partials, single render sorted by (leaf position, depth)),
    both with the depth channel appended."""
    proj = project_gaussians(params["means"], params["quats"], params["scales"], viewmat, K, WIDTH, HEIGHT, settings)
    colors = torch.cat([params["colors"], proj.depths[:, None]], dim=1)
    position = _leaf_positions(params, tree, viewmat)
    partial_c, partial_t = rasterize_groups(
        proj, colors, params["opacities"], position, tree.num_leaves, WIDTH, HEIGHT, settings
    )
    comp = composite(partial_c, partial_t, background)
    single_c, single_t = rasterize(proj, colors, params["opacities"], WIDTH, HEIGHT, settings, group=position)
    if background is not None:
        single_c = single_c + single_t * background
    return comp, (single_c, single_t), colors, proj


def _spans_split_planes(params, tree) -> int:
    """How many Gaussians' 2-sigma boxes cross a split plane of their own path."""
    boxes = tree.leaf_boxes()[assign_leaves(tree, params["means"])]
    reach = 2.0 * params["scales"].max(dim=1).values[:, None]
    return int(((params["means"] - reach < boxes[:, 0]) | (params["means"] + reach > boxes[:, 1])).any(1).sum())


@pytest.mark.parametrize("depth", [0, 1, 2, 3])
@pytest.mark.parametrize("camera", ["outside", "inside"])
@pytest.mark.parametrize("seed", [0, 1])
def test_composite_equals_single_render(depth, camera, seed):
    params, tree, viewmat, K = _scene(seed, depth, camera)
    settings = RasterSettings(min_transmittance=0.0)
    background = torch.tensor([0.2, 0.5, 0.9, 0.0], dtype=torch.float64)
    (comp_c, comp_t), (single_c, single_t), _, proj = _render_both(params, tree, viewmat, K, settings, background)
    assert (single_t < 0.5).float().mean() > 0.2, "the scene must cover the image"
    if depth > 0:
        assert _spans_split_planes(params, tree) > 10
    if camera == "inside":
        assert (proj.radii == 0).any(), "some Gaussians are behind the inside camera"
    assert (comp_c - single_c).abs().max() <= EXACT
    assert (comp_t - single_t).abs().max() <= EXACT


@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("camera", ["outside", "inside"])
def test_composite_with_early_termination_is_bounded(depth, camera):
    """Why not exact: every leaf stops on its own T_k, the single render on the product.
    Proof of the bound: the global T is the product of the leaf T's, so the single render
    stops no later than the composite and the composite keeps a superset of its
    Gaussians, with the same transmittance up to where the single render stopped.  Hence
    T_comp <= T_single, |C_comp - C_single| <= max|c| (T_single - T_comp), and the two
    agree wherever the single render did not stop, in particular wherever
    T_single > min_T / (1 - alpha_max) = 0.1."""
    settings = RasterSettings()
    diff_seen = 0.0
    for seed in range(3):
        params, tree, viewmat, K = _scene(seed, depth, camera, n=120)
        params["opacities"] = 0.7 + 0.29 * params["opacities"]  # opaque: pixels terminate
        (comp_c, comp_t), (single_c, single_t), colors, _ = _render_both(params, tree, viewmat, K, settings)
        assert (comp_t <= single_t + EXACT).all()
        bound = colors.abs().max() * (single_t - comp_t)
        assert ((comp_c - single_c).abs() <= bound + EXACT).all()
        unstopped = single_t[..., 0] > settings.min_transmittance / (1 - settings.alpha_max)
        assert ((comp_c - single_c).abs() * unstopped[..., None]).max() <= EXACT
        assert (single_t < settings.min_transmittance / (1 - settings.alpha_max)).any()
        diff_seen = max(diff_seen, float((comp_c - single_c).abs().max()))
    # Sanity: the bound is not vacuous here, and the effect is small in practice.
    assert diff_seen < 0.05


@pytest.mark.parametrize("depth", [1, 3])
@pytest.mark.parametrize("camera", ["outside", "inside"])
def test_composite_gradients_match(depth, camera):
    params, tree, viewmat, K = _scene(7, depth, camera)
    settings = RasterSettings(min_transmittance=0.0)
    names = ["means", "quats", "scales", "opacities", "colors"]
    g = torch.Generator().manual_seed(11)
    cot_c = torch.randn(HEIGHT, WIDTH, 4, generator=g, dtype=torch.float64)
    cot_t = torch.randn(HEIGHT, WIDTH, 1, generator=g, dtype=torch.float64)
    grads = []
    for which in ("composite", "single"):
        leaves = {k: params[k].clone().requires_grad_(True) for k in names}
        comp, single, _, _ = _render_both(leaves, tree, viewmat, K, settings)
        color, trans = comp if which == "composite" else single
        loss = (color * cot_c).sum() + (trans * cot_t).sum()
        grads.append(torch.autograd.grad(loss, [leaves[k] for k in names]))
    for name, a, b in zip(names, *grads):
        assert b.abs().max() > 0, f"{name} gets no gradient"
        torch.testing.assert_close(a, b, rtol=GRAD_RTOL, atol=GRAD_ATOL, msg=f"gradient of {name}")


def test_cropped_partials_composite_like_full():
    """The distributed path: each leaf renders only its footprint window, the owner
    pastes the crops back (T = 1, colour 0 outside) and composites."""
    params, tree, viewmat, K = _scene(4, 3, "outside")
    settings = RasterSettings()
    proj = project_gaussians(params["means"], params["quats"], params["scales"], viewmat, K, WIDTH, HEIGHT, settings)
    position = _leaf_positions(params, tree, viewmat)
    full_c, full_t = rasterize_groups(
        proj, params["colors"], params["opacities"], position, tree.num_leaves, WIDTH, HEIGHT, settings
    )
    pasted, windows = [], []
    for k in range(tree.num_leaves):
        idx = (position == k).nonzero()[:, 0]
        sub = proj.take(idx)
        window = footprint_window(sub, WIDTH, HEIGHT, settings.tile_size)
        crop = rasterize(
            sub, params["colors"][idx], params["opacities"][idx], WIDTH, HEIGHT, settings, window=window
        )
        pasted.append(paste_partial(*crop, window, WIDTH, HEIGHT))
        windows.append(window)
    assert any(w != (0, 0, WIDTH, HEIGHT) for w in windows), "some leaves must be cropped"
    got = composite([p[0] for p in pasted], [p[1] for p in pasted])
    want = composite(full_c, full_t)
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=1e-12)


def test_composite_basics():
    g = torch.Generator().manual_seed(0)
    colors = torch.rand(3, 4, 5, 2, generator=g, dtype=torch.float64)
    trans = torch.rand(3, 4, 5, 1, generator=g, dtype=torch.float64)
    bg = torch.tensor([1.0, 2.0], dtype=torch.float64)
    c, t = composite(colors, trans, bg)
    want = colors[0] + trans[0] * colors[1] + trans[0] * trans[1] * colors[2] + trans.prod(0) * bg
    torch.testing.assert_close(c, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(t, trans.prod(0), rtol=1e-12, atol=1e-12)
    c_list, t_list = composite(list(colors), list(trans))
    torch.testing.assert_close(c_list, c - trans.prod(0) * bg, rtol=1e-12, atol=1e-12)
    # A zero transmittance must not break gradients (no division by T).
    trans = trans.clone()
    trans[0, 0, 0] = 0.0
    colors.requires_grad_(True)
    trans.requires_grad_(True)
    c, t = composite(colors, trans)
    (c.sum() + t.sum()).backward()
    assert torch.isfinite(colors.grad).all() and torch.isfinite(trans.grad).all()
    with pytest.raises(ValueError):
        composite([], [])


def test_expected_depth_and_paste():
    d = torch.tensor([[[2.0], [0.0]]], dtype=torch.float64)
    t = torch.tensor([[[0.5], [1.0]]], dtype=torch.float64)
    out = expected_depth(d, t)
    assert out[0, 0, 0] == 4.0 and out[0, 1, 0] == 0.0
    crop_c = torch.ones(2, 3, 3, dtype=torch.float64, requires_grad=True)
    crop_t = torch.full((2, 3, 1), 0.25, dtype=torch.float64)
    full_c, full_t = paste_partial(crop_c, crop_t, (1, 2, 4, 4), 6, 5)
    assert full_c.shape == (5, 6, 3) and full_t.shape == (5, 6, 1)
    assert full_c.sum() == 18 and (full_t[2:4, 1:4] == 0.25).all() and full_t.sum() == 30 - 6 * 0.75
    full_c.sum().backward()
    assert (crop_c.grad == 1).all()
    with pytest.raises(ValueError):
        paste_partial(crop_c, crop_t, (1, 2, 5, 4), 6, 5)
