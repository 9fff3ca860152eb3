"""Empty-space skipping for landmark-grid (``--pipeline.model.sampler occupancy``).

An occupancy grid over the scene box (one grid covering all blocks) holds which cells may contain
density.  Its state and its training-time update are nerfacc's ``OccGridEstimator`` (as in
nerfstudio's instant-ngp: every n steps, density x step size at a random point of each cell, an
EMA max, thresholded at ``occ_thre``).  Rays are marched here in torch with a uniform step between
the box entry and exit: only samples whose midpoint lies in an occupied cell are kept, then (as
nerfacc's ``sampling`` with a ``sigma_fn``) their density is evaluated without gradient and the
samples behind transmittance < ``early_stop_eps`` are dropped before the field's full forward.

The march is torch (not nerfacc's CUDA ``traverse_grids``) so that the same code runs on the CPU,
and so that layout edits are honoured: a sample is looked up where the field reads it (the edited
position), and removed boxes are skipped.  Every rank of a model-parallel group marches the same
rays through the same grid (the update draws its points from a seed of the step alone, and the
field's joined densities are equal on every rank), so the field's collective forward sees the
same samples everywhere.

A checkpoint without a grid (trained with the proposal sampler) loads too: the grid is rebuilt from
the field's density (largest density over a lattice of points per cell) before the first render.

Each ray always keeps the last sample of its march: ``background_color='last_sample'`` reads the
colour there, as the proposal sampler's last sample near the box exit.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import nerfacc
import torch
from jaxtyping import Bool, Float
from torch import Tensor, nn

from nerfstudio.cameras.rays import Frustums, RayBundle, RaySamples
from nerfstudio.field_components.field_heads import FieldHeadNames
from nerfstudio.model_components.losses import scale_gradients_by_distance_squared

from landmark_plugin.grid.parallel import same_randomness, step_seed

OCCUPANCY_STREAM = 1 << 21
"""Seed stream of the occupancy updates (apart from the training and eval streams)."""


@dataclass
class OccupancyConfig:
    """Occupancy grid and march of ``--pipeline.model.sampler occupancy``."""

    cells: int = 128
    """Occupancy cells along the scene box's longest axis (the other axes in proportion)."""
    march_samples: int = 1024
    """Uniform march steps along the box diagonal: the step is the diagonal divided by this."""
    occ_thre: float = 0.01
    """A cell is occupied when density x step (EMA max) exceeds min(this, the grid's mean)."""
    update_every: int = 16
    """Update the grid from the field's density every n training steps."""
    warmup_steps: int = 256
    """Until this step every cell is re-evaluated; afterwards a quarter of random and occupied cells."""
    ema_decay: float = 0.95
    """Decay of a cell's occupancy between updates."""
    early_stop_eps: float = 1e-4
    """Drop samples behind which the transmittance falls below this (early ray termination)."""
    alpha_thre: float = 0.0
    """Also drop samples whose opacity is below this (0: off; skipping is then exact up to the grid)."""


