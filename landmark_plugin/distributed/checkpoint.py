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

from landmark_plugin.checkpoints import UnreadableCheckpoint, atomic_torch_save, load_checkpoint_file
from landmark_plugin.core.partition import KDTree, assign_leaves
from landmark_plugin.core.schedule import Parts
from landmark_plugin.distributed.collectives import barrier
from landmark_plugin.distributed.groups import Comm
from landmark_plugin.gaussians.export import GAUSS_PREFIX

STEP_DIR = re.compile(r"^step-(\d{9})$")
STRATEGY_STATS = ("grad2d", "count", "radii")
LEAF_IDS = "_model.leaf_ids"
"""Pipeline key of every Gaussian's leaf (a row like the parameters; absent in older checkpoints)."""


def _row_keys(pipeline: Dict) -> List[str]:
    """Pipeline keys holding one row per Gaussian: the parameters and the leaf ids."""
    return [k for k in pipeline if k.startswith(GAUSS_PREFIX) or k == LEAF_IDS]


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
    # Temp files stay in the step folder: nerfstudio never lists it, and a step is read only once complete.
    atomic_torch_save({**state, "rank": comm.rank, "world_size": comm.world_size, "tree": tree.to_dict()}, path, path.parent)
    barrier(comm, f"checkpoint step {step}")
    if comm.is_main:
        manifest = {"step": step, "world_size": comm.world_size, "tree": tree.to_dict()}
        _atomic_write_text(json.dumps(manifest), step_dir(base_dir, step) / "complete.json")
    barrier(comm, f"checkpoint step {step} (manifest)")
    return path


def save_group_shard(
    comm: Comm, base_dir: Path, step: int, state: Dict, index: Optional[int], count: int, manifest: Dict
) -> Optional[Path]:
    """``save_shard`` for runs where several ranks hold the same shard (landmark-grid's data-parallel
    replicas): ``count`` shard files, of which this rank writes ``index`` (None: it holds a copy
    another rank writes); rank 0 writes ``manifest`` (plus step and count) once all are written.

    Collective (two barriers over ``comm``): every rank must call it at the same step.
    """
    path = None
    if index is not None:
        path = shard_path(base_dir, step, index, count)
        atomic_torch_save({**state, "rank": index, "world_size": count}, path, path.parent)
    barrier(comm, f"checkpoint step {step}")
    if comm.is_main:
        text = json.dumps({**manifest, "step": step, "world_size": count})
        _atomic_write_text(text, step_dir(base_dir, step) / "complete.json")
    barrier(comm, f"checkpoint step {step} (manifest)")
    return path


def complete_steps(base_dir: Path) -> List[int]:
    """Steps whose shards are all written (``complete.json`` present), newest first; a step
    folder a crash left incomplete is never among them."""
    root = Path(base_dir) / "shards"
    if not root.is_dir():
        return []
    steps = [int(m.group(1)) for p in root.iterdir() if (m := STEP_DIR.match(p.name)) and (p / "complete.json").exists()]
    return sorted(steps, reverse=True)


def latest_complete_step(base_dir: Path) -> Optional[int]:
    """Newest step whose shards are all written (``complete.json`` present), or None."""
    steps = complete_steps(base_dir)
    return steps[0] if steps else None


def read_manifest(base_dir: Path, step: int) -> Dict:
    return json.loads((step_dir(base_dir, step) / "complete.json").read_text())


def load_shards(base_dir: Path, step: int) -> List[Dict]:
    """Every shard of a complete step, in rank order (on CPU)."""
    manifest = read_manifest(base_dir, step)
    world = int(manifest["world_size"])
    return [load_checkpoint_file(shard_path(base_dir, step, r, world), weights_only=False) for r in range(world)]


def _gauss_names(state: Dict) -> List[str]:
    return [k[len(GAUSS_PREFIX) :] for k in state["pipeline"] if k.startswith(GAUSS_PREFIX)]


def merge_shards(shards: List[Dict]) -> Dict:
    """One nerfstudio checkpoint holding every Gaussian (rank order) and rank 0's replicated state."""
    first = shards[0]
    merged = {k: v for k, v in first.items() if k not in ("rank", "pipeline", "optimizers", "strategy_state")}
    merged["world_size"] = 1
    pipeline = dict(first["pipeline"])
    for key in _row_keys(first["pipeline"]):
        pipeline[key] = torch.cat([s["pipeline"][key] for s in shards])
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
    rows = set(_row_keys(merged["pipeline"]))
    out["pipeline"] = {k: (v[keep] if k in rows else v) for k, v in merged["pipeline"].items()}
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
    """The part of a merged checkpoint that ``rank`` of ``world_size`` owns under ``tree``: the
    Gaussians of its leaves (the saved leaf ids, else the leaf of every mean)."""
    pipeline = merged["pipeline"]
    leaves = pipeline.get(LEAF_IDS)
    if leaves is None or leaves.shape[0] != pipeline[GAUSS_PREFIX + "means"].shape[0]:
        leaves = assign_leaves(tree, pipeline[GAUSS_PREFIX + "means"])
    parts = Parts.of(tree.depth, world_size)
    owner = torch.as_tensor(parts.rank)[parts.leaf_part()[leaves]]
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


