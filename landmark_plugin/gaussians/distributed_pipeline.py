"""nerfstudio pipeline for retina-gs on one or several processes: a thin adapter over ``RetinaFrame``.

One process (``ns-train``, ``ns-eval``, ``ns-render``, ``ns-viewer``) is a world of size 1: the
same code runs with one part holding every leaf and nothing exchanged.  Differences from
``VanillaPipeline``:
- no DDP wrapper: each rank's model holds only the Gaussians of its subtrees and only their
  optimiser state; with several ranks the model is initialised identically on every rank
  (torch seeded with ``init_seed`` around the construction) and then sharded;
- training: a camera batch packed under ``max_batch_size`` / ``max_load`` from a camera queue
  that is the same on every rank (a seeded permutation per epoch, interleaved so that
  consecutive cameras cycle through their owners); image i's loss is always computed by rank
  ``i % R`` (``schedule.image_owner``), so each rank loads, caches or streams only its own
  images (``RetinaGSDataManager.load_only``); loss and metrics are reduced over ranks for logging;
- after the optimiser step (``step_post_backward``): gsplat's strategy densifies and prunes
  this rank's Gaussians from the batch's screen gradients, then at refinement steps (and every
  ``repartition_every`` steps) Gaussians that left this rank's region migrate to their owner,
  after rebuilding the tree when the model's ``strategy.rebuild_tree_every`` says so;
- ``sync_gradients_`` (called by ``RetinaTrainer`` before every optimiser step) gives every
  Gaussian a gradient (zeros where nothing was drawn, so Adam steps every rank the same way)
  and sums the gradients of replicated parameters (camera optimiser) over ranks;
- evaluation is collective: every rank renders its partial of each eval camera, the camera's
  owner (``i % R`` of the eval split, which only it loads) composites it and computes the
  metrics, and the metrics are gathered on every rank (images for the logger go to rank 0);
- loading (``load_pipeline``, what nerfstudio's eval_setup calls): a pointer to shards (what a
  sharded save leaves in nerfstudio_models/) loads this rank's part of them, a whole-model
  checkpoint is cut to this rank's Gaussians.  One process loading a pointer merges the shards
  in memory;
- one-camera renders (``render_view``, what the live viewer calls, and the model's
  ``get_outputs``, what ns-render calls): collective, every rank renders its partial, rank 0
  composites, and for ``get_outputs`` the composite is broadcast, so ns-render's loop
  (``landmark-render`` under torchrun) runs in lockstep on every rank and each gets the whole
  image.  A rank calling
  it alone waits for the others until the collective timeout;
- layout edits (``apply_edits``): blocks resolve against the extent of every rank's Gaussians, as
  in one process, and copies render on the rank owning their new leaf (``RetinaFrame.render_set``).
"""

from __future__ import annotations

import contextlib
import datetime
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Literal, Optional, Tuple, Type

import torch
import tyro
from nerfstudio.cameras.cameras import Cameras
from nerfstudio.engine.callbacks import TrainingCallback, TrainingCallbackAttributes, TrainingCallbackLocation
from nerfstudio.pipelines.base_pipeline import VanillaPipeline, VanillaPipelineConfig
from nerfstudio.utils.rich_utils import CONSOLE

from landmark_plugin.checkpoints import install_eval_checkpoint_filter
from landmark_plugin.core.schedule import image_owner, interleave_owners, locality_order, look_points, owned_images
from landmark_plugin.distributed.checkpoint import rank_state_of_shards, shard_for_rank, shards_of_pointer, tree_of_state
from landmark_plugin.distributed.collectives import (
    all_gather_rows,
    all_reduce_grads_,
    broadcast_object,
)
from landmark_plugin.distributed.groups import init_comm, launched_world_size
from landmark_plugin.gaussians.rows import migrate_, shard_
from landmark_plugin.edits import LayoutEdits
from landmark_plugin.gaussians.appearance import sync_grid_gradients_
from landmark_plugin.gaussians.evaluation import average_eval_metrics, average_loader_metrics
from landmark_plugin.gaussians.frame import RetinaFrame
from landmark_plugin.gaussians.layout import RetinaEditLayout
from landmark_plugin.modes import eval_mode


