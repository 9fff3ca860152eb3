"""The landmark-grid trainer: ``LandmarkTrainer`` on one process, sharded checkpoints on several.

With one rank it is ``LandmarkTrainer``, except that ``--load-dir`` may also name a sharded run
(merged in memory).  With several ranks (``DistributedGridPipeline`` over a ``GridPlan``):
- before every optimiser step the pipeline's ``sync_gradients_`` runs;
- checkpoints are sharded: one file per model-parallel rank, written atomically by the rank of
  the first data-parallel group (``distributed.checkpoint.save_group_shard``; the other
  data-parallel groups hold the same shards), ``complete.json`` once all are written, and a
  pointer ``nerfstudio_models/step-N.ckpt`` so that ns-eval / ns-render / ns-viewer load the run
  as it is (the pipeline merges the shards in memory); ``landmark-merge CONFIG`` writes the
  merged checkpoint instead;
- ``--load-dir`` may name a sharded run (its directory, ``shards/``, a ``shards/step-*`` folder, or
  its nerfstudio_models/ of pointers) or a single-process nerfstudio_models/: with the layout that
  saved it each rank loads its own shard, otherwise the checkpoint is merged and re-split;
- config.yml records the world size; rank 0 logs;
- the viewer (``--vis viewer...``) runs on rank 0 and renders through every rank
  (``LandmarkTrainer``'s live view over the pipeline's ``render_view``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Type

import torch
from nerfstudio.utils.rich_utils import CONSOLE

from landmark_plugin.checkpoints import remove_stale_temp_files
from landmark_plugin.distributed.checkpoint import (
    find_shards,
    is_shards_pointer,
    latest_complete_step,
    remove_pointers_except,
    remove_steps_except,
    save_group_shard,
    shards_of_pointer,
    write_shards_pointer,
)
from landmark_plugin.grid.sharded_state import grid_state_of_shards, param_names, shard_grid_state, sharded_keys
from landmark_plugin.trainer import LandmarkTrainer, LandmarkTrainerConfig


@dataclass
class GridTrainerConfig(LandmarkTrainerConfig):
    """TrainerConfig of landmark-grid (one or several ranks)."""

    _target: Type = field(default_factory=lambda: GridTrainer)


class GridTrainer(LandmarkTrainer):
    """LandmarkTrainer that saves and loads sharded checkpoints when the run has several ranks."""

    config: GridTrainerConfig

    @property
    def distributed(self) -> bool:
        return getattr(self.pipeline, "plan", None) is not None

    def gradient_sync(self):
        return self.pipeline.sync_gradients_ if self.distributed else None

    # ---- saving ---------------------------------------------------------------------------
    def checkpoint_state(self, step: int) -> dict:
        state = super().checkpoint_state(step)
        if hasattr(self.pipeline, "state_names"):
            state.update(self.pipeline.state_names())
        return state

    def save_checkpoint(self, step: int) -> None:
        if not self.distributed:
            return super().save_checkpoint(step)
        plan = self.pipeline.plan
        index = plan.rank if plan.dp.rank == 0 else None  # data-parallel replicas hold the same shard
        manifest = {"method": self.config.method_name, "grid_layout": plan.layout.to_dict(), "ranks": self.comm.world_size}
        save_group_shard(self.comm, self.base_dir, step, self.checkpoint_state(step), index, plan.layout.parts, manifest)
        if self.comm.is_main:
            write_shards_pointer(self.checkpoint_dir, self.base_dir, step, plan.layout.parts)
            remove_stale_temp_files(self.checkpoint_dir)
            if self.config.save_only_latest_checkpoint:
                remove_steps_except(self.base_dir, step)
                remove_pointers_except(self.checkpoint_dir, step)

    # ---- loading --------------------------------------------------------------------------
    def _load_checkpoint(self) -> None:
        state = self._state_to_load()
        if state is None:
            CONSOLE.print("No checkpoint to load, so training from scratch.")
            return
        self.restore_state(state)
        CONSOLE.print(f"Resumed at step {self._start_step} (rank {self.comm.rank} of {self.comm.world_size})")

    def _state_to_load(self) -> Optional[Dict]:
        """This rank's part of the checkpoint --load-dir / --load-checkpoint names, or None."""
        pipeline, plan = self.pipeline, getattr(self.pipeline, "plan", None)
        load_dir = self.config.load_dir
        sharded = find_shards(load_dir) if load_dir is not None else None
        if sharded is None:
            path = self.checkpoint_to_load()
            if path is None:
                return None
            if not is_shards_pointer(path):
                merged = torch.load(path, map_location="cpu", weights_only=True)
                if plan is None or plan.layout.parts == 1:
                    return merged
                keys = sharded_keys(plan, pipeline.model)
                return shard_grid_state(merged, plan.layout, plan.rank, keys, param_names(pipeline))
            sharded = shards_of_pointer(torch.load(path, map_location="cpu", weights_only=True)["pipeline"])
        base, step = sharded
        step = step if step is not None else self.config.load_step
        step = step if step is not None else latest_complete_step(base)
        CONSOLE.print(f"Resuming from the shards of step {step} in {base}")
        return grid_state_of_shards(base, step, plan, pipeline.model, param_names(pipeline))
