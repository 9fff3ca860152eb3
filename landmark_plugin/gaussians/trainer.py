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

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Type

from nerfstudio.utils.rich_utils import CONSOLE
from torch import Tensor

from landmark_plugin.checkpoints import (
    Candidate,
    load_newest_readable,
    remove_stale_temp_files,
)
from landmark_plugin.distributed.checkpoint import (
    LEAF_IDS,
    checkpoint_or_pointer,
    complete_steps,
    find_shards,
    rank_state_of_shards,
    read_manifest,
    remove_pointers_except,
    remove_steps_except,
    save_shard,
    shard_for_rank,
    tree_of_state,
    write_shards_pointer,
)
from landmark_plugin.errors import ConfigError
from landmark_plugin.gaussians.rows import STRATEGY_STATS, migrate_
from landmark_plugin.trainer import LandmarkTrainer, LandmarkTrainerConfig


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
        return self.pipeline.sync_gradients_

    def pending_gradients(self) -> Dict[str, List[Tensor]]:
        """With offload stream: the image gradients of the batch's subtree crops, from which
        ``sync_gradients_`` makes (and steps) the Gaussians' gradients after this check."""
        batch = self._streamed_batch()
        return {} if batch is None else {"streamed subtree images": batch.image_gradients()}

    def discard_pending_step(self) -> None:
        """A skipped step leaves no streamed batch to step."""
        if self._streamed_batch() is not None:
            self.pipeline.model.offload_store.stream.pending = None

    def _streamed_batch(self):
        store = self.pipeline.model.offload_store
        return store.stream.pending if store is not None and store.stream is not None else None

    # ---- saving ---------------------------------------------------------------------------
    def checkpoint_state(self, step: int) -> dict:
        self.pipeline.model.hold_every_row(on_host=True)  # with offload: the whole shard is saved
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
            remove_stale_temp_files(self.checkpoint_dir)
            if self.config.save_only_latest_checkpoint:
                remove_steps_except(self.base_dir, step)
                remove_pointers_except(self.checkpoint_dir, step)

    # ---- loading --------------------------------------------------------------------------
    def resume_candidates(self) -> List[Candidate]:
        """This rank's part of every checkpoint --load-dir / --load-checkpoint may resume from,
        newest first: the complete sharded steps of a sharded run (its directory, ``shards/`` or
        one ``shards/step-*``), else the checkpoint files of a nerfstudio_models/ (pointers to
        shards load the shards)."""
        load_dir = self.config.load_dir
        sharded = find_shards(load_dir) if load_dir is not None else None
        if sharded is None:
            if self.distributed and load_dir is None and self.config.load_checkpoint is not None:
                raise ConfigError("with several ranks resume through --load-dir (a sharded run or a nerfstudio_models/)")
            return [Candidate(str(path), functools.partial(self._rank_state_of_file, path)) for path in self.checkpoint_candidates()]
        base, step = sharded
        step = step if step is not None else self.config.load_step
        steps = [step] if step is not None else complete_steps(base)
        return [Candidate(f"the shards of step {s} in {base}", functools.partial(self._rank_state_of_shards, base, s)) for s in steps]

    def _rank_state_of_shards(self, base: Path, step: int) -> Dict:
        comm = self.comm
        world = int(read_manifest(base, step)["world_size"])
        CONSOLE.print(f"Resuming rank {comm.rank}/{comm.world_size} from the {world} shards of step {step} in {base}")
        return rank_state_of_shards(base, step, comm.rank, comm.world_size, self.pipeline.model.config.tree_depth)

    def _rank_state_of_file(self, path: Path) -> Dict:
        """This rank's part of a checkpoint file: a single-process (or landmark-merge) checkpoint,
        cut by subtree on several ranks, or a pointer to shards."""
        state, pointed = checkpoint_or_pointer(path)
        if pointed is not None:
            return self._rank_state_of_shards(*pointed)
        comm = self.comm
        CONSOLE.print(f"Resuming rank {comm.rank}/{comm.world_size} from {path}")
        return shard_for_rank(state, tree_of_state(state, self.pipeline.model.config.tree_depth), comm.rank, comm.world_size)

    def _load_checkpoint(self) -> None:
        candidates = self.resume_candidates()
        if not candidates:
            CONSOLE.print("No checkpoint to load, so training from scratch.")
            return
        state = load_newest_readable(candidates, self.errors_on_every_rank)
        with self.pipeline.loading_rank_parts():  # the candidates cut the state for this rank
            self.restore_state(state)
        model = self.pipeline.model
        CONSOLE.print(f"Resumed from step {state['step']}: training continues at step {self._start_step} with "
                      f"{model.num_points} Gaussians on rank {self.comm.rank}")
        if self.distributed and LEAF_IDS not in state["pipeline"]:
            # A checkpoint without leaf ids (older versions) was assigned leaves from the means:
            # Gaussians that drifted out of their rank's region since the last migration move now.
            migrate_(self.comm, model, self.optimizers.optimizers, model.strategy_state, self.pipeline.frame.parts, rebuild=False)
            self._rebind_optimizers()
