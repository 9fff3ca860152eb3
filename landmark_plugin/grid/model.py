"""landmark-grid model: the multi-branch grid field behind nerfstudio's proposal sampling.

The model subclasses nerfacto's: ray marching (proposal sampler -> field -> renderers), the
proposal losses, metrics and images are nerfacto's own code.  What changes is what is being
sampled: the field is ``MultiBranchGridField`` and the proposal density fields are small
multi-branch grids too (pure torch, fast on CPU and GPU, sharded the same way), near/far come
from the scene box, and the grid grows on a schedule with TV / L1 regularisers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Dict, List, Literal, Optional, Tuple, Type

import numpy as np
import torch
from torch.nn import Parameter

from nerfstudio.cameras.camera_optimizers import CameraOptimizer, CameraOptimizerConfig
from nerfstudio.engine.callbacks import TrainingCallback, TrainingCallbackAttributes, TrainingCallbackLocation
from nerfstudio.engine.optimizers import Optimizers
from nerfstudio.model_components.losses import MSELoss
from nerfstudio.model_components.ray_samplers import (
    ProposalNetworkSampler,
    UniformLinDispPiecewiseSampler,
    UniformSampler,
)
from nerfstudio.model_components.renderers import AccumulationRenderer, DepthRenderer, RGBRenderer
from nerfstudio.model_components.scene_colliders import AABBBoxCollider, NearFarCollider
from nerfstudio.models.base_model import Model, ModelConfig
from nerfstudio.models.nerfacto import NerfactoModel

from landmark_plugin.errors import ConfigError
from landmark_plugin.grid.field import GridDensityFieldConfig, MultiBranchGridField, MultiBranchGridFieldConfig
from landmark_plugin.grid.layout import GridEditLayout
from landmark_plugin.grid.occupancy import GridOccupancy, OccupancyConfig, occupancy_outputs
from landmark_plugin.metrics import build_lpips, without_unavailable_lpips
from landmark_plugin.viewer.controls import LayoutControls


class LazyLPIPS:
    """LPIPS built on first use (eval only): training never needs it, and building it costs
    seconds (offline: a failed download, then ``build_lpips``'s NaN stand-in).  Not a Module,
    so its AlexNet weights stay out of checkpoints."""

    def __init__(self) -> None:
        self._metric = None

    def __call__(self, pred: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
        if self._metric is None:
            self._metric = build_lpips(normalize=True)
        self._metric = self._metric.to(pred.device)
        return self._metric(pred, gt)


def upsample_steps(fractions: Tuple[float, ...], max_num_iterations: int) -> List[int]:
    """Training steps (one entry per upsampling, repeats allowed) for fractions of the run."""
    return sorted(max(0, min(max_num_iterations - 1, round(f * max_num_iterations))) for f in fractions)


@dataclass
class LandmarkGridModelConfig(ModelConfig):
    """landmark-grid: LandMark's multi-branch grid NeRF on nerfstudio's samplers and renderers."""

    _target: Type = dataclasses.field(default_factory=lambda: LandmarkGridModel)
    """target class to instantiate"""
    # (dataclasses.field spelled out: this config has a member named `field`)
    enable_collider: bool = True
    """Clip rays to the scene box (near/far from the box, which the datamanager derives from the data);
    with --pipeline.model.field.contraction linf rays run from near_plane to far_plane instead."""
    near_plane: float = 0.05
    """Closest distance to the camera sampled during training (rays start at the box otherwise)."""
    far_plane: float = 1000.0
    """Farthest distance sampled with --pipeline.model.field.contraction linf (nerfacto's); a
    bounded field ends rays at the box instead."""
    field: MultiBranchGridFieldConfig = dataclasses.field(default_factory=MultiBranchGridFieldConfig)
    """The multi-branch grid field (blocks, factorisation, resolution, decoder)."""
    upsample_fractions: Tuple[float, ...] = (0.05, 0.1, 0.2)
    """Fractions of max_num_iterations at which every grid doubles its cells (exact resampling;
    Adam state is carried over).  Empty: keep the initial resolution."""
    sampler: Literal["proposal", "occupancy"] = "proposal"
    """How rays are sampled.  proposal: nerfacto's proposal grids (options below).  occupancy:
    empty-space skipping -- an occupancy grid over the scene box, updated from the field's density
    during training, a uniform march through its occupied cells only, and early ray termination
    (options under --pipeline.model.occupancy; the proposal grids are kept but unused)."""
    occupancy: OccupancyConfig = dataclasses.field(default_factory=OccupancyConfig)
    """The occupancy grid and march of ``sampler occupancy`` (ignored by ``proposal``)."""
    proposal_cells: Tuple[int, ...] = (32, 64)
    """Cells per block (longest axis) of each proposal density grid, one entry per proposal round."""
    proposal_components: int = 8
    """Density components of the proposal grids."""
    num_proposal_samples_per_ray: Tuple[int, ...] = (256, 96)
    """Samples per ray for each proposal round."""
    num_nerf_samples_per_ray: int = 48
    """Samples per ray evaluated by the grid field."""
    proposal_update_every: int = 5
    """Update the proposal sampling every n steps after the warmup."""
    proposal_warmup: int = 5000
    """Scales n from 1 to proposal_update_every over this many steps."""
    use_proposal_weight_anneal: bool = True
    """Anneal the proposal weights before PDF sampling (mip-NeRF 360, eq. 18)."""
    proposal_weights_anneal_slope: float = 10.0
    """Slope of the annealing function."""
    proposal_weights_anneal_max_num_iters: int = 1000
    """Steps over which the annealing runs."""
    use_single_jitter: bool = True
    """One jitter for all samples of a ray."""
    interlevel_loss_mult: float = 1.0
    """Proposal (interlevel) loss weight."""
    distortion_loss_mult: float = 0.002
    """Distortion loss weight."""
    tv_density_mult: float = 1e-3
    """TV weight on the density planes."""
    tv_appearance_mult: float = 1e-4
    """TV weight on the appearance planes."""
    l1_density_mult: float = 5e-4
    """L1 (sparsity) weight on the density planes and lines."""
    background_color: Literal["random", "last_sample", "black", "white"] = "last_sample"
    """Background: 'last_sample' learns it (sky of city scenes); 'white' for blender scenes."""
    use_gradient_scaling: bool = False
    """Scale gradients down near the camera (floater reduction)."""
    camera_optimizer: CameraOptimizerConfig = dataclasses.field(
        default_factory=lambda: CameraOptimizerConfig(mode="off")
    )
    """Camera pose refinement ('off' by default: synthetic and SfM poses are used as given)."""
    parallel: Literal["none", "branch", "plane", "channel"] = "none"
    """Model parallelism on several ranks (README: Distributed landmark-grid).  branch: each rank of a
    model-parallel group holds whole blocks (some one more where the ranks do not divide them); plane:
    each block's x-y plane is cut into sub-planes of whole cells over the ranks (as evenly as the
    cells allow), with one shared z line (implies field.shared_line; mode xy-z); channel: every rank
    holds every block with 1/N of the channels (some one more where N does not divide them).  The proposal grids are split the same way.  One process:
    the whole model (so a merged checkpoint of any strategy loads into the same config)."""
    model_parallel_size: Optional[int] = None
    """Ranks per model-parallel group (consecutive ranks); the world size divided by it is the
    data-parallel degree.  Default: the world size (none: 1, pure data parallel)."""

    # nerfacto's methods read these; grid fields have no normals, so they are constants, not options
    predict_normals = False

    @property
    def num_proposal_iterations(self) -> int:
        """Proposal rounds (nerfacto's name), one per proposal grid."""
        return len(self.proposal_cells)


SHARDED_LOSSES = ("tv_density", "tv_appearance", "l1_density")
"""Losses that are sums of per-rank shares under model parallelism (regularisers of the grids);
the other losses are computed whole, and equally, on every rank of a model-parallel group."""


class LandmarkGridModel(NerfactoModel):
    """Multi-branch grid NeRF: nerfacto's rendering pipeline around a MultiBranchGridField.

    Args:
        config: model configuration.
    """

    config: LandmarkGridModelConfig  # type: ignore[assignment]
    field: MultiBranchGridField

    def populate_modules(self):
        """Field, proposal grids, samplers, collider, renderers, losses and metrics."""
        # Model's collider setup only: nerfacto's populate_modules would build hash-grid fields
        Model.populate_modules(self)
        config = self.config
        if len(config.num_proposal_samples_per_ray) != config.num_proposal_iterations:
            raise ConfigError("num_proposal_samples_per_ray needs one entry per proposal_cells entry")
        aabb = self.scene_box.aabb
        plane = config.parallel == "plane"
        if plane and config.field.mode != "xy-z":
            raise ConfigError("--pipeline.model.parallel plane cuts the x-y plane into sub-planes: it needs "
                             "--pipeline.model.field.mode xy-z")
        # plane parallelism shares one z line over all blocks (every rank holds a copy)
        field_config = dataclasses.replace(config.field, shared_line=True) if plane else config.field
        self.field = field_config.setup(aabb=aabb, num_images=self.num_train_data)
        self.proposal_networks = torch.nn.ModuleList(
            GridDensityFieldConfig(
                blocks=config.field.blocks,
                mode=config.field.mode,
                cells=cells,
                density_components=config.proposal_components,
                density_bias=config.field.density_bias,
                feature_backend=config.field.feature_backend,
                shared_line=plane,
                contraction=config.field.contraction,
            ).setup(aabb=aabb)
            for cells in config.proposal_cells
        )
        self.density_fns = [net.density_fn for net in self.proposal_networks]
        self.camera_optimizer: CameraOptimizer = config.camera_optimizer.setup(
            num_cameras=self.num_train_data, device="cpu"
        )

        def update_schedule(step):
            return np.clip(
                np.interp(step, [0, config.proposal_warmup], [0, config.proposal_update_every]),
                1,
                config.proposal_update_every,
            )

        # a bounded box: uniform initial samples between the box entry and exit points; unbounded
        # (contracted): nerfacto's, uniform up to distance 1 and in disparity beyond
        unbounded = config.field.contraction != "none"
        initial = UniformLinDispPiecewiseSampler if unbounded else UniformSampler
        self.proposal_sampler = ProposalNetworkSampler(
            num_nerf_samples_per_ray=config.num_nerf_samples_per_ray,
            num_proposal_samples_per_ray=config.num_proposal_samples_per_ray,
            num_proposal_network_iterations=config.num_proposal_iterations,
            single_jitter=config.use_single_jitter,
            update_sched=update_schedule,
            initial_sampler=initial(single_jitter=config.use_single_jitter),
        )
        self.occupancy: Optional[GridOccupancy] = None
        if config.sampler == "occupancy":
            self.occupancy = self._make_occupancy()
        if unbounded:
            self.collider = NearFarCollider(near_plane=config.near_plane, far_plane=config.far_plane)
        elif config.enable_collider:
            self.collider = AABBBoxCollider(scene_box=self.scene_box, near_plane=config.near_plane)

        self.renderer_rgb = RGBRenderer(background_color=config.background_color)
        self.renderer_accumulation = AccumulationRenderer()
        self.renderer_depth = DepthRenderer(method="median")
        self.renderer_expected_depth = DepthRenderer(method="expected")
        self.rgb_loss = MSELoss()
        self.step = 0

        from torchmetrics.functional import structural_similarity_index_measure
        from torchmetrics.image import PeakSignalNoiseRatio

        self.psnr = PeakSignalNoiseRatio(data_range=1.0)
        self.ssim = structural_similarity_index_measure
        self.lpips = LazyLPIPS()
        self.layout = LayoutControls(self)  # viewer folders: partition, edits, appearance

    def _make_occupancy(self) -> GridOccupancy:
        config = self.config
        occupancy = config.occupancy
        if not config.enable_collider or config.field.contraction != "none":
            raise ConfigError("--pipeline.model.sampler occupancy marches from the box entry to its exit: it needs "
                              "--pipeline.model.enable-collider True and --pipeline.model.field.contraction none")
        if min(occupancy.cells, occupancy.march_samples, occupancy.update_every) < 1:
            raise ConfigError("--pipeline.model.occupancy.cells, .march-samples and .update-every must be positive")
        return GridOccupancy(occupancy, self.scene_box.aabb)

    def get_outputs(self, ray_bundle):
        """nerfacto's proposal sampling, or the occupancy march (``sampler occupancy``)."""
        if self.occupancy is None:
            return super().get_outputs(ray_bundle)
        if self.training:
            self.camera_optimizer.apply_to_raybundle(ray_bundle)
        return occupancy_outputs(self, ray_bundle)

    def get_metrics_dict(self, outputs, batch):
        if self.occupancy is None:
            return super().get_metrics_dict(outputs, batch)
        # no proposal weights: nerfacto's distortion metric has nothing to read
        metrics = {"psnr": self.psnr(outputs["rgb"], self.renderer_rgb.blend_background(batch["image"].to(self.device)))}
        metrics["samples_per_ray"] = outputs["num_samples_per_ray"].mean()
        self.camera_optimizer.get_metrics_dict(metrics)
        return metrics

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # only a load of this model's state (field keys present) decides that the grid is missing:
        # nerfstudio's pipeline also passes its own, non-model entries through here afterwards
        if self.occupancy is not None and any(key.startswith(prefix + "field.") for key in state_dict):
            self.occupancy.adopt_missing_state(state_dict, prefix + "occupancy.")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def scene_layout(self) -> GridEditLayout:
        """The layout-edit adapter of this model."""
        return GridEditLayout(self)

    def get_param_groups(self) -> Dict[str, List[Parameter]]:
        """'grids' (planes and lines), 'decoder', 'proposal_networks' and the camera optimiser."""
        groups = {
            "grids": self.field.grid_parameters(),
            "decoder": self.field.decoder_parameters(),
            "proposal_networks": list(self.proposal_networks.parameters()),
        }
        self.camera_optimizer.get_param_groups(param_groups=groups)
        return groups

    def get_training_callbacks(
        self, training_callback_attributes: TrainingCallbackAttributes
    ) -> List[TrainingCallback]:
        callbacks = super().get_training_callbacks(training_callback_attributes)
        if self.occupancy is not None:
            occupancy = self.occupancy
            callbacks.append(
                TrainingCallback(
                    where_to_run=[TrainingCallbackLocation.BEFORE_TRAIN_ITERATION],
                    update_every_num_iters=1,
                    func=lambda step: occupancy.update(step, self.field.density_fn),
                )
            )
        trainer = training_callback_attributes.trainer
        if not self.config.upsample_fractions or trainer is None:
            return callbacks
        steps = upsample_steps(self.config.upsample_fractions, trainer.config.max_num_iterations)
        optimizers = training_callback_attributes.optimizers

        def upsample(step: int) -> None:
            # several fractions may round to the same step on short runs: grow once per entry
            for _ in range(steps.count(step)):
                self.upsample_grids(optimizers)

        callbacks.append(
            TrainingCallback(
                where_to_run=[TrainingCallbackLocation.AFTER_TRAIN_ITERATION],
                iters=tuple(sorted(set(steps))),
                func=upsample,
            )
        )
        return callbacks

    def upsample_grids(self, optimizers: Optional[Optimizers] = None) -> None:
        """Double the cells of the field's grids; the optimisers keep their state (resampled)."""
        torch_optimizers = list(optimizers.optimizers.values()) if optimizers is not None else []
        replaced = {}
        for factors in self.field.factor_sets():
            replaced.update(factors.upsample(2, torch_optimizers))
        if optimizers is not None:  # nerfstudio keeps its own parameter lists for gradient clipping
            for params in optimizers.parameters.values():
                params[:] = [replaced.get(p, p) for p in params]

    def get_loss_dict(self, outputs, batch, metrics_dict=None):
        if self.occupancy is None:
            loss_dict = super().get_loss_dict(outputs, batch, metrics_dict)
        else:  # nerfacto's rgb loss; the proposal losses have no proposal weights to compare
            pred, gt = self.renderer_rgb.blend_background_for_loss_computation(
                pred_image=outputs["rgb"], pred_accumulation=outputs["accumulation"], gt_image=batch["image"].to(self.device)
            )
            loss_dict = {"rgb_loss": self.rgb_loss(gt, pred)}
            if self.training:
                self.camera_optimizer.get_loss_dict(loss_dict)
        if self.training:
            config = self.config
            if config.tv_density_mult > 0:
                loss_dict["tv_density"] = config.tv_density_mult * self.field.density.tv()
            if config.tv_appearance_mult > 0:
                loss_dict["tv_appearance"] = config.tv_appearance_mult * self.field.appearance.tv()
            if config.l1_density_mult > 0:
                loss_dict["l1_density"] = config.l1_density_mult * self.field.density.l1()
        return loss_dict

    def get_image_metrics_and_images(self, outputs, batch):
        if self.occupancy is not None:  # nerfacto draws one depth image per proposal round
            outputs = {**outputs, **{f"prop_depth_{i}": outputs["depth"] for i in range(self.config.num_proposal_iterations)}}
        metrics, images = super().get_image_metrics_and_images(outputs, batch)
        return without_unavailable_lpips(metrics), images

