"""The retina-gs trainer: ``LandmarkTrainer`` on one process, sharded on several.

With one rank it is ``LandmarkTrainer`` (atomic nerfstudio checkpoints in ``nerfstudio_models/``,
exact resume), except that ``--load-dir`` may also name a sharded run.  With several ranks
(``DistributedRetinaPipeline`` over a process group):
- before every optimiser step the pipeline's ``sync_gradients_`` runs (zero-filled Gaussian
  gradients, all-reduced replicated gradients);
- every rank writes its shard (``distributed.checkpoint.save_shard``: atomic, ``complete.json``
  once all are written) instead of rank 0 writing one file; ``landmark-merge CONFIG`` turns
  them into one checkpoint;
- ``--load-dir`` may name a sharded run (its directory, ``shards/`` or a ``shards/step-*``
  folder) or a single-process ``nerfstudio_models/``; on the same number of ranks each rank
  loads its own shard, on another number the shards are merged and re-split by subtree
  (``shard_for_rank``), then Gaussians that drifted out of their rank's region migrate;
- config.yml records the world size and the kd-tree at setup; logging is nerfstudio's, from
  rank 0;
- the viewer (``--vis viewer...``) runs on rank 0 and renders through every rank
  (``LandmarkTrainer``'s live view over the pipeline's ``render_view``);
- every sharded save also writes ``nerfstudio_models/step-N.ckpt`` as a pointer to the shards
  (``write_shards_pointer``), so ``ns-eval`` / ``ns-render`` / ``ns-viewer`` load the run
  directly (the pipeline merges the shards in memory).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Type

import torch
from nerfstudio.utils.rich_utils import CONSOLE

from landmark_plugin.distributed.checkpoint import (
    find_shards,
    latest_complete_step,
    is_shards_pointer,
    rank_state_of_shards,
    read_manifest,
    remove_pointers_except,
    remove_steps_except,
    save_shard,
    shard_for_rank,
    shards_of_pointer,
    tree_of_state,
    write_shards_pointer,
)
from landmark_plugin.distributed.shards import STRATEGY_STATS, migrate_
from landmark_plugin.errors import ConfigError
from landmark_plugin.trainer import LandmarkTrainer, LandmarkTrainerConfig
from landmark_plugin.trainer import latest_complete_step as latest_checkpoint_step


@dataclass
class RetinaTrainerConfig(LandmarkTrainerConfig):
    """TrainerConfig of retina-gs (one or several ranks)."""

    _target: Type = field(default_factory=lambda: RetinaTrainer)


class RetinaTrainer(LandmarkTrainer):
    """LandmarkTrainer that saves and loads sharded checkpoints when the run has several ranks."""

    config: RetinaTrainerConfig

    @property
    def distributed(self) -> bool:
        return self.comm.world_size > 1

    def recorded_layout(self) -> Dict[str, Any]:
        """config.yml also records the kd-tree at setup."""
        return {**super().recorded_layout(), "tree": self.pipeline.model.tree.to_dict()}

    def gradient_sync(self):
        return self.pipeline.sync_gradients_ if self.distributed else None

    # ---- saving ---------------------------------------------------------------------------
    def checkpoint_state(self, step: int) -> dict:
        state = super().checkpoint_state(step)
        # Densification statistics as rows beside the Gaussians (merge_shards / select_rows cut
        # them with the parameters); landmark_plugin.resume keeps its own copy under "resume".
        model = self.pipeline.model
        state["strategy_state"] = {k: v for k, v in model.strategy_state.items() if k in STRATEGY_STATS}
        return state

    def save_checkpoint(self, step: int) -> None:
        if not self.distributed:
            return super().save_checkpoint(step)
        save_shard(self.comm, self.base_dir, step, self.checkpoint_state(step), self.pipeline.model.tree)
        if self.comm.is_main:
            # What ns-eval / ns-render / ns-viewer find in nerfstudio_models/: a pointer to the shards.
            write_shards_pointer(self.checkpoint_dir, self.base_dir, step, self.comm.world_size)
            if self.config.save_only_latest_checkpoint:
                remove_steps_except(self.base_dir, step)
                remove_pointers_except(self.checkpoint_dir, step)

    # ---- loading --------------------------------------------------------------------------
    def _load_checkpoint(self) -> None:
        load_dir = self.config.load_dir
        sharded = find_shards(load_dir) if load_dir is not None else None
        if sharded is None:
            sharded = self._pointed_shards()
        if sharded is None and not self.distributed:
            return super()._load_checkpoint()  # a nerfstudio checkpoint (or none) on one process
        if sharded is None and load_dir is None:
            if self.config.load_checkpoint is not None:
                raise ConfigError("with several ranks resume through --load-dir (a sharded run or a nerfstudio_models/)")
            CONSOLE.print("No checkpoint to load, so training from scratch.")
            return
        with self.pipeline.loading_rank_parts():  # _read_state has cut the state for this rank
            self.restore_state(self._read_state(load_dir, sharded))
        model = self.pipeline.model
        CONSOLE.print(f"Resumed at step {self._start_step} with {model.num_points} Gaussians on rank {self.comm.rank}")
        if self.distributed:
            # Gaussians that drifted out of their rank's region since the last migration move now.
            migrate_(self.comm, model, self.optimizers.optimizers, model.strategy_state, self.pipeline.sharded.parts, rebuild=False)
            self._rebind_optimizers()

    def _read_state(self, load_dir: Path, sharded) -> Dict:
        """This rank's part of the checkpoint that ``load_dir`` names."""
        comm = self.comm
        depth = self.pipeline.model.config.tree_depth
        if sharded is None:  # a single-process run's (or landmark-merge's) nerfstudio_models/
            step = self.config.load_step if self.config.load_step is not None else latest_checkpoint_step(load_dir)
            if step is None:
                raise FileNotFoundError(f"no complete checkpoint (step-*.ckpt or shards/step-*/complete.json) in {load_dir}")
            path = Path(load_dir) / f"step-{step:09d}.ckpt"
            CONSOLE.print(f"Resuming rank {comm.rank}/{comm.world_size} from {path}")
            merged = torch.load(path, map_location="cpu", weights_only=True)
        else:
            base, step = sharded
            step = step if step is not None else self.config.load_step
            step = step if step is not None else latest_complete_step(base)
            world = int(read_manifest(base, step)["world_size"])
            CONSOLE.print(f"Resuming rank {comm.rank}/{comm.world_size} from the {world} shards of step {step} in {base}")
            return rank_state_of_shards(base, step, comm.rank, comm.world_size, depth)
        if comm.world_size == 1:
            return merged
        return shard_for_rank(merged, tree_of_state(merged, depth), comm.rank, comm.world_size)

    def _pointed_shards(self):
        """(run directory, step) when the checkpoint --load-dir / --load-checkpoint selects in a
        nerfstudio_models/ is a pointer to shards (``write_shards_pointer``), else None."""
        try:
            path = self.checkpoint_to_load()
        except FileNotFoundError:
            return None
        if path is None or not is_shards_pointer(path):
            return None
        return shards_of_pointer(torch.load(path, map_location="cpu", weights_only=True)["pipeline"])
