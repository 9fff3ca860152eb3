"""``clip`` mode's torch twin: box-clipped leaves with boundary sharing composite to the
unpartitioned render of all Gaussians, forward and gradients, whatever the tree."""

from __future__ import annotations

import math

import pytest
import torch

from landmark_plugin.core.clip import (
    Copies,
    clip_camera,
    rasterize_clipped,
    rasterize_clipped_leaves,
    ray_points,
    reach_boxes,
    share_everything,
    share_leaves,
    sharing_copies,
    unbounded_leaf_boxes,
)
from landmark_plugin.core.composite import composite
from landmark_plugin.core.order import camera_leaf_order, order_positions
from landmark_plugin.core.partition import assign_leaves, build_kdtree
from landmark_plugin.core.raster_ref import RasterSettings, project_gaussians, rasterize
from landmark_plugin.core.sh import camera_center

from test_raster_ref import intrinsics, look_at, random_gaussians

EXACT = 1e-9
"""float64, the same contributions in the same order: only rounding differs (seen ~1e-15);
the issue asks for 1e-4 (sharing rule) and 1e-6 (share everything)."""
GRAD_RTOL, GRAD_ATOL = 1e-6, 1e-9
"""float64 gradients, relative with an absolute floor."""
WIDTH, HEIGHT = 40, 30
NO_TERMINATION = RasterSettings(min_transmittance=0.0)
CAMERAS = {
    "outside": ([1.6, -1.9, 1.0], [0.0, 0.0, 0.0], 70.0),
    "inside": ([0.15, -0.35, 0.1], [0.6, 1.0, -0.1], 80.0),
    # Grazing view over a flat layer of flat splats: footprints stretch far beyond the
    # splats' 3-sigma boxes in the plane of their centre's depth.
    "oblique": ([-2.6, -0.3, 0.32], [1.0, 0.2, -0.05], 50.0),
}


def _scene(seed: int, depth: int, camera: str, n: int = 90):
    params = random_gaussians(n, seed, scale_range=(0.03, 0.25), opacity_range=(0.2, 0.95))
    if camera == "oblique":
        params["means"][:, 2] *= 0.15
        params["scales"][:, 2] = 0.003  # thin discs
        params["quats"] = params["quats"] * torch.tensor([1.0, 0.1, 0.1, 1.0], dtype=torch.float64)
    tree = build_kdtree(params["means"], depth)
    eye, target, fov = CAMERAS[camera]
    viewmat, K = look_at(eye, target), intrinsics(WIDTH, HEIGHT, fov_deg=fov)
    return params, tree, viewmat, K


def _setup(params, tree, viewmat, K, settings):
    proj = project_gaussians(params["means"], params["quats"], params["scales"], viewmat, K, WIDTH, HEIGHT, settings)
    colors = torch.cat([params["colors"], proj.depths[:, None]], dim=1)
    boxes = unbounded_leaf_boxes(tree)
    camera = clip_camera(viewmat, K)
    order = camera_leaf_order(tree, camera_center(viewmat))
    return proj, colors, boxes, camera, order


def _reference(proj, colors, params, settings):
    return rasterize(proj, colors, params["opacities"], WIDTH, HEIGHT, settings)


def _composite_of_leaves(proj, colors, params, copies, boxes, camera, order, settings):
    cs, ts = rasterize_clipped_leaves(
        proj, colors, params["opacities"], copies, boxes, camera, order, WIDTH, HEIGHT, settings
    )
    return composite(cs, ts)


def _one_pass(proj, colors, params, copies, boxes, camera, order, settings):
    return rasterize_clipped(
        proj, colors, params["opacities"], copies, boxes, camera, WIDTH, HEIGHT, settings,
        leaf_position=order_positions(order),
    )


def _max_diff(a, b) -> float:
    return max(float((a[0] - b[0]).abs().max()), float((a[1] - b[1]).abs().max()))


