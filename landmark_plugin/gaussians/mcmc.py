"""MCMC densification for retina-gs (``--pipeline.model.strategy.kind mcmc``), on every world size.

gsplat's ``MCMCStrategy`` (3DGS-MCMC) in retina-gs's terms: the Gaussian count grows by 5 % per
refinement up to ``cap_max``; at every refinement Gaussians whose opacity fell to
``min_opacity`` or below move onto live ones and new ones are added, both drawn in proportion
to opacity and given the relocation rule's opacity and scale (``core/mcmc.py``); every step
the means of nearly transparent Gaussians get noise shaped by their covariance; the loss gains
the opacity and scale regularisers MCMC relies on.

On several ranks each rank draws among its own Gaussians (their opacities are there; a draw
over all ranks would send every Gaussian's opacity to every rank at each refinement), so
the Gaussians a run moves and adds, and the noise, depend on the world size, while the count
does not: the global 5 % (and the cap) are split over ranks in proportion to their counts,
largest remainders first.  Copies sit where their source is, so they stay on its rank.

Edits go through the shard's row matrix (``rows.gaussian_rows``), so parameters, Adam moments
and strategy statistics move together.  Unlike gsplat, a relocated slot starts with zero Adam
moments instead of the dead Gaussian's.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from landmark_plugin.core.mcmc import relocation
from landmark_plugin.core.projection import quat_scale_to_covar
from landmark_plugin.distributed.collectives import all_gather_objects
from landmark_plugin.gaussians.rows import MOMENTS, Layout, gaussian_rows, layout_columns, set_gaussian_rows_


def refines_at(step: int, model_config) -> bool:
    """gsplat's schedule on splatfacto's fields: after warmup_length, before stop_split_at."""
    return model_config.warmup_length < step < model_config.stop_split_at and step % model_config.refine_every == 0


def regularisation(model, global_count: Tensor) -> Tensor:
    """MCMC's opacity and scale regularisers: means over every Gaussian of every rank (this
    rank's sum over the global count, so the ranks' gradients together are one process's)."""
    policy = model.config.strategy
    opacity = torch.sigmoid(model.opacities).sum() / global_count
    scale = torch.exp(model.scales).sum() / (3.0 * global_count)
    return policy.opacity_reg * opacity + policy.scale_reg * scale


def mcmc_step_(model, optimizers: Optional[Dict], step: int) -> Tuple[int, int]:
    """Relocate and add at refinement steps, then move the means by noise; (moved, added)."""
    moved = added = 0
    if refines_at(step, model.config):
        moved, added = _relocate_and_add_(model, optimizers, step)
    lr = optimizers["means"].param_groups[0]["lr"] if optimizers and "means" in optimizers else 0.0
    _inject_noise_(model, step, lr * model.config.strategy.noise_lr)
    return moved, added


def _generator(model, step: int) -> torch.Generator:
    """This rank's draws at ``step``: seeded by (seed, step, rank), so a run repeats exactly."""
    comm = model.frame.comm
    generator = torch.Generator(device=model.device)
    generator.manual_seed(model.config.strategy.seed * 1_000_003 + step * 1_009 + comm.rank)
    return generator


def _shares(counts: List[int], total_new: int) -> List[int]:
    """``total_new`` split over ranks in proportion to ``counts``, largest remainders first."""
    whole = sum(counts)
    if whole == 0:
        return [0] * len(counts)
    exact = [total_new * c / whole for c in counts]
    shares = [int(e) for e in exact]
    by_remainder = sorted(range(len(counts)), key=lambda r: (-(exact[r] - shares[r]), r))
    for r in by_remainder[: total_new - sum(shares)]:
        shares[r] += 1
    return shares


