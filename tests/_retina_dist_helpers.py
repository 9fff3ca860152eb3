"""Shared pieces of the distributed retina-gs tests: an identical tiny model on every process,
float64 cameras and target images, and the single-process reference step."""

from __future__ import annotations

import math
from typing import Dict, List

import torch


W, H = 32, 24
NUM_CAMERAS = 6
LRS = {"means": 1.6e-3, "features_dc": 0.0025, "features_rest": 0.0025 / 20, "opacities": 0.05, "scales": 0.005, "quats": 0.001}


def make_model(num_points: int = 300, depth: int = 2, seed: int = 0, **options):
    """A float64 RetinaGSModel, identical on every process (seeded), densification off;
    ``options``: more RetinaGSModelConfig fields."""
    from nerfstudio.data.scene_box import SceneBox

    from landmark_plugin.gaussians.model import RetinaGSModelConfig

    g = torch.Generator().manual_seed(seed)
    pts = (torch.rand(num_points, 3, generator=g) - 0.5) * 2
    rgb = (torch.rand(num_points, 3, generator=g) * 255).to(torch.uint8)
    config = RetinaGSModelConfig(
        tree_depth=depth, sh_degree=1, background_color="white", stop_split_at=0, num_downscales=0, backend="torch",
        **options,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = config.setup(
            scene_box=SceneBox(aabb=torch.tensor([[-1.0, -1, -1], [1, 1, 1]])),
            num_train_data=NUM_CAMERAS,
            seed_points=(pts, rgb),
        )
    model = model.to(torch.float64)
    model.train()
    model.optimizers = {}
    return model


def make_cameras(num: int = NUM_CAMERAS):
    """Cameras on a circle around the unit cube looking at its centre (float64)."""
    from nerfstudio.cameras.cameras import Cameras

    c2ws = []
    for i in range(num):
        a = 2 * math.pi * i / num
        eye = torch.tensor([2.6 * math.cos(a), 2.6 * math.sin(a), 1.2 + 0.3 * (i % 2)], dtype=torch.float64)
        forward = -eye / eye.norm()
        right = torch.linalg.cross(forward, torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))
        right = right / right.norm()
        up = torch.linalg.cross(right, forward)
        c2ws.append(torch.cat([torch.stack([right, up, -forward], dim=1), eye[:, None]], dim=1))
    full = lambda v: torch.full((num, 1), float(v), dtype=torch.float64)  # noqa: E731
    return Cameras(
        camera_to_worlds=torch.stack(c2ws), fx=full(28), fy=full(28), cx=full(W / 2), cy=full(H / 2),
        width=torch.full((num, 1), W), height=torch.full((num, 1), H),
    )


def target_image(index: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(500 + index)
    return torch.rand(H, W, 3, generator=g, dtype=torch.float64)


def make_optimizers(model, eps: float = 1e-15) -> Dict[str, torch.optim.Adam]:
    """splatfacto's Adam (eps 1e-15) unless a float32 comparison asks for a larger ``eps``."""
    return {name: torch.optim.Adam([model.gauss_params[name]], lr=lr, eps=eps) for name, lr in LRS.items()}


def step_optimizers(model, optimizers) -> None:
    """Adam step on every group; a shard that drew nothing still steps with zero gradients
    (as the single-process model, whose every parameter is in the graph)."""
    for name, opt in optimizers.items():
        p = model.gauss_params[name]
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        opt.step()
        opt.zero_grad(set_to_none=False)


def batch_losses(frame, cameras, step: int, batch_size: int, num_cameras: int) -> Dict:
    """The loss dict of training batch ``step`` (cameras ``step * B`` onwards, modulo the count),
    planned and rendered through ``frame`` against ``target_image``."""
    batch = [(step * batch_size + k) % num_cameras for k in range(batch_size)]
    chosen = cameras[torch.tensor(batch)]
    _, visible, owners = frame.plan_batch(chosen, batch_size, max_load=16)
    losses, _, _ = frame.batch_loss(chosen, visible, owners, lambda b: {"image": target_image(batch[b])})
    return losses


def reference_step(model, cameras, indices: List[int]):
    """Single-process: mean of splatfacto's loss over the cameras, with the whole model."""
    loss, images = 0.0, []
    for i in indices:
        out = model.get_outputs(cameras[i : i + 1])
        images.append(out["rgb"].detach())
        loss = loss + model.get_loss_dict(out, {"image": target_image(i)})["main_loss"] / len(indices)
    loss.backward()
    return float(loss), images


def no_termination(rasterize_mode: str = "classic"):
    from landmark_plugin.core.projection import RasterSettings

    return RasterSettings(min_transmittance=0.0, rasterize_mode=rasterize_mode)


def _look_at(eye, target):
    eye, target = torch.tensor(eye, dtype=torch.float64), torch.tensor(target, dtype=torch.float64)
    forward = (target - eye) / (target - eye).norm()
    right = torch.linalg.cross(forward, torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64))
    right = right / right.norm()
    up = torch.linalg.cross(right, forward)
    return torch.cat([torch.stack([right, up, -forward], dim=1), eye[:, None]], dim=1)


def stress_cameras():
    """Four around the scene, one oblique from high above, one inside a leaf looking across."""
    from nerfstudio.cameras.cameras import Cameras

    ring = [(2.6 * math.cos(a), 2.6 * math.sin(a), 0.9) for a in (0.3, 1.9, 3.5, 5.0)]
    c2ws = [_look_at(eye, (0.0, 0.0, 0.0)) for eye in ring]
    c2ws.append(_look_at((1.9, -0.4, 2.7), (-0.5, 0.3, -0.4)))  # steep, across several leaves
    c2ws.append(_look_at((0.55, 0.45, 0.35), (-1.0, -0.6, -0.2)))  # inside the scene's box
    full = lambda v: torch.full((len(c2ws), 1), float(v), dtype=torch.float64)  # noqa: E731
    return Cameras(
        camera_to_worlds=torch.stack(c2ws), fx=full(26), fy=full(26), cx=full(W / 2), cy=full(H / 2),
        width=torch.full((len(c2ws), 1), W), height=torch.full((len(c2ws), 1), H),
    )


def stress_model(depth: int, **options):
    """The tiny float64 model in clip mode, a fifth of its Gaussians made large or elongated so
    that they straddle the partition's planes (shared by several leaves, hence ranks)."""
    model = make_model(num_points=240, depth=depth, **options)
    model.config.mode = "clip"
    g = torch.Generator().manual_seed(7)
    n = model.num_points
    picked = torch.randperm(n, generator=g)[: n // 5]
    scales = torch.empty(picked.numel(), 3, dtype=torch.float64)
    scales[:, 0] = math.log(0.35)
    scales[:, 1:] = math.log(0.04)
    scales[::3] = math.log(0.22)  # some large and round
    quats = torch.randn(picked.numel(), 4, generator=g, dtype=torch.float64)
    with torch.no_grad():
        model.gauss_params["scales"][picked] = scales
        model.gauss_params["quats"][picked] = quats / quats.norm(dim=-1, keepdim=True)
        model.gauss_params["opacities"][picked] = 1.5
    return model
