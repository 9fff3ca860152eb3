"""Sharded checkpoints: one file per rank, merged into one nerfstudio checkpoint or re-split.

Layout, beside nerfstudio's ``nerfstudio_models/`` (which nerfstudio's loaders scan and
which must keep holding only ``step-*.ckpt`` files)::

    <base_dir>/shards/step-000001000/rank-00000-of-00002.ckpt   (atomic, written by rank 0)
    <base_dir>/shards/step-000001000/rank-00001-of-00002.ckpt   (atomic, written by rank 1)
    <base_dir>/shards/step-000001000/complete.json              (rank 0, after a barrier)

A step counts only once ``complete.json`` exists, so a run killed mid-save resumes from the
previous complete step.  Every shard is a nerfstudio checkpoint of its rank's pipeline
(``step``, ``pipeline``, ``optimizers``, ``schedulers``, ``scalers``) plus ``rank``,
``world_size``, ``tree`` and ``strategy_state``.  ``merge_shards`` concatenates the Gaussian
rows (parameters, Adam moments, densification statistics, also those in the trainer's
``resume`` state) in rank order and takes everything replicated from rank 0; ``select_rows``
cuts a merged state down to the Gaussians one rank of a new world size owns, so a run resumes
on any number of ranks.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from landmark_plugin.checkpoints import atomic_torch_save
from landmark_plugin.core.partition import KDTree, assign_leaves
from landmark_plugin.core.schedule import Parts
from landmark_plugin.distributed.collectives import barrier
from landmark_plugin.distributed.groups import Comm
from landmark_plugin.gaussians.export import GAUSS_PREFIX

STEP_DIR = re.compile(r"^step-(\d{9})$")
STRATEGY_STATS = ("grad2d", "count", "radii")


def step_dir(base_dir: Path, step: int) -> Path:
    return Path(base_dir) / "shards" / f"step-{step:09d}"


def shard_path(base_dir: Path, step: int, rank: int, world_size: int) -> Path:
    return step_dir(base_dir, step) / f"rank-{rank:05d}-of-{world_size:05d}.ckpt"


def _atomic_write_text(text: str, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_shard(comm: Comm, base_dir: Path, step: int, state: Dict, tree: KDTree) -> Path:
    """Write this rank's shard atomically; rank 0 marks the step complete after all wrote.

    Collective (a barrier): every rank must call it at the same step.
    """
    path = shard_path(base_dir, step, comm.rank, comm.world_size)
    atomic_torch_save({**state, "rank": comm.rank, "world_size": comm.world_size, "tree": tree.to_dict()}, path)
    barrier(comm, f"checkpoint step {step}")
    if comm.is_main:
        manifest = {"step": step, "world_size": comm.world_size, "tree": tree.to_dict()}
        _atomic_write_text(json.dumps(manifest), step_dir(base_dir, step) / "complete.json")
    barrier(comm, f"checkpoint step {step} (manifest)")
    return path


def latest_complete_step(base_dir: Path) -> Optional[int]:
    """Newest step whose shards are all written (``complete.json`` present), or None."""
    root = Path(base_dir) / "shards"
    if not root.is_dir():
        return None
    steps = [int(m.group(1)) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and (p / "complete.json").exists()]
    return max(steps) if steps else None


def read_manifest(base_dir: Path, step: int) -> Dict:
    return json.loads((step_dir(base_dir, step) / "complete.json").read_text())


def load_shards(base_dir: Path, step: int) -> List[Dict]:
    """Every shard of a complete step, in rank order (on CPU)."""
    manifest = read_manifest(base_dir, step)
    world = int(manifest["world_size"])
    return [
        torch.load(shard_path(base_dir, step, r, world), map_location="cpu", weights_only=False) for r in range(world)
    ]


def _gauss_names(state: Dict) -> List[str]:
    return [k[len(GAUSS_PREFIX) :] for k in state["pipeline"] if k.startswith(GAUSS_PREFIX)]


def merge_shards(shards: List[Dict]) -> Dict:
    """One nerfstudio checkpoint holding every Gaussian (rank order) and rank 0's replicated state."""
    first = shards[0]
    merged = {k: v for k, v in first.items() if k not in ("rank", "pipeline", "optimizers", "strategy_state")}
    merged["world_size"] = 1
    pipeline = dict(first["pipeline"])
    for name in _gauss_names(first):
        pipeline[GAUSS_PREFIX + name] = torch.cat([s["pipeline"][GAUSS_PREFIX + name] for s in shards])
    merged["pipeline"] = pipeline
    optimizers = {}
    for name, opt in first["optimizers"].items():
        opt = {"state": {k: dict(v) for k, v in opt["state"].items()}, "param_groups": opt["param_groups"]}
        if name in _gauss_names(first) and opt["state"]:
            for kind in ("exp_avg", "exp_avg_sq"):
                opt["state"][0][kind] = torch.cat([s["optimizers"][name]["state"][0][kind] for s in shards])
        optimizers[name] = opt
    merged["optimizers"] = optimizers
    stats = {}
    for key in STRATEGY_STATS:
        values = [(s.get("strategy_state") or {}).get(key) for s in shards]
        stats[key] = torch.cat(values) if all(v is not None for v in values) else None
    merged["strategy_state"] = stats
    strategies = [((sh.get("resume") or {}).get("strategy")) for sh in shards]
    if all(isinstance(st, dict) for st in strategies):  # landmark_plugin.resume's copy of the statistics
        strategy = dict(strategies[0])
        for key in STRATEGY_STATS:
            values = [st.get(key) for st in strategies]
            if key in strategy:
                strategy[key] = torch.cat(values) if all(isinstance(v, Tensor) for v in values) else None
        merged["resume"] = {**first["resume"], "strategy": strategy}
    return merged


