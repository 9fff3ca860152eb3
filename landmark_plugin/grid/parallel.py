"""landmark-grid on several ranks: one plan for the strategies none / branch / plane / channel.

Ranks form model-parallel groups of ``model_parallel_size`` consecutive ranks (M) and
data-parallel groups across them (D = world / M).  Every rank of a model-parallel group sees the
same rays (the pipeline seeds the step's randomness by its data-parallel rank) and holds its share
of every factor set (the field's density and appearance grids and the proposal grids, which are
split the same way) as laid out by ``core.grid_parallel.GridLayout``:

- branch / plane: a rank evaluates the samples that fall in its (fine) blocks, decodes them with
  the replicated decoder, and the per-sample outputs (density, or density and colour: 1 or 4
  values) are all-gathered and put back in sample order: 4 values per sample is the least a
  join can move, and the decoder's work is split too;
- channel: a rank samples its channels of every sample (uneven where M does not divide them);
  the density sum over its channels and its appearance channels are all-gathered (``all_gather_cat`` along channels), the density
  shares summed and the channels put in the model's order, then every rank decodes every sample.

The joins' backward is local (``collectives.all_gather_cat``): every rank of the group computes
the same loss from the joined outputs, so each already holds the whole gradient of its own piece.

Gradients (``sync_gradients_``, before every optimiser step), each equal to the single-process
gradient of the mean loss over all D ray batches:
- factor shards: averaged over the data-parallel group; under branch / plane the seam texels
  whose copies live on different ranks are then tied across the model-parallel group (the
  border rows of every block are all-reduced, then ``tie_seams`` runs on them);
- replicated parameters (decoder, basis, appearance embedding, shared lines): under branch /
  plane each rank's gradient covers its own samples only, so they are summed over the world and
  divided by D; under channel (and M = 1) every rank of a group already holds the whole gradient,
  so they are averaged over the data-parallel group.

The regularisers (TV, L1) are per-rank shares (``core.grid_parallel.FactorShard``) whose sum over
the group is the model's value; ``report`` turns every logged loss and metric into the
single-process value (the gradient stays the rank's own).
"""

from __future__ import annotations

import contextlib
import random
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from landmark_plugin.core.grid_features import tie_seams
from landmark_plugin.core.grid_parallel import (
    FactorShard,
    GridLayout,
    border_index,
    channels_to_factor_major,
    check_layout,
    choose_split,
    only_axis,
    seam_dims,
    shard_factor,
)
from landmark_plugin.distributed.collectives import all_gather_cat, all_reduce_grads_, all_reduce_ints, all_reduce_sum
from landmark_plugin.distributed.groups import Comm, model_parallel_comms

Features = Callable[[Optional[Tensor], Tensor], Tuple[Tensor, Optional[Tensor]]]
Decode = Callable[[Optional[Tensor], Tensor, Optional[Tensor]], Tensor]


def parallel_sizes(model_config, world_size: int) -> Tuple[str, int]:
    """(strategy, model-parallel size M) of a landmark-grid model config on ``world_size`` ranks."""
    strategy = model_config.parallel
    size = model_config.model_parallel_size
    if size is None:
        size = 1 if strategy == "none" else world_size
    if world_size % size:
        raise ValueError(f"--pipeline.model.model-parallel-size {size} does not divide the {world_size} ranks "
                         "(data-parallel degree = ranks / model-parallel size)")
    return strategy, size


def check_parallel_config(model_config, world_size: int) -> None:
    """Checks that need no data (before anything is loaded): sizes, block and channel counts."""
    strategy, size = parallel_sizes(model_config, world_size)
    field = model_config.field
    channels = [field.density_components, field.appearance_components, model_config.proposal_components]
    check_layout(strategy, tuple(field.blocks), size, channels, shared_lines=True)
    if size > 1 and model_config.camera_optimizer.mode != "off":
        raise ValueError("the camera optimiser with model parallelism is not supported (its gradient mixes per-rank "
                         "and replicated parts); use --pipeline.model.camera-optimizer.mode off")