class GridOccupancy(nn.Module):
    """nerfacc's OccGridEstimator over the scene box, plus the torch march through it.

    Args:
        config: occupancy configuration.
        aabb: [2, 3] scene box.
    """

    def __init__(self, config: OccupancyConfig, aabb: Float[Tensor, "2 3"]) -> None:
        super().__init__()
        self.config = config
        extent = (aabb[1] - aabb[0]).float()
        resolution = [max(1, round(config.cells * float(e) / float(extent.max()))) for e in extent]
        self.estimator = nerfacc.OccGridEstimator(roi_aabb=aabb.flatten().float(), resolution=resolution, levels=1)
        # a fresh grid marches densely until its first update (nerfacc starts all-empty)
        self.estimator.binaries.fill_(True)
        self.step_size = float(extent.norm()) / config.march_samples
        self.stale = False
        """True after loading a checkpoint without occupancy state (trained with the proposal
        sampler): the first render rebuilds the grid from the field's density."""

    def adopt_missing_state(self, state_dict: Dict, prefix: str) -> None:
        """Called with a model state that lacks this grid (a proposal-sampler checkpoint): put the
        fresh buffers in (``state_dict`` is load_state_dict's own copy, so a strict load works)
        and rebuild the grid from the field's density before the first render."""
        names = {prefix + "estimator." + name: buf for name, buf in self.estimator.named_buffers()
                 if name in ("resolution", "aabbs", "occs", "binaries")}  # fmt: skip
        if not any(name in state_dict for name in names):
            state_dict.update(names)
            self.stale = True

    def rebuild_if_stale(self, density_fn: Callable[[Tensor], Tensor]) -> None:
        """Rebuild a grid loaded without state: a cell is occupied where density x step reaches occ_thre."""
        if self.stale:
            self.rebuild(density_fn, self.config.occ_thre / self.step_size)
            self.stale = False

    def update(self, step: int, density_fn: Callable[[Tensor], Tensor]) -> None:
        """nerfacc's EMA update (every ``update_every`` steps) from ``density_fn(positions)``.

        Its random points come from a seed of the step only (and the global streams are put back),
        so every rank updates identically and training's own randomness is untouched."""
        config = self.config
        self.stale = False  # training's updates take over from a grid loaded without state
        with same_randomness(step_seed(0, step, OCCUPANCY_STREAM), self.estimator.occs.device):
            self.estimator.update_every_n_steps(
                step=step,
                occ_eval_fn=lambda x: density_fn(x) * self.step_size,
                occ_thre=config.occ_thre,
                ema_decay=config.ema_decay,
                warmup_steps=config.warmup_steps,
                n=config.update_every,
            )

    @torch.no_grad()
    def rebuild(self, density_fn: Callable[[Tensor], Tensor], threshold: float, probes: int = 4, chunk: int = 1 << 16):
        """Mark every cell whose largest density over ``probes``^3 points (a lattice including its
        corners) is below ``threshold`` empty, the others occupied (e.g. after loading a model)."""
        est = self.estimator
        res = est.resolution.to(est.aabbs)
        lo, hi = est.aabbs[0, :3], est.aabbs[0, 3:]
        ticks = torch.linspace(0.0, 1.0, probes, device=res.device)
        offsets = torch.stack(torch.meshgrid(ticks, ticks, ticks, indexing="ij"), -1).reshape(-1, 3)
        peak = torch.empty(est.cells_per_lvl, device=res.device)
        coords = est.grid_coords.to(res)
        for start in range(0, est.cells_per_lvl, chunk):
            cells = coords[start : start + chunk]
            points = lo + (cells[:, None] + offsets[None]) / res * (hi - lo)
            peak[start : start + chunk] = density_fn(points.reshape(-1, 3)).reshape(len(cells), -1).amax(dim=1)
        est.occs.copy_(peak * self.step_size)
        est.binaries.copy_((peak >= threshold).view(est.binaries.shape))

    def occupied(self, points: Float[Tensor, "N 3"]) -> Bool[Tensor, " N"]:
        """Whether points lie in occupied cells (outside the box: empty, as the field is there)."""
        est = self.estimator
        lo, hi = est.aabbs[0, :3], est.aabbs[0, 3:]
        unit = (points - lo) / (hi - lo)
        inside = ((unit >= 0) & (unit <= 1)).all(dim=-1)
        res = est.resolution.to(points.device)
        index = (unit * res).floor().long().clamp(min=0).minimum(res - 1)
        return est.binaries[0, index[:, 0], index[:, 1], index[:, 2]] & inside


def _compact(mask: Bool[Tensor, "R S"]) -> Tuple[Tensor, Tensor]:
    """([R, K] column indices of each row's True entries, in order, padded; [R, K] validity).
    A scatter to each entry's rank among its row's True entries (not a sort: O(S) per row)."""
    counts = mask.sum(dim=1)
    width = int(counts.max()) if mask.shape[0] else 0
    rank = torch.where(mask, mask.cumsum(dim=1) - 1, width)  # False entries land in a spare column
    columns = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    order = torch.zeros(mask.shape[0], width + 1, dtype=torch.long, device=mask.device).scatter_(1, rank, columns)
    return order[:, :width], torch.arange(width, device=mask.device) < counts[:, None]


def _samples(bundle: RayBundle, starts: Tensor, ends: Tensor, rows: Optional[Tensor] = None) -> RaySamples:
    """RaySamples of intervals [starts, ends] (shape [*S, 1]) on the rays ``rows`` (None: [R, K] grid)."""
    pick = (lambda t: t[rows]) if rows is not None else (lambda t: t[:, None].expand(*starts.shape[:-1], -1))
    cams = bundle.camera_indices
    return RaySamples(
        frustums=Frustums(
            origins=pick(bundle.origins), directions=pick(bundle.directions),
            starts=starts, ends=ends, pixel_area=pick(bundle.pixel_area),
        ),
        camera_indices=None if cams is None else pick(cams),
        deltas=ends - starts,
    )  # fmt: skip


