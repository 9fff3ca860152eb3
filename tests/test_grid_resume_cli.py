"""Resuming landmark-grid from the command line after its grids have grown, as a user does after
a crash: ``ns-train landmark-grid ... --load-dir`` (one process) and torchrun with
``landmark_plugin.distributed.train`` (3 gloo processes, plane parallel: 2x2 blocks cut into
uneven sub-planes), with ``--deterministic True``.

Each case trains an unbroken run of steps 0..4 that grows every grid at step 1 and saves at every
step, copies what a crash would have left (the step-2 checkpoint, written after the growth, and
the step-3 one truncated, one rank's shard on 3 processes) and resumes from the copy with the
same command line into a fresh model, whose grids have the initial resolution:
- the truncated checkpoint is reported by path and the run resumes from step 2;
- the losses of steps 3 and 4 and the final parameters and Adam moments equal the unbroken run's
  bit for bit (README: a resumed CPU run repeats an unbroken one).
A checkpoint of another model structure (one z line per block, ``--pipeline.model.parallel
none``) resumed into ``plane`` (one shared z line) stops with one error naming the checkpoint.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
import torch
from test_distributed_train import BIN, _finish, _start
from test_resume_cli import _checksums, assert_resumed_like_unbroken, crash_leftovers

STEPS, SAVED, LOST = 5, 2, 3
"""Steps 0..4, growth at step 1 (0.2 of the run), a checkpoint at every step; a crash after step
3's save truncated it."""
CITY = dict(blocks=(2, 2), num_images=6, width=48, height=36, num_points=300, test_every=3)
CELLS = 8
TRAIN = [
    "--experiment-name", "city", "--machine.device-type", "cpu", "--vis", "tensorboard",
    "--deterministic", "True", "--max-num-iterations", str(STEPS), "--steps-per-save", "1",
    "--save-only-latest-checkpoint", "False", "--logging.steps-per-log", "1", "--steps-per-eval-batch", "1000",
    "--steps-per-eval-image", "1000", "--steps-per-eval-all-images", "1000",
    "--pipeline.model.upsample-fractions", "0.2",
    "--pipeline.datamanager.train-num-rays-per-batch", "64", "--pipeline.datamanager.eval-num-rays-per-batch", "64",
    "--pipeline.model.eval-num-rays-per-chunk", "2048", "--pipeline.model.field.cells", str(CELLS),
    "--pipeline.model.proposal-cells", "4", "8", "--pipeline.model.num-proposal-samples-per-ray", "16", "8",
    "--pipeline.model.num-nerf-samples-per-ray", "8",
]  # fmt: skip
LAYOUTS = {1: "none", 3: "plane"}
PLANE = "_model.field.density.planes.0"


def _command(nproc: int, data: Path, out: Path, timestamp: str, parallel: str, *extra: str) -> List[str]:
    args = ["--data", str(data), "--output-dir", str(out), "--timestamp", timestamp, *TRAIN,
            "--pipeline.model.parallel", parallel, *extra, "synthetic-city"]  # fmt: skip
    if nproc == 1:
        return [str(BIN / "ns-train"), "landmark-grid", *args]
    return [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", str(nproc), "-m",
            "landmark_plugin.distributed.train", "landmark-grid", *args]  # fmt: skip


def _checkpoint(run_dir: Path, step: int) -> Dict:
    """The checkpoint of ``step``, the shards merged into the single-process model."""
    from landmark_plugin.checkpoints import allow_nerfstudio_checkpoints, load_checkpoint_file

    if (run_dir / "shards").is_dir():
        from landmark_plugin.distributed.checkpoint import load_shards
        from landmark_plugin.grid.sharded_state import merge_grid_shards

        return merge_grid_shards(load_shards(run_dir, step))
    allow_nerfstudio_checkpoints()
    return load_checkpoint_file(run_dir / "nerfstudio_models" / f"step-{step:09d}.ckpt")


def _final_state(run_dir: Path) -> Dict[str, torch.Tensor]:
    state = _checkpoint(run_dir, STEPS - 1)
    out = {f"pipeline.{k}": v for k, v in state["pipeline"].items() if isinstance(v, torch.Tensor)}
    for name, opt in state["optimizers"].items():
        for index, moments in opt["state"].items():
            out.update({f"adam.{name}.{index}.{k}": v for k, v in moments.items() if isinstance(v, torch.Tensor)})
    return out


