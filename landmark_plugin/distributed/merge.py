"""``landmark-merge CONFIG``: shards of a distributed run -> one checkpoint (+ a .ply for retina-gs).

landmark-grid shards (their manifest holds a ``grid_layout``) merge by ``grid.sharded_state``:
blocks stacked (branch), sub-planes stitched into the blocks' planes (plane), channels
concatenated (channel); there is no .ply.

The merged checkpoint is an ordinary nerfstudio checkpoint written into the run's
``nerfstudio_models/``, so ``ns-render``, ``ns-eval`` and ``ns-viewer --load-config CONFIG``
load it in one process.  The .ply uses the standard 3DGS vertex layout (x y z, normals,
f_dc_*, f_rest_*, opacity, scale_*, rot_*), what ``ns-export gaussian-splat`` writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import tyro
import yaml

from landmark_plugin.checkpoints import atomic_torch_save
from landmark_plugin.distributed.checkpoint import latest_complete_step, load_shards, merge_shards, read_manifest
from landmark_plugin.gaussians.export import write_gaussians_ply


@dataclass
class Merge:
    """Merge the sharded checkpoint of a distributed run into one checkpoint and a .ply."""

    config: tyro.conf.Positional[Path]
    """The run's config.yml."""
    step: Optional[int] = None
    """Step to merge (default: the newest step whose shards are all written)."""
    ply: Optional[Path] = None
    """Where to write the .ply (default: <run>/splat.ply); --no-write-ply skips it."""
    write_ply: bool = True
    """Also export the Gaussians as a standard 3DGS .ply."""

    def main(self) -> Path:
        base_dir = self.config.parent
        trainer_config = yaml.load(self.config.read_text(), Loader=yaml.Loader)
        step = self.step if self.step is not None else latest_complete_step(base_dir)
        if step is None:
            raise SystemExit(f"no complete sharded checkpoint under {base_dir / 'shards'}")
        if "grid_layout" in read_manifest(base_dir, step):  # landmark-grid: factors, no Gaussians
            from landmark_plugin.grid.sharded_state import merge_grid_shards

            merged, self.write_ply = merge_grid_shards(load_shards(base_dir, step)), False
        else:
            merged = merge_shards(load_shards(base_dir, step))
        out = base_dir / trainer_config.relative_model_dir / f"step-{step:09d}.ckpt"
        atomic_torch_save(merged, out)
        print(f"merged the shards of step {step} into {out}")
        if self.write_ply:
            ply = self.ply or base_dir / "splat.ply"
            n = write_gaussians_ply(ply, merged["pipeline"])
            print(f"wrote {n} Gaussians to {ply}")
        return out


def entrypoint() -> None:
    tyro.cli(Merge).main()


if __name__ == "__main__":
    entrypoint()