@pytest.mark.parametrize("camera", list(CAMERAS))
@pytest.mark.parametrize("depth", [0, 1, 2, 3])
def test_leaf_composite_equals_reference(depth, camera):
    """Per-leaf clipped partials with the sharing rule, composited in leaf order, equal the
    single render of all Gaussians; so does share-everything."""
    params, tree, viewmat, K = _scene(depth, depth, camera)
    proj, colors, boxes, camera32, order = _setup(params, tree, viewmat, K, NO_TERMINATION)
    want = _reference(proj, colors, params, NO_TERMINATION)
    assert float((want[1] < 0.5).float().mean()) > 0.1, "the scene must cover the image"
    copies = sharing_copies(proj, params["opacities"], camera32, boxes, WIDTH, HEIGHT, NO_TERMINATION)
    got = _composite_of_leaves(proj, colors, params, copies, boxes, camera32, order, NO_TERMINATION)
    assert _max_diff(got, want) <= EXACT
    if depth > 0:
        shared = int((copies.box >= 0).sum())
        assert shared > 10, "the scene must put Gaussians across split planes"
    if depth in (1, 3):
        everything = share_everything(proj.radii.shape[0], tree.num_leaves)
        full = _composite_of_leaves(proj, colors, params, everything, boxes, camera32, order, NO_TERMINATION)
        assert _max_diff(full, want) <= 1e-6


@pytest.mark.parametrize("camera", list(CAMERAS))
@pytest.mark.parametrize("depth", [1, 3])
def test_one_pass_equals_reference_with_early_termination(depth, camera):
    """One pass over all leaves sorted by (leaf position, depth) visits every pixel's
    contributions in depth order, so it matches the reference exactly, termination included."""
    params, tree, viewmat, K = _scene(10 + depth, depth, camera)
    params["opacities"] = 0.6 + 0.39 * params["opacities"]  # opaque: many pixels terminate
    settings = RasterSettings()
    proj, colors, boxes, camera32, order = _setup(params, tree, viewmat, K, settings)
    want = _reference(proj, colors, params, settings)
    copies = sharing_copies(proj, params["opacities"], camera32, boxes, WIDTH, HEIGHT, settings)
    got = _one_pass(proj, colors, params, copies, boxes, camera32, order, settings)
    assert _max_diff(got, want) <= EXACT
    assert bool((want[1] <= settings.min_transmittance / (1 - settings.alpha_max)).any()), "some pixels terminate"


@pytest.mark.parametrize("camera", ["outside", "oblique"])
def test_leaf_composite_with_early_termination_is_bounded(camera):
    """Each leaf stops on its own T, so per-leaf partials keep a superset of the reference's
    contributions after it stopped (same bound as ``test_composite``): equal wherever the
    reference's final T exceeds min_T / (1 - alpha_max) = 0.1, and T_comp <= T_ref."""
    params, tree, viewmat, K = _scene(3, 2, camera)
    params["opacities"] = 0.6 + 0.39 * params["opacities"]
    settings = RasterSettings()
    proj, colors, boxes, camera32, order = _setup(params, tree, viewmat, K, settings)
    want_c, want_t = _reference(proj, colors, params, settings)
    copies = sharing_copies(proj, params["opacities"], camera32, boxes, WIDTH, HEIGHT, settings)
    got_c, got_t = _composite_of_leaves(proj, colors, params, copies, boxes, camera32, order, settings)
    assert (got_t <= want_t + EXACT).all()
    unstopped = want_t[..., 0] > settings.min_transmittance / (1 - settings.alpha_max)
    assert float(((got_c - want_c).abs() * unstopped[..., None]).max()) <= EXACT
    bound = colors.abs().max() * (want_t - got_t)
    assert ((got_c - want_c).abs() <= bound + EXACT).all()


