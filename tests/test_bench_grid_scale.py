"""scripts/bench_grid_scale.py --smoke: landmark-grid's scale benchmark, its whole code path on CPU.

Driver, city generation, landmark-grid trainers on 1 and 2 gloo ranks (forked) with plane, branch
and channel parallelism at one grid size, held-out PSNR, the memory curves with their fits and
plot, the verification steps at the predicted largest grids and the (stand-in) 4K renders from
them; the table printed last.  Timings are not checked, only that everything was measured.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_grid_scale.py"
PHASES = ("gen", "train-w1", "train-w2-plane", "train-w2-branch", "train-w2-channel", "verify-w1", "verify-w2-channel")


def test_bench_grid_scale_smoke(tmp_path):
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--launcher", "spawn", "--out", str(out), "--work", str(tmp_path / "work"),
         "--budget-s", "300"],
        capture_output=True, text=True, timeout=400, check=False,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    report = json.loads((out / "bench_grid_scale.json").read_text())
    phases = report["phases"]
    assert set(phases) == set(PHASES)
    for tag in PHASES:
        assert phases[tag]["status"] == "ok", (tag, phases[tag])

    # every run trains the same grid; one step's rays and the memory of every rank are recorded
    runs = {tag: phases[tag]["result"] for tag in PHASES if tag.startswith("train")}
    assert len({run["setup"]["grid_params"] for run in runs.values()}) == 1
    assert runs["train-w1"]["setup"]["train_images"] == 21 and runs["train-w1"]["setup"]["eval_images"] == 3
    for tag, run in runs.items():
        ranks = 1 if tag == "train-w1" else 2
        throughput = run["throughput"]
        assert throughput["rays"] == 64 * throughput["steps"] and throughput["rays_per_s"] > 0
        assert len(throughput["peak_per_rank"]) == len(throughput["grid_bytes_per_rank"]) == ranks
        assert math.isfinite(run["eval"]["psnr"]) and run["eval"]["views"] == 2
    # channel parallelism: each rank holds half of every factor's channels
    assert sum(runs["train-w2-channel"]["throughput"]["grid_params_per_rank"]) == runs["train-w1"]["setup"]["grid_params"]

    summary = report["summary"]
    for strategy in ("plane", "branch", "channel"):
        assert summary["rays_per_s"][strategy]["ratio"] > 0
    assert {"target", "met"} <= set(summary["rays_per_s"]["plane"]) and "target" not in summary["rays_per_s"]["channel"]
    # grid memory (CPU: bytes of planes, lines, gradients and Adam state) per rank halves on two ranks
    assert 0.45 < summary["grid_memory"]["ratio"] < 0.55 and summary["grid_memory"]["met"]

    for w in ("1", "2"):
        curve = report["curves"][w]
        counts = [count for count, _ in curve["points"]]
        assert len(counts) == 3 and counts == sorted(set(counts)), "the probes grow the grid"
        assert curve["bytes_per_grid_param"] > 0
        largest = summary["max_grid"][w]
        assert counts[-1] < largest["verified"] <= 0.9 * curve["predicted_max"]
        render = summary["render"][w]
        assert (render["width"], render["height"]) == (64, 48) and render["frames"] >= 1 and render["frames_per_s"] > 0
        assert render["grid_params"] == largest["verified"]
    largest = summary["max_grid"]
    assert largest["basis"] == "verified" and 1.6 < largest["ratio"] < 2.6 and largest["params_met"] is False

    assert (out / "memory_vs_grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = result.stdout.rsplit("\nmetric", 1)[-1].splitlines()
    assert not any(line.startswith("[") for line in table), "the table is printed last"
    for row in ("training rays/s, plane", "grid memory per GPU", "largest trainable grid", "render 64x48 on 2"):
        assert any(line.startswith(row) for line in table), row
