"""retina-gs on one device: splatfacto's Gaussians, owned by the leaves of a kd-tree.

The model is a thin adapter over core/: each Gaussian belongs to the leaf holding its mean,
the camera's leaf order sorts the leaves front to back, ``render_partial`` renders all leaves
in one pass sorted by (leaf position, depth), and ``composite`` adds the background.  On one
device that single partial is the whole image; the distributed pipeline renders one partial
per rank and composites them with the same function.

Everything else (losses, metrics, densification through gsplat's DefaultStrategy, optimiser
groups, export) is splatfacto's, inherited.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Literal, Optional, Tuple, Type, Union

import torch
from nerfstudio.cameras.cameras import Cameras
from nerfstudio.models.splatfacto import (
    RGB2SH,
    SplatfactoModel,
    SplatfactoModelConfig,
    num_sh_bases,
    random_quat_tensor,
)
from nerfstudio.utils.rich_utils import CONSOLE

from landmark_plugin.config_checks import check_tree_fits_points
from landmark_plugin.core.clip import unbounded_leaf_boxes
from landmark_plugin.core.edits import BoxEdit
from landmark_plugin.core.partition import KDTree, assign_leaves, build_kdtree, leaf_counts
from landmark_plugin.core.render import Gaussians
from landmark_plugin.distributed.groups import Comm
from landmark_plugin.gaussians.appearance import GaussianAppearance, make_grids
from landmark_plugin.gaussians.frame import RetinaFrame
from landmark_plugin.gaussians.frame_stats import ensure_statistics
from landmark_plugin.gaussians.layout import RetinaEditLayout
from landmark_plugin.gaussians.model_offload import OutOfCore
from landmark_plugin.gaussians.offload import OffloadStore
from landmark_plugin.gaussians.strategy import RetinaStrategyConfig
from landmark_plugin.gaussians.visible_adam import bind_visibility
from landmark_plugin.metrics import offline_safe_lpips, without_unavailable_lpips
from landmark_plugin.viewer.controls import LayoutControls


@dataclass
class RetinaGSModelConfig(SplatfactoModelConfig):
    """retina-gs: Gaussians partitioned by a kd-tree into 2**tree_depth leaves."""

    _target: Type = field(default_factory=lambda: RetinaGSModel)
    tree_depth: int = 2
    """kd-tree depth: the Gaussians are owned by 2**tree_depth leaves (whole subtrees go to ranks)."""
    split_axes: Literal["widest", "xy"] = "widest"
    """Split each kd-tree node on its widest axis, or alternate x and y (aerial captures)."""
    mode: Literal["auto", "plain", "clip"] = "plain"
    """plain: each Gaussian is rendered by its own leaf only, and the composite equals one render
    sorted by (leaf order, depth).  clip: RetinaGS's rule: a Gaussian counts at a pixel only in the
    leaf whose box holds the point on the pixel's ray at the Gaussian's centre depth, and it is
    shared with every leaf it can reach, so the render equals the unpartitioned render of all
    Gaussians (boundaries are invisible); CUDA kernel of csrc/ on GPU (built on first use), its
    torch twin with backend torch; on several ranks, Gaussians reaching another rank's leaves are
    sent there for the batch.  On one process (one part, no boundary to clip at) clip is the
    ordinary render of all Gaussians, on either backend.  auto: clip where it is fast -- one
    process, or the csrc/ kernel on any number of ranks -- and plain on several ranks with the
    torch backend (the clip twin is several times slower) or without the kernels.  plain stays
    the default until a whole clip training step costs at most 1.10x splatfacto's (BENCHMARKS.md
    has the measured ratio)."""
    backend: Literal["auto", "gsplat", "torch"] = "auto"
    """Rasteriser: gsplat on CUDA, the pure-torch reference on CPU (auto), or forced."""
    affine_appearance: bool = False
    """Per-image appearance as one affine colour transform per training image (a 3x4 matrix on
    the composite: exposure, white balance), the bilateral grid's machinery with a single cell;
    optimised in the bilateral_grid group.  A lighter alternative to use_bilateral_grid."""
    appearance_features: int = 0
    """> 0: per-Gaussian appearance (gaussians/appearance.py): a feature of this size per Gaussian and
    an embedding per training image, mapped by a small MLP to a colour gain and offset per Gaussian
    and image; models light that differs per surface.  Optimised in the appearance_features and
    appearance groups.  0: off."""
    appearance_embedding: int = 32
    """With appearance_features: the size of each training image's appearance embedding."""
    eval_appearance: Literal["none", "mean"] = "none"
    """With an appearance option: the appearance of renders outside training (eval, ns-render, the
    viewer) when no layout edit picks an image's: none (the scene's own colours, splatfacto's
    choice) or mean (the mean of all training images' grids or embeddings)."""
    visible_adam: bool = False
    """Step only the Gaussians the batch saw (gsplat's SelectiveAdam rule, with Adam's bias
    correction kept): a Gaussian no camera of the batch drew keeps its parameters and Adam
    moments unchanged, instead of drifting on its momentum.  Needs the Gaussian groups'
    optimizer to be VisibleAdamOptimizerConfig (the retina-gs method configs' default)."""
    offload: Literal["none", "host", "stream", "auto"] = "none"
    """host: this rank's Gaussians and Adam moments live in host memory; a training batch holds
    only the kd-tree leaves its cameras can draw (exact); needs visible_adam and the default
    strategy.  stream: as host, but the GPU holds one subtree (offload_stream_depth) at a time,
    each frame rendered and re-rendered in backward subtree by subtree.  auto: stream when the
    predicted training footprint exceeds the GPU's free memory (said once)."""
    offload_stream_depth: int = 3
    """With offload stream: subtrees of this depth stream (clamped to the tree and a rank's parts)."""
    offload_budget_gb: float = 0.0
    """With offload host: GPU memory (parameters, moments and statistics of the held rows) up to
    which leaves the current batch does not need stay held, in case a later batch needs them
    again (the least recently needed go first).  A leaf consecutive batches both need stays
    held anyway.  0: hold only each batch's leaves."""
    strategy: RetinaStrategyConfig = field(default_factory=RetinaStrategyConfig)
    """Ownership upkeep: re-assigning Gaussians that left their leaf, rebuilding the tree."""


