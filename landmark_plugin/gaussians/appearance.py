"""Per-image appearance of retina-gs: splatfacto's bilateral grid, or one affine colour transform
per image, applied to the composite.

Real captures change exposure, white balance and light from image to image.  With
``use_bilateral_grid`` every training image gets a bilateral grid of affine colour transforms
(nerfstudio's ``BilateralGrid``, splatfacto's option and shapes), sliced by pixel position and
grey level and applied to the camera's composited image, where splatfacto applies it to its
render.  The frame is the same on every world size:

- the rank that composites a camera applies that image's grid, so only it puts a gradient on
  that grid; before the step (``sync_grid_gradients_``, from the pipeline's ``sync_gradients_``)
  the batch's grids' gradients are summed over ranks -- B grids travel, not one per training
  image -- and the total variation's gradient (splatfacto's weight) is added on every rank alike,
  so every rank steps the same grids, as one process would.

``affine_appearance`` is the same machinery with a grid of one cell: a 3x4 colour matrix per image
(exposure, white balance, a colour cast; what the affine models of large-scene papers fit), with no
total variation to regularise (one cell has no neighbours).

``appearance_features`` (> 0) is per-Gaussian appearance instead (the decoupled appearance of
WildGaussians / GS-W): every Gaussian has a learned feature (a Gaussian parameter like its
colour: densified, sent between ranks, saved with it), every training image an embedding, and a
small MLP maps (feature, embedding) to a colour gain and offset per Gaussian, applied to its
colour before rasterising (``core.sh.recolor_sh``).  Light that differs per surface (a low sun
brightening some facades and darkening others) is representable, which no transform of the
composite is.  The image's appearance acts per Gaussian, so the frame applies it to every part's
Gaussians for that camera (copies received from other ranks carry their features) and the
partition stays invisible.  The MLP and the embeddings are replicated; their gradients are summed
over ranks with the other replicated parameters.

Outside training (eval, ns-render, the viewer) the render shows the appearance a layout edit
picks (``edits.Appearance``: one image's grid, or a blend of two), else ``eval_appearance``:
``none`` (splatfacto's: the scene's own colours) or ``mean`` (the mean of all images' grids, or
embeddings); ``fit_embedding`` fits a held-out image's embedding (the NeRF-W evaluation protocol).
"""

from __future__ import annotations

from typing import Dict, Iterable, Optional, Sequence, Tuple

import torch
from jaxtyping import Float
from nerfstudio.cameras.cameras import Cameras
from nerfstudio.model_components.lib_bilagrid import BilateralGrid, total_variation_loss
from nerfstudio.model_components.lib_bilagrid import slice as slice_grid
from torch import Tensor

from landmark_plugin.core.render import Gaussians
from landmark_plugin.core.sh import recolor_sh
from landmark_plugin.distributed.collectives import all_reduce_sum
from landmark_plugin.errors import ConfigError
from landmark_plugin.modes import eval_mode

TV_WEIGHT = 10.0
"""splatfacto's weight of the grids' total variation."""

Mix = Tuple[Tuple[int, float], ...]
"""(image, weight) pairs whose grids, so weighted, give a render's appearance."""


def make_grids(config, num_images: int) -> Optional[BilateralGrid]:
    """One identity grid per training image (``config``: splatfacto's ``use_bilateral_grid``,
    ``grid_shape``; or ``affine_appearance``: one cell), or None when both options are off."""
    chosen = [name for name, on in (("use-bilateral-grid", config.use_bilateral_grid),
              ("affine-appearance", config.affine_appearance), ("appearance-features", config.appearance_features > 0)) if on]
    if len(chosen) > 1:
        raise ConfigError("choose one per-image appearance, not " + " and ".join(f"--pipeline.model.{c}" for c in chosen))
    if config.affine_appearance:
        return BilateralGrid(num=num_images, grid_X=1, grid_Y=1, grid_W=1)
    if not config.use_bilateral_grid:
        return None
    grid_x, grid_y, grid_w = config.grid_shape
    return BilateralGrid(num=num_images, grid_X=grid_x, grid_Y=grid_y, grid_W=grid_w)


