"""data/city_gaussians.py: surface samples and scattered model Gaussians of a synthetic city."""

from __future__ import annotations

import math

import numpy as np
import torch

from landmark_plugin.core.partition import assign_leaves, build_kdtree
from landmark_plugin.core.sh import rgb_to_sh_dc
from landmark_plugin.data.city import CityConfig, make_layout
from landmark_plugin.data.city_gaussians import anchor_gaussians, scatter_gaussians, surface_samples
from landmark_plugin.data.city_render import surface_area


def _anchors(num: int = 2000):
    layout = make_layout(CityConfig(blocks=(2, 2)))
    xyz, rgb = surface_samples(layout, num, seed=3, per_chunk=700)
    return layout, torch.from_numpy(xyz), torch.from_numpy(rgb).float() / 255


def test_surface_samples_are_chunked_deterministically():
    layout = make_layout(CityConfig(blocks=(2, 2)))
    xyz, rgb = surface_samples(layout, 1500, seed=3, per_chunk=700)
    again, _ = surface_samples(layout, 1500, seed=3, per_chunk=700)
    assert xyz.shape == (1500, 3) and rgb.shape == (1500, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(xyz, again)
    assert not np.array_equal(xyz[:700], xyz[700:1400]), "every chunk has its own stream"
    inside = (xyz[:, :2] >= layout.ground_min - 1e-6) & (xyz[:, :2] <= layout.ground_max + 1e-6)
    assert inside.all() and (xyz[:, 2] >= 0).all()
    assert 0 < surface_area(layout) < math.inf


def test_ranks_keep_disjoint_parts_of_the_one_process_set():
    _, anchors, colors = _anchors()
    count, spacing = 5000, 0.01
    whole = scatter_gaussians(anchors, colors, count, spacing, sh_degree=3, seed=5, chunk=1024)
    assert whole["means"].shape == (count, 3) and whole["features_rest"].shape == (count, 15, 3)
    tree = build_kdtree(whole["means"], 2, axis_rule="xy")
    left = lambda means: assign_leaves(tree, means) < 2  # noqa: E731  (two "ranks": leaves 0-1, 2-3)
    ranks = [scatter_gaussians(anchors, colors, count, spacing, 3, keep=k, seed=5, chunk=1024)
             for k in (left, lambda means: ~left(means))]
    assert 0 < ranks[0]["means"].shape[0] < count
    for name, value in whole.items():
        mask = left(whole["means"])
        torch.testing.assert_close(ranks[0][name], value[mask], rtol=0, atol=0)
        torch.testing.assert_close(ranks[1][name], value[~mask], rtol=0, atol=0)
    # parameters as splatfacto stores them: log scales, logit opacity 0.5, SH colours near the anchors'
    assert torch.allclose(whole["opacities"], torch.zeros(count, 1))
    assert abs(float(whole["scales"].mean()) - math.log(spacing)) < 0.05
    rgb = whole["features_dc"] * 0.2820947917738781 + 0.5  # the DC colour, inverse of rgb_to_sh_dc
    torch.testing.assert_close(rgb_to_sh_dc(rgb), whole["features_dc"])
    assert float((rgb.mean(0) - colors.mean(0)).abs().max()) < 0.03, "colours drawn around the anchors'"
    other = scatter_gaussians(anchors, colors, count, spacing, 3, seed=6, chunk=1024)
    assert not torch.equal(other["means"], whole["means"]), "the seed matters"


def test_anchor_gaussians_render_plain_colours():
    _, anchors, colors = _anchors(300)
    g = anchor_gaussians(anchors, colors, spacing=0.02)
    assert g.sh.shape == (300, 1, 3) and torch.equal(g.sh[:, 0], colors)
    assert torch.all(g.scales == 0.012) and torch.all(g.opacities == 0.95)
