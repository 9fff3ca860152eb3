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
        [sys.executable, str(REPO / "scripts" / "bench_gaussians.py"), "--smoke", "--work", str(tmp_path), "--json", str(out),
         "--sync-audit", "2"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert rows and rows[0]["method"] == "retina-gs" and rows[0]["steps"] == 3
    # The audit names the step's one deliberate read-back (the non-finite check) by its line.
    assert "calls that would synchronise on a GPU per step" in result.stdout
    assert "step_guard.py" in result.stdout
    assert 0.0 < rows[0]["psnr"] < 60.0
    assert "ms/step" in result.stdout  # the table is printed last
