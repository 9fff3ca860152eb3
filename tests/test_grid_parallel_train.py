"""landmark-grid, branch parallel on 2 CPU processes as a user runs it: landmark-train, shards,
loading straight from the shards, landmark-merge, ns-eval of the merge, and resuming.

One 4-step run on a 6-image 48x36 synthetic city (2 gloo ranks, 2x2 blocks: two per rank,
checkpoint at step 3) is shared by the checks:
- the shards of step 3 are complete, each holds two of the four blocks, config.yml records the
  world size, and nerfstudio_models/ holds a pointer to the shards;
- nerfstudio's ``eval_setup`` (what ns-render / ns-eval / ns-viewer call) loads the run from the
  pointer (shards merged in memory) and, after landmark-merge, from the merged checkpoint: both
  render the same image; the merge holds all four blocks; ns-eval evaluates the merge;
- resuming the shards in one process continues at step 4 with the merged parameters.
"""

from __future__ import annotations

import glob
import gzip
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from test_distributed_train import _finish, _start  # the same subprocess helpers

BIN = Path(sys.executable).parent
STEPS = 4
CITY = dict(blocks=(2, 2), num_images=6, width=48, height=36, num_points=300, test_every=3)
TRAIN = [
    "--machine.num-devices", "2", "--machine.device-type", "cpu", "--vis", "tensorboard",
    "--experiment-name", "city", "--timestamp", "two", "--max-num-iterations", str(STEPS),
    "--steps-per-save", "3", "--logging.steps-per-log", "1", "--steps-per-eval-batch", "2",
    "--steps-per-eval-image", "1000", "--steps-per-eval-all-images", "1000",
    "--pipeline.model.parallel", "branch",
    "--pipeline.datamanager.train-num-rays-per-batch", "64",
    "--pipeline.datamanager.eval-num-rays-per-batch", "64",
    "--pipeline.model.eval-num-rays-per-chunk", "2048",
    "--pipeline.model.field.cells", "8",
    "--pipeline.model.proposal-cells", "4", "8",
    "--pipeline.model.num-proposal-samples-per-ray", "16", "8",
    "--pipeline.model.num-nerf-samples-per-ray", "8",
]


def _train_losses(run_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = glob.glob(str(run_dir / "events.out.tfevents.*"))
    acc = EventAccumulator(events)
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars("Train Loss")}


def _render_first_test_view(config_path: Path) -> torch.Tensor:
    """rgb of the first test camera through nerfstudio's eval_setup (one process)."""
    from nerfstudio.utils.eval_utils import eval_setup

    _, pipeline, _, _ = eval_setup(config_path, test_mode="test")
    camera = pipeline.datamanager.eval_dataset.cameras[0:1]
    with torch.no_grad():
        return pipeline.model.get_outputs_for_camera(camera)["rgb"]


def _render_test_views(config_path: Path) -> dict:
    """image name -> rgb of every test camera, one process."""
    from nerfstudio.utils.eval_utils import eval_setup

    _, pipeline, _, _ = eval_setup(config_path, test_mode="test")
    dataset = pipeline.datamanager.eval_dataset
    out = {}
    for index, filename in enumerate(dataset._dataparser_outputs.image_filenames):
        with torch.no_grad():
            out[Path(filename).stem] = pipeline.model.get_outputs_for_camera(dataset.cameras[index : index + 1])["rgb"]
    return out


@pytest.fixture(scope="module")
def city(tmp_path_factory) -> Path:
    from landmark_plugin.data.city import CityConfig, write_city

    return write_city(tmp_path_factory.mktemp("grid-city") / "city", CityConfig(**CITY))


@pytest.mark.slow
def test_branch_parallel_run_shards_merges_evaluates_and_resumes(city, tmp_path):
    from landmark_plugin.distributed.checkpoint import is_shards_pointer, latest_complete_step, load_shards, read_manifest

    _finish(_start([str(BIN / "landmark-train"), "landmark-grid", "--data", str(city), "--output-dir",
                    str(tmp_path / "out"), *TRAIN, "synthetic-city"], tmp_path))
    run_dir = tmp_path / "out" / "city" / "landmark-grid" / "two"
    config_path = run_dir / "config.yml"
    losses = _train_losses(run_dir)
    assert sorted(losses) == list(range(STEPS)) and all(v == v and abs(v) < 1e3 for v in losses.values())
    assert yaml.load(config_path.read_text(), Loader=yaml.Loader).pipeline.world_size == 2

    last = STEPS - 1
    assert latest_complete_step(run_dir) == last
    manifest = read_manifest(run_dir, last)
    assert manifest["world_size"] == 2 and manifest["grid_layout"]["strategy"] == "branch"
    shards = load_shards(run_dir, last)
    key = "_model.field.density.planes.0"
    assert [s["pipeline"][key].shape[0] for s in shards] == [2, 2], "each rank holds two of the four blocks"
    assert not torch.equal(shards[0]["pipeline"][key], shards[1]["pipeline"][key])
    pointer = run_dir / "nerfstudio_models" / f"step-{last:09d}.ckpt"
    assert is_shards_pointer(pointer)

    from_shards = _render_first_test_view(config_path)
    from landmark_plugin.distributed.merge import entrypoint

    argv, sys.argv = sys.argv, ["landmark-merge", str(config_path)]
    try:
        entrypoint()
    finally:
        sys.argv = argv
    assert not is_shards_pointer(pointer)
    merged = torch.load(pointer, map_location="cpu", weights_only=True)
    assert merged["pipeline"][key].shape[0] == 4
    torch.testing.assert_close(merged["pipeline"][key], torch.cat([s["pipeline"][key] for s in shards]), rtol=0, atol=0)
    torch.testing.assert_close(_render_first_test_view(config_path), from_shards, rtol=0, atol=1e-5)

    evaluate = _start([str(BIN / "ns-eval"), "--load-config", str(config_path), "--output-path",
                       str(tmp_path / "eval.json")], tmp_path)
    # resume in this process from the shards: merged, continues at the next step
    config = yaml.load(config_path.read_text(), Loader=yaml.Loader)
    config.load_dir, config.timestamp, config.max_num_iterations = run_dir / "shards", "one", 1
    config.machine.num_devices = 1
    trainer = config.setup(local_rank=0, world_size=1)
    trainer.setup()
    assert trainer._start_step == STEPS
    state = trainer.pipeline.state_dict()
    for name, value in merged["pipeline"].items():
        torch.testing.assert_close(state[name], value, rtol=0, atol=0, msg=name)
    assert all(v == v for v in trainer.run_steps(STEPS, 1))

    _finish(evaluate)
    results = json.loads((tmp_path / "eval.json").read_text())["results"]
    assert 0.0 < results["psnr"] < 60.0

    # The merged (single-process) checkpoint rendered on 2 ranks: each keeps its two blocks, and
    # the frames are the one-process render.
    frames = tmp_path / "frames-two-ranks"
    _finish(_start([str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", "-m", "landmark_plugin.render_cli",
                    "dataset", "--load-config", str(config_path), "--split", "test", "--rendered-output-names",
                    "raw-rgb", "--output-path", str(frames)], tmp_path))
    rendered = {path.name.split(".")[0]: path for path in (frames / "test" / "raw-rgb").rglob("*.npy.gz")}
    views = _render_test_views(config_path)
    assert sorted(rendered) == sorted(views) and len(views) >= 1
    for name, path in rendered.items():
        with gzip.open(path, "rb") as f:
            torch.testing.assert_close(torch.from_numpy(np.load(f)), views[name], rtol=0, atol=1e-5, msg=name)
