#!/usr/bin/env python
"""landmark-grid's samplers at equal training time: proposal against occupancy (empty-space
skipping), with nerfacto as the reference, side by side in one process (scripts/bench_grid.py's
calibration, training loop and evaluation).  Recorded per method: training rays/s, PSNR / SSIM
over the held-out images and their render rate (nerfstudio's fps and rays/s of the eval pass).
Writes JSON and prints the table, then the occupancy-vs-proposal line last.

    python scripts/bench_grid_occupancy.py --scenes city --seconds 600 --json occ.json   # GPU
    python scripts/bench_grid_occupancy.py --smoke                                        # CPU: tiny city, 4 steps
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_grid  # noqa: E402

METHODS = ("nerfacto", "landmark-grid", "landmark-grid-occupancy")


def comparison(rows: List[Dict]) -> List[str]:
    """Per scene: occupancy against proposal (and against nerfacto) in PSNR, training and render rate."""
    by_scene: Dict[str, Dict[str, Dict]] = {}
    for r in rows:
        by_scene.setdefault(r["scene"], {})[r["method"]] = r
    lines = []
    for scene, methods in by_scene.items():
        occ, prop = methods.get("landmark-grid-occupancy"), methods.get("landmark-grid")
        if occ is None or prop is None:
            continue
        line = (f"{scene}: occupancy - proposal PSNR {occ['psnr'] - prop['psnr']:+.2f} dB, "
                f"train rays/s {occ['train_rays_per_s'] / prop['train_rays_per_s']:.2f}x, "
                f"render fps {occ.get('fps', float('nan')) / max(prop.get('fps', float('nan')), 1e-12):.2f}x")  # fmt: skip
        if "nerfacto" in methods:
            line += f"; occupancy - nerfacto PSNR {occ['psnr'] - methods['nerfacto']['psnr']:+.2f} dB"
        lines.append(line)
    return lines


def main() -> None:
    args = bench_grid.parse_args(methods=METHODS, description=__doc__)
    rows = bench_grid.run(args)
    bench_grid.print_table(rows)
    print("\n".join(comparison(rows)))


if __name__ == "__main__":
    main()