def march(occupancy: GridOccupancy, field, bundle: RayBundle, stratified: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """[R, S] candidate starts and ends of a uniform march from the box entry to its exit, and
    which are kept: in an occupied cell where the field reads them; the last one always."""
    step = occupancy.step_size
    nears, fars = bundle.nears.reshape(-1), bundle.fars.reshape(-1)
    if stratified:
        nears = nears + torch.rand_like(nears) * step
    counts = torch.ceil((fars - nears).clamp(min=0) / step).long().clamp(min=1)
    steps = int(counts.max()) if len(counts) else 1
    starts = nears[:, None] + step * torch.arange(steps, device=nears.device, dtype=nears.dtype)
    ends = torch.minimum(starts + step, fars[:, None])
    column = torch.arange(steps, device=nears.device)
    valid, last = column < counts[:, None], column == (counts - 1)[:, None]
    mids = bundle.origins[:, None] + bundle.directions[:, None] * ((starts + ends) / 2)[..., None]
    read, alive = field.edited_positions(mids.reshape(-1, 3))
    keep = occupancy.occupied(read).view(valid.shape)
    if alive is not None:
        keep &= alive.view(valid.shape)
    return starts, ends, (keep & valid) | last


@torch.no_grad()
def terminate_early(field, bundle, starts, ends, valid, eps: float, alpha_thre: float) -> Tensor:
    """[R, K] validity after dropping samples behind transmittance < ``eps`` (and opacity < ``alpha_thre``)."""
    rows, cols = valid.nonzero(as_tuple=True)
    density = torch.zeros(valid.shape, dtype=starts.dtype, device=starts.device)
    if len(rows):
        packed = _samples(bundle, starts[rows, cols, None], ends[rows, cols, None], rows)
        density[rows, cols] = field.get_density(packed)[0].reshape(-1).to(density)
    tau = density * (ends - starts)
    transmittance = torch.exp(-(torch.cumsum(tau, dim=1) - tau))
    keep = valid & (transmittance >= eps)
    if alpha_thre > 0:
        keep &= (1 - torch.exp(-tau)) >= alpha_thre
    return keep


def occupancy_outputs(model, bundle: RayBundle) -> Dict[str, Tensor]:
    """nerfacto's outputs (rgb, accumulation, depth, expected_depth) from the occupancy march."""
    occupancy, field, config = model.occupancy, model.field, model.config.occupancy
    if not model.training:
        occupancy.rebuild_if_stale(field.density_fn)
    with torch.no_grad():
        starts, ends, keep = march(occupancy, field, bundle, stratified=model.training)
        last = (keep.cumsum(dim=1) == keep.sum(dim=1, keepdim=True)) & keep  # each ray's final column
        body = keep & ~last
        last_start, last_end = starts[last], ends[last]
        order, valid = _compact(body)
        starts, ends = starts.gather(1, order), ends.gather(1, order)
        if config.early_stop_eps > 0 or config.alpha_thre > 0:
            order, valid = _compact(terminate_early(field, bundle, starts, ends, valid, config.early_stop_eps,
                                                    config.alpha_thre))  # fmt: skip
            starts, ends = starts.gather(1, order), ends.gather(1, order)
        fars = bundle.fars.reshape(-1, 1).to(starts)
        # padding: zero-length intervals (zero opacity) at the far end; the march's last sample last
        starts = torch.cat([torch.where(valid, starts, fars), last_start[:, None]], dim=1)
        ends = torch.cat([torch.where(valid, ends, fars), last_end[:, None]], dim=1)
        valid = torch.cat([valid, valid.new_ones(valid.shape[0], 1)], dim=1)
        rows, cols = valid.nonzero(as_tuple=True)
    packed = _samples(bundle, starts[rows, cols, None], ends[rows, cols, None], rows)
    out = field.forward(packed)
    if model.config.use_gradient_scaling:
        out = scale_gradients_by_distance_squared(out, packed)
    flat = rows * valid.shape[1] + cols
    density = out[FieldHeadNames.DENSITY].new_zeros(valid.numel(), 1).index_copy(0, flat, out[FieldHeadNames.DENSITY])
    rgb = out[FieldHeadNames.RGB].new_zeros(valid.numel(), 3).index_copy(0, flat, out[FieldHeadNames.RGB])
    grid = _samples(bundle, starts[..., None], ends[..., None])
    weights = grid.get_weights(density.view(*valid.shape, 1))
    outputs = {
        "rgb": model.renderer_rgb(rgb=rgb.view(*valid.shape, 3), weights=weights),
        "accumulation": model.renderer_accumulation(weights=weights),
        "expected_depth": model.renderer_expected_depth(weights=weights, ray_samples=grid),
        "num_samples_per_ray": valid.sum(dim=1, keepdim=True).to(weights),
    }
    with torch.no_grad():
        outputs["depth"] = model.renderer_depth(weights=weights, ray_samples=grid)
    return outputs

