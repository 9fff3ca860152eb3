"""gsplat's densification statistic on the torch rasteriser: ``means2d.absgrad`` is, per Gaussian,
the sum over pixels of the absolute value of each pixel's gradient with respect to its screen
mean (splatfacto's threshold is set for it), so the torch backend densifies as gsplat does.
Checked against the definition itself, one pixel's backward at a time (float64), for plain and
box-clipped renders, in one band and in several (recomputed in backward)."""

from __future__ import annotations

import functools

import pytest
import torch

from landmark_plugin.core.clip import unbounded_leaf_boxes
from landmark_plugin.core.order import camera_leaf_order, order_positions
from landmark_plugin.core.partition import assign_leaves, build_kdtree
from landmark_plugin.core.projection import RasterSettings
from landmark_plugin.core.render import Gaussians, render_partial
from landmark_plugin.core.render_clip import ClipLeaves, render_partial_clipped
from landmark_plugin.core.sh import camera_center

from test_raster_ref import intrinsics, look_at, random_gaussians

WIDTH, HEIGHT = 20, 15


def _render(mode: str, settings: RasterSettings, seed: int = 3):
    params = {k: v.requires_grad_() for k, v in random_gaussians(60, seed, scale_range=(0.05, 0.3), opacity_range=(0.2, 0.9)).items()}
    gaussians = Gaussians(params["means"], params["quats"], params["scales"], params["opacities"], params["colors"][:, None])
    tree = build_kdtree(params["means"].detach(), 2)
    viewmat, K = look_at([1.6, -1.9, 1.0], [0.0, 0.0, 0.0]), intrinsics(WIDTH, HEIGHT, fov_deg=70.0)
    positions = order_positions(camera_leaf_order(tree, camera_center(viewmat)))
    if mode == "clip":
        leaves = ClipLeaves(unbounded_leaf_boxes(tree), positions)
        return render_partial_clipped(gaussians, leaves, viewmat, K, WIDTH, HEIGHT, None, settings, backend="torch",
                                      absgrad=True)
    leaf = assign_leaves(tree, params["means"].detach())
    return render_partial(gaussians, positions[leaf], viewmat, K, WIDTH, HEIGHT, None, settings, backend="torch",
                          absgrad=True)


COTANGENTS = torch.Generator().manual_seed(11)
COT_C = torch.randn(HEIGHT, WIDTH, 3, generator=COTANGENTS, dtype=torch.float64)
COT_T = torch.randn(HEIGHT, WIDTH, 1, generator=COTANGENTS, dtype=torch.float64)


@functools.lru_cache(maxsize=None)
def _definition(mode: str) -> torch.Tensor:
    """[N, 2] the sum over pixels of |d (pixel's loss) / d mean2d|, one pixel's backward at a time
    (one band: recomputing bands per pixel would cost minutes); these backwards also fill the
    buffer, which must then hold the same."""
    partial = _render(mode, RasterSettings())
    want = torch.zeros_like(partial.means2d[0])
    for y in range(HEIGHT):
        for x in range(WIDTH):
            pixel = (partial.color[y, x] * COT_C[y, x]).sum() + (partial.transmittance[y, x] * COT_T[y, x]).sum()
            (grad,) = torch.autograd.grad(pixel, partial.means2d, retain_graph=True)
            want += grad[0].abs()
    assert torch.allclose(partial.means2d.absgrad[0], want, rtol=1e-9, atol=1e-12)
    return want


@pytest.mark.parametrize("mode", ["plain", "clip"])
@pytest.mark.parametrize("bands", ["one", "several"])
def test_absgrad_is_the_sum_of_each_pixels_absolute_gradient(mode, bands):
    want = _definition(mode)
    partial = _render(mode, RasterSettings(max_candidates=2**20 if bands == "one" else 300))
    means2d = partial.means2d
    means2d.retain_grad()
    ((partial.color * COT_C).sum() + (partial.transmittance * COT_T).sum()).backward()
    got = means2d.absgrad[0]
    assert float(want.abs().sum()) > 1.0 and int((want.sum(1) > 0).sum()) > 20, "the scene must draw Gaussians"
    assert torch.allclose(got, want, rtol=1e-9, atol=1e-12), f"absgrad off by {float((got - want).abs().max()):.3g}"
    plain = means2d.grad[0]
    assert bool((got >= plain.abs() - 1e-12).all()) and float((got - plain.abs()).sum()) > 1e-3, \
        "|sum| <= sum |.|, strictly where pixels pull a mean opposite ways"


def test_no_absgrad_buffer_without_gradients():
    with torch.no_grad():
        partial = _render("plain", RasterSettings())
    assert getattr(partial.means2d, "absgrad", None) is None
