"""Sharded landmark-grid checkpoints: merge the shards into one model, re-split a model.

A shard is a nerfstudio checkpoint of one model-parallel rank's pipeline (``step``, ``pipeline``,
``optimizers``, ``schedulers``, ``scalers``, ``resume``) plus what merging needs:

- ``grid_layout``: ``GridLayout.to_dict()`` of the run;
- ``grid_sharded_keys``: pipeline-state key -> "plane" / "line" of every sharded factor tensor
  (everything else, including a shared line under branch / plane, is replicated);
- ``param_names``: per optimiser, the pipeline-state key of each of its parameters in order
  (Adam keys its state by position).

``merge_grid_shards`` builds the single-process checkpoint (factors merged by
``core.grid_parallel.merge_factor``, their Adam moments likewise, everything replicated from the
first shard); ``shard_grid_state`` cuts a single-process checkpoint to one rank of another
layout.  Together they let a run resume on any layout, and ``landmark-merge`` / ns-eval /
ns-render load a sharded run in one process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List

from landmark_plugin.checkpoints import load_checkpoint_file
from landmark_plugin.core.grid_parallel import GridLayout, merge_factor, shard_factor
from landmark_plugin.distributed.checkpoint import load_shards, read_manifest, shard_path
from landmark_plugin.errors import ConfigError

MOMENTS = ("exp_avg", "exp_avg_sq")
PREFIX = "_model."
"""Pipeline-state keys of the model (VanillaPipeline keeps it as ``_model``)."""


def sharded_keys(plan, model) -> Dict[str, str]:
    """Pipeline-state key -> kind ("plane" / "line") of every factor tensor ``plan`` shards."""
    if plan is None or plan.layout.parts == 1:
        return {}
    names = {id(p): n for n, p in model.named_parameters()}
    keys: Dict[str, str] = {}
    shards, _ = plan.sharded_parameters(model)
    planes = {id(p) for field in (model.field, *model.proposal_networks) for f in field.factor_sets() for p in f.planes}
    for param in shards:
        keys[PREFIX + names[id(param)]] = "plane" if id(param) in planes else "line"
    return keys


def _grown(saved: int, fresh: int) -> bool:
    """Whether ``saved`` texels along an axis are ``fresh`` ones after doubling the cells 0 or more
    times (upsampling maps s texels to 2 (s - 1) + 1)."""
    cells, base = saved - 1, fresh - 1
    while base > 0 and cells > base and cells % 2 == 0:
        cells //= 2
    return cells == base


def check_factor_shapes(model, pipeline_state: Dict, source: str) -> None:
    """Refuse a checkpoint (``pipeline_state``, already cut for this rank) whose grid factors are
    not ``model``'s own at some number of growth steps: other blocks, channels, modes or lines.

    Loading resizes every factor to the checkpoint's shape (a grown grid is larger than a fresh
    model), so without this check a checkpoint of another structure, e.g. one z line per block
    (``--pipeline.model.parallel none``) into a shared line (``plane``), would load silently wrong.
    """
    factors = {id(p) for field in (model.field, *model.proposal_networks) for f in field.factor_sets()
               for p in (*f.planes, *f.lines)}  # fmt: skip
    for name, param in model.named_parameters():
        saved = pipeline_state.get(PREFIX + name)
        if id(param) not in factors or saved is None:
            continue  # a missing key is load_state_dict's error to report
        fresh = tuple(param.shape)
        same = saved.dim() == len(fresh) and saved.shape[0] == fresh[0] and saved.shape[-1] == fresh[-1]
        if same and all(_grown(s, f) for s, f in zip(saved.shape[1:-1], fresh[1:-1])):
            continue
        hint = ""
        if name.split(".")[-2] == "lines" and saved.dim() == len(fresh) and 1 in (saved.shape[0], fresh[0]):
            shared = "the checkpoint has" if saved.shape[0] == 1 else "this run has"
            hint = (f"; {shared} one z line shared by all blocks (--pipeline.model.parallel plane implies "
                    "--pipeline.model.field.shared-line True), the other one line per block")
        raise ConfigError(
            f"{source} does not fit this model: {name} is {tuple(saved.shape)} there, {fresh} here "
            f"(this rank's part; grids may differ only by growth){hint}.  Resume with the model options "
            "(blocks, mode, components, shared line) of the run that wrote it."
        )


def param_names(pipeline) -> Dict[str, List[str]]:
    """Per optimiser (param group), the pipeline-state keys of its parameters, in order."""
    names = {id(p): n for n, p in pipeline.named_parameters()}
    return {group: [names[id(p)] for p in params] for group, params in pipeline.get_param_groups().items()}


def _moments_by_key(optimizers: Dict, names: Dict[str, List[str]]):
    """(optimiser, position, key, state) of every parameter state entry."""
    for group, opt in optimizers.items():
        for index, state in opt["state"].items():
            yield group, index, names[group][int(index)], state


def _copy_optimizers(optimizers: Dict) -> Dict:
    return {
        name: {"state": {k: dict(v) for k, v in opt["state"].items()}, "param_groups": opt["param_groups"]}
        for name, opt in optimizers.items()
    }


def merge_grid_shards(shards: List[Dict]) -> Dict:
    """One single-process checkpoint from the shards of one step (in model-parallel rank order)."""
    first = shards[0]
    layout = GridLayout.from_dict(first["grid_layout"])
    keys: Dict[str, str] = first.get("grid_sharded_keys") or {}
    if len(shards) != layout.parts:
        raise ValueError(f"{len(shards)} shards for a layout of {layout.parts} model-parallel ranks")
    merged = {k: v for k, v in first.items() if k not in ("pipeline", "optimizers", "rank", "grid_sharded_keys")}
    merged["pipeline"] = {
        k: (merge_factor([s["pipeline"][k] for s in shards], kind, layout) if (kind := keys.get(k)) else v)  # type: ignore[arg-type]
        for k, v in first["pipeline"].items()
    }
    optimizers = _copy_optimizers(first["optimizers"])
    names = first["param_names"]
    for group, index, key, state in _moments_by_key(optimizers, names):
        if key in keys:
            for kind in MOMENTS:
                if kind in state:
                    pieces = [s["optimizers"][group]["state"][index][kind] for s in shards]
                    state[kind] = merge_factor(pieces, keys[key], layout)  # type: ignore[arg-type]
    merged["optimizers"] = optimizers
    merged["grid_layout"] = GridLayout("none", layout.blocks, 1).to_dict()
    merged["world_size"] = 1
    return merged


def shard_grid_state(merged: Dict, layout: GridLayout, rank: int, keys: Dict[str, str], names: Dict[str, List[str]]) -> Dict:
    """The part of a single-process checkpoint that ``rank`` holds under ``layout``.

    Args:
        merged: a single-process (or merged) checkpoint.
        keys: ``sharded_keys`` of the model being loaded (its layout's sharded tensors).
        names: ``param_names`` of the pipeline being loaded.
    """
    out = dict(merged)
    out["pipeline"] = {
        k: (shard_factor(v, kind, layout, rank) if (kind := keys.get(k)) else v)  # type: ignore[arg-type]
        for k, v in merged["pipeline"].items()
    }
    optimizers = _copy_optimizers(merged["optimizers"])
    for _, _, key, state in _moments_by_key(optimizers, names):
        if key in keys:
            for kind in MOMENTS:
                if kind in state:
                    state[kind] = shard_factor(state[kind], keys[key], layout, rank)  # type: ignore[arg-type]
    out["optimizers"] = optimizers
    out["grid_layout"], out["grid_sharded_keys"], out["param_names"] = layout.to_dict(), keys, names
    out["rank"] = rank
    return out


def grid_state_of_shards(base_dir: Path, step: int, plan, model, names: Dict[str, List[str]]) -> Dict:
    """This rank's state from the sharded checkpoint ``step`` of a run: its own shard when the
    layout is the one that saved it, else the shards merged (one process) and re-split."""
    manifest = read_manifest(base_dir, step)
    saved = GridLayout.from_dict(manifest["grid_layout"])
    count = int(manifest["world_size"])
    if plan is not None and saved == plan.layout and plan.layout.parts > 1:
        return load_checkpoint_file(shard_path(base_dir, step, plan.rank, count))
    merged = merge_grid_shards(load_shards(base_dir, step))
    if plan is None or plan.layout.parts == 1:
        return merged
    return shard_grid_state(merged, plan.layout, plan.rank, sharded_keys(plan, model), names)
