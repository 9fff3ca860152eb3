"""The exported .ply looks in any 3DGS viewer as retina-gs renders it -- in clip mode (issue 17).

A viewer (gsplat.rasterization, SuperSplat, the 3DGS reference) reads the .ply's Gaussians and
draws them all in one depth-sorted pass. Here the file is read back with plyfile, independently
of our writer, and drawn by the torch reference rasteriser the same way (float64, one group
sorted by depth); that equals the clip-mode render of the model on the stress scene (Gaussians
straddling the kd-tree's planes, an oblique camera, a camera inside the scene) within 1e-5.
Plain mode, which draws each Gaussian in its own leaf only, does not match: the README says so.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from _retina_dist_helpers import no_termination, stress_cameras, stress_model

TOL = dict(rtol=0.0, atol=1e-5)


def read_viewer_gaussians(path: Path):
    """The .ply as a 3DGS viewer reads it: activated parameters and SH coefficients [N, K, 3]."""
    from plyfile import PlyData

    v = PlyData.read(str(path))["vertex"]
    col = lambda name: torch.from_numpy(np.asarray(v[name], dtype=np.float64))  # noqa: E731
    names = [p.name for p in v.properties]
    rest = sorted((n for n in names if n.startswith("f_rest_")), key=lambda n: int(n.split("_")[-1]))
    n, k = len(v["x"]), len(rest) // 3 + 1
    dc = torch.stack([col(f"f_dc_{i}") for i in range(3)], dim=-1)[:, None, :]
    rest_sh = torch.stack([col(name) for name in rest], dim=-1).reshape(n, 3, k - 1).transpose(1, 2)
    quats = torch.stack([col(f"rot_{i}") for i in range(4)], dim=-1)
    return {
        "means": torch.stack([col("x"), col("y"), col("z")], dim=-1),
        "quats": quats / quats.norm(dim=-1, keepdim=True),
        "scales": torch.exp(torch.stack([col(f"scale_{i}") for i in range(3)], dim=-1)),
        "opacities": torch.sigmoid(col("opacity")),
        "sh": torch.cat([dc, rest_sh], dim=1),
    }


def viewer_render(g, camera, background: torch.Tensor, settings) -> torch.Tensor:
    """All Gaussians in one pass sorted by depth, as gsplat.rasterization draws them."""
    from landmark_plugin.core.raster_ref import render_ref

    c2w = camera.camera_to_worlds[0].to(torch.float64)
    # nerfstudio's camera looks down -z with y up; the rasteriser's (OpenCV) down +z with y down.
    c2w = torch.cat([c2w[:, :3] * torch.tensor([1.0, -1.0, -1.0], dtype=torch.float64), c2w[:, 3:]], dim=1)
    viewmat = torch.eye(4, dtype=torch.float64)
    viewmat[:3, :3] = c2w[:, :3].T
    viewmat[:3, 3] = -c2w[:, :3].T @ c2w[:, 3]
    K = torch.tensor([[float(camera.fx), 0, float(camera.cx)], [0, float(camera.fy), float(camera.cy)], [0, 0, 1]],
                     dtype=torch.float64)
    sh_degree = int(round(g["sh"].shape[1] ** 0.5)) - 1
    color, trans = render_ref(g["means"], g["quats"], g["scales"], g["opacities"], g["sh"], viewmat, K,
                              int(camera.width), int(camera.height), settings, sh_degree=sh_degree)
    return torch.clamp(color + trans * background, 0.0, 1.0)


def _exported_and_model_renders(tmp_path: Path, mode: str, settings, appearance: bool = False):
    from landmark_plugin.distributed.groups import Comm
    from landmark_plugin.gaussians.export import APPEARANCE_PREFIX, GAUSS_PREFIX, write_gaussians_ply
    from landmark_plugin.gaussians.frame import RetinaFrame

    options = dict(appearance_features=6, appearance_embedding=4, eval_appearance="mean") if appearance else {}
    model, cameras = stress_model(2, **options), stress_cameras()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # the file stores float32: the model holds exactly what it will read
        for p in model.gauss_params.values():
            p.copy_(p.float().double())
        for p in model.gaussian_appearance.parameters() if appearance else ():  # away from identity
            p.copy_((p + 0.2 * torch.randn(p.shape, generator=g, dtype=p.dtype)).float().double())
    model.config.mode = mode
    model.frame = RetinaFrame(Comm.single(), model, settings)
    model.step = 10**6  # every SH degree
    model.eval()
    path = tmp_path / "splat.ply"
    state = {GAUSS_PREFIX + k: v for k, v in model.gauss_params.items()}
    if appearance:
        state.update({APPEARANCE_PREFIX + k: v for k, v in model.gaussian_appearance.state_dict().items()})
    written = write_gaussians_ply(path, state)
    assert written == model.num_points
    g = read_viewer_gaussians(path)
    background = model._get_background_color().to(torch.float64)
    out = []
    with torch.no_grad():
        for i in range(len(cameras)):
            ours = model.get_outputs(cameras[i : i + 1])["rgb"]
            out.append((ours, viewer_render(g, cameras[i : i + 1], background, settings)))
    return out


@pytest.fixture
def float64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


@pytest.mark.parametrize("termination", [False, True], ids=["no-termination", "termination"])
def test_exported_ply_in_a_viewer_equals_the_clip_render(tmp_path, float64, termination):
    from landmark_plugin.core.projection import RasterSettings

    settings = RasterSettings() if termination else no_termination()
    for i, (ours, viewer) in enumerate(_exported_and_model_renders(tmp_path, "clip", settings)):
        assert viewer.std() > 0.01, f"camera {i} sees nothing: the check would be empty"
        torch.testing.assert_close(ours, viewer, **TOL, msg=lambda m: f"camera {i}: {m}")


def test_exported_ply_in_a_viewer_differs_from_the_plain_render(tmp_path, float64):
    diffs = [float((ours - viewer).abs().max()) for ours, viewer in _exported_and_model_renders(tmp_path, "plain", no_termination())]
    assert max(diffs) > 1e-2, diffs


def test_exported_ply_bakes_the_mean_appearance(tmp_path, float64):
    """Per-Gaussian appearance is no 3DGS field: the file holds the colours of the mean training
    appearance, so a viewer shows what eval_appearance mean renders."""
    renders = _exported_and_model_renders(tmp_path, "clip", no_termination(), appearance=True)
    for i, (ours, viewer) in enumerate(renders):
        assert viewer.std() > 0.01, f"camera {i} sees nothing: the check would be empty"
        torch.testing.assert_close(ours, viewer, **TOL, msg=lambda m: f"camera {i}: {m}")
