"""Method specifications of retina-gs (registered as nerfstudio entry points in pyproject.toml).

One method name serves one process and several: the pipeline (``DistributedRetinaPipeline``)
and trainer (``RetinaTrainer``) behave as nerfstudio's ``VanillaPipeline`` / our
``LandmarkTrainer`` when the run has one rank, and shard the Gaussians by kd-tree subtree
when it has several (torchrun or ``landmark-train`` on CPU and GPU; ``ns-train
--machine.num-devices N`` on GPU):

    torchrun --nproc-per-node 2 -m landmark_plugin.distributed.train retina-gs --data DATA ... synthetic-city
    landmark-merge outputs/.../config.yml    # one checkpoint for ns-eval / ns-render / ns-viewer, plus a .ply

The multi-rank knobs are ``--pipeline.max-batch-size``, ``--pipeline.max-load``,
``--pipeline.repartition-every`` and ``--pipeline.collective-timeout-s``.
"""

from __future__ import annotations

from nerfstudio.configs.base_config import ViewerConfig
from nerfstudio.engine.optimizers import AdamOptimizerConfig
from nerfstudio.engine.schedulers import ExponentialDecaySchedulerConfig
from nerfstudio.plugins.types import MethodSpecification

from landmark_plugin.data.nerfstudio_data import PlyNerfstudioDataParserConfig
from landmark_plugin.gaussians.datamanager import RetinaGSDataManagerConfig
from landmark_plugin.gaussians.distributed_pipeline import DistributedRetinaPipelineConfig
from landmark_plugin.gaussians.model import RetinaGSModelConfig
from landmark_plugin.gaussians.trainer import RetinaTrainerConfig
from landmark_plugin.gaussians.visible_adam import VisibleAdamOptimizerConfig


def gaussian_optimizers(max_steps: int) -> dict:
    """splatfacto's learning rates; the schedules end at ``max_steps`` (the trainer re-targets
    them to ``--max-num-iterations``)."""

    def adam(lr: float) -> AdamOptimizerConfig:
        return VisibleAdamOptimizerConfig(lr=lr, eps=1e-15)  # Adam unless --pipeline.model.visible-adam

    return {
        "means": {"optimizer": adam(1.6e-4), "scheduler": ExponentialDecaySchedulerConfig(lr_final=1.6e-6, max_steps=max_steps)},
        "features_dc": {"optimizer": adam(0.0025), "scheduler": None},
        "features_rest": {"optimizer": adam(0.0025 / 20), "scheduler": None},
        "opacities": {"optimizer": adam(0.05), "scheduler": None},
        "scales": {"optimizer": adam(0.005), "scheduler": None},
        "quats": {"optimizer": adam(0.001), "scheduler": None},
        # splatfacto's; used with --pipeline.model.use-bilateral-grid True
        "bilateral_grid": {
            "optimizer": AdamOptimizerConfig(lr=2e-3, eps=1e-15),
            "scheduler": ExponentialDecaySchedulerConfig(lr_final=1e-4, max_steps=max_steps, warmup_steps=1000, lr_pre_warmup=0),
        },
        # used with --pipeline.model.appearance-features N: the Gaussians' features, then the
        # image embeddings and their MLP
        "appearance_features": {"optimizer": adam(0.0025), "scheduler": None},
        "appearance": {
            "optimizer": AdamOptimizerConfig(lr=1e-3, eps=1e-15),
            "scheduler": ExponentialDecaySchedulerConfig(lr_final=1e-4, max_steps=max_steps),
        },
        "camera_opt": {
            "optimizer": AdamOptimizerConfig(lr=1e-4, eps=1e-15),
            "scheduler": ExponentialDecaySchedulerConfig(lr_final=5e-7, max_steps=max_steps, warmup_steps=1000, lr_pre_warmup=0),
        },
    }


def retina_gs_config(method_name: str, max_steps: int, model: RetinaGSModelConfig) -> RetinaTrainerConfig:
    """One retina-gs trainer; the variants differ only in ``model`` and ``max_steps``."""
    return RetinaTrainerConfig(
        method_name=method_name,
        steps_per_eval_image=100,
        steps_per_eval_batch=0,
        steps_per_save=2000,
        steps_per_eval_all_images=1000,
        max_num_iterations=max_steps,
        mixed_precision=False,
        pipeline=DistributedRetinaPipelineConfig(
            datamanager=RetinaGSDataManagerConfig(
                dataparser=PlyNerfstudioDataParserConfig(load_3D_points=True),
                cache_images_type="uint8",
            ),
            model=model,
        ),
        optimizers=gaussian_optimizers(max_steps),
        viewer=ViewerConfig(num_rays_per_chunk=1 << 15, websocket_host="127.0.0.1"),
        vis="viewer",
    )


retina_gs = MethodSpecification(
    config=retina_gs_config("retina-gs", 30000, RetinaGSModelConfig(tree_depth=2)),
    description="RetinaGS: Gaussian splatting partitioned by a kd-tree, composited front to back in leaf order.",
)

retina_gs_small = MethodSpecification(
    config=retina_gs_config(
        "retina-gs-small",
        3000,
        RetinaGSModelConfig(tree_depth=2, sh_degree=1, warmup_length=200, refine_every=100, stop_split_at=2500, num_downscales=0),
    ),
    description="retina-gs for quick runs and CPU: 3000 steps, SH degree 1, full resolution from the start.",
)
