"""nerfstudio pipeline for landmark-grid on one or several processes: a thin adapter over ``GridPlan``.

One process (``ns-train``, ``ns-eval``, ``ns-render``, ``ns-viewer``): exactly ``VanillaPipeline``
over the whole model, whatever ``--pipeline.model.parallel`` says (so a merged checkpoint of any
strategy loads into the run's own config.yml).

Several processes (torchrun, ``landmark-train``, or nerfstudio's launcher on GPUs), differences
from ``VanillaPipeline`` (see ``grid/parallel.py`` for the strategies):
- no DDP wrapper: the model is built identically on every rank (every random stream seeded with
  ``init_seed`` around the construction; the grids start small, so the full model fits) and then
  each rank keeps its share (``GridPlan.shard_model_``);
- a training step's randomness (ray batch, sample jitter) is seeded by (``init_seed``, step,
  data-parallel rank): the ranks of a model-parallel group draw the same rays, data-parallel
  groups different ones; evaluation's by (``init_seed``, step) on every rank;
- losses and metrics are logged with their single-process values (``GridPlan.report``);
- ``sync_gradients_`` (called by ``GridTrainer`` before every optimiser step) makes every rank's
  gradients the single-process ones;
- evaluation is collective: every rank renders every eval image (a model-parallel group
  together), so metrics are the same everywhere; rank 0 logs them.  ns-eval under torchrun
  runs the same way (nerfstudio's loop over the eval images, in lockstep on every rank);
- one-camera renders (``render_view``, the live viewer; ``model.get_outputs_for_camera``,
  ns-render) need no more than that: the model's forward is collective over the model-parallel
  group and gives every rank the whole image, so every rank must render the same cameras in the
  same order (``landmark-render`` under torchrun, ns-eval, the viewer's per-step sync do);
- layout edits act on the sample points before they are routed to blocks, so the ranks
  evaluate the edited points exactly as one process does (``apply_edits``).
"""

from __future__ import annotations

import contextlib
import datetime
from dataclasses import dataclass, field
from typing import Dict, Iterator, Literal, Optional, Type

import torch
import tyro
from nerfstudio.cameras.cameras import Cameras
from nerfstudio.model_components.renderers import background_color_override_context
from nerfstudio.pipelines.base_pipeline import VanillaPipeline, VanillaPipelineConfig
from nerfstudio.utils.rich_utils import CONSOLE

from landmark_plugin.checkpoints import install_eval_checkpoint_filter
from landmark_plugin.distributed.checkpoint import shards_of_pointer
from landmark_plugin.distributed.groups import init_comm, launched_world_size
from landmark_plugin.edits import LayoutEdits, apply_edits
from landmark_plugin.grid.model import SHARDED_LOSSES
from landmark_plugin.grid.parallel import GridPlan, same_randomness, step_seed
from landmark_plugin.grid.sharded_state import (
    check_factor_shapes,
    grid_state_of_shards,
    param_names,
    shard_grid_state,
    sharded_keys,
)
from landmark_plugin.modes import eval_mode

EVAL_STREAM = 1 << 20
"""Seed stream of evaluation (data-parallel ranks use streams 0 .. D-1)."""


@dataclass
class DistributedGridPipelineConfig(VanillaPipelineConfig):
    """landmark-grid on one or several ranks (model parallel per --pipeline.model.parallel, data parallel on top)."""

    _target: Type = field(default_factory=lambda: DistributedGridPipeline)
    collective_timeout_s: float = 600.0
    """A collective waiting longer than this for a peer fails with a clear error instead of hanging."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """Process group backend: NCCL on CUDA, gloo on CPU (auto)."""
    init_seed: int = 0
    """Several ranks: seed of the model initialisation and of every step's rays (identical on every rank)."""
    world_size: tyro.conf.Suppress[int] = 1
    """Recorded by the trainer: the number of ranks the run trained on."""


