"""scripts/bench_retina_dist.py --smoke: the 1-vs-2-rank benchmark's whole code path on CPU.

Driver, scene generation, the retina-gs phases on 1 and 2 gloo ranks (forked, streaming their
own images from disk), the memory curve with its fit and plot, and the verification steps at
the predicted largest count; gsplat's distributed rasteriser needs CUDA and is reported skipped.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_retina_dist.py"


@pytest.mark.slow
def test_bench_retina_dist_smoke(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--launcher", "spawn", "--out", str(out), "--work", str(tmp_path / "work"),
         "--budget-s", "400"],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    report = json.loads((out / "bench_retina_dist.json").read_text())
    phases = report["phases"]
    for tag in ("gen", "train-w1", "train-w2", "verify-w1", "verify-w2"):
        assert phases[tag]["status"] == "ok", (tag, phases[tag])
    assert phases["gsplat-w2"]["status"] == "skipped" and "CUDA" in phases["gsplat-w2"]["reason"]

    one, two = phases["train-w1"]["result"], phases["train-w2"]["result"]
    assert one["setup"]["train_images_held"] == 14 and two["setup"]["train_images_held"] == 7, "own images only"
    for run in (one, two):
        assert run["throughput"]["images"] == 2 * run["throughput"]["steps"] and run["throughput"]["images_per_s"] > 0
    assert sum(two["throughput"]["gaussians_per_rank"]) == one["throughput"]["gaussians_per_rank"][0] == 600

    summary = report["summary"]
    # memory (CPU proxy: parameters + gradients + Adam) per rank halves with two ranks
    assert 0.4 < summary["peak_memory"]["ratio"] < 0.6 and summary["peak_memory"]["met"]
    for w in ("1", "2"):
        curve = report["curves"][w]
        assert len(curve["points"]) == 3 and curve["bytes_per_gaussian"] > 0
        assert summary["max_count"][w]["verified"] == int(0.9 * curve["predicted_max"])
    assert summary["max_count"]["basis"] == "verified" and 1.6 < summary["max_count"]["ratio"] < 2.2
    assert (out / "memory_vs_count.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    tail = result.stdout.rstrip().splitlines()
    assert any(line.startswith("training images/s") for line in tail[-8:]), "the table is printed last"