def image_index(cameras: Cameras, b: int) -> Optional[int]:
    """The training image of camera ``b`` (nerfstudio's ``cam_idx`` metadata), if it has one."""
    index = (cameras.metadata or {}).get("cam_idx")
    if index is None:
        return None
    if isinstance(index, int):
        return index
    return int(torch.as_tensor(index).reshape(-1)[b])


def eval_mix(model) -> Mix:
    """The appearance of renders outside training: the layout edit's, else ``eval_appearance``."""
    picked = getattr(model, "eval_appearance_mix", None)
    if picked is not None:
        image, to_image, t = picked
        return ((image, 1.0),) if to_image is None or t == 0.0 else ((image, 1.0 - t), (to_image, t))
    if model.config.eval_appearance == "mean":
        count = model.num_train_data
        return tuple((i, 1.0 / count) for i in range(count))
    return ()


class GaussianAppearance(torch.nn.Module):
    """Per-image embeddings and the MLP that maps (a Gaussian's feature, an image's embedding) to
    that Gaussian's colour gain and offset in that image.  The last layer starts at zero, so
    training starts from the Gaussians' own colours (gain 1, offset 0)."""

    def __init__(self, num_images: int, feature_dim: int, embedding_dim: int, hidden: int = 64):
        super().__init__()
        self.embeddings = torch.nn.Parameter(0.1 * torch.randn(max(num_images, 1), embedding_dim))
        self.mlp = torch.nn.Sequential(
            torch.nn.Linear(feature_dim + embedding_dim, hidden), torch.nn.ReLU(),
            torch.nn.Linear(hidden, hidden), torch.nn.ReLU(),
            torch.nn.Linear(hidden, 6),
        )
        torch.nn.init.zeros_(self.mlp[-1].weight)
        torch.nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, features: Float[Tensor, "N F"], embedding: Float[Tensor, " E"]) -> Tuple[Tensor, Tensor]:
        """[N, 3] gains (positive) and [N, 3] offsets of N Gaussians in the image of ``embedding``."""
        code = embedding.to(features)[None].expand(features.shape[0], -1)
        out = self.mlp(torch.cat([features, code], dim=-1))
        return torch.exp(out[:, :3]), out[:, 3:]


def embedding_of(model, image: Optional[int]) -> Optional[Tensor]:
    """The appearance embedding of a render: in training that of ``image``; outside it a fitted
    one (``fit_embedding``), else ``eval_mix``'s blend.  None: the Gaussians' own colours."""
    module: GaussianAppearance = model.gaussian_appearance
    if model.training:
        return None if image is None else module.embeddings[image]
    fitted = getattr(model, "eval_appearance_embedding", None)
    if fitted is not None:
        return fitted
    mix = eval_mix(model)
    return _weighted(module.embeddings, mix) if mix else None


def with_appearance(model, gaussians: Gaussians, image: Optional[int], plain: bool) -> Gaussians:
    """``gaussians`` as the rasteriser draws them in a camera of training image ``image``: with
    per-Gaussian appearance their colours through that image's appearance (``plain``: ``sh``
    holds colours), the features dropped; unchanged without."""
    if gaussians.features is None:
        return gaussians
    embedding = embedding_of(model, image)
    if embedding is None:
        return gaussians._replace(features=None)
    gain, offset = model.gaussian_appearance(gaussians.features, embedding)
    return gaussians._replace(sh=recolor_sh(gaussians.sh, gain, offset, plain), features=None)


def apply_appearance(model, rgb: Float[Tensor, "H W 3"], image: Optional[int]) -> Float[Tensor, "H W 3"]:
    """``rgb`` through its appearance: in training the grid of ``image`` (none if it is None),
    otherwise ``eval_mix``; unchanged without bilateral grids."""
    grids: Optional[BilateralGrid] = getattr(model, "bil_grids", None)
    if grids is None:
        return rgb
    if model.training:
        if image is None:
            return rgb
        return _sliced(grids, rgb, image)
    mix = eval_mix(model)
    if not mix:
        return rgb
    with torch.no_grad():
        blend = BilateralGrid(1, grids.grid_width, grids.grid_height, grids.grid_guidance).to(rgb.device, rgb.dtype)
        blend.grids.copy_(_weighted(grids.grids, mix)[None])
        return _sliced(blend, rgb, 0)