@pytest.mark.parametrize("depth, camera", [(1, "inside"), (3, "oblique"), (2, "outside")])
def test_gradients_match_reference(depth, camera):
    params, tree, viewmat, K = _scene(20 + depth, depth, camera, n=80)
    names = ["means", "quats", "scales", "opacities", "colors"]
    g = torch.Generator().manual_seed(5)
    cot_c = torch.randn(HEIGHT, WIDTH, 4, generator=g, dtype=torch.float64)
    cot_t = torch.randn(HEIGHT, WIDTH, 1, generator=g, dtype=torch.float64)
    grads = {}
    for which in ("reference", "leaves", "one_pass"):
        leaves = {k: params[k].clone().requires_grad_(True) for k in names}
        proj, colors, boxes, camera32, order = _setup(leaves, tree, viewmat, K, NO_TERMINATION)
        if which == "reference":
            out = _reference(proj, colors, leaves, NO_TERMINATION)
        else:
            copies = sharing_copies(proj, leaves["opacities"], camera32, boxes, WIDTH, HEIGHT, NO_TERMINATION)
            render = _composite_of_leaves if which == "leaves" else _one_pass
            out = render(proj, colors, leaves, copies, boxes, camera32, order, NO_TERMINATION)
        loss = (out[0] * cot_c).sum() + (out[1] * cot_t).sum()
        grads[which] = torch.autograd.grad(loss, [leaves[k] for k in names])
    for which in ("leaves", "one_pass"):
        for name, a, b in zip(names, grads[which], grads["reference"]):
            assert b.abs().max() > 0, f"{name} gets no gradient"
            torch.testing.assert_close(a, b, rtol=GRAD_RTOL, atol=GRAD_ATOL, msg=f"{which}: gradient of {name}")


def _axis_box_copies(params, tree, boxes, sigmas: float = 3.0) -> Copies:
    """The naive rule: share with every leaf the ellipsoid's 3-sigma axis box meets."""
    from landmark_plugin.core.raster_ref import quat_scale_to_covar

    cov = quat_scale_to_covar(params["quats"], params["scales"])
    half = sigmas * torch.sqrt(torch.diagonal(cov, dim1=-2, dim2=-1))
    reach = torch.stack([params["means"] - half, params["means"] + half], dim=1)
    return share_leaves(reach, boxes)


def test_sharing_rule_loses_no_contribution_where_axis_boxes_do():
    """At a grazing view the point a pixel tests can leave the 3-sigma axis box: sharing by
    that box loses contributions, the projection-derived region does not (share-everything
    is the reference), and it needs far fewer copies than sharing everything."""
    params, tree, viewmat, K = _scene(4, 3, "oblique")
    proj, colors, boxes, camera32, order = _setup(params, tree, viewmat, K, NO_TERMINATION)
    n = proj.radii.shape[0]
    full = _composite_of_leaves(
        proj, colors, params, share_everything(n, tree.num_leaves), boxes, camera32, order, NO_TERMINATION
    )
    copies = sharing_copies(proj, params["opacities"], camera32, boxes, WIDTH, HEIGHT, NO_TERMINATION)
    ours = _composite_of_leaves(proj, colors, params, copies, boxes, camera32, order, NO_TERMINATION)
    assert _max_diff(ours, full) <= EXACT
    assert copies.gaussian.shape[0] < 0.5 * n * tree.num_leaves
    naive = _axis_box_copies(params, tree, boxes)
    lossy = _composite_of_leaves(proj, colors, params, naive, boxes, camera32, order, NO_TERMINATION)
    assert _max_diff(lossy, full) > 1e-3, "the oblique scene must defeat the axis-box rule"