def select_rows(merged: Dict, keep: Tensor) -> Dict:
    """The merged checkpoint cut down to the Gaussian rows ``keep`` (a [N] bool or index)."""
    out = dict(merged)
    out["pipeline"] = {
        k: (v[keep] if k.startswith(GAUSS_PREFIX) else v) for k, v in merged["pipeline"].items()
    }
    names = _gauss_names(merged)
    optimizers = {}
    for name, opt in merged["optimizers"].items():
        opt = {"state": {k: dict(v) for k, v in opt["state"].items()}, "param_groups": opt["param_groups"]}
        if name in names and opt["state"]:
            for kind in ("exp_avg", "exp_avg_sq"):
                opt["state"][0][kind] = opt["state"][0][kind][keep]
        optimizers[name] = opt
    out["optimizers"] = optimizers
    stats = merged.get("strategy_state") or {}
    out["strategy_state"] = {k: (v[keep] if v is not None else None) for k, v in stats.items()}
    strategy = (merged.get("resume") or {}).get("strategy")
    if isinstance(strategy, dict):
        cut = {k: (v[keep] if k in STRATEGY_STATS and isinstance(v, Tensor) else v) for k, v in strategy.items()}
        out["resume"] = {**merged["resume"], "strategy": cut}
    return out


def shard_for_rank(merged: Dict, tree: KDTree, rank: int, world_size: int) -> Dict:
    """The part of a merged checkpoint that ``rank`` of ``world_size`` owns under ``tree``."""
    means = merged["pipeline"][GAUSS_PREFIX + "means"]
    parts = Parts.of(tree.depth, world_size)
    part_rank = torch.as_tensor(parts.rank)
    owner = part_rank[parts.leaf_part()[assign_leaves(tree, means)]]
    out = select_rows(merged, owner == rank)
    out["rank"], out["world_size"] = rank, world_size
    return out


def tree_of_state(state: Dict, depth: int) -> KDTree:
    """The kd-tree of a shard, merged or single-process checkpoint (its ``tree`` entry, else
    the model's tree buffers)."""
    if state.get("tree") is not None:
        return KDTree.from_dict(state["tree"])
    pipeline = state["pipeline"]
    return KDTree(
        bounds=pipeline["_model.tree_bounds"],
        split_axis=pipeline["_model.tree_split_axis"],
        split_value=pipeline["_model.tree_split_value"],
        depth=depth,
    )


def find_shards(load_dir: Path) -> Optional[Tuple[Path, Optional[int]]]:
    """Where a ``--load-dir`` points at a sharded checkpoint: (run directory, step or None).

    ``load_dir`` may be the run directory, its ``shards/`` or one ``shards/step-*`` folder
    (which fixes the step).  None when it holds no complete sharded step.
    """
    load_dir = Path(load_dir)
    step: Optional[int] = None
    if (match := STEP_DIR.match(load_dir.name)) and load_dir.parent.name == "shards":
        base, step = load_dir.parent.parent, int(match.group(1))
    elif load_dir.name == "shards":
        base = load_dir.parent
    else:
        base = load_dir
    return (base, step) if latest_complete_step(base) is not None else None


def remove_steps_except(base_dir: Path, keep: int) -> None:
    """Delete every complete sharded step but ``keep`` (save_only_latest_checkpoint).

    The manifest goes first, so a step being deleted never looks complete.
    """
    root = Path(base_dir) / "shards"
    for path in root.iterdir():
        match = STEP_DIR.match(path.name)
        if match is None or int(match.group(1)) == keep:
            continue
        (path / "complete.json").unlink(missing_ok=True)
        for child in path.iterdir():
            child.unlink()
        path.rmdir()