def _weighted(grids: Tensor, mix: Mix) -> Tensor:
    """sum_i w_i grids[i] (slicing is linear in the grid, so this is the blend of the images')."""
    index = torch.tensor([i for i, _ in mix], device=grids.device)
    weights = torch.tensor([w for _, w in mix], device=grids.device, dtype=grids.dtype)
    return torch.einsum("n,n...->...", weights, grids[index])


def _sliced(grids: BilateralGrid, rgb: Tensor, index: int) -> Tensor:
    """Grid ``index`` applied to one image, as splatfacto's ``_apply_bilateral_grid``."""
    height, width = rgb.shape[:2]
    grid_y, grid_x = torch.meshgrid(
        torch.linspace(0, 1.0, height, device=rgb.device, dtype=rgb.dtype),
        torch.linspace(0, 1.0, width, device=rgb.device, dtype=rgb.dtype),
        indexing="ij",
    )
    xy = torch.stack([grid_x, grid_y], dim=-1)[None]
    out = slice_grid(bil_grids=grids, rgb=rgb[None], xy=xy, grid_idx=torch.tensor(index, device=rgb.device, dtype=torch.long))
    return out["rgb"][0]


def tv_loss(model) -> Optional[Tensor]:
    """The grids' weighted total variation, for the log: detached, since its gradient is added by
    ``sync_grid_gradients_`` (None without grids, or with one-cell affine grids, which have no
    variation)."""
    grids: Optional[BilateralGrid] = getattr(model, "bil_grids", None)
    if grids is None or not model.training or model.config.affine_appearance:
        return None
    with torch.no_grad():
        return TV_WEIGHT * total_variation_loss(grids.grids)


def sync_grid_gradients_(model, comm, images: Sequence[int]) -> None:
    """Before the optimiser step, on every rank: the grids' gradients become one process's.

    Only the batch's images' grids have a photometric gradient, each on the rank that composited
    that image: those rows alone are summed over ranks (B grids, not one per training image).
    Then the total variation's gradient, the same on every rank, is added to every grid (what
    splatfacto's TV term gives), so the replicated grids take identical steps everywhere.
    """
    grids: Optional[BilateralGrid] = getattr(model, "bil_grids", None)
    if grids is None:
        return
    weights = grids.grids
    if weights.grad is None:
        weights.grad = torch.zeros_like(weights)
    rows = torch.tensor(sorted(set(images)), dtype=torch.int64, device=weights.device)
    if rows.numel():
        (summed,) = all_reduce_sum(comm, [weights.grad[rows]], "bilateral grid gradients of the batch")
        weights.grad[rows] = summed
    if not model.config.affine_appearance:
        with torch.enable_grad():
            probe = weights.detach().requires_grad_(True)
            (tv_grad,) = torch.autograd.grad(TV_WEIGHT * total_variation_loss(probe), probe)
        weights.grad += tv_grad


def fit_embedding(model, camera: Cameras, image: Tensor, columns: slice, steps: int = 200, lr: float = 0.05) -> Tensor:
    """A held-out image's embedding, as NeRF-W evaluates appearance models: fitted to ``image``
    ([H, W, 3] in [0, 1], its ground truth) over the pixel ``columns`` only (the left half; score
    the other), from the mean of the training images', every other parameter frozen.  Renders
    outside training use it until ``model.eval_appearance_embedding`` is set back to None."""
    module: GaussianAppearance = model.gaussian_appearance
    embedding = module.embeddings.detach().mean(dim=0).clone().requires_grad_(True)
    optimizer = torch.optim.Adam([embedding], lr=lr)
    frozen = [p for p in model.parameters() if p.requires_grad]
    target = image[:, columns].to(embedding)
    try:
        for p in frozen:
            p.requires_grad_(False)
        model.eval_appearance_embedding = embedding
        with eval_mode(model), torch.enable_grad():
            for _ in range(steps):
                rgb = model.get_outputs(camera)["rgb"]
                loss = torch.nn.functional.mse_loss(rgb[:, columns], target)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    finally:
        for p in frozen:
            p.requires_grad_(True)
    model.eval_appearance_embedding = embedding.detach()
    return model.eval_appearance_embedding