class DistributedGridPipeline(VanillaPipeline):
    """VanillaPipeline without DDP; on several ranks, over this rank's share of the model."""

    config: DistributedGridPipelineConfig

    def __init__(self, config: DistributedGridPipelineConfig, device: str, test_mode="val", world_size: int = 1,
                 local_rank: int = 0, grad_scaler=None):
        if torch.device(device).type == "cuda" and torch.device(device).index is not None:
            torch.cuda.set_device(torch.device(device))  # NCCL talks through the current device
        # eval_setup (ns-eval, ns-render, ...) builds the pipeline, then lists the checkpoints: from here on
        # it skips names that are not checkpoints (temp files of older versions) instead of crashing
        install_eval_checkpoint_filter()
        if launched_world_size() > 1:
            # identical model and identically ordered image cache on every rank
            with same_randomness(config.init_seed, torch.device(device)):
                super().__init__(config, device, test_mode, world_size=1, local_rank=local_rank, grad_scaler=grad_scaler)
        else:  # world_size=1: VanillaPipeline would otherwise wrap the model in DDP
            super().__init__(config, device, test_mode, world_size=1, local_rank=local_rank, grad_scaler=grad_scaler)
        timeout = datetime.timedelta(seconds=config.collective_timeout_s)
        self.comm = init_comm(device, timeout=timeout, backend=config.backend)
        self.world_size = self.comm.world_size
        self.plan: Optional[GridPlan] = None
        self._loading_rank_parts = False
        if self.comm.world_size > 1:
            self.plan = GridPlan.create(self.comm, self.model)
            self.plan.shard_model_(self.model)
            CONSOLE.print(self.plan.describe())

    @property
    def distributed(self) -> bool:
        return self.plan is not None

    # ---- training -------------------------------------------------------------------------
    def get_train_loss_dict(self, step: int):
        if self.plan is None:
            return super().get_train_loss_dict(step)
        with same_randomness(step_seed(self.config.init_seed, step, self.plan.dp.rank), self.device):
            ray_bundle, batch = self.datamanager.next_train(step)
            outputs = self.model(ray_bundle)
            metrics = self.model.get_metrics_dict(outputs, batch)
            losses = self.model.get_loss_dict(outputs, batch, metrics)
        losses, metrics = self.plan.report(losses, metrics, SHARDED_LOSSES)
        return outputs, losses, metrics

    def sync_gradients_(self) -> None:
        """Before the optimiser step: every rank's gradients become the single-process ones."""
        if self.plan is not None:
            self.plan.sync_gradients_(self.model)

    # ---- evaluation: the same images and rays on every rank ---------------------------------
    def _eval_randomness(self, step: int):
        return same_randomness(step_seed(self.config.init_seed, step, EVAL_STREAM), self.device)

    def get_eval_loss_dict(self, step: int):
        if self.plan is None:
            return super().get_eval_loss_dict(step)
        with self._eval_randomness(step):
            return super().get_eval_loss_dict(step)

    def get_eval_image_metrics_and_images(self, step: int):
        if self.plan is None:
            return super().get_eval_image_metrics_and_images(step)
        with self._eval_randomness(step):
            return super().get_eval_image_metrics_and_images(step)

    # ---- one camera, every rank ------------------------------------------------------------
    def render_view(self, camera: Cameras, background: Optional[torch.Tensor] = None,
                    to_every_rank: bool = True) -> Dict[str, torch.Tensor]:
        """The model's render of ``camera`` in eval mode (over ``background`` when given).

        Collective on several ranks (every rank calls it with the same camera); every rank
        returns the whole image whatever ``to_every_rank`` says (the model-parallel forward
        joins the samples' outputs on every rank of a group).
        """
        model = self.model
        override = contextlib.nullcontext()
        if background is not None:
            override = background_color_override_context(background.to(self.device))
        with eval_mode(model), override, torch.no_grad():
            return model.get_outputs_for_camera(camera.to(self.device))

    def apply_edits(self, edits: LayoutEdits, source: str = "edits") -> None:
        """Install layout edits (every rank holds the field's box and block grid, so each
        installs the same edits on its own)."""
        apply_edits(self.model, edits, source)

    # ---- checkpoints ----------------------------------------------------------------------
    def state_names(self) -> Dict:
        """What a sharded checkpoint records beside nerfstudio's entries (see grid/sharded_state.py)."""
        layout = self.plan.layout.to_dict() if self.plan is not None else None
        return {"grid_layout": layout, "grid_sharded_keys": sharded_keys(self.plan, self.model),
                "param_names": param_names(self)}

    def load_pipeline(self, loaded_state: Dict, step: int) -> None:
        """VanillaPipeline's, except that a pointer to shards (what a sharded save leaves in
        nerfstudio_models/ for ns-eval / ns-render / ns-viewer) loads the shards: merged in memory
        on one process, this rank's part on several; and that a single-process checkpoint on
        several ranks loads this rank's part.  Within ``loading_rank_parts`` (the trainer's
        resume) the state is this rank's part already.  A checkpoint of another model structure
        (blocks, channels, lines) is refused with a ConfigError."""
        pointed = shards_of_pointer(loaded_state)
        if pointed is not None:
            base, shard_step = pointed
            state = grid_state_of_shards(base, shard_step, self.plan, self.model, param_names(self))
            CONSOLE.print(f"Loaded the shards of step {shard_step} in {base}")
            loaded_state = state["pipeline"]
        elif self.plan is not None and not self._loading_rank_parts and (keys := sharded_keys(self.plan, self.model)):
            # A single-process checkpoint (a one-process run, landmark-merge) on several ranks:
            # keep this rank's part of every sharded factor.  Not told by shapes: a grown grid's
            # sub-plane can have the shape of a whole plane at the initial resolution.
            whole = {"pipeline": loaded_state, "optimizers": {}}
            loaded_state = shard_grid_state(whole, self.plan.layout, self.plan.rank, keys, param_names(self))["pipeline"]
            CONSOLE.print(f"Loaded rank {self.plan.rank}'s part of a single-process checkpoint")
        check_factor_shapes(self.model, loaded_state, f"the checkpoint of step {step}")
        super().load_pipeline(loaded_state, step)

    @contextlib.contextmanager
    def loading_rank_parts(self) -> Iterator[None]:
        """Within: ``load_pipeline`` receives states already cut for this rank (the trainer's resume)."""
        self._loading_rank_parts = True
        try:
            yield
        finally:
            self._loading_rank_parts = False
