"""csrc/ box-clipped rasteriser on the GPU against its torch twin (core/clip.py), and the
one-pass clipped render against gsplat's unpartitioned render.

Kernel vs twin: same projection (gsplat's), same copies, same intersections.  Both take
their per-entry decisions (sigma, alpha, clip test) with the same float32 operations in
the same order, so they count the same (pixel, entry) pairs and differ only by
accumulation order: the forward is asserted on every pixel.  Outputs are poisoned (NaN)
before the kernel runs, so a pixel the kernel failed to write would show.

Against gsplat (which uses the fast ``__expf``) a (pixel, Gaussian) whose alpha sits on
alpha_min can flip; those comparisons bound the rare flips as test_gsplat_parity does.
"""

from __future__ import annotations

import pytest
import torch

from landmark_plugin.core.clip import clip_camera, rasterize_clipped, sharing_copies, unbounded_leaf_boxes
from landmark_plugin.core.order import camera_leaf_order, order_positions
from landmark_plugin.core.partition import build_kdtree
from landmark_plugin.core.projection import Projection, RasterSettings
from landmark_plugin.core.sh import camera_center

from test_raster_ref import intrinsics, look_at, random_gaussians

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the CPU twin is tested in test_clip.py)"),
]

FWD_ATOL = 1e-4
"""Kernel vs twin, every pixel (float32, same decisions; seen differences are rounding)."""
GRAD_REL = 1e-3
"""Kernel vs twin gradients: max |difference| / max |twin| per input (float32; the kernel
recovers T by division in its backward sweep, the twin differentiates a cumulative product)."""
WIDTH, HEIGHT = 300, 200


@pytest.fixture(scope="module")
def ext():
    from landmark_plugin import cuda

    try:
        return cuda.load()
    except cuda.CudaUnavailable as err:
        pytest.fail(f"a CUDA device is present but the kernels do not build: {err}")


def _scene(seed: int, depth: int, n: int = 6000, channels: int = 3, eye=(2.2, -2.0, 1.1)):
    from gsplat.cuda._wrapper import fully_fused_projection

    p = random_gaussians(n, seed, dtype=torch.float32, scale_range=(0.005, 0.12), opacity_range=(0.05, 0.99),
                         color_dim=channels)
    p = {k: v.cuda() for k, v in p.items()}
    viewmat = look_at(list(eye), [0.0, 0.0, 0.0], dtype=torch.float32).cuda()
    K = intrinsics(WIDTH, HEIGHT, fov_deg=70.0, dtype=torch.float32).cuda()
    settings = RasterSettings()
    radii, means2d, depths, conics, _ = fully_fused_projection(
        p["means"], None, p["quats"], p["scales"], viewmat[None], K[None], WIDTH, HEIGHT,
        eps2d=settings.eps2d, near_plane=settings.near_plane, far_plane=settings.far_plane,
    )
    tree = build_kdtree(p["means"].cpu(), depth)
    boxes = unbounded_leaf_boxes(tree).cuda()
    position = order_positions(camera_leaf_order(tree, camera_center(viewmat.cpu()))).cuda()
    camera = clip_camera(viewmat, K).cuda()
    proj = Projection(means2d[0], conics[0], depths[0], radii[0])
    copies = sharing_copies(proj, p["opacities"], camera, boxes, WIDTH, HEIGHT, settings)
    return dict(p=p, radii=radii, means2d=means2d, depths=depths, conics=conics, boxes=boxes,
                position=position, camera=camera, copies=copies, settings=settings, viewmat=viewmat, K=K)


def _kernel_and_twin(s, colors, cot_c, cot_t, absgrad=False):
    from landmark_plugin.core.render_clip import ClipLeaves, clip_intersections
    from landmark_plugin.cuda import rasterize_clipped as kernel

    proj = Projection(s["means2d"][0], s["conics"][0], s["depths"][0], s["radii"][0])
    offsets, flatten_ids, isect_boxes = clip_intersections(
        proj, s["p"]["opacities"], s["camera"], ClipLeaves(s["boxes"], s["position"]), WIDTH, HEIGHT, s["settings"]
    )
    out = {}
    for who in ("kernel", "twin"):
        leaves = [s["means2d"][0].detach().clone(), s["conics"][0].detach().clone(), colors.clone(),
                  s["p"]["opacities"].clone()]
        for t in leaves:
            t.requires_grad_(True)
        m2, con, col, op = leaves
        if who == "kernel":
            color, trans = kernel(m2, con, col, op, s["depths"][0], s["boxes"], s["camera"], WIDTH, HEIGHT,
                                  offsets, flatten_ids, isect_boxes, s["settings"], absgrad=absgrad, poison=True)
        else:
            proj = Projection(m2, con, s["depths"][0], s["radii"][0])
            color, trans = rasterize_clipped(proj, col, op, s["copies"], s["boxes"], s["camera"], WIDTH, HEIGHT,
                                             s["settings"], leaf_position=s["position"])
        loss = (color * cot_c).sum() + (trans * cot_t).sum()
        grads = torch.autograd.grad(loss, leaves)
        out[who] = (color.detach(), trans.detach(), grads, m2)
    return out, int(flatten_ids.shape[0])


