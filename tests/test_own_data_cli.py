"""The README's "Your own data" commands, run as written on a small capture of each format
(COLMAP: the real cup capture, skipped when ../shared/data is absent; nerfstudio-data with a
point cloud: the micro city; synthetic-city and matrixcity have their own CLI tests)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from _trainers import micro_city  # noqa: F401 -- fixture
from conftest import shared_data

BIN = Path(sys.executable).parent
QUICK = ["--machine.device-type", "cpu", "--max-num-iterations", "2", "--steps-per-save", "1", "--vis", "tensorboard",
         "--timestamp", "t"]


def ns_train(args, cwd: Path) -> None:
    result = subprocess.run([str(BIN / "ns-train"), *args], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.mark.slow
def test_readme_colmap_command_on_a_sparse_0_capture(tmp_path):
    cup = shared_data("cup_colmap")  # sparse/0, images_4/: nerfstudio's default colmap_path is absent
    assert (cup / "sparse" / "0").is_dir() and not (cup / "colmap").exists()
    # README: ns-train retina-gs --data path/to/scene colmap --downscale-factor 4
    ns_train(["retina-gs", "--data", str(cup), "--output-dir", str(tmp_path / "out"), *QUICK,
              "colmap", "--downscale-factor", "4"], tmp_path)
    assert (tmp_path / "out" / "cup_colmap" / "retina-gs" / "t" / "nerfstudio_models" / "step-000000001.ckpt").is_file()


@pytest.mark.slow
def test_ns_train_nerfstudio_data_with_a_point_cloud(micro_city, tmp_path):
    # nerfstudio's own parser imports open3d here (ImportError without libusb, or no open3d at all).
    # README: ns-train retina-gs --data path/to/scene nerfstudio-data
    ns_train(["retina-gs", "--data", str(micro_city), "--output-dir", str(tmp_path / "out"), *QUICK,
              "--pipeline.model.num-downscales", "0", "nerfstudio-data"], tmp_path)
    run = tmp_path / "out" / micro_city.name / "retina-gs" / "t"
    assert (run / "nerfstudio_models" / "step-000000001.ckpt").is_file()
    assert "PlyNerfstudioDataParserConfig" in (run / "config.yml").read_text()


@pytest.mark.slow
def test_readme_matrixcity_command_on_a_tiny_map(tmp_path):
    import json

    from test_dataparsers import aerial_pose_m, raw_capture_file, write_matrixcity

    root = write_matrixcity(tmp_path / "small_city")  # block_1: split files (pose/block_A); block_2: raw capture
    # MatrixCity ships a raw capture file in every block folder: block_1's too
    for folder, poses in (("train/block_1", range(4)), ("test/block_1_test", range(10, 12))):
        (root / "aerial" / folder / "transforms.json").write_text(json.dumps(raw_capture_file([aerial_pose_m(i) for i in poses])))
    # README: ns-train retina-gs --data path/to/MatrixCity/small_city matrixcity --views aerial --blocks block_1 block_2
    ns_train(["retina-gs", "--data", str(root), "--output-dir", str(tmp_path / "out"), *QUICK,
              "--pipeline.model.num-downscales", "0", "matrixcity", "--views", "aerial", "--blocks", "block_1", "block_2"], tmp_path)
    assert (tmp_path / "out" / "small_city" / "retina-gs" / "t" / "nerfstudio_models" / "step-000000001.ckpt").is_file()
