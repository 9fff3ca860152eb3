"""scripts/bench_grid_occupancy.py runs end to end on CPU at tiny sizes, so it cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_grid_occupancy_smoke(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench_grid_occupancy.py"), "--smoke", "--methods", "landmark-grid",
         "landmark-grid-occupancy", "--work", str(tmp_path), "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [r["method"] for r in rows] == ["landmark-grid", "landmark-grid-occupancy"]
    for row in rows:
        assert row["steps"] >= 1 and row["train_rays_per_s"] > 0 and row["fps"] > 0
        assert 0.0 < row["psnr"] < 60.0
    assert result.stdout.rstrip().splitlines()[-1].startswith("city: occupancy - proposal PSNR")
