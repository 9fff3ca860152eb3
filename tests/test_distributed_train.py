"""retina-gs on 2 CPU processes as a user runs it: torchrun, landmark-merge, ns-eval, ns-render, resume.

One 7-step run on a 6-image 48x36 synthetic city (4 train, 2 test views; 2 ranks, gloo,
batches of 2 cameras, refinement at step 6) is shared by the checks:
- the loss logged at step 0 equals the single-process model's loss on the same cameras;
- densification and migration ran: the last shards hold more Gaussians than the seed points,
  each on the rank owning its mean's leaf; config.yml records the world size and the tree;
- the distributed evaluation of all eval images (step 6) equals ns-eval of the merged
  checkpoint, which ns-render also loads; the merge also writes the .ply;
- resume 2 -> 1 (from the shards, in this process) and 1 -> 2 (torchrun, from the merged
  single checkpoint): the run continues at step 7 with every Gaussian, and on 2 ranks with the
  single-process model's loss at that step.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

import pytest
import torch
import yaml

BIN = Path(sys.executable).parent
STEPS = 7  # steps 0..6; step 6 refines (refine_every 2, after gsplat's pause of 4 images + 2 steps)
SEED_POINTS = 300
CITY = dict(blocks=(2, 2), num_images=6, width=48, height=36, num_points=SEED_POINTS, test_every=3)
TRAIN = [
    "--experiment-name", "city", "--machine.device-type", "cpu", "--vis", "tensorboard",
    "--logging.steps-per-log", "1", "--steps-per-eval-image", "3", "--pipeline.model.warmup-length", "1",
    "--pipeline.model.refine-every", "2", "--pipeline.model.background-color", "white",
    "--pipeline.max-batch-size", "2",
]


def _start(args: List[str], cwd: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, timeout: int = 600) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, proc.args))} failed:\n{out[-6000:]}"
    return out


def _torchrun(nproc: int, *args: str) -> List[str]:
    return [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", str(nproc), "-m",
            "landmark_plugin.distributed.train", "retina-gs-small", *args]


def _scalars(run_dir: Path) -> Dict[str, Dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = glob.glob(str(run_dir / "events.out.tfevents.*"))
    acc = EventAccumulator(events)
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def _single_process_loss(config_path: Path, step: int, state: Optional[Dict] = None) -> float:
    """Mean loss of the next camera batch of the run's queue, rendered by one process holding
    every Gaussian (the run's initial model, or ``state``)."""
    config = yaml.load(config_path.read_text(), Loader=yaml.Loader)
    torch.manual_seed(config.pipeline.init_seed)  # what every rank does around its pipeline's construction
    pipeline = config.pipeline.setup(device="cpu", test_mode="val")
    if state is not None:
        pipeline.load_pipeline(state["pipeline"], state["step"])
        pipeline.load_resume_state(state["resume"]["own"]["pipeline"])
    # the queue of the run's world size (its owners interleaved), not of this one process
    batch = pipeline._next_pool(config.pipeline.max_batch_size or config.pipeline.world_size, world_size=config.pipeline.world_size)
    model, dm = pipeline.model, pipeline.datamanager
    model.train()
    model.step = step
    model.optimizers = {}  # read by the strategy's pre-backward hook; no step is taken here
    loss = 0.0
    for index in batch:
        outputs = model.get_outputs(dm.train_dataset.cameras[index : index + 1])
        loss += float(model.get_loss_dict(outputs, dict(dm.cached_train[index]))["main_loss"]) / len(batch)
    return loss


@pytest.fixture(scope="module")
def city(tmp_path_factory) -> Path:
    from landmark_plugin.data.city import CityConfig, write_city

    return write_city(tmp_path_factory.mktemp("dist-city") / "city", CityConfig(**CITY))


@pytest.fixture(scope="module")
def run(city, tmp_path_factory):
    """The 2-rank run, merged: (work dir, run dir, logged scalars)."""
    work = tmp_path_factory.mktemp("dist-train")
    _finish(_start(_torchrun(
        2, "--data", str(city), "--output-dir", str(work / "out"), "--timestamp", "two",
        "--max-num-iterations", str(STEPS), "--steps-per-save", "6", "--steps-per-eval-all-images", str(STEPS - 1),
        *TRAIN, "synthetic-city"), work))
    run_dir = work / "out" / "city" / "retina-gs-small" / "two"
    # landmark-merge CONFIG, in this process (a new process would spend ~20 s importing nerfstudio)
    from landmark_plugin.distributed.merge import entrypoint

    argv = sys.argv
    sys.argv = ["landmark-merge", str(run_dir / "config.yml")]
    try:
        entrypoint()
    finally:
        sys.argv = argv
    return work, run_dir, _scalars(run_dir)


@pytest.mark.slow
def test_two_rank_run_matches_one_process_and_writes_shards(run):
    from landmark_plugin.core.partition import KDTree, assign_leaves
    from landmark_plugin.core.schedule import Parts
    from landmark_plugin.distributed.checkpoint import latest_complete_step, load_shards

    _, run_dir, scalars = run
    losses = scalars["Train Loss"]
    assert sorted(losses) == list(range(STEPS)) and all(torch.isfinite(torch.tensor(list(losses.values()))))
    assert losses[0] == pytest.approx(_single_process_loss(run_dir / "config.yml", 0), abs=1e-5)

    config = yaml.load((run_dir / "config.yml").read_text(), Loader=yaml.Loader)
    assert config.pipeline.world_size == 2 and config.pipeline.tree["depth"] == 2
    assert latest_complete_step(run_dir) == STEPS - 1
    assert [p.name for p in (run_dir / "shards").iterdir()] == [f"step-{STEPS - 1:09d}"], "only the latest step is kept"
    shards = load_shards(run_dir, STEPS - 1)
    parts = Parts.of(2, 2)
    total = 0
    for shard in shards:
        means = shard["pipeline"]["_model.gauss_params.means"]
        leaves = assign_leaves(KDTree.from_dict(shard["tree"]), means)
        owner = torch.tensor(parts.rank)[parts.leaf_part()[leaves]]
        assert bool((owner == shard["rank"]).all()), "after migration every Gaussian lives on its owner"
        total += means.shape[0]
    assert total != SEED_POINTS, f"step {STEPS - 1} should have densified / pruned the seed Gaussians"
    assert scalars["Train Metrics Dict/gaussian_count"][0] == SEED_POINTS


@pytest.mark.slow
def test_merged_checkpoint_evaluates_and_renders_in_one_process(run):
    from plyfile import PlyData

    work, run_dir, scalars = run
    config = run_dir / "config.yml"
    merged = torch.load(run_dir / "nerfstudio_models" / f"step-{STEPS - 1:09d}.ckpt", map_location="cpu")
    count = merged["pipeline"]["_model.gauss_params.means"].shape[0]
    assert PlyData.read(str(run_dir / "splat.ply"))["vertex"].count == count

    evaluate = _start([str(BIN / "ns-eval"), "--load-config", str(config), "--output-path", str(work / "eval.json")], work)
    render = _start([str(BIN / "ns-render"), "dataset", "--load-config", str(config), "--output-path", str(work / "frames"),
                     "--split", "test", "--rendered-output-names", "rgb"], work)
    _finish(evaluate)
    _finish(render)
    results = json.loads((work / "eval.json").read_text())["results"]
    distributed_psnr = scalars["Eval Images Metrics Dict (all images)/psnr"][STEPS - 1]
    assert results["psnr"] == pytest.approx(distributed_psnr, abs=1e-3), "distributed eval == ns-eval of the merge"
    assert len(list((work / "frames").rglob("*.jpg"))) == 2  # the tiny city's two test views


@pytest.mark.slow
def test_resume_on_one_and_on_two_ranks(run, city):
    work, run_dir, _ = run
    merged_dir = run_dir / "nerfstudio_models"
    merged = torch.load(merged_dir / f"step-{STEPS - 1:09d}.ckpt", map_location="cpu")
    count = merged["pipeline"]["_model.gauss_params.means"].shape[0]
    on_two = _start(_torchrun(
        2, "--data", str(city), "--max-num-iterations", str(STEPS + 1), "--steps-per-save", "100", "--steps-per-eval-all-images",
        "1000", *TRAIN, "--output-dir", str(work / "two"), "--timestamp", "two", "--load-dir", str(merged_dir),
        "synthetic-city"), work)

    # 2 -> 1, here while the 2-rank resume runs: the shards merge into this one process.
    config = yaml.load((run_dir / "config.yml").read_text(), Loader=yaml.Loader)
    config.load_dir, config.timestamp, config.max_num_iterations = run_dir / "shards", "one", 1
    trainer = config.setup(local_rank=0, world_size=1)
    trainer.setup()
    assert trainer._start_step == STEPS
    assert trainer.pipeline.model.num_points == count
    assert torch.isfinite(torch.tensor(trainer.run_steps(STEPS, 1))).all()

    # 1 -> 2: shards at the resume step, every Gaussian once, the single-process loss at that step.
    from landmark_plugin.distributed.checkpoint import load_shards

    _finish(on_two)
    two_dir = work / "two" / "city" / "retina-gs-small" / "two"
    shards = load_shards(two_dir, STEPS)
    assert sum(s["pipeline"]["_model.gauss_params.means"].shape[0] for s in shards) == count
    logged = _scalars(two_dir)["Train Loss"][STEPS]
    assert logged == pytest.approx(_single_process_loss(run_dir / "config.yml", STEPS, merged), abs=1e-5)


@pytest.mark.slow
def test_two_ranks_stream_leaves_from_host_memory(city, tmp_path):
    """--pipeline.model.offload host on 2 ranks as a user runs it: training through a refinement
    and an eval pass, sharded checkpoint; the first batch's loss is the one-process loss."""
    from landmark_plugin.distributed.checkpoint import latest_complete_step, load_shards

    _finish(_start(_torchrun(
        2, "--data", str(city), "--output-dir", str(tmp_path / "out"), "--timestamp", "offload",
        "--max-num-iterations", str(STEPS), "--steps-per-save", "6", "--steps-per-eval-all-images", str(STEPS - 1), *TRAIN,
        "--pipeline.model.visible-adam", "True", "--pipeline.model.offload", "host", "--pipeline.model.tree-depth", "3",
        "--pipeline.camera-order", "locality", "synthetic-city"), tmp_path))
    run_dir = tmp_path / "out" / "city" / "retina-gs-small" / "offload"
    scalars = _scalars(run_dir)
    losses = scalars["Train Loss"]
    assert sorted(losses) == list(range(STEPS)) and all(torch.isfinite(torch.tensor(list(losses.values()))))
    assert losses[0] == pytest.approx(_single_process_loss(run_dir / "config.yml", 0), abs=1e-5)
    assert latest_complete_step(run_dir) == STEPS - 1
    total = sum(s["pipeline"]["_model.gauss_params.means"].shape[0] for s in load_shards(run_dir, STEPS - 1))
    assert total != SEED_POINTS, "step 6 refined: the shards hold the refined Gaussians"
    counts = scalars["Train Metrics Dict/gaussian_count"]
    assert all(counts[s] == SEED_POINTS for s in range(STEPS)), f"the count is every Gaussian, not the staged ones: {counts}"
    assert torch.isfinite(torch.tensor(scalars["Eval Images Metrics Dict (all images)/psnr"][STEPS - 1]))