def factor_fields(model) -> List[nn.Module]:
    """The grid fields of a landmark-grid model: the field, then the proposal grids."""
    return [model.field, *model.proposal_networks]


def model_layout(model, strategy: str, parts: int) -> GridLayout:
    """The layout of ``model`` (full, unsharded) for ``strategy`` over ``parts`` ranks (checked)."""
    fields = factor_fields(model)
    channels = [f.planes[0].shape[-1] for field in fields for f in field.factor_sets()]
    shared = all(field.config.shared_line for field in fields)
    blocks = tuple(model.field.config.blocks)
    check_layout(strategy, blocks, parts, channels, shared_lines=shared)
    split = (1, 1)
    if strategy == "plane" and parts > 1:
        cells = [(p.shape[2] - 1, p.shape[1] - 1) for field in fields for f in field.factor_sets() for p in f.planes]
        split = choose_split(parts, blocks, cells)
    return GridLayout(strategy, blocks, parts, split)  # type: ignore[arg-type]


@contextlib.contextmanager
def same_randomness(seed: int, device: Optional[torch.device] = None) -> Iterator[None]:
    """Every random stream (python, numpy, torch, the CUDA device's) seeded with ``seed`` inside,
    and put back afterwards: ranks that pass the same seed draw the same rays and jitter."""
    devices = [device] if device is not None and torch.device(device).type == "cuda" else []
    python, numpy_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=devices):
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(python)
            np.random.set_state(numpy_state)


def step_seed(init_seed: int, step: int, stream: int) -> int:
    """Seed of one step's randomness; ``stream`` tells data-parallel groups (and eval) apart."""
    return ((init_seed * 1_000_003 + step) * 1_009 + stream) % 2**63


