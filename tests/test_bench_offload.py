"""scripts/bench_offload.py --smoke: issue 18's capped-memory benchmark's whole code path on CPU.

Driver, scene generation, the in-memory, offload and stream phases (visible Adam, locality order,
the default render mode, the Gaussians of the offload phases made in host memory, staged by leaf or streamed by
subtree), the summary, the plot and the table.  CPU has no memory cap to run out of: the counts only show that every probe trains.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_offload.py"


@pytest.mark.slow
def test_bench_offload_smoke(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--launcher", "spawn", "--out", str(out), "--work", str(tmp_path / "work"),
         "--budget-s", "300"],
        capture_output=True, text=True, timeout=400,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    report = json.loads((out / "bench_offload.json").read_text())
    for tag in ("gen", "train-memory", "train-offload", "train-stream"):
        assert report["phases"][tag]["status"] == "ok", (tag, report["phases"][tag])
    memory, offload, stream = (report["phases"][f"train-{m}"]["result"] for m in ("memory", "offload", "stream"))
    # every probe of both modes trained (nothing to run out of on CPU), with the same step count
    assert [p["count"] for p in memory["probes"]] == [300, 600] and [p["count"] for p in offload["probes"]] == [600, 1200]
    assert [p["count"] for p in stream["probes"]] == [600, 1200]
    for run in [memory["throughput"], offload["throughput"], stream["throughput"], *memory["probes"], *offload["probes"]]:
        assert run["images"] == 2 * run["steps"] and run["images_per_s"] > 0
    # the offload phase staged its rows from a host store holding every row of the shard
    staged = offload["throughput"]
    assert 0.0 < staged["held_fraction"] <= 1.0 and staged["host_store_bytes"] > 0
    assert "held_fraction" not in memory["throughput"], "the in-memory phase has no store"
    # the stream phase stepped its batches subtree by subtree
    assert stream["throughput"]["stream_groups"] == 4 and stream["throughput"]["streamed_batches"] > 0
    summary = report["summary"]
    assert summary["memory"]["trained"] == 600 and summary["offload"]["trained"] == 1200
    assert summary["max_count_ratio"] == 2.0 and summary["max_count_ratio_is_lower_bound"]
    assert summary["images_per_s_ratio"] > 0 and summary["stream_images_per_s_ratio"] > 0
    assert summary["stream_max_count_ratio"] == 2.0
    assert (out / "offload_memory_vs_count.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "images/s offload / memory" in result.stdout.rstrip().splitlines()[-1], "the table is printed last"


def test_visible_fractions_bound_what_offload_can_gain(tmp_path):
    """--visible-fractions (CPU, no training): a batch draws at least what each of its cameras
    does, a bigger city leaves more of itself out of a camera's view, and the bound follows."""
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--visible-fractions", "--cities", "2", "6", "--num-images", "24", "--tree-depth", "5",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    small, large = json.loads((tmp_path / "visible_fractions.json").read_text())
    for row in (small, large):
        assert 0.0 < row["camera_mean"] <= row["camera_max"] <= 1.0
        assert row["camera_mean"] <= row["batch_mean"] <= row["batch_max"] <= 1.0
        assert row["gain_bound"] == pytest.approx(1.0 / row["batch_max"])
    assert large["camera_mean"] < small["camera_mean"], "a camera sees less of a bigger city"
