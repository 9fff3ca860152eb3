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
  saved it each rank loads its own shard, otherwise the checkpoint is merged and re-split; a
  checkpoint (or any rank's shard) that does not load is reported and the newest older one that
  loads is used (``load_newest_readable``, as for retina-gs); one of another model structure
  (blocks, components, shared line) stops the run with a ConfigError naming it;
- config.yml records the world size; rank 0 logs;
- the viewer (``--vis viewer...``) runs on rank 0 and renders through every rank
  (``LandmarkTrainer``'s live view over the pipeline's ``render_view``).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Type

from nerfstudio.utils.rich_utils import CONSOLE

from landmark_plugin.checkpoints import Candidate, remove_stale_temp_files
from landmark_plugin.data.validate import InputError
from landmark_plugin.distributed.checkpoint import (
    checkpoint_or_pointer,
    complete_steps,
    find_shards,
    remove_pointers_except,
    remove_steps_except,
    save_group_shard,
    write_shards_pointer,
)
from landmark_plugin.grid.sharded_state import (
    check_factor_shapes,
    grid_state_of_shards,
    param_names,
    shard_grid_state,
    sharded_keys,
)
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
    def resume_candidates(self) -> List[Candidate]:
        """This rank's part of every checkpoint --load-dir / --load-checkpoint may resume from,
        newest first (``load_newest_readable`` falls back to an older one when a file or a shard
        does not load): the complete sharded steps of a sharded run (its directory, ``shards/`` or
        one ``shards/step-*``), else the checkpoint files of a nerfstudio_models/ (pointers to
        shards load the shards)."""
        load_dir = self.config.load_dir
        sharded = find_shards(load_dir) if load_dir is not None else None
        if sharded is None:
            return [Candidate(str(path), functools.partial(self._rank_state_of_file, path)) for path in self.checkpoint_candidates()]
        base, step = sharded
        step = step if step is not None else self.config.load_step
        steps = [step] if step is not None else complete_steps(base)
        if not steps:
            raise InputError(f"no complete sharded checkpoint (shards/step-*/complete.json) in {base}")
        return [Candidate(f"the shards of step {s} in {base}", functools.partial(self._rank_state_of_shards, base, s)) for s in steps]

    def _rank_state_of_shards(self, base: Path, step: int) -> Dict:
        pipeline = self.pipeline
        CONSOLE.print(f"Resuming from the shards of step {step} in {base}")
        state = grid_state_of_shards(base, step, getattr(pipeline, "plan", None), pipeline.model, param_names(pipeline))
        return self._checked(state, f"the shards of step {step} in {base}")

    def _rank_state_of_file(self, path: Path) -> Dict:
        """This rank's part of a checkpoint file: a single-process (or landmark-merge) checkpoint,
        cut for this rank's layout on several ranks, or a pointer to shards."""
        state, pointed = checkpoint_or_pointer(path)
        if pointed is not None:
            return self._rank_state_of_shards(*pointed)
        pipeline, plan = self.pipeline, getattr(self.pipeline, "plan", None)
        if plan is not None and plan.layout.parts > 1:
            state = shard_grid_state(state, plan.layout, plan.rank, sharded_keys(plan, pipeline.model), param_names(pipeline))
        return self._checked(state, str(path))

    def _checked(self, state: Dict, source: str) -> Dict:
        """``state``, after refusing one of another model structure (named by ``source``)."""
        check_factor_shapes(self.pipeline.model, state["pipeline"], source)
        return state