@pytest.mark.parametrize("depth, channels", [(0, 3), (2, 4), (3, 4), (2, 5)])
def test_kernel_matches_twin(ext, depth, channels):
    s = _scene(depth, depth, channels=channels)
    colors = s["p"]["colors"]
    if channels >= 4:  # depth as a colour channel (what with_depth renders)
        colors = torch.cat([colors[:, : channels - 1], s["depths"][0, :, None]], dim=1)
    g = torch.Generator(device="cuda").manual_seed(depth)
    cot_c = torch.randn(HEIGHT, WIDTH, channels, device="cuda", generator=g)
    cot_t = torch.randn(HEIGHT, WIDTH, 1, device="cuda", generator=g)
    out, n_isects = _kernel_and_twin(s, colors, cot_c, cot_t)
    (kc, kt, kg, _), (tc, tt, tg, _) = out["kernel"], out["twin"]
    assert torch.isfinite(kc).all() and torch.isfinite(kt).all(), "a pixel was not written"
    assert float((1 - tt).mean()) > 0.2 and n_isects > 10_000, "the scene must cover the image"
    if depth > 0:
        assert int((s["copies"].box >= 0).sum()) > 100, "the scene must straddle split planes"
    err_c, err_t = float((kc - tc).abs().max()), float((kt - tt).abs().max())
    print(f"depth {depth}: {n_isects} entries, max |colour diff| {err_c:.2e}, |T diff| {err_t:.2e}")
    assert err_c <= FWD_ATOL and err_t <= FWD_ATOL
    for name, a, b in zip(("means2d", "conics", "colors", "opacities"), kg, tg):
        rel = float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))
        print(f"  grad {name}: max relative difference {rel:.2e}")
        assert rel <= GRAD_REL, f"gradient of {name} differs by {rel:.2e}"


def test_absgrad_and_copies_sum_into_owner(ext):
    s = _scene(7, 2)
    cot_c = torch.randn(HEIGHT, WIDTH, 3, device="cuda", generator=torch.Generator(device="cuda").manual_seed(3))
    out, _ = _kernel_and_twin(s, s["p"]["colors"], cot_c, torch.zeros(HEIGHT, WIDTH, 1, device="cuda"), absgrad=True)
    m2 = out["kernel"][3]
    assert m2.absgrad is not None and m2.absgrad.shape == m2.shape
    assert (m2.absgrad >= out["kernel"][2][0].abs() - 1e-6).all(), "|sum| <= sum |.|"


def test_empty_and_unwritten_pixels(ext):
    """No entries at all: every pixel still gets colour 0 and T 1 (outputs start as NaN)."""
    from landmark_plugin.cuda import rasterize_clipped as kernel

    n = 4
    z = torch.zeros(n, 2, device="cuda")
    tiles = torch.zeros(13, 19, dtype=torch.int32, device="cuda")
    none = torch.zeros(0, dtype=torch.int32, device="cuda")
    color, trans = kernel(z, torch.ones(n, 3, device="cuda"), torch.ones(n, 3, device="cuda"),
                          torch.ones(n, device="cuda"), torch.ones(n, device="cuda"),
                          torch.zeros(1, 2, 3, device="cuda"), torch.ones(16, device="cuda"), 300, 200,
                          tiles, none, none, poison=True)
    assert torch.equal(color, torch.zeros_like(color)) and torch.equal(trans, torch.ones_like(trans))


def test_unclipped_kernel_matches_gsplat(ext):
    """Box -1 everywhere and gsplat's own (tile, depth) sort: gsplat's rasterize_to_pixels."""
    from gsplat.cuda._wrapper import isect_offset_encode, isect_tiles, rasterize_to_pixels

    from landmark_plugin.cuda import rasterize_clipped as kernel

    s = _scene(11, 0)
    tiles_x, tiles_y = (WIDTH + 15) // 16, (HEIGHT + 15) // 16
    _, isect_ids, flatten_ids = isect_tiles(s["means2d"], s["radii"], s["depths"], 16, tiles_x, tiles_y)
    offsets = isect_offset_encode(isect_ids, 1, tiles_x, tiles_y)
    colors, opac = s["p"]["colors"], s["p"]["opacities"]
    ours_c, ours_t = kernel(s["means2d"][0], s["conics"][0], colors, opac, s["depths"][0], s["boxes"], s["camera"],
                            WIDTH, HEIGHT, offsets[0], flatten_ids, torch.full_like(flatten_ids, -1), poison=True)
    theirs_c, theirs_a = rasterize_to_pixels(s["means2d"], s["conics"], colors[None], opac[None], WIDTH, HEIGHT, 16,
                                             offsets, flatten_ids)
    _bounded_flips(ours_c, theirs_c[0], "colour")
    _bounded_flips(1.0 - ours_t, theirs_a[0], "alpha")


