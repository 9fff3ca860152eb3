"""Gaussians of a synthetic city, made directly on the device they will train on (scale runs).

Two sets, both from points sampled on the city's surfaces (``city_render.sample_points``):
- *anchors*: a modest number of surface points with their exact colours; rendered as small
  opaque Gaussians they give a ground-truth image of the city on the GPU (``anchor_gaussians``);
- a model of any size (``scatter_gaussians``): Gaussians scattered around random anchors with
  perturbed colours, in splatfacto's parameterisation, drawn in fixed chunks from a seeded
  generator on the target device.  Every chunk is drawn the same way whatever ``keep``
  selects, so ranks that each keep their own region's rows hold, together, exactly the set one
  process would make: no process ever materialises the whole model (hundreds of millions of
  Gaussians do not fit in host memory once per rank).
"""

from __future__ import annotations

import math
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from typing import Callable, Dict, Optional, Tuple

import numpy as np
import torch
from jaxtyping import Bool, Float, UInt8
from torch import Tensor

from landmark_plugin.core.render import Gaussians
from landmark_plugin.core.sh import num_sh_bases, rgb_to_sh_dc
from landmark_plugin.data.city_render import CityLayout, sample_points

CHUNK = 1 << 23
"""Rows drawn per chunk: bounds the temporaries of one draw (about 0.5 GB at 8M rows)."""


def _sample_chunk(layout: CityLayout, num: int, seed: int, chunk: int) -> Tuple[np.ndarray, np.ndarray]:
    return sample_points(layout, num, np.random.default_rng([seed, chunk]))


def surface_samples(
    layout: CityLayout, num: int, seed: int = 0, workers: int = 1, per_chunk: int = 100_000
) -> Tuple[Float[np.ndarray, "M 3"], UInt8[np.ndarray, "M 3"]]:
    """``num`` points on the city's surfaces with their colours, in chunks of ``per_chunk``
    (each its own random stream) on ``workers`` processes; deterministic for any ``workers``.

    ``sample_points`` is numpy and single threaded, and its ground sampling is quadratic in
    memory per call (points x buildings), hence chunks.
    """
    sizes = [min(per_chunk, num - start) for start in range(0, num, per_chunk)]
    if workers <= 1 or len(sizes) <= 1:
        parts = [_sample_chunk(layout, n, seed, k) for k, n in enumerate(sizes)]
    else:
        # spawn: the caller may hold threads or a CUDA context, which forked workers must not inherit
        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            parts = list(pool.map(_sample_chunk, [layout] * len(sizes), sizes, [seed] * len(sizes), range(len(sizes))))
    if not parts:
        return np.zeros((0, 3), np.float32), np.zeros((0, 3), np.uint8)
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def anchor_gaussians(
    xyz: Float[Tensor, "M 3"], rgb: Float[Tensor, "M 3"], spacing: float, opacity: float = 0.95
) -> Gaussians:
    """The anchors as activated, isotropic Gaussians of plain colour (sh holds [M, 1, 3] colours,
    render with ``sh_degree=None``): a ground-truth render of the city."""
    num = xyz.shape[0]
    quats = torch.zeros(num, 4, device=xyz.device)
    quats[:, 0] = 1.0
    return Gaussians(
        means=xyz,
        quats=quats,
        scales=torch.full((num, 3), 0.6 * spacing, device=xyz.device),
        opacities=torch.full((num,), opacity, device=xyz.device),
        sh=rgb[:, None, :],
    )


def _draw(anchors: Tensor, spacing: float, seed: int, chunk: int, rows: int) -> Tuple[torch.Generator, Tensor, Tensor]:
    """The first draws of one chunk: anchor ids and means (all ``keep`` needs to decide)."""
    device = anchors.device
    g = torch.Generator(device=device).manual_seed(seed * 1_000_003 + chunk)
    src = torch.randint(anchors.shape[0], (rows,), generator=g, device=device)
    means = anchors[src] + torch.randn(rows, 3, generator=g, device=device) * (spacing / 2)
    return g, src, means


def scatter_gaussians(
    anchors: Float[Tensor, "M 3"],
    colors: Float[Tensor, "M 3"],
    count: int,
    spacing: float,
    sh_degree: int,
    keep: Optional[Callable[[Tensor], Bool[Tensor, " n"]]] = None,
    seed: int = 0,
    chunk: int = CHUNK,
) -> Dict[str, Tensor]:
    """``count`` Gaussians around random anchors, or the rows of them that ``keep`` selects.

    Each Gaussian sits within about ``spacing`` of its anchor (normal jitter of
    ``spacing / 2`` per axis) with the anchor's colour plus noise (so there is something to
    learn), a random rotation, isotropic log-scale ``log(spacing)`` plus noise and opacity 0.5.

    Args:
        anchors, colors: [M, 3] surface points and their RGB in [0, 1], on the target device.
        spacing: the model's point spacing, about ``sqrt(surface area / count)``.
        sh_degree: 0 stores logit colours (splatfacto's convention), else SH coefficients
            with the higher bands zero.
        keep: [n, 3] means -> [n] mask of the rows to keep (a rank's region); None keeps all.
        seed: the same seed gives the same ``count`` Gaussians on any device of the same kind.

    Returns:
        splatfacto's ``gauss_params`` tensors (means [K, 3], scales [K, 3] log, quats [K, 4],
        features_dc [K, 3], features_rest [K, B - 1, 3], opacities [K, 1] logit), K kept.
    """
    device = anchors.device
    sizes = [min(chunk, count - start) for start in range(0, count, chunk)]
    # Pass 1: how many rows each chunk keeps, so the outputs are allocated once at their size
    # (concatenating chunks would need twice the memory at the largest counts).
    kept = []
    for k, rows in enumerate(sizes):
        _, _, means = _draw(anchors, spacing, seed, k, rows)
        kept.append(rows if keep is None else int(keep(means).sum()))
        del means
    total = sum(kept)
    bases = num_sh_bases(sh_degree) if sh_degree > 0 else 1
    out = {
        "means": torch.empty(total, 3, device=device),
        "scales": torch.empty(total, 3, device=device),
        "quats": torch.empty(total, 4, device=device),
        "features_dc": torch.empty(total, 3, device=device),
        "features_rest": torch.zeros(total, bases - 1, 3, device=device),
        "opacities": torch.full((total, 1), 0.0, device=device),  # logit(0.5)
    }
    row = 0
    for k, rows in enumerate(sizes):
        g, src, means = _draw(anchors, spacing, seed, k, rows)
        rgb = (colors[src] + 0.1 * torch.randn(rows, 3, generator=g, device=device)).clamp(0.02, 0.98)
        quats = torch.nn.functional.normalize(torch.randn(rows, 4, generator=g, device=device), dim=-1)
        scales = math.log(spacing) + 0.2 * torch.randn(rows, 1, generator=g, device=device)
        if keep is not None:
            mask = keep(means)
            means, rgb, quats, scales = means[mask], rgb[mask], quats[mask], scales[mask]
        n = means.shape[0]
        out["means"][row : row + n] = means
        out["quats"][row : row + n] = quats
        out["scales"][row : row + n] = scales.expand(n, 3)
        out["features_dc"][row : row + n] = rgb_to_sh_dc(rgb) if sh_degree > 0 else torch.logit(rgb)
        row += n
    assert row == total, f"chunks kept {row} rows on the second pass, {total} on the first"
    return out
