"""The benchmark scripts run end to end on CPU at tiny sizes, so they cannot rot."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_gaussians_smoke(tmp_path):
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "bench_gaussians.py"), "--smoke", "--work", str(tmp_path), "--json", str(out)],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert rows and rows[0]["method"] == "retina-gs" and rows[0]["steps"] == 3
    assert 0.0 < rows[0]["psnr"] < 60.0
    assert "ms/step" in result.stdout  # the table is printed last