@dataclass
class DistributedRetinaPipelineConfig(VanillaPipelineConfig):
    """retina-gs with the Gaussians sharded over ranks by kd-tree subtrees (one rank: VanillaPipeline)."""

    _target: Type = field(default_factory=lambda: DistributedRetinaPipeline)
    max_batch_size: Optional[int] = None
    """Most cameras per step (RetinaGS's batch size); default: one per rank (one process trains
    one camera per step, as splatfacto)."""
    max_load: int = 4
    """Most render tasks (camera x own visible subtree) any rank gets per step."""
    repartition_every: int = 0
    """Several ranks: also migrate Gaussians that left their rank's region every this many steps
    (they always migrate at refinement steps)."""
    collective_timeout_s: float = 600.0
    """A collective waiting longer than this for a peer fails with a clear error instead of hanging."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """Process group backend: NCCL on CUDA, gloo on CPU (auto).  gloo on CUDA runs several ranks
    on one GPU (tensors staged through host memory; ranks share the GPUs round robin): the whole
    multi-rank GPU path on a single-GPU machine."""
    init_seed: int = 0
    """Several ranks: seed of the model initialisation and of the camera queue (identical on every rank)."""
    camera_order: Literal["random", "locality"] = "random"
    """Order of the training cameras within an epoch (every image once per epoch either way).
    random: a new permutation per epoch.  locality: sorted along a Z-order curve of what each
    camera looks at (where its optical axis crosses the scene box), in runs of
    ``locality_run`` cameras shuffled per epoch, so consecutive batches see the same leaves
    (with --pipeline.model.offload host they stay on the GPU instead of travelling again)."""
    locality_run: int = 16
    """camera_order locality: cameras per run kept together."""
    world_size: tyro.conf.Suppress[int] = 1
    """Recorded by the trainer: the number of ranks the run trained on (loading on another
    number re-assigns subtrees)."""
    tree: tyro.conf.Suppress[Optional[dict]] = None
    """Recorded by the trainer: the kd-tree at setup (each sharded checkpoint's complete.json
    holds the tree at its step)."""


class DistributedRetinaPipeline(VanillaPipeline):
    """VanillaPipeline without DDP, over one rank's shard of a RetinaGSModel."""

    config: DistributedRetinaPipelineConfig

    def __init__(self, config: DistributedRetinaPipelineConfig, device: str, test_mode="val", world_size: int = 1,
                 local_rank: int = 0, grad_scaler=None):
        if torch.device(device).type == "cuda" and torch.device(device).index is not None:
            torch.cuda.set_device(torch.device(device))  # NCCL talks through the current device
        # eval_setup (ns-eval, ns-render, ...) builds the pipeline, then lists the checkpoints: from here on
        # it skips names that are not checkpoints (temp files of older versions) instead of crashing
        install_eval_checkpoint_filter()
        # Several ranks: an identical initial model on every rank (one process: nerfstudio's seeding).
        seeded = launched_world_size() > 1
        with torch.random.fork_rng(devices=[], enabled=seeded):
            if seeded:
                torch.manual_seed(config.init_seed)
            # world_size=1: VanillaPipeline would otherwise wrap the model in DDP.
            super().__init__(config, device, test_mode, world_size=1, local_rank=local_rank, grad_scaler=grad_scaler)
        timeout = datetime.timedelta(seconds=config.collective_timeout_s)
        self.comm = init_comm(device, timeout=timeout, backend=config.backend)
        self.world_size = self.comm.world_size
        self.frame = RetinaFrame(self.comm, self.model)
        self.model.frame = self.frame  # the model's own renders go through this rank's frame
        shard_(self.comm, self.model, self.frame.parts)
        if hasattr(self.datamanager, "load_only"):
            # Before any image is read: this rank holds only the images whose loss it computes.
            rank, dm = self.comm.rank, self.datamanager
            dm.load_only(
                train=owned_images(len(dm.train_dataset), rank, self.world_size),
                eval=owned_images(len(dm.eval_dataset), rank, self.world_size),
            )
        self._queue: List[int] = []
        self._epoch = 0
        self._loading_rank_parts = False
        self.last_batch: List[int] = []
        """Train image indices of the last ``get_batch_loss_dict`` batch."""

    @property
    def distributed(self) -> bool:
        return self.comm.world_size > 1

    # ---- one camera, every rank ------------------------------------------------------------
    def render_view(self, camera: Cameras, background: Optional[torch.Tensor] = None,
                    to_every_rank: bool = False) -> Optional[Dict[str, torch.Tensor]]:
        """Collective: every rank renders its partial of ``camera``, rank 0 composites it.

        The model renders in eval mode (no pose correction, full resolution; layout edits
        applied) and, when ``background`` is given (the viewer's, for a "random" background),
        over it; both are restored afterwards.

        Returns:
            splatfacto's outputs (background expanded to the image, as the one-process model
            returns it) on rank 0, and with ``to_every_rank`` on every rank; else None.
        """
        model = self.model
        saved_background = model.background_color
        if background is not None:
            model.background_color = background.to(saved_background)
        try:
            with eval_mode(model), torch.no_grad():
                out = self.frame.render_camera(camera, to_every_rank=to_every_rank)
        finally:
            model.background_color = saved_background
        if out is not None:
            height, width = out["rgb"].shape[:2]
            out["background"] = out["background"].expand(height, width, 3)
        return out

    def apply_edits(self, edits: LayoutEdits, source: str = "edits") -> None:
        """Install layout edits on this rank's shard (collective on several ranks): leaf boxes
        are cut from the extent of every rank's Gaussians, as in one process."""
        RetinaEditLayout(self.model, means_extent=self._means_extent()).install(edits, source)

    def _means_extent(self) -> torch.Tensor:
        """[2, 3] min / max corner of every rank's Gaussian means (float64, CPU)."""
        means = self.model.means.detach().to("cpu", torch.float64)
        inf = torch.full((3,), torch.inf, dtype=torch.float64)
        lo = means.min(0).values if means.shape[0] else inf
        hi = means.max(0).values if means.shape[0] else -inf
        corners = all_gather_rows(self.comm, torch.stack([lo, hi]), "extent of the Gaussians' means")
        return torch.stack([corners[0::2].min(0).values, corners[1::2].max(0).values])

    # ---- training -------------------------------------------------------------------------
    def _next_pool(self, size: int, world_size: Optional[int] = None) -> List[int]:
        """The next ``size`` cameras of the queue (``world_size``: whose owners to interleave;
        this run's by default, another to reproduce a run of that many ranks)."""
        num = len(self.datamanager.train_dataset)
        world = self.world_size if world_size is None else world_size
        while len(self._queue) < size:
            g = torch.Generator().manual_seed(self.config.init_seed * 1_000_003 + self._epoch)
            if self.config.camera_order == "locality":
                order = locality_order(*self._look_points(), self.config.locality_run, g)
            else:
                order = torch.randperm(num, generator=g).tolist()
            self._queue += interleave_owners(order, world)
            self._epoch += 1
        return self._queue[:size]

    def _look_points(self) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """What each training camera looks at (``core.schedule.look_points``) in the kd-tree's box,
        and the box: the same on every rank (poses and tree only)."""
        c2w = self.datamanager.train_dataset.cameras.camera_to_worlds.detach().cpu().double()
        box = self.model.tree.bounds.detach().cpu().double()
        return look_points(c2w, box[0], box[1]), box[0], box[1]

    def resume_state(self) -> Dict:
        """The camera queue (``landmark_plugin.resume`` saves it, so a resumed run takes the
        same batches; identical on every rank)."""
        return {"queue": list(self._queue), "epoch": self._epoch}

    def load_resume_state(self, state: Dict) -> None:
        self._queue, self._epoch = [int(i) for i in state["queue"]], int(state["epoch"])

    def get_train_loss_dict(self, step: int):
        return self.get_batch_loss_dict(step)

    @property
    def batch_size(self) -> int:
        """Most cameras per step (``max_batch_size``, default one per rank)."""
        return self.config.max_batch_size or self.world_size

    def get_batch_loss_dict(self, step: int, batch_size: Optional[int] = None):
        """The training step on the next batch of the camera queue (``batch_size``: this many
        cameras at most instead of ``batch_size``, e.g. to compare 1 and R ranks on the same
        batches).

        Returns:
            (owned cameras' outputs, loss dict, metrics dict), as ``get_train_loss_dict``.
        """
        dm = self.datamanager
        cameras = dm.train_dataset.cameras
        batch_size = batch_size or self.batch_size
        pool = self._next_pool(batch_size)
        pool_cameras = cameras[torch.tensor(pool)]  # on the host: the frame reads sizes and poses there
        self.model.stage_leaves(pool_cameras)  # with offload: the leaves these cameras can draw
        size, visible, _ = self.frame.plan_batch(pool_cameras, batch_size, self.config.max_load)
        batch, self._queue = pool[:size], self._queue[size:]
        self.last_batch = batch
        if self.model.offload_store is not None:  # the next batch's leaves travel while this one renders
            self.model.prefetch_leaves(cameras[torch.tensor(self._next_pool(batch_size))])
        owners = torch.tensor([image_owner(i, self.world_size) for i in batch], dtype=torch.int64)
        if hasattr(dm, "prefetch_train"):
            # Streamed captures: start reading this rank's next images while this batch renders.
            ahead = self._queue[: getattr(dm.config, "prefetch", 4) * self.world_size]
            dm.prefetch_train([i for i in ahead if image_owner(i, self.world_size) == self.comm.rank])

        def batch_of(b: int) -> Dict[str, torch.Tensor]:
            data = dict(dm.cached_train[batch[b]])  # only the owner holds (and reads) the image
            data["image"] = data["image"].to(self.device)
            return data

        batch_cameras = pool_cameras if size == len(pool) else cameras[torch.tensor(batch)]
        batch_cameras.metadata = {"cam_idx": torch.tensor(batch)[:, None]}
        loss_dict, metrics_dict, outputs = self.frame.batch_loss(batch_cameras, visible, owners, batch_of)
        return outputs, loss_dict, metrics_dict

    def sync_gradients_(self) -> None:
        """Before the optimiser step: make every rank's gradients what one process would have.

        A Gaussian this rank did not draw gets a zero gradient (Adam then steps it, as the
        single-process model steps every Gaussian), and replicated parameters' gradients are
        summed over ranks (each owner only saw its own cameras).
        """
        streamed = self.model.step_streamed_()  # offload stream: the Gaussians are stepped already
        for param in self.model.gauss_params.values():
            if param.grad is None and not streamed:
                param.grad = torch.zeros_like(param)
        names = set(self.model.gauss_params.keys()) | {"bilateral_grid"}  # the grids: sync_grid_gradients_
        groups = self.get_param_groups()
        replicated = [p for name in sorted(groups) if name not in names for p in groups[name]]
        all_reduce_grads_(self.comm, replicated)
        sync_grid_gradients_(self.model, self.comm, self.last_batch)

    def get_training_callbacks(self, training_callback_attributes: TrainingCallbackAttributes) -> List[TrainingCallback]:
        callbacks = super().get_training_callbacks(training_callback_attributes)
        # The model's own post-backward callback, with this pipeline's repartition period.
        kept = [cb for cb in callbacks if cb.func != self.model.step_post_backward]
        return kept + [TrainingCallback([TrainingCallbackLocation.AFTER_TRAIN_ITERATION], self.step_post_backward)]

    def step_post_backward(self, step: int) -> None:
        """Densify / prune this rank's Gaussians, then migrate those that left its region."""
        self.model.step_post_backward(step, repartition_every=self.config.repartition_every)

    # ---- loading --------------------------------------------------------------------------
    def load_pipeline(self, loaded_state: Dict, step: int) -> None:
        """VanillaPipeline's, except that a pointer to shards (what a sharded save leaves in
        nerfstudio_models/ for ns-eval / ns-render / ns-viewer) loads the shards: merged in memory
        on one process, this rank's part on several."""
        comm, depth = self.comm, self.model.config.tree_depth
        pointed = shards_of_pointer(loaded_state)
        if pointed is not None:
            base, shard_step = pointed
            state = rank_state_of_shards(base, shard_step, comm.rank, comm.world_size, depth)
            CONSOLE.print(f"Loaded the shards of step {shard_step} in {base} (rank {comm.rank} of {comm.world_size})")
            loaded_state = state["pipeline"]
        elif not self._loading_rank_parts:
            # A whole-model checkpoint (one-process run, landmark-merge) on several ranks: keep
            # this rank's Gaussians, or every rank would render every Gaussian.
            whole = {"pipeline": loaded_state, "optimizers": {}}
            loaded_state = shard_for_rank(whole, tree_of_state(whole, depth), comm.rank, comm.world_size)["pipeline"]
        super().load_pipeline(loaded_state, step)
        if not self._loading_rank_parts:
            # A shard loaded as saved may hold Gaussians that drifted out of this rank's region
            # since the last migration; loading assigns leaves by mean (as one process does), so
            # they would belong to no rank's render.  Move them to their owners.
            migrate_(comm, self.model, None, None, self.frame.parts, rebuild=False)

    @contextlib.contextmanager
    def loading_rank_parts(self) -> Iterator[None]:
        """Within: ``load_pipeline`` receives states already cut for this rank (the trainer's
        resume: its shard may hold Gaussians that left its region, which migrate afterwards)."""
        self._loading_rank_parts = True
        try:
            yield
        finally:
            self._loading_rank_parts = False

    # ---- evaluation -----------------------------------------------------------------------
    def _render_for_owners(self, cameras: Cameras, owners: torch.Tensor) -> Dict[int, Dict[str, torch.Tensor]]:
        """Collective: every rank renders its parts of ``cameras``; returns the owned composites."""
        visible = torch.ones(len(cameras), len(self.frame.parts), dtype=torch.bool)
        with torch.no_grad():
            outputs, _ = self.frame.forward(cameras, visible, owners, with_depth=True)
        return outputs

    def _eval_data(self, index: int) -> Dict[str, torch.Tensor]:
        data = dict(self.datamanager.cached_eval[index])
        data["image"] = data["image"].to(self.device)
        return data

    def _eval_cameras(self, indices: List[int]) -> Cameras:
        return self.datamanager.eval_dataset.cameras[torch.tensor(indices)]  # host: see RetinaFrame.view

    def _next_eval_index(self) -> int:
        """Rank 0's pick of an eval image, the same on every rank."""
        choice = random.randrange(len(self.datamanager.eval_dataset)) if self.comm.is_main else None
        return int(broadcast_object(self.comm, choice, what="eval image index"))

    def get_eval_loss_dict(self, step: int):
        self.eval()
        index = self._next_eval_index()
        owner = image_owner(index, self.world_size)  # the only rank holding the image
        outputs = self._render_for_owners(self._eval_cameras([index]), torch.tensor([owner]))
        values = None
        if self.comm.rank == owner:
            data = self._eval_data(index)
            metrics = self.model.get_metrics_dict(outputs[0], data)
            losses = self.model.get_loss_dict(outputs[0], data, metrics)
            values = ({k: float(v) for k, v in losses.items()}, {k: float(v) for k, v in metrics.items()})
        losses, metrics = broadcast_object(self.comm, values, src=owner, what="eval loss")
        self.train()
        as_tensors = lambda d: {k: torch.tensor(v) for k, v in d.items()}  # noqa: E731
        return outputs.get(0, {}), as_tensors(losses), as_tensors(metrics)

    def get_eval_image_metrics_and_images(self, step: int):
        self.eval()
        index = self._next_eval_index()
        owner = image_owner(index, self.world_size)  # the only rank holding the image
        camera = self._eval_cameras([index])
        outputs = self._render_for_owners(camera, torch.tensor([owner]))
        payload, images = None, {}
        if self.comm.rank == owner:
            metrics, images = self.model.get_image_metrics_and_images(outputs[0], self._eval_data(index))
            # The logger runs on rank 0: another owner sends its images along with the metrics.
            sent = {k: v.detach().cpu() for k, v in images.items()} if owner != 0 else {}
            payload = ({k: float(v) for k, v in metrics.items()}, sent)
        metrics, sent = broadcast_object(self.comm, payload, src=owner, what="eval image metrics")
        metrics = dict(metrics)
        images = (images if owner == 0 else sent) if self.comm.is_main else {}
        metrics["num_rays"] = int((camera.height * camera.width).sum().item())
        self.train()
        return metrics, images

    def get_average_eval_image_metrics(
        self, step: Optional[int] = None, output_path: Optional[Path] = None, get_std: bool = False
    ):
        """Every eval image once, on one rank or several (``evaluation.average_eval_metrics``)."""
        self.eval()
        try:
            return average_eval_metrics(self, output_path, get_std)
        finally:
            self.train()

    def get_average_image_metrics(self, data_loader, image_prefix: str, step: Optional[int] = None,
                                  output_path: Optional[Path] = None, get_std: bool = False):
        """nerfstudio's, on one rank or several (``evaluation.average_loader_metrics``)."""
        self.eval()
        try:
            return average_loader_metrics(self, data_loader, image_prefix, output_path, get_std)
        finally:
            self.train()
