"""nerfstudio pipeline for model-parallel retina-gs: a thin adapter over ``ShardedRetina``.

Differences from ``VanillaPipeline``: no DDP wrapper (each rank's model holds only the
Gaussians of its subtrees, and only their optimiser state); the model is initialised
identically on every rank (fixed seed) and then sharded; each step takes a camera batch packed
under ``max_batch_size`` / ``max_load`` from a camera queue that is the same on every rank
(a seeded permutation per epoch), and each rank reads only the images of the cameras it owns.

Status: training steps run through ``ShardedRetina`` (tested for exactness in
tests/test_distributed_retina.py); densification statistics, migration at refinement steps,
sharded saving in the trainer and distributed evaluation are not wired in yet.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import Dict, List, Literal, Optional, Type

import torch
from nerfstudio.pipelines.base_pipeline import VanillaPipeline, VanillaPipelineConfig

from landmark_plugin.distributed.groups import init_comm
from landmark_plugin.distributed.shards import shard_
from landmark_plugin.gaussians.sharded import ShardedRetina


@dataclass
class DistributedRetinaPipelineConfig(VanillaPipelineConfig):
    """retina-gs with the Gaussians sharded over ranks by kd-tree subtrees."""

    _target: Type = field(default_factory=lambda: DistributedRetinaPipeline)
    max_batch_size: int = 4
    """Most cameras per step (RetinaGS's batch size)."""
    max_load: int = 4
    """Most render tasks (camera x own visible subtree) any rank gets per step."""
    repartition_every: int = 0
    """Migrate Gaussians that left their rank's region every this many steps (0: only at refinement)."""
    collective_timeout_s: float = 600.0
    """A collective waiting longer than this for a peer fails with a clear error instead of hanging."""
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    """Process group backend: NCCL on CUDA, gloo on CPU (auto)."""
    init_seed: int = 0
    """Seed of the model initialisation and of the camera queue (identical on every rank)."""


class DistributedRetinaPipeline(VanillaPipeline):
    """VanillaPipeline without DDP, over one rank's shard of a RetinaGSModel."""

    config: DistributedRetinaPipelineConfig

    def __init__(self, config: DistributedRetinaPipelineConfig, device: str, test_mode="val", world_size: int = 1,
                 local_rank: int = 0, grad_scaler=None):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.init_seed)  # identical initial model on every rank
            # world_size=1: VanillaPipeline would otherwise wrap the model in DDP.
            super().__init__(config, device, test_mode, world_size=1, local_rank=local_rank, grad_scaler=grad_scaler)
        timeout = datetime.timedelta(seconds=config.collective_timeout_s)
        self.comm = init_comm(device, timeout=timeout, backend=config.backend)
        self.world_size = self.comm.world_size
        self.sharded = ShardedRetina(self.comm, self.model)
        shard_(self.comm, self.model, self.sharded.parts)
        self._queue: List[int] = []
        self._epoch = 0

    def _next_pool(self, size: int) -> List[int]:
        num = len(self.datamanager.train_dataset)
        while len(self._queue) < size:
            g = torch.Generator().manual_seed(self.config.init_seed * 1_000_003 + self._epoch)
            self._queue += torch.randperm(num, generator=g).tolist()
            self._epoch += 1
        return self._queue[:size]

    def get_train_loss_dict(self, step: int):
        dm = self.datamanager
        cameras = dm.train_dataset.cameras
        pool = self._next_pool(self.config.max_batch_size)
        pool_cameras = cameras[torch.tensor(pool)].to(self.device)
        size, visible, owners = self.sharded.plan_batch(pool_cameras, self.config.max_batch_size, self.config.max_load)
        batch, self._queue = pool[:size], self._queue[size:]

        def batch_of(b: int) -> Dict[str, torch.Tensor]:
            data = dict(dm.cached_train[batch[b]])  # only owners read images
            data["image"] = data["image"].to(self.device)
            return data

        batch_cameras = cameras[torch.tensor(batch)].to(self.device)
        batch_cameras.metadata = {"cam_idx": torch.tensor(batch)[:, None]}
        loss_dict, metrics_dict, outputs = self.sharded.batch_loss(batch_cameras, visible, owners, batch_of)
        return outputs, loss_dict, metrics_dict

    def get_eval_image_metrics_and_images(self, step: int):
        if self.world_size > 1:
            raise NotImplementedError("distributed evaluation is not implemented yet; merge the shards and run ns-eval")
        return super().get_eval_image_metrics_and_images(step)

    def get_average_image_metrics(self, *args, **kwargs):
        if self.world_size > 1:
            raise NotImplementedError("distributed evaluation is not implemented yet; merge the shards and run ns-eval")
        return super().get_average_image_metrics(*args, **kwargs)
