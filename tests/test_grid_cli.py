"""landmark-grid through nerfstudio's own commands, on CPU, on the tiny synthetic city:
ns-train (a few steps), ns-render (dataset frames as images) and ns-eval (metrics JSON)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent

# tiny sizes: the point is that the commands work end to end, not the quality
TINY = [
    "--max-num-iterations", "4",
    "--steps-per-save", "100",
    "--pipeline.datamanager.train-num-rays-per-batch", "128",
    "--pipeline.datamanager.eval-num-rays-per-batch", "128",
    "--pipeline.model.eval-num-rays-per-chunk", "4096",
    "--pipeline.model.field.cells", "8",
    "--pipeline.model.proposal-cells", "4", "8",
    "--pipeline.model.num-proposal-samples-per-ray", "24", "12",
    "--pipeline.model.num-nerf-samples-per-ray", "12",
    "--machine.device-type", "cpu",
    "--vis", "tensorboard",
    "--viewer.quit-on-train-completion", "True",
]


def _run(args, cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{args[0]} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


@pytest.mark.slow
def test_train_render_eval_on_the_tiny_city(tiny_city, tmp_path):
    _run(
        [str(BIN / "ns-train"), "landmark-grid", "--data", str(tiny_city), "--output-dir", str(tmp_path / "out"),
         "--timestamp", "run", *TINY],
        cwd=tmp_path,
    )
    config = tmp_path / "out" / tiny_city.name / "landmark-grid" / "run" / "config.yml"
    assert config.exists()
    assert sorted((config.parent / "nerfstudio_models").glob("step-*.ckpt"))

    # interpolate / spiral / camera-path need ffmpeg even for images; `dataset` writes frames without it
    _run(
        [str(BIN / "ns-render"), "dataset", "--load-config", str(config), "--output-path", str(tmp_path / "frames"),
         "--split", "test", "--rendered-output-names", "rgb"],
        cwd=tmp_path,
    )
    frames = sorted((tmp_path / "frames").rglob("*.jpg")) + sorted((tmp_path / "frames").rglob("*.png"))
    assert len(frames) == 2  # the tiny city's two test views

    _run(
        [str(BIN / "ns-eval"), "--load-config", str(config), "--output-path", str(tmp_path / "eval.json")],
        cwd=tmp_path,
    )
    results = json.loads((tmp_path / "eval.json").read_text())["results"]
    assert 0.0 < results["psnr"] < 60.0 and 0.0 <= results["ssim"] <= 1.0
    assert all(v == v for v in results.values())  # no NaN (LPIPS is left out offline, not faked)