class RetinaGSModel(OutOfCore, SplatfactoModel):
    """Splatfacto whose Gaussians are grouped by kd-tree leaf and rendered in leaf order."""

    config: RetinaGSModelConfig
    layout_edits: Tuple[BoxEdit, ...] = ()
    """Render-time layout edits (set by landmark_plugin.edits.apply_edits; ignored in training)."""

    def populate_modules(self) -> None:
        # splatfacto's populate_modules allocates the seed colours with .cuda(); ours is the
        # same initialisation on whatever device the model lives on.
        means = self._initial_means()
        check_tree_fits_points(self.config.tree_depth, means.shape[0])  # before anything per leaf is built
        distances, _ = self.k_nearest_sklearn(means, 3)
        scales = torch.log(torch.from_numpy(distances).mean(dim=-1, keepdim=True).clamp_min(1e-7).repeat(1, 3))
        num_points = means.shape[0]
        features_dc, features_rest = self._initial_colors(num_points)
        self.gauss_params = torch.nn.ParameterDict(
            {
                "means": torch.nn.Parameter(means),
                "scales": torch.nn.Parameter(scales),
                "quats": torch.nn.Parameter(random_quat_tensor(num_points)),
                "features_dc": torch.nn.Parameter(features_dc),
                "features_rest": torch.nn.Parameter(features_rest),
                "opacities": torch.nn.Parameter(torch.logit(0.1 * torch.ones(num_points, 1))),
            }
        )
        if self.config.appearance_features > 0:
            self.gauss_params["appearance_features"] = torch.nn.Parameter(0.1 * torch.randn(num_points, self.config.appearance_features))
        self._populate_helpers()
        tree = build_kdtree(means, self.config.tree_depth, axis_rule=self.config.split_axes)
        self._set_tree(tree)
        # A buffer, so checkpoints keep each Gaussian's leaf: it is re-assigned only at
        # refinement steps, and a resumed run must render with the leaves the unbroken run has.
        self.register_buffer("leaf_ids", assign_leaves(tree, means), persistent=True)
        self.layout = LayoutControls(self)  # viewer folders: partition, edits (nerfstudio finds them on the model)

    def _initial_means(self) -> torch.Tensor:
        if self.seed_points is not None and not self.config.random_init:
            return self.seed_points[0].float().clone()
        return (torch.rand((self.config.num_random, 3)) - 0.5) * self.config.random_scale

    def _initial_colors(self, num_points: int) -> Tuple[torch.Tensor, torch.Tensor]:
        dim_sh = num_sh_bases(self.config.sh_degree)
        has_colors = self.seed_points is not None and not self.config.random_init and self.seed_points[1].shape[0] > 0
        if not has_colors:
            return torch.rand(num_points, 3), torch.zeros(num_points, dim_sh - 1, 3)
        rgb = self.seed_points[1].float() / 255.0
        dc = RGB2SH(rgb) if self.config.sh_degree > 0 else torch.logit(rgb, eps=1e-10)
        return dc, torch.zeros(num_points, dim_sh - 1, 3)

    def _populate_helpers(self) -> None:
        """Camera optimiser, metrics, background and densification strategy, as splatfacto builds them."""
        from nerfstudio.models.splatfacto import SSIM, get_color
        from torchmetrics.image import PeakSignalNoiseRatio

        self.camera_optimizer = self.config.camera_optimizer.setup(num_cameras=self.num_train_data, device="cpu")
        self.psnr = PeakSignalNoiseRatio(data_range=1.0)
        self.ssim = SSIM(data_range=1.0, size_average=True, channel=3)
        with offline_safe_lpips():
            from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

            self.lpips = LearnedPerceptualImagePatchSimilarity(normalize=True)
        self.step = 0
        self.crop_box = None
        if self.config.background_color == "random":
            self.background_color = torch.tensor([0.1490, 0.1647, 0.2157])  # viser's background
        else:
            self.background_color = get_color(self.config.background_color)
        self.bil_grids = make_grids(self.config, self.num_train_data)  # None unless use_bilateral_grid
        if self.config.appearance_features > 0:
            self.gaussian_appearance = GaussianAppearance(self.num_train_data, self.config.appearance_features, self.config.appearance_embedding)
        self.eval_appearance_mix: Optional[Tuple[int, Optional[int], float]] = None
        """A layout edit's appearance for renders outside training (``gaussians/appearance.py``)."""
        self.strategy = self.config.strategy.make_gsplat_strategy(self.config, self.num_train_data)
        self.strategy_state = self.strategy.initialize_state(scene_scale=1.0)
        self.strategy.split_normals = self._split_normals
        self.strategy.gather = self._gather_rows
        self._backend_checked = False
        self._auto_mode: Optional[Tuple[Tuple[str, bool], str]] = None
        self.frame = RetinaFrame(Comm.single(), self)
        """The frame path; the distributed pipeline replaces it with one over its ranks."""
        self.offload_store: Optional[OffloadStore] = None
        """With offload: this rank's Gaussians in host memory (made at the first training batch)."""

    # ---- the tree -------------------------------------------------------------------------
    def _set_tree(self, tree: KDTree) -> None:
        """Keep the tree as buffers so it is saved in, and restored from, checkpoints."""
        for name, value in (
            ("tree_bounds", tree.bounds),
            ("tree_split_axis", tree.split_axis),
            ("tree_split_value", tree.split_value),
        ):
            self.register_buffer(name, value.detach().clone(), persistent=True)

    @property
    def cpu_tree(self) -> KDTree:
        """The tree on the CPU, cached until the tree buffers change."""
        key = (id(self.tree_split_value), self.tree_split_value._version)
        if getattr(self, "_cpu_tree_key", None) != key:
            self._cpu_tree = self.tree.to("cpu")
            self._cpu_tree_key = key
        return self._cpu_tree

    @property
    def clip_boxes(self) -> torch.Tensor:
        """[L, 2, 3] leaf boxes with the outer faces at infinity (clip mode), cached per tree."""
        key = (id(self.tree_split_value), self.tree_split_value._version, self.tree_split_value.device)
        if getattr(self, "_clip_boxes_key", None) != key:
            self._clip_boxes = unbounded_leaf_boxes(self.tree)
            self._clip_boxes_key = key
        return self._clip_boxes

    @property
    def tree(self) -> KDTree:
        return KDTree(
            bounds=self.tree_bounds,
            split_axis=self.tree_split_axis,
            split_value=self.tree_split_value,
            depth=self.config.tree_depth,
        )

    def refresh_ownership(self, rebuild: bool = False) -> None:
        """Give every Gaussian to the leaf that holds its mean; optionally rebalance the tree first."""
        with torch.no_grad():
            if rebuild:
                tree = build_kdtree(self.means.detach(), self.config.tree_depth, axis_rule=self.config.split_axes)
                self._set_tree(tree.to(self.tree_split_value.device))  # means may sit in host memory (offload)
            self.leaf_ids = assign_leaves(self.tree, self.means.detach())

    def scene_layout(self) -> RetinaEditLayout:
        """The layout-edit adapter of this model."""
        return RetinaEditLayout(self)

    def leaf_counts(self) -> torch.Tensor:
        store = self.offload_store
        leaf_ids = store.leaf_ids if store is not None and store.staged else self.leaf_ids
        return leaf_counts(leaf_ids, 2**self.config.tree_depth)

    # ---- checkpoints --------------------------------------------------------------------
    def load_state_dict(self, dict, **kwargs):  # type: ignore[override]
        # Parameters change size during training: allocate them at the checkpoint's size, and
        # the tree buffers likewise (a rebuilt tree keeps the same shape, a changed depth not).
        self.step = 30000
        if self.offload_store is not None:
            self.offload_store.reset()  # the checkpoint's Gaussians replace the host copy
        # With offload the Gaussians load into host memory; batches and renders stage what they need.
        where = torch.device("cpu") if self.config.offload in ("host", "stream") else self.device
        for name in list(self.gauss_params.keys()):
            shape = dict[f"gauss_params.{name}"].shape
            self.gauss_params[name] = torch.nn.Parameter(torch.zeros(shape, device=where))
        for name in ("tree_bounds", "tree_split_axis", "tree_split_value"):
            if name in dict:
                self.register_buffer(name, torch.zeros_like(dict[name], device=self.device))
        num_points = dict["gauss_params.means"].shape[0]
        saved_leaves = dict.get("leaf_ids")
        has_leaves = saved_leaves is not None and saved_leaves.shape == (num_points,)
        placeholder = torch.zeros(num_points, dtype=torch.int64, device=where)
        self.register_buffer("leaf_ids", placeholder.clone())
        result = torch.nn.Module.load_state_dict(self, {**dict, "leaf_ids": saved_leaves if has_leaves else placeholder}, **kwargs)
        if not has_leaves:  # a checkpoint written before leaf ids were saved: the leaf of every mean
            self.refresh_ownership()
        return result

    # ---- rendering ------------------------------------------------------------------------
    def get_outputs(self, camera: Cameras) -> Dict[str, Union[torch.Tensor, list]]:
        """One camera through the frame path (``gaussians/frame.py``), whatever the world size:
        with several ranks it is collective (every rank renders its parts of the camera; ns-render
        under torchrun calls it in lockstep) and every rank gets the whole image."""
        if not isinstance(camera, Cameras):
            raise TypeError("retina-gs renders Cameras, not ray bundles")
        if self.training:
            assert camera.shape[0] == 1, "one camera per step"
        if self.leaf_ids.shape[0] != self.num_points or self.leaf_ids.device != self.means.device:
            self.refresh_ownership()
        out = self.frame.render_camera(camera)
        assert out is not None
        height, width = out["rgb"].shape[:2]
        self.last_size = (height, width)
        if out["background"].shape[0] == 3 and not self.training:
            out["background"] = out["background"].expand(height, width, 3)
        return out

    def activated_gaussians(self) -> Gaussians:
        """Parameters as the rasteriser wants them (linear scales, opacities in [0, 1])."""
        if self.config.sh_degree > 0:
            sh = torch.cat([self.features_dc[:, None, :], self.features_rest], dim=1)
        else:
            sh = torch.sigmoid(self.features_dc)[:, None, :]
        return Gaussians(
            means=self.means,
            quats=self.quats,
            scales=torch.exp(self.scales),
            opacities=torch.sigmoid(self.opacities).squeeze(-1),
            sh=sh,
            features=self.gauss_params["appearance_features"] if "appearance_features" in self.gauss_params else None,
        )

    def render_mode(self, backend: str) -> Literal["plain", "clip"]:
        """The rule renders use: ``config.mode``, with ``auto`` resolved (see its docstring)."""
        if self.config.mode != "auto":
            return self.config.mode
        one_part = self.frame.one_part  # the distributed pipeline replaces the frame
        if self._auto_mode is None or self._auto_mode[0] != (backend, one_part):
            from landmark_plugin import cuda

            kernels = backend == "gsplat" and cuda.require(allow_fallback=True) is not None
            mode = "clip" if one_part or kernels else "plain"
            why = "one part: the ordinary render" if one_part else "csrc/ kernel" if kernels else "no csrc/ kernel"
            CONSOLE.print(f"retina-gs: mode auto -> {mode} ({why})")
            self._auto_mode = ((backend, one_part), mode)
        return self._auto_mode[1]

    def _note_backend(self, backend: str) -> None:
        """Say once when the torch reference rasteriser renders (it densifies as gsplat does: the
        same absgrad statistic and threshold)."""
        if self._backend_checked:
            return
        self._backend_checked = True
        if backend == "torch":
            CONSOLE.print("retina-gs: rendering with the torch reference rasteriser (no CUDA)")

    # ---- optimiser and densification -------------------------------------------------------
    def get_param_groups(self) -> Dict[str, list]:
        groups = super().get_param_groups()
        if self.config.affine_appearance:  # splatfacto adds the group for its own option only
            groups["bilateral_grid"] = list(self.bil_grids.parameters())
        if self.config.appearance_features > 0:
            groups["appearance_features"] = [self.gauss_params["appearance_features"]]
            groups["appearance"] = list(self.gaussian_appearance.parameters())
        return groups

    def step_cb(self, optimizers, step) -> None:
        super().step_cb(optimizers, step)
        bind_visibility(self, self.optimizers)

    def visible_rows(self) -> Optional[torch.Tensor]:
        """[N] Gaussians of this rank the last training batch saw (what visible Adam steps)."""
        return self.frame.visible_rows()

    def _gather_rows(self, rows: torch.Tensor) -> torch.Tensor:
        """Every rank's ``rows`` (the densification budget ranks all ranks' candidates)."""
        from landmark_plugin.distributed.collectives import all_gather_rows

        return all_gather_rows(self.frame.comm, rows, "densification budget")

    def _split_normals(self, means: torch.Tensor, step: int) -> torch.Tensor:
        """Split offsets drawn the same on every world size (``partition_invariant_normals``)."""
        from landmark_plugin.gaussians.rows import partition_invariant_normals

        return partition_invariant_normals(self.frame.comm, means, step)

    def step_post_backward(self, step: int, repartition_every: int = 0) -> None:
        """Densify and prune (gsplat's strategy, on the statistics of the last training frame or
        batch), then keep ownership current: at refinement steps (and every
        ``repartition_every`` steps) Gaussians go to the leaf, and with several ranks the rank,
        holding their mean, after a tree rebuild when the strategy says so."""
        from landmark_plugin.gaussians.mcmc import mcmc_step_
        from landmark_plugin.gaussians.rows import migrate_

        info = self.frame.strategy_info()
        policy = self.config.strategy
        rebuild = policy.rebuilds_at(step)
        every = repartition_every > 0 and step > 0 and step % repartition_every == 0
        refresh = rebuild or policy.refreshes_at(step, self.config) or every
        store = self.offload_store
        staged = store is not None and store.staged
        if self.config.strategy.kind == "mcmc":
            if info is not None:
                mcmc_step_(self, getattr(self, "optimizers", None), step)
        elif staged and store.stream is not None:  # statistics gathered group by group (stream.py)
            if refresh or self.strategy.touches_every_row(step):
                store.materialize(on_host=True)
                self.strategy.refine(self.gauss_params, self.optimizers, self.strategy_state, step)
        elif info is not None:
            self.info = info
            state = self.strategy_state
            ensure_statistics(self)
            if staged and (refresh or self.strategy.touches_every_row(step)):
                # Statistics on the staged Gaussians, refinement with all of them in host memory.
                self.strategy.gather_statistics(self.gauss_params, state, step, info)
                store.materialize(on_host=True)
                self.strategy.refine(self.gauss_params, self.optimizers, state, step)
            else:
                self.strategy.step_post_backward(self.gauss_params, self.optimizers, state, step, info, packed=False)
        if refresh and store is not None:
            store.materialize(on_host=True)
        if refresh:
            frame = self.frame
            migrate_(frame.comm, self, getattr(self, "optimizers", None), self.strategy_state, frame.parts, rebuild=rebuild)

    def get_loss_dict(self, outputs, batch, metrics_dict=None) -> Dict[str, torch.Tensor]:
        """splatfacto's, without its bilateral grids' total variation: splatfacto adds it per call,
        i.e. per camera here, over every image's grid; the frame accounts for it once per step
        (``appearance.tv_loss`` and ``sync_grid_gradients_``)."""
        grids_on = self.config.use_bilateral_grid
        self.config.use_bilateral_grid = False
        try:
            return super().get_loss_dict(outputs, batch, metrics_dict)
        finally:
            self.config.use_bilateral_grid = grids_on

    def get_metrics_dict(self, outputs, batch) -> Dict[str, torch.Tensor]:
        metrics = super().get_metrics_dict(outputs, batch)
        if self.training:
            counts = self.leaf_counts()
            metrics["leaf_count_max_over_mean"] = counts.max().float() / counts.float().mean().clamp_min(1.0)
        return metrics

    def get_image_metrics_and_images(self, outputs, batch):
        metrics, images = super().get_image_metrics_and_images(outputs, batch)
        return without_unavailable_lpips(metrics), images
