"""A rank's Gaussians as rows: selecting, replacing and migrating them with their optimiser state.

Every per-Gaussian quantity travels together: the parameters in ``model.gauss_params``, their
Adam moments (``exp_avg``, ``exp_avg_sq``; the step count is per optimiser and identical on
every rank) and the densification statistics of gsplat's strategy (``grad2d``, ``count``,
``radii``).  ``migrate_`` moves rows whose mean left this rank's parts to their new owner
with one ``all_to_all``, optionally after rebuilding the kd-tree from all current means.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from landmark_plugin.core.partition import assign_leaves, build_kdtree
from landmark_plugin.core.render import split_columns
from landmark_plugin.core.schedule import Parts
from landmark_plugin.distributed.collectives import all_gather_rows, all_to_all_rows
from landmark_plugin.distributed.groups import Comm

MOMENTS = ("exp_avg", "exp_avg_sq")
STRATEGY_STATS = ("grad2d", "count", "radii")
Layout = List[Tuple[str, str, Tuple[int, ...]]]  # (group name, kind, trailing shape)


def owner_ranks(model, parts: Parts, means: Optional[Tensor] = None) -> Tensor:
    """[N] rank owning every Gaussian: the rank of the part holding the leaf of its mean."""
    leaf = assign_leaves(model.tree, model.means if means is None else means)
    part_rank = torch.as_tensor(parts.rank, device=leaf.device)
    return part_rank[parts.leaf_part().to(leaf.device)[leaf]]


def _set_param(model, optimizers: Optional[Dict], name: str, value: Tensor, moments: Dict[str, Tensor]) -> None:
    """Replace one Gaussian parameter, re-pointing its optimiser at the new tensor."""
    old = model.gauss_params[name]
    new = torch.nn.Parameter(value.to(old.dtype).contiguous(), requires_grad=old.requires_grad)
    model.gauss_params[name] = new
    if optimizers is None or name not in optimizers:
        return
    opt = optimizers[name]
    state = opt.state.pop(old, {})
    opt.param_groups[0]["params"] = [new]
    if state or moments:
        state = dict(state)
        for kind in MOMENTS:
            if kind in moments:
                state[kind] = moments[kind].to(old.dtype).contiguous()
        state.setdefault("step", torch.zeros((), dtype=torch.float32))
        opt.state[new] = state


def gaussian_blocks(model, optimizers: Optional[Dict], strategy_state: Optional[Dict]) -> Tuple[List[Optional[Tensor]], Layout]:
    """Every per-Gaussian quantity of the shard as one [N, w] tensor per layout entry (views of
    the model's own tensors, no copy), None where a moment or statistic does not exist yet."""
    blocks: List[Optional[Tensor]] = []
    layout: Layout = []
    n = model.num_points
    for name, param in model.gauss_params.items():
        tail = tuple(param.shape[1:])
        blocks.append(param.detach().reshape(n, -1))
        layout.append((name, "param", tail))
        state = optimizers[name].state.get(param, {}) if optimizers and name in optimizers else {}
        for kind in MOMENTS:
            value = state.get(kind)
            blocks.append(value.detach().reshape(n, -1) if value is not None else None)
            layout.append((name, kind, tail))
    for key in STRATEGY_STATS:
        if strategy_state is not None and key in strategy_state:
            value = strategy_state[key]
            blocks.append(value.reshape(n, 1) if value is not None else None)
            layout.append((key, "stat", ()))
    return blocks, layout


def gaussian_rows(model, optimizers: Optional[Dict], strategy_state: Optional[Dict]) -> Tuple[Tensor, Layout]:
    """Every per-Gaussian quantity of the shard as one [N, D] matrix (model dtype) and its layout.

    Missing moments / statistics are zeros, so every rank has the same layout.
    """
    blocks, layout = gaussian_blocks(model, optimizers, strategy_state)
    n, dtype, device = model.num_points, model.means.dtype, model.means.device
    columns = [b if b is not None else torch.zeros(n, math.prod(tail), dtype=dtype, device=device)
               for b, (_, _, tail) in zip(blocks, layout)]
    return torch.cat([c.to(dtype) for c in columns], dim=1), layout


def layout_columns(layout: Layout) -> Dict[Tuple[str, str], slice]:
    """(group name, kind) -> its columns in the row matrix of ``gaussian_rows``."""
    out, col = {}, 0
    for name, kind, tail in layout:
        width = math.prod(tail)
        out[(name, kind)] = slice(col, col + width)
        col += width
    return out


def set_gaussian_rows_(model, optimizers: Optional[Dict], strategy_state: Optional[Dict], rows: Tensor, layout: Layout) -> None:
    """Inverse of ``gaussian_rows``: the shard becomes exactly ``rows``."""
    set_gaussian_blocks_(model, optimizers, strategy_state, split_columns(rows, [tail for _, _, tail in layout]), layout)


def set_gaussian_blocks_(model, optimizers: Optional[Dict], strategy_state: Optional[Dict], blocks: Sequence[Tensor],
                         layout: Layout) -> None:
    """Inverse of ``gaussian_blocks``: the shard becomes exactly ``blocks`` (one [N, *tail] or
    [N, w] tensor per layout entry; contiguous ones of the right dtype are taken without a copy)."""
    values: Dict[Tuple[str, str], Tensor] = {(name, kind): b.reshape((b.shape[0], *tail))
                                              for (name, kind, tail), b in zip(layout, blocks)}
    for name in list(model.gauss_params.keys()):
        moments = {kind: values[(name, kind)] for kind in MOMENTS if (name, kind) in values}
        has_state = optimizers is not None and name in optimizers and bool(optimizers[name].state)
        _set_param(model, optimizers, name, values[(name, "param")], moments if has_state else {})
    for key in STRATEGY_STATS:
        if strategy_state is not None and (key, "stat") in values:
            value = values[(key, "stat")]
            # gsplat adds float32 counts, and screen gradients / radii in the model's dtype.
            dtype = torch.float32 if key == "count" else model.means.dtype
            strategy_state[key] = value.reshape(value.shape[0]).to(dtype).contiguous()


def select_rows_(model, optimizers: Optional[Dict], strategy_state: Optional[Dict], index: Tensor) -> None:
    """Keep only the rows ``index`` of the shard (parameters, moments, statistics)."""
    rows, layout = gaussian_rows(model, optimizers, strategy_state)
    set_gaussian_rows_(model, optimizers, strategy_state, rows[index], layout)
    model.refresh_ownership()


def shard_(comm: Comm, model, parts: Parts) -> None:
    """Drop every Gaussian another rank owns (used once, right after the identical
    initialisation of the full model on every rank)."""
    if comm.is_single:
        return
    keep = torch.nonzero(owner_ranks(model, parts) == comm.rank).flatten()
    select_rows_(model, None, None, keep)


def migrate_(comm: Comm, model, optimizers: Optional[Dict], strategy_state: Optional[Dict], parts: Parts, rebuild: bool) -> int:
    """Send every Gaussian to the rank owning its mean's leaf; optionally rebuild the tree first.

    The rebuild gathers all means (in rank order, so every rank builds the identical tree).
    After the call the shard holds, in source-rank order, exactly the Gaussians of this
    rank's parts, and ``model.leaf_ids`` is current.

    Returns:
        The number of Gaussians that left this rank.
    """
    if comm.is_single:  # nothing moves between ranks: only the leaves are re-assigned
        model.refresh_ownership(rebuild=rebuild)
        return 0
    with torch.no_grad():
        if rebuild:
            all_means = all_gather_rows(comm, model.means.detach(), "gather means for the tree rebuild")
            model._set_tree(build_kdtree(all_means, model.config.tree_depth, axis_rule=model.config.split_axes))
        rows, layout = gaussian_rows(model, optimizers, strategy_state)
        dest = owner_ranks(model, parts).to(rows.device)  # rows may sit in host memory (offload)
        leaving = int((dest != comm.rank).sum())
        received, _ = all_to_all_rows(comm, rows, dest)
        set_gaussian_rows_(model, optimizers, strategy_state, received, layout)
        model.refresh_ownership()
    return leaving


def partition_invariant_normals(comm: Comm, means: Tensor, step: int, seed: int = 0) -> Tensor:
    """Standard normals [2, n, 3] for the Gaussians at ``means`` [n, 3] that this rank splits at
    ``step``, the same whatever the partition: every rank's rows are gathered, ordered by their
    means (x, then y, then z) and given the draws of one generator seeded by (seed, step) in
    that order.  Collective: every rank calls it, with or without rows."""
    tagged = torch.cat([means.detach().double(), means.new_full((means.shape[0], 1), comm.rank).double()], dim=1)
    rows = all_gather_rows(comm, tagged, "split offsets").cpu()
    order = torch.arange(rows.shape[0])
    for axis in (2, 1, 0):  # stable sorts, last key first: lexicographic (x, y, z)
        order = order[torch.sort(rows[order, axis], stable=True).indices]
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    draws = torch.randn(rows.shape[0], 2, 3, generator=generator, dtype=torch.float64)
    by_row = torch.empty_like(draws)
    by_row[order] = draws
    mine = by_row[rows[:, 3] == comm.rank]
    return mine.transpose(0, 1).to(means.device, means.dtype)