@pytest.fixture(scope="module")
def city(tmp_path_factory) -> Path:
    from landmark_plugin.data.city import CityConfig, write_city

    return write_city(tmp_path_factory.mktemp("grid-resume-city") / "city", CityConfig(**CITY))


@pytest.fixture(scope="module")
def unbroken(city, tmp_path_factory, request) -> Tuple[Path, int]:
    """The unbroken run on ``request.param`` processes (trained once per module): its directory
    and process count."""
    nproc = request.param
    work = tmp_path_factory.mktemp(f"unbroken-{nproc}")
    _finish(_start(_command(nproc, city, work / "out", "unbroken", LAYOUTS[nproc]), work))
    return work / "out" / "city" / "landmark-grid" / "unbroken", nproc


@pytest.mark.slow
@pytest.mark.parametrize("unbroken", [1, 3], indirect=True, ids=["1-process", "3-ranks-plane"])
def test_resume_after_growth_is_bit_exact(city, unbroken, tmp_path):
    run_dir, nproc = unbroken
    assert _checkpoint(run_dir, SAVED)["pipeline"][PLANE].shape[1] == 2 * CELLS + 1, "the grid should have grown"
    load_dir = crash_leftovers(run_dir, tmp_path / "left", nproc, SAVED, LOST)
    before = _checksums(load_dir)

    out = tmp_path / "out"
    log = _finish(_start(_command(nproc, city, out, "resumed", LAYOUTS[nproc], "--load-dir", str(load_dir)), tmp_path))
    resumed = out / "city" / "landmark-grid" / "resumed"
    assert _checksums(load_dir) == before, "resuming changed the checkpoints it read"
    assert_resumed_like_unbroken(log, nproc, run_dir, resumed, _final_state(run_dir), _final_state(resumed), SAVED, LOST, STEPS)


@pytest.mark.slow
@pytest.mark.parametrize("unbroken", [1], indirect=True, ids=["1-process"])
def test_resume_into_another_line_layout_is_one_error_naming_the_checkpoint(city, unbroken, tmp_path):
    checkpoint = unbroken[0] / "nerfstudio_models" / f"step-{SAVED:09d}.ckpt"
    load_dir = tmp_path / "left"
    load_dir.mkdir()
    shutil.copy(checkpoint, load_dir)
    proc = _start(_command(2, city, tmp_path / "out", "resumed", "plane", "--load-dir", str(load_dir)), tmp_path)
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0, log[-3000:]
    ours = sorted(line for line in log.splitlines() if line.startswith("[rank ") and "] error: " in line)
    assert [line.split(" error: ")[0] for line in ours] == ["[rank 0/2]", "[rank 1/2]"], log[-3000:]
    flat = "".join(log.split())  # the console wraps long paths
    assert f"{load_dir / checkpoint.name}doesnotfitthismodel" in flat and "sharedbyallblocks" in flat, log[-3000:]
    assert "ConfigError" not in log, "a rank printed a traceback before its error"


def test_factor_shape_check_accepts_growth_and_refuses_another_structure():
    from _grid_dist_helpers import make_model

    from landmark_plugin.errors import ConfigError
    from landmark_plugin.grid.sharded_state import PREFIX, check_factor_shapes

    grown = make_model("none")
    grown.upsample_grids()
    grown.upsample_grids()
    state = {PREFIX + k: v for k, v in grown.state_dict().items()}
    check_factor_shapes(make_model("none"), state, "grown.ckpt")  # a fresh model takes a grown grid
    with pytest.raises(ConfigError, match=r"grown.ckpt does not fit this model: field.density.lines.0 .*shared by all"):
        check_factor_shapes(make_model("plane"), state, "grown.ckpt")  # plane: one shared z line
    state[PREFIX + "field.density.planes.0"] = state[PREFIX + "field.density.planes.0"][:, :-1]  # not a doubling
    with pytest.raises(ConfigError, match="field.density.planes.0"):
        check_factor_shapes(make_model("none"), state, "grown.ckpt")
