"""Method specification of landmark-grid (registered as a nerfstudio entry point in pyproject.toml)."""

from __future__ import annotations

from nerfstudio.configs.base_config import ViewerConfig
from nerfstudio.engine.optimizers import AdamOptimizerConfig
from nerfstudio.engine.schedulers import ExponentialDecaySchedulerConfig
from nerfstudio.plugins.types import MethodSpecification

from landmark_plugin.data.nerfstudio_data import PlyNerfstudioDataParserConfig
from landmark_plugin.grid.datamanager import LandmarkGridDataManagerConfig
from landmark_plugin.grid.distributed_pipeline import DistributedGridPipelineConfig
from landmark_plugin.grid.model import LandmarkGridModelConfig
from landmark_plugin.grid.trainer import GridTrainerConfig


def grid_optimizers(max_steps: int) -> dict:
    """TensoRF-style rates: grids fast (0.02), decoder slow (1e-3), both decaying 10x by ``max_steps``."""

    def group(lr: float, lr_final: float) -> dict:
        return {
            "optimizer": AdamOptimizerConfig(lr=lr, eps=1e-15),
            "scheduler": ExponentialDecaySchedulerConfig(lr_final=lr_final, max_steps=max_steps),
        }

    return {
        "grids": group(2e-2, 2e-3),
        "decoder": group(1e-3, 1e-4),
        "proposal_networks": group(2e-2, 2e-3),
        "camera_opt": group(1e-3, 1e-4),  # used only with --pipeline.model.camera-optimizer.mode SO3xR3
    }


def landmark_grid_config(method_name: str = "landmark-grid", max_steps: int = 30000) -> GridTrainerConfig:
    """The landmark-grid trainer: our pipeline (VanillaPipeline on one rank; model and data parallel
    on several, see grid/parallel.py), datamanager (box from the data) and model."""
    return GridTrainerConfig(
        method_name=method_name,
        steps_per_eval_batch=500,
        steps_per_eval_image=500,
        steps_per_save=2000,
        max_num_iterations=max_steps,
        mixed_precision=True,  # decoder MLP in fp16 on CUDA; grids stay fp32; off on CPU anyway
        pipeline=DistributedGridPipelineConfig(
            datamanager=LandmarkGridDataManagerConfig(
                # the datamanager reads sparse_pc.ply for the scene box itself (without open3d)
                dataparser=PlyNerfstudioDataParserConfig(),
                train_num_rays_per_batch=4096,
                eval_num_rays_per_batch=4096,
            ),
            model=LandmarkGridModelConfig(eval_num_rays_per_chunk=1 << 14),
        ),
        optimizers=grid_optimizers(max_steps),
        viewer=ViewerConfig(num_rays_per_chunk=1 << 14, websocket_host="127.0.0.1"),
        vis="viewer",
    )


landmark_grid = MethodSpecification(
    config=landmark_grid_config(),
    description=(
        "LandMark's multi-branch grid NeRF: x-y blocks of plane x line feature grids, a shared decoder "
        "with appearance codes, proposal sampling inside the data-derived scene box."
    ),
)