class GridPlan:
    """How this rank takes part in a model-parallel (and data-parallel) landmark-grid run.

    Args:
        world: all ranks.
        model_parallel: this rank's model-parallel group (M ranks).
        data_parallel: this rank's data-parallel group (D ranks).
        layout: the model-parallel layout.
    """

    def __init__(self, world: Comm, model_parallel: Comm, data_parallel: Comm, layout: GridLayout) -> None:
        self.world, self.mp, self.dp, self.layout = world, model_parallel, data_parallel, layout
        self._owner: Optional[Tensor] = None

    @classmethod
    def create(cls, world: Comm, model) -> "GridPlan":
        """The plan of a (full, identically initialised) model; collective (creates the groups)."""
        strategy, size = parallel_sizes(model.config, world.world_size)
        check_parallel_config(model.config, world.world_size)
        layout = model_layout(model, strategy, size)
        mp, dp = model_parallel_comms(world, size)
        return cls(world, mp, dp, layout)

    @property
    def rank(self) -> int:
        """This rank's position in its model-parallel group."""
        return self.mp.rank

    def describe(self) -> str:
        layout = self.layout
        split = f", sub-planes {layout.split[0]}x{layout.split[1]} per block" if layout.strategy == "plane" else ""
        return (f"landmark-grid on {self.world.world_size} ranks: {layout.strategy} parallel over {layout.parts} "
                f"(model-parallel groups) x {self.world.world_size // layout.parts} (data parallel){split}")

    # ---- sharding ------------------------------------------------------------------------------
    def replicated_lines(self, field) -> bool:
        """Whether ``field``'s lines are replicated on every rank (a shared line under branch / plane)."""
        return self.layout.shards_blocks and bool(field.config.shared_line)

    def shard_model_(self, model) -> None:
        """Keep this rank's share of every factor set of ``model`` (full, as initialised)."""
        if self.layout.parts == 1:
            return
        for field in factor_fields(model):
            for factors in field.factor_sets():
                self._shard_factors_(factors, self.replicated_lines(field))
            field.blocks = self.layout.fine_blocks
            field.plan = self

    @torch.no_grad()
    def _shard_factors_(self, factors, replicated_lines: bool) -> None:
        layout, rank = self.layout, self.rank
        factors.local_ties = not layout.shards_blocks  # channel: all blocks here, the hooks tie
        factors.blocks = layout.fine_blocks
        factors.shard = FactorShard(layout, rank, replicated_lines, factors.planes[0].shape[-1])
        for store, kind in ((factors.planes, "plane"), (factors.lines, "line")):
            if kind == "line" and replicated_lines:
                continue
            for index, old in enumerate(store):
                store[index] = nn.Parameter(shard_factor(old.detach(), kind, layout, rank))  # type: ignore[arg-type]
        for param, spatial in factors._spatial_axes():
            factors._tie(param, spatial)  # no-op unless local_ties

    def sharded_parameters(self, model) -> Tuple[List[nn.Parameter], List[nn.Parameter]]:
        """(factor shards, replicated parameters) of ``model``, in a fixed order on every rank."""
        shards: List[nn.Parameter] = []
        if self.layout.parts > 1:
            for field in factor_fields(model):
                skip_lines = self.replicated_lines(field)
                for factors in field.factor_sets():
                    shards += list(factors.planes) + ([] if skip_lines else list(factors.lines))
        ids = {id(p) for p in shards}
        replicated = [p for p in model.parameters() if id(p) not in ids and p.requires_grad]
        return shards, replicated

    # ---- evaluation ----------------------------------------------------------------------------
    def evaluate(
        self, block_index: Tensor, features: Features, decode: Decode, num_factors: int, appearance_channels: int
    ) -> Tensor:
        """Collective over the model-parallel group: [N, K] outputs of the N samples, the same on
        every rank.  ``features(rows, local_blocks)`` samples this rank's factors at the given rows
        (None: all); ``decode(rows, density_sum, appearance)`` turns full features into outputs;
        ``appearance_channels``: the model's appearance components per factor (0: none)."""
        if self.layout.strategy == "channel":
            return self._evaluate_channels(block_index, features, decode, num_factors, appearance_channels)
        return self._evaluate_blocks(block_index, features, decode)

    def _evaluate_blocks(self, block_index: Tensor, features: Features, decode: Decode) -> Tensor:
        if self._owner is None or self._owner.device != block_index.device:
            self._owner = self.layout.block_owner(block_index.device)
        owner = self._owner[block_index]
        order = torch.argsort(owner, stable=True)  # samples grouped by rank: the gather's order
        counts = torch.bincount(owner, minlength=self.layout.parts).tolist()
        start = sum(counts[: self.rank])
        rows = order[start : start + counts[self.rank]]
        first_block = self.layout.block_range(self.rank)[0]
        mine = decode(rows, *features(rows, block_index[rows] - first_block))
        gathered = all_gather_cat(self.mp, mine, 0, counts, "landmark-grid: gather per-sample outputs")
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        return gathered[inverse]

    def _evaluate_channels(
        self, block_index: Tensor, features: Features, decode: Decode, num_factors: int, appearance_channels: int
    ) -> Tensor:
        density, appearance = features(None, block_index)
        local = density[:, None] if appearance is None else torch.cat([density[:, None], appearance.to(density)], -1)
        layout = self.layout
        widths = [  # per rank: its density share and its appearance channels of every factor
            1 + (0 if appearance is None else num_factors * (stop - start))
            for start, stop in (layout.channel_range(appearance_channels, r) for r in range(layout.parts))
        ]
        gathered = all_gather_cat(self.mp, local, 1, widths, "landmark-grid: gather channels").split(widths, dim=1)
        density_sum = torch.stack([piece[:, 0] for piece in gathered], dim=1).sum(dim=1)
        appearance_all = None if appearance is None else channels_to_factor_major([p[:, 1:] for p in gathered], num_factors)
        return decode(None, density_sum, appearance_all)

    # ---- gradients -----------------------------------------------------------------------------
    @torch.no_grad()
    def sync_gradients_(self, model) -> None:
        """Make every rank's gradients the single-process gradient of the mean loss (see module doc)."""
        shards, replicated = self.sharded_parameters(model)
        # A parameter gets a gradient when any rank's step used it, as in one process; one that
        # no rank used (proposal grids between their updates run without grad) keeps none, so
        # Adam leaves it alone there too.
        flags = torch.tensor([p.grad is not None for p in shards + replicated], dtype=torch.int64)
        used = all_reduce_ints(self.world, flags, "landmark-grid: which parameters have gradients").tolist()
        shards = [p for p, u in zip(shards, used) if u]
        replicated = [p for p, u in zip(replicated, used[len(flags) - len(replicated) :]) if u]
        for param in shards + replicated:
            if param.grad is None:  # this rank's samples missed it (e.g. none fell in its blocks)
                param.grad = torch.zeros_like(param)
        data = self.dp.world_size
        if data > 1:
            all_reduce_grads_(self.dp, shards)
        if self.layout.shards_blocks:
            self._tie_seams_across(model, {id(p) for p in shards})
            all_reduce_grads_(self.world, replicated)
        elif data > 1:
            all_reduce_grads_(self.dp, replicated)
        if data > 1:
            for param in shards + replicated:
                param.grad.div_(data)

    def _tie_seams_across(self, model, with_grad: set) -> None:
        """``tie_seams`` over the whole fine block grid, for seams whose copies live on several
        ranks: per split axis, the border texels of every block (zeros where another rank holds
        the block) are summed over the group, tied, and written back into this rank's blocks."""
        layout = self.layout
        start, stop = layout.block_range(self.rank)
        entries = [
            (param, spatial)
            for field in factor_fields(model)
            for factors in field.factor_sets()
            for param, spatial in factors._spatial_axes()
            if id(param) in with_grad  # the shards (not replicated lines) that have gradients
        ]
        for axis in (0, 1):  # x then y: a corner texel ends with the sum of its four copies
            if layout.fine_blocks[axis] == 1:
                continue
            frames, targets = [], []
            for param, spatial in entries:
                for dim in seam_dims(spatial, axis):
                    index = border_index(param.shape[dim], param.device)
                    local = param.grad.index_select(dim, index)
                    full = local.new_zeros((layout.num_fine_blocks,) + tuple(local.shape[1:]))
                    full[start:stop] = local
                    frames.append(full)
                    targets.append((param, dim, index, only_axis(spatial, axis)))
            summed = all_reduce_sum(self.mp, frames, "landmark-grid: tie seam gradients")
            for full, (param, dim, index, spatial) in zip(summed, targets):
                param.grad.index_copy_(dim, index, tie_seams(full, layout.fine_blocks, spatial)[start:stop])

    # ---- logging -------------------------------------------------------------------------------
    def report(
        self, losses: Dict[str, Tensor], metrics: Dict[str, Tensor], sharded_losses: Tuple[str, ...]
    ) -> Tuple[Dict[str, Tensor], Dict[str, Tensor]]:
        """Losses and metrics whose values are the single-process ones (mean over the D ray
        batches, regulariser shares summed over the group); each loss keeps this rank's gradient.

        Collective over the world (one all-reduce of the scalars).
        """
        parts, data = self.layout.parts, self.dp.world_size
        loss_keys = sorted(losses)
        metric_keys = sorted(k for k, v in metrics.items() if torch.is_tensor(v) and v.numel() == 1)
        shares = {k for k in loss_keys if k in sharded_losses and parts > 1}
        # shares: sum over the group, mean over data parallel; whole values: mean over everyone
        scales = [1.0 / data if k in shares else 1.0 / (data * parts) for k in loss_keys] + [
            1.0 / (data * parts) for _ in metric_keys
        ]
        values = [losses[k].detach().double().reshape(1) for k in loss_keys]
        values += [metrics[k].detach().double().reshape(1) for k in metric_keys]
        scaled = [v * s for v, s in zip(values, scales)]
        totals = all_reduce_sum(self.world, scaled, "landmark-grid: loss and metrics for logging")
        out_losses = {}
        for key, total in zip(loss_keys, totals):
            value = losses[key]
            out_losses[key] = value + (total.reshape(()).to(value) - value).detach()
        out_metrics = dict(metrics)
        for key, total in zip(metric_keys, totals[len(loss_keys) :]):
            out_metrics[key] = total.reshape(()).to(metrics[key].dtype)
        return out_losses, out_metrics