@torch.no_grad()
def _relocate_and_add_(model, optimizers: Optional[Dict], step: int) -> Tuple[int, int]:
    policy = model.config.strategy
    comm = model.frame.comm
    generator = _generator(model, step)
    rows, layout = gaussian_rows(model, optimizers, model.strategy_state)
    opacity = _opacity(model).reshape(-1)
    alive = opacity > policy.min_opacity
    moved = int((~alive).sum()) if bool(alive.any()) else 0  # nothing to move onto: keep them
    if moved:
        sources = _draw(torch.where(alive, opacity, 0.0), moved, generator)
        rows = _with_copies(rows, layout, sources, keep=alive, min_opacity=policy.min_opacity)
    counts = [int(c) for c in all_gather_objects(comm, rows.shape[0], "MCMC counts")]
    total = sum(counts)
    target = min(policy.cap_max, int(1.05 * total))
    added = _shares(counts, max(0, target - total))[comm.rank]
    if added:
        weights = torch.sigmoid(rows[:, layout_columns(layout)[("opacities", "param")]].reshape(-1))
        sources = _draw(weights, added, generator)
        rows = _with_copies(rows, layout, sources, keep=None, min_opacity=policy.min_opacity)
    set_gaussian_rows_(model, optimizers, model.strategy_state, rows, layout)
    model.refresh_ownership()
    return moved, added


def _draw(weights: Tensor, n: int, generator: torch.Generator) -> Tensor:
    """``n`` rows drawn with replacement in proportion to ``weights`` (inverse CDF: no limit on
    the row count, where ``torch.multinomial`` takes at most 2**24 categories)."""
    cdf = torch.cumsum(weights.to(torch.float64), 0)
    u = torch.rand(n, generator=generator, device=weights.device, dtype=torch.float64) * cdf[-1]
    return torch.searchsorted(cdf, u, right=True).clamp(max=weights.shape[0] - 1)


def _opacity(model) -> Tensor:
    return torch.sigmoid(model.opacities.detach())


def _with_copies(rows: Tensor, layout: Layout, sources: Tensor, keep: Optional[Tensor], min_opacity: float) -> Tensor:
    """Rows ``keep`` (all if None) plus one copy per entry of ``sources``: every sampled Gaussian
    and its copies get the relocation rule's opacity and scale, and start with zero moments."""
    picked, hits = torch.unique(sources, return_counts=True)
    columns = layout_columns(layout)
    opacity_cols, scale_cols = columns[("opacities", "param")], columns[("scales", "param")]
    opacity = torch.sigmoid(rows[picked, opacity_cols].reshape(-1))
    new_opacity, new_scale = relocation(opacity, torch.exp(rows[picked, scale_cols]), hits + 1)
    eps = torch.finfo(torch.float32).eps
    rows = rows.clone()
    rows[picked, opacity_cols] = torch.logit(new_opacity.clamp(min_opacity, 1.0 - eps))[:, None].to(rows)
    rows[picked, scale_cols] = torch.log(new_scale).to(rows)
    for (_, kind), cols in columns.items():
        if kind in MOMENTS or kind == "stat":  # Adam moments and strategy statistics start at zero
            rows[picked, cols] = 0.0
    copies = rows[torch.repeat_interleave(picked, hits)]
    kept = rows if keep is None else rows[keep]
    return torch.cat([kept, copies])


@torch.no_grad()
def _inject_noise_(model, step: int, scale: float) -> None:
    """gsplat's position noise: normals shaped by each covariance, strong only where the
    opacity is near zero (a sigmoid of 1 - opacity at 0.995, slope 100)."""
    if scale == 0.0 or model.num_points == 0:
        return
    opacity = _opacity(model).reshape(-1)
    covars = quat_scale_to_covar(model.quats.detach(), torch.exp(model.scales.detach()))
    normals = torch.randn(model.means.shape, generator=_generator(model, step + 7_919), device=model.device,
                          dtype=model.means.dtype)
    gate = torch.sigmoid(100.0 * ((1.0 - opacity) - 0.995))
    noise = torch.einsum("bij,bj->bi", covars, normals * gate[:, None] * scale)
    model.means.add_(noise)