def bake_mean_appearance(gauss: Dict[str, Tensor], state: Dict[str, Tensor], prefix: str) -> Dict[str, Tensor]:
    """Gaussian parameters (``gauss``: name -> tensor, as saved) with the mean of the training
    images' appearance baked into their colours, so that a viewer without the appearance model
    (a 3DGS .ply) shows what ``eval_appearance mean`` renders; ``state`` holds the appearance
    module under ``prefix``.  Unchanged without per-Gaussian appearance."""
    features = gauss.get("appearance_features")
    if features is None:
        return gauss
    weights = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    module = GaussianAppearance(weights["embeddings"].shape[0], features.shape[1], weights["embeddings"].shape[1],
                                hidden=weights["mlp.0.weight"].shape[0]).to(features)
    module.load_state_dict({k: v.to(features) for k, v in weights.items()})
    with torch.no_grad():
        gain, offset = module(features, module.embeddings.mean(dim=0))
        plain = gauss["features_rest"].shape[1] == 0  # sh_degree 0: the model's colours are sigmoid(features_dc)
        if plain:
            colors = recolor_sh(torch.sigmoid(gauss["features_dc"])[:, None], gain, offset, plain=True)[:, 0]
            dc, rest = torch.logit(colors.clamp(1e-6, 1 - 1e-6)), gauss["features_rest"]
        else:
            sh = recolor_sh(torch.cat([gauss["features_dc"][:, None], gauss["features_rest"]], dim=1), gain, offset)
            dc, rest = sh[:, 0], sh[:, 1:]
    return {**gauss, "features_dc": dc, "features_rest": rest}


def held_out_half_psnr(model, views: Iterable[Tuple[Cameras, Tensor]], steps: int = 200) -> float:
    """Mean PSNR over held-out ``views`` ((camera, truth [H, W, 3] in [0, 1]) pairs) under
    NeRF-W's appearance protocol, for any Gaussian model (splatfacto's too), rendered in eval mode
    whatever mode the model is in (restored after): each view's appearance is fitted on its left
    half and scored on its right half.  The fit: a per-Gaussian appearance model's embedding
    (``fit_embedding``, ``steps`` Adam steps), then for every model a 3x4 colour map (render ->
    truth, least squares), which stands in for the exposure and white balance no model can know
    for an unseen image."""
    scores = []
    with eval_mode(model):  # a training-mode render would take the held-out camera's index for a training image's
        for camera, truth in views:
            width = truth.shape[1]
            left, right = slice(0, width // 2), slice(width // 2, width)
            if getattr(model, "gaussian_appearance", None) is not None:
                fit_embedding(model, camera, truth, left, steps=steps)
            with torch.no_grad():
                rgb = model.get_outputs_for_camera(camera)["rgb"].to(truth)
            if hasattr(model, "eval_appearance_embedding"):
                model.eval_appearance_embedding = None
            homogeneous = torch.cat([rgb, torch.ones_like(rgb[..., :1])], dim=-1).double()
            fit = torch.linalg.lstsq(homogeneous[:, left].reshape(-1, 4), truth[:, left].reshape(-1, 3).double()).solution
            predicted = (homogeneous[:, right].reshape(-1, 4) @ fit).clamp(0.0, 1.0)
            mse = torch.mean((predicted - truth[:, right].reshape(-1, 3).double()) ** 2)
            scores.append(float(-10.0 * torch.log10(mse.clamp_min(1e-12))))
    return sum(scores) / max(len(scores), 1)