# ---- loading shards where nerfstudio expects one checkpoint ----------------------------------
# nerfstudio's loaders (ns-eval, ns-render, ns-viewer, ns-export: ``eval_setup``) read the newest
# ``step-*.ckpt`` of the run's nerfstudio_models/ and hand its "pipeline" entry to the pipeline's
# ``load_pipeline``.  A sharded save also writes there a small pointer checkpoint naming the shards;
# the retina-gs pipeline's ``load_pipeline`` recognises it and loads the shards instead (merged in
# memory on one process, or each rank's part on several).  ``landmark-merge`` replaces the pointer
# with the real merged checkpoint of that step.
POINTER_KEY = "landmark_sharded_checkpoint"
POINTER_MAX_BYTES = 64 * 1024
"""A pointer is a few hundred bytes; bigger files are real checkpoints and are never opened to check."""


def write_shards_pointer(checkpoint_dir: Path, base_dir: Path, step: int, world_size: int) -> Path:
    """Write ``checkpoint_dir/step-N.ckpt`` pointing at the complete shards of ``step`` (rank 0, after ``save_shard``).

    The run directory is stored as the trainer knows it (relative paths resolve against the
    working directory, as nerfstudio resolves the config's output directory) and absolute.
    """
    path = Path(checkpoint_dir) / f"step-{step:09d}.ckpt"
    pointer = {"base_dir": str(base_dir), "abs_base_dir": str(Path(base_dir).resolve()), "step": step, "world_size": world_size}
    atomic_torch_save({"step": step, "pipeline": {POINTER_KEY: pointer}}, path)
    return path


def shards_of_pointer(pipeline_state: Dict) -> Optional[Tuple[Path, int]]:
    """(run directory, step) of a pointer checkpoint's "pipeline" entry; None for a real checkpoint.

    Raises:
        FileNotFoundError: the pointer's shards are gone (moved run, deleted step).
    """
    pointer = pipeline_state.get(POINTER_KEY) if isinstance(pipeline_state, dict) else None
    if pointer is None:
        return None
    step = int(pointer["step"])
    for base in (Path(pointer["base_dir"]), Path(pointer["abs_base_dir"])):
        if (step_dir(base, step) / "complete.json").exists():
            return base, step
    raise FileNotFoundError(
        f"this checkpoint points at the shards of step {step} in {pointer['base_dir']} ({pointer['abs_base_dir']}), "
        "which are not there (complete.json missing): run from the training's working directory, or merge "
        "the shards where they are (landmark-merge CONFIG) and copy the merged checkpoint"
    )


def checkpoint_or_pointer(path: Path) -> Tuple[Dict, Optional[Tuple[Path, int]]]:
    """A checkpoint file (``load_checkpoint_file``) and, where it is a pointer, the (run directory,
    step) of its shards; a pointer whose shards are gone counts as unreadable, so that resuming
    falls back to an older checkpoint.

    Raises:
        UnreadableCheckpoint: the file does not load, or its shards are gone.
    """
    state = load_checkpoint_file(path)
    try:
        return state, shards_of_pointer(state["pipeline"])
    except FileNotFoundError as gone:
        raise UnreadableCheckpoint(f"{path} cannot be read ({gone})") from gone


def is_shards_pointer(path: Path) -> bool:
    """Whether the file at ``path`` is a pointer checkpoint (cheap: large files are not opened)."""
    path = Path(path)
    if not path.is_file() or path.stat().st_size > POINTER_MAX_BYTES:
        return False
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a pointer holds plain values only; anything the safe unpickler refuses is not one
        return False
    return isinstance(state, dict) and isinstance(state.get("pipeline"), dict) and POINTER_KEY in state["pipeline"]


def remove_pointers_except(checkpoint_dir: Path, keep: int) -> None:
    """Delete the pointer checkpoints of other steps (save_only_latest_checkpoint); real
    checkpoints (e.g. landmark-merge's) are left alone."""
    for path in Path(checkpoint_dir).glob("step-*.ckpt"):
        if path.name != f"step-{keep:09d}.ckpt" and is_shards_pointer(path):
            path.unlink(missing_ok=True)


def rank_state_of_shards(base_dir: Path, step: int, rank: int, world_size: int, depth: int) -> Dict:
    """The part of the sharded checkpoint ``step`` that ``rank`` of ``world_size`` holds: its own
    shard when the world size is the one that saved it, else the merge of all shards (one
    process) or the merge re-split by subtree (``shard_for_rank``)."""
    world = int(read_manifest(base_dir, step)["world_size"])
    if world == world_size:
        return load_checkpoint_file(shard_path(base_dir, step, rank, world))
    merged = merge_shards(load_shards(base_dir, step))
    if world_size == 1:
        return merged
    return shard_for_rank(merged, tree_of_state(merged, depth), rank, world_size)