def _bounded_flips(a, b, name, scale=1.0):
    """Nearly every pixel within 1e-4; the rare alpha_min / termination flips bounded."""
    err = ((a - b).abs() / scale).amax(dim=-1).flatten()
    q = float(torch.quantile(err, 0.999))
    print(f"{name}: 99.9% quantile {q:.2e}, max {float(err.max()):.2e}")
    assert q <= 1e-4, f"{name}: 99.9% quantile {q:.2e}"
    assert float(err.max()) <= 0.1, f"{name}: max {float(err.max()):.2e}"


@pytest.mark.parametrize("depth, mode", [(2, "classic"), (4, "classic"), (2, "antialiased")])
def test_one_pass_clip_render_equals_unpartitioned_gsplat(ext, depth, mode):
    """The clip-mode partial over all leaves (sharing, clipping, one pass, early termination
    on) against gsplat.rasterization of all Gaussians: forward and parameter gradients, in
    gsplat's classic and antialiased modes."""
    import dataclasses

    from gsplat.rendering import rasterization

    from landmark_plugin.core.render import Gaussians
    from landmark_plugin.core.render_clip import ClipLeaves, render_partial_clipped

    s = _scene(20 + depth, depth, n=8000, eye=(1.2, -0.9, 0.35))  # low, partly inside: oblique rays
    s["settings"] = dataclasses.replace(s["settings"], rasterize_mode=mode)
    p = s["p"]
    names = ["means", "quats", "scales", "opacities", "colors"]
    g = torch.Generator(device="cuda").manual_seed(depth)
    cot_c = torch.randn(HEIGHT, WIDTH, 3, device="cuda", generator=g)
    cot_t = torch.randn(HEIGHT, WIDTH, 1, device="cuda", generator=g)
    results = {}
    for who in ("clip", "gsplat"):
        leaves = {k: p[k].clone().requires_grad_(True) for k in names}
        if who == "clip":
            gs = Gaussians(leaves["means"], leaves["quats"], leaves["scales"], leaves["opacities"],
                           leaves["colors"][:, None, :])
            part = render_partial_clipped(gs, ClipLeaves(s["boxes"], s["position"]), s["viewmat"], s["K"],
                                          WIDTH, HEIGHT, None, s["settings"], backend="gsplat")
            color, trans = part.color, part.transmittance
        else:
            color, alpha, _ = rasterization(leaves["means"], leaves["quats"], leaves["scales"], leaves["opacities"],
                                            leaves["colors"], s["viewmat"][None], s["K"][None], WIDTH, HEIGHT,
                                            packed=False, rasterize_mode=mode)
            color, trans = color[0], 1.0 - alpha[0]
        loss = (color * cot_c).sum() + (trans * cot_t).sum()
        results[who] = (color.detach(), trans.detach(), torch.autograd.grad(loss, [leaves[k] for k in names]))
    (cc, ct, cg), (gc, gt, gg) = results["clip"], results["gsplat"]
    _bounded_flips(cc, gc, "colour")
    _bounded_flips(ct, gt, "transmittance")
    for name, a, b in zip(names, cg, gg):
        rel = float((a - b).norm() / b.norm().clamp_min(1e-12))
        print(f"grad {name}: relative L2 difference {rel:.2e}")
        assert rel <= GRAD_REL, f"gradient of {name} differs by {rel:.2e} (relative L2)"


@pytest.mark.parametrize("num_positions", [1, 3, 16])
def test_leaf_sort_kernel_equals_torch_twin(ext, num_positions: int) -> None:
    """The radix sort by (tile, leaf position, depth) equals the twin's stable int64 sort,
    entry for entry, including ties (equal depths) and empty tiles; with one leaf position it
    equals gsplat's own sorted order."""
    from gsplat.cuda._wrapper import isect_offset_encode, isect_tiles

    from landmark_plugin import cuda
    from landmark_plugin.core.render import _sort_by_tile_leaf_depth_torch

    gen = torch.Generator().manual_seed(num_positions)
    n, tiles_x, tiles_y = 5000, 19, 13
    means2d = (torch.rand(1, n, 2, generator=gen) * torch.tensor([tiles_x * 16.0, tiles_y * 16.0])).cuda()
    radii = torch.randint(0, 40, (1, n), generator=gen, dtype=torch.int32).cuda()
    # a few hundred equal depths make ties that only a stable sort orders reproducibly
    depths = torch.rand(1, n, generator=gen).cuda() * 10 + 0.1
    depths[0, ::17] = 3.0
    _, ids, flat = isect_tiles(means2d, radii, depths, 16, tiles_x, tiles_y, sort=False)
    position = torch.randint(0, num_positions, (n,), generator=gen).cuda()
    got_offsets, got_flat = cuda.sort_tile_leaf_depth(ids, flat, position, num_positions, tiles_x * tiles_y)
    want_offsets, want_flat = _sort_by_tile_leaf_depth_torch(ids, flat, position, num_positions, tiles_x * tiles_y)
    assert ids.numel() > 10000
    assert torch.equal(got_offsets, want_offsets)
    assert torch.equal(got_flat.long(), want_flat.long())
    if num_positions == 1:
        _, sorted_ids, sorted_flat = isect_tiles(means2d, radii, depths, 16, tiles_x, tiles_y, sort=True)
        gsplat_offsets = isect_offset_encode(sorted_ids, 1, tiles_x, tiles_y).flatten()
        assert torch.equal(got_offsets, gsplat_offsets.to(torch.int32))
        assert torch.equal(got_flat.long(), sorted_flat.long())