def test_ray_points_and_reach_boxes():
    """The ray point through mean2d at the centre's depth is the mean; reach boxes hold it;
    the box of a culled Gaussian is empty; unbounded boxes agree with assign_leaves."""
    params, tree, viewmat, K = _scene(6, 3, "outside")
    proj, _, boxes, camera32, _ = _setup(params, tree, viewmat, K, NO_TERMINATION)
    m2d = proj.means2d
    visible = (proj.radii > 0) & (m2d[:, 0] > 1) & (m2d[:, 0] < WIDTH - 1) & (m2d[:, 1] > 1) & (m2d[:, 1] < HEIGHT - 1)
    points = ray_points(camera32, proj.means2d[:, 0], proj.means2d[:, 1], proj.depths)
    torch.testing.assert_close(points.double()[visible], params["means"][visible], rtol=0, atol=1e-5)
    reach = reach_boxes(proj, params["opacities"], camera32, WIDTH, HEIGHT)
    m = params["means"][visible]
    assert ((reach[visible, 0] <= m) & (m <= reach[visible, 1])).all()
    assert torch.isinf(reach[proj.radii == 0]).all()
    far = torch.randn(500, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 5.0
    inside = ((far[:, None] >= boxes[None, :, 0]) & (far[:, None] < boxes[None, :, 1])).all(-1)
    assert (inside.sum(1) == 1).all()
    assert torch.equal(inside.long().argmax(1), assign_leaves(tree, far))


def test_unclipped_copies_render_like_plain():
    """Box -1 skips the test: one copy per Gaussian in its own leaf is the plain render
    sorted by (leaf position, depth)."""
    params, tree, viewmat, K = _scene(8, 2, "outside")
    settings = RasterSettings()
    proj, colors, boxes, camera32, order = _setup(params, tree, viewmat, K, settings)
    leaf = assign_leaves(tree, params["means"])
    n = leaf.shape[0]
    copies = Copies(torch.arange(n), leaf, torch.full((n,), -1))
    got = _one_pass(proj, colors, params, copies, boxes, camera32, order, settings)
    want = rasterize(proj, colors, params["opacities"], WIDTH, HEIGHT, settings, group=order_positions(order)[leaf])
    assert _max_diff(got, want) == 0.0


@pytest.mark.parametrize("camera", ["outside", "oblique"])
@pytest.mark.parametrize("depth", [0, 2])
def test_clip_intersections_twin_lists_every_copy_tile_in_order(depth, camera):
    """The entries the clipped kernel walks (twin of the CUDA op): every copy once per tile
    of its Gaussian (gsplat's binning), per tile ordered by (leaf position, depth, copy)."""
    from landmark_plugin.core.raster_ref import tile_ranges
    from landmark_plugin.core.render_clip import ClipLeaves, clip_intersections

    params, tree, viewmat, K = _scene(40 + depth, depth, camera, n=150)
    settings = RasterSettings(tile_size=8)
    proj, _, boxes, camera32, order = _setup(params, tree, viewmat, K, settings)
    position = order_positions(order)
    offsets, flatten_ids, isect_boxes = clip_intersections(
        proj, params["opacities"], camera32, ClipLeaves(boxes, position), WIDTH, HEIGHT, settings
    )
    copies = sharing_copies(proj, params["opacities"], camera32, boxes, WIDTH, HEIGHT, settings)
    rect = tile_ranges(proj.means2d, proj.radii, 8, WIDTH, HEIGHT).tolist()
    tiles_x, tiles_y = math.ceil(WIDTH / 8), math.ceil(HEIGHT / 8)
    depth32 = proj.depths.to(torch.float32).tolist()
    want = []
    for c, (g, leaf, box) in enumerate(zip(*(t.tolist() for t in copies))):
        x0, x1, y0, y1 = rect[g]
        for ty in range(y0, y1):
            for tx in range(x0, x1):
                want.append((ty * tiles_x + tx, int(position[leaf]), depth32[g], c, g, box))
    want.sort()
    assert len(want) > 200
    if depth > 0:
        assert any(w[5] >= 0 for w in want), "the scene should share some Gaussians"
    assert flatten_ids.tolist() == [w[4] for w in want]
    assert isect_boxes.tolist() == [w[5] for w in want]
    first = [sum(1 for w in want if w[0] < t) for t in range(tiles_x * tiles_y)]
    assert offsets.shape == (tiles_y, tiles_x) and offsets.flatten().tolist() == first


# ------------------------------------------------------------------ antialiased mode

ANTIALIASED = RasterSettings(rasterize_mode="antialiased")


def _partitioned_antialiased(params, tree, viewmat, K, mode: str):
    """The renders the model uses (``render_partial_clipped`` / ``render_partial``, torch twin)."""
    from landmark_plugin.core.render import Gaussians, render_partial
    from landmark_plugin.core.render_clip import ClipLeaves, render_partial_clipped

    gaussians = Gaussians(params["means"], params["quats"], params["scales"], params["opacities"], params["colors"][:, None])
    positions = order_positions(camera_leaf_order(tree, camera_center(viewmat)))
    if mode == "clip":
        leaves = ClipLeaves(unbounded_leaf_boxes(tree), positions)
        partial = render_partial_clipped(gaussians, leaves, viewmat, K, WIDTH, HEIGHT, None, ANTIALIASED, backend="torch")
    else:
        leaf = assign_leaves(tree, params["means"].detach())
        partial = render_partial(gaussians, positions[leaf], viewmat, K, WIDTH, HEIGHT, None, ANTIALIASED, backend="torch")
    return partial.color, partial.transmittance


@pytest.mark.parametrize("depth, camera", [(1, "inside"), (3, "oblique"), (2, "outside")])
def test_antialiased_clip_render_equals_the_unpartitioned_antialiased_render(depth, camera):
    """Forward and every gradient, float64: the compensation scales opacities before the
    sharing rule and the rasteriser, in the partition as in the one render."""
    from landmark_plugin.core.raster_ref import render_ref

    params, tree, viewmat, K = _scene(40 + depth, depth, camera, n=80)
    params["scales"][:6] = 1e-3  # sub-pixel splats: the compensation matters most there
    names = ["means", "quats", "scales", "opacities", "colors"]
    g = torch.Generator().manual_seed(7)
    cot_c = torch.randn(HEIGHT, WIDTH, 3, generator=g, dtype=torch.float64)
    cot_t = torch.randn(HEIGHT, WIDTH, 1, generator=g, dtype=torch.float64)
    out, grads = {}, {}
    for which in ("reference", "classic", "clip"):
        p = {k: params[k].clone().requires_grad_(True) for k in names}
        if which == "clip":
            color, trans = _partitioned_antialiased(p, tree, viewmat, K, "clip")
        else:
            settings = ANTIALIASED if which == "reference" else RasterSettings()
            color, trans = render_ref(p["means"], p["quats"], p["scales"], p["opacities"], p["colors"], viewmat, K,
                                      WIDTH, HEIGHT, settings)
        out[which] = (color.detach(), trans.detach())
        grads[which] = torch.autograd.grad((color * cot_c).sum() + (trans * cot_t).sum(), [p[k] for k in names])
    assert _max_diff(out["clip"], out["reference"]) <= 1e-9
    assert _max_diff(out["classic"], out["reference"]) > 1e-3, "antialiasing must change the image"
    for name, a, b in zip(names, grads["clip"], grads["reference"]):
        assert b.abs().max() > 0, f"{name} gets no gradient"
        torch.testing.assert_close(a, b, rtol=GRAD_RTOL, atol=GRAD_ATOL, msg=f"gradient of {name}")


def test_antialiased_plain_render_equals_the_sorted_antialiased_render():
    """plain mode: the (leaf position, depth) sorted render with compensated opacities."""
    from landmark_plugin.core.raster_ref import render_ref

    params, tree, viewmat, K = _scene(50, 2, "outside")
    positions = order_positions(camera_leaf_order(tree, camera_center(viewmat)))
    group = positions[assign_leaves(tree, params["means"])]
    want = render_ref(params["means"], params["quats"], params["scales"], params["opacities"], params["colors"], viewmat,
                      K, WIDTH, HEIGHT, ANTIALIASED, group=group)
    assert _max_diff(_partitioned_antialiased(params, tree, viewmat, K, "plain"), want) <= 1e-12
