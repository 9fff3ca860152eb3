"""retina-gs Gaussians as a standard 3DGS .ply, and the ``landmark-export`` command.

The vertex layout is the one the 3DGS reference code and the web viewers read (x y z, nx ny nz,
f_dc_*, f_rest_* channel-major, opacity as a logit, log-scales, wxyz quaternions): the same
file ``ns-export gaussian-splat`` writes.  Ours needs no open3d, which ns-export imports and
which fails on machines without libusb.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Dict

import numpy as np
import torch
import tyro

GAUSS_PREFIX = "_model.gauss_params."
"""Where a pipeline state dict keeps the Gaussian parameters."""
APPEARANCE_PREFIX = "_model.gaussian_appearance."
"""Where it keeps the per-Gaussian appearance model (``--pipeline.model.appearance-features``)."""


def write_gaussians_ply(path: Path, pipeline_state: Dict[str, torch.Tensor]) -> int:
    """Write the Gaussians of a pipeline state dict as a 3DGS .ply; returns their number N.  A
    model with per-Gaussian appearance is written with the mean training appearance baked into
    its colours (what ``--pipeline.model.eval-appearance mean`` renders)."""
    from plyfile import PlyData, PlyElement

    from landmark_plugin.gaussians.appearance import bake_mean_appearance

    g = {k[len(GAUSS_PREFIX) :]: v.detach().cpu().float() for k, v in pipeline_state.items() if k.startswith(GAUSS_PREFIX)}
    appearance = {k: v.detach().cpu().float() for k, v in pipeline_state.items() if k.startswith(APPEARANCE_PREFIX)}
    g = bake_mean_appearance(g, appearance, APPEARANCE_PREFIX)  # per-Gaussian appearance is no 3DGS field
    n = g["means"].shape[0]
    columns = {"x": g["means"][:, 0], "y": g["means"][:, 1], "z": g["means"][:, 2]}
    for axis in ("nx", "ny", "nz"):
        columns[axis] = torch.zeros(n)
    for i in range(3):
        columns[f"f_dc_{i}"] = g["features_dc"][:, i]
    rest = g["features_rest"].transpose(1, 2).reshape(n, -1)  # channel-major, as 3DGS stores it
    for i in range(rest.shape[1]):
        columns[f"f_rest_{i}"] = rest[:, i]
    columns["opacity"] = g["opacities"].reshape(n)
    for i in range(3):
        columns[f"scale_{i}"] = g["scales"][:, i]
    for i in range(4):
        columns[f"rot_{i}"] = g["quats"][:, i]
    vertex = np.empty(n, dtype=[(name, "<f4") for name in columns])
    for name, value in columns.items():
        vertex[name] = value.numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    PlyData([PlyElement.describe(vertex, "vertex")], text=False).write(str(path))
    return n


@dataclass
class ExportGaussians:
    """Export the Gaussians of a trained retina-gs run as a standard 3DGS .ply."""

    load_config: Path
    """config.yml of the run (its latest checkpoint is read)."""
    output_dir: Path = Path("exports")
    """Folder for splat.ply."""

    def main(self) -> Path:
        from nerfstudio.utils.eval_utils import eval_setup

        from landmark_plugin.checkpoints import load_newest_complete

        _, pipeline, checkpoint, _ = eval_setup(self.load_config, test_mode="inference", update_config_callback=load_newest_complete)
        path = self.output_dir / "splat.ply"
        n = write_gaussians_ply(path, pipeline.state_dict())
        print(f"wrote {n} Gaussians from {checkpoint} to {path}")
        return path


def entrypoint() -> None:
    tyro.cli(ExportGaussians).main()