def test_leaf_sort_kernel_without_intersections(ext) -> None:
    from landmark_plugin import cuda

    empty = torch.zeros(0, dtype=torch.int64, device="cuda")
    offsets, flat = cuda.sort_tile_leaf_depth(empty, empty.int(), torch.zeros(4, dtype=torch.int32, device="cuda"), 4, 6)
    assert offsets.tolist() == [0] * 6 and flat.numel() == 0


@pytest.mark.parametrize("depth, eye", [(0, (2.2, -2.0, 1.1)), (2, (2.2, -2.0, 1.1)), (4, (0.3, -3.0, 0.05)),
                                        (3, (2.5, 0.2, 2.4))])
def test_sharing_kernel_equals_twin(ext, depth: int, eye) -> None:
    """The csrc/ sharing kernel hands out exactly the twin's copies (same float64 steps in the
    same order), oblique and grazing cameras included."""
    s = _scene(seed=11 + depth, depth=depth, eye=eye)
    proj = Projection(s["means2d"][0], s["conics"][0], s["depths"][0], s["radii"][0])
    args = (proj, s["p"]["opacities"], s["camera"], s["boxes"], WIDTH, HEIGHT, s["settings"])
    kernel = sharing_copies(*args)
    twin = sharing_copies(*args, use_kernel=False)
    assert kernel.gaussian.numel() > 1000
    if depth > 0:
        assert (twin.box >= 0).any(), "the scene should share some Gaussians across leaves"
    for got, want in zip(kernel, twin):
        assert torch.equal(got, want)


@pytest.mark.parametrize("depth, eye", [(0, (2.2, -2.0, 1.1)), (2, (2.2, -2.0, 1.1)), (4, (0.3, -3.0, 0.05)),
                                        (3, (2.5, 0.2, 2.4)), (6, (2.2, -2.0, 1.1))])
def test_clip_intersections_op_equals_twin(ext, depth: int, eye) -> None:
    """The one-op sharing + binning + sort gives the twin's entries in the twin's order
    (offsets, Gaussian and box of every entry); with one leaf, gsplat's own sorted entries.
    Depth 6 (64 leaves) takes the op's path without per-Gaussian leaf masks."""
    from gsplat.cuda._wrapper import isect_offset_encode, isect_tiles

    from landmark_plugin.core.render_clip import ClipLeaves, _clip_intersections_torch, clip_intersections

    s = _scene(seed=31 + depth, depth=depth, eye=eye)
    proj = Projection(s["means2d"][0], s["conics"][0], s["depths"][0], s["radii"][0])
    args = (proj, s["p"]["opacities"], s["camera"], ClipLeaves(s["boxes"], s["position"]), WIDTH, HEIGHT,
            s["settings"])
    got = clip_intersections(*args)
    want = _clip_intersections_torch(*args)
    assert got[1].numel() > 10_000
    if depth > 0:
        assert int((want[2] >= 0).sum()) > 100, "the scene should share some Gaussians across leaves"
    for name, a, b in zip(("offsets", "flatten_ids", "isect_boxes"), got, want):
        assert a.dtype == torch.int32 and a.shape == b.shape, name
        assert torch.equal(a, b), f"{name} differ at {int((a != b).sum())} places"
    if depth == 0:
        tiles_x, tiles_y = (WIDTH + 15) // 16, (HEIGHT + 15) // 16
        _, ids, flat = isect_tiles(s["means2d"], s["radii"], s["depths"], 16, tiles_x, tiles_y, sort=True)
        assert torch.equal(got[0], isect_offset_encode(ids, 1, tiles_x, tiles_y)[0].to(torch.int32))
        assert torch.equal(got[1], flat.to(torch.int32))
        assert bool((got[2] == -1).all())
