"""Resuming from the command line, as a user does after a crash: ``ns-train ... --load-dir`` (one
process) and torchrun with ``landmark_plugin.distributed.train`` (3 gloo processes), with
``--deterministic True`` and densification inside the run.

Each case trains an unbroken run of steps 0..9 that saves at every step, copies what a crash
would have left (the step-1 checkpoint, and the step-2 one truncated, as a full disk or a lost
node leaves it), and resumes from the copy with the same command line:
- the truncated checkpoint (one rank's shard on 3 processes) is reported by path and the run
  resumes from step 1;
- the losses of steps 2..9 and the final checkpoint's parameters, optimiser moments and leaf ids
  equal the unbroken run's bit for bit.  Leaf ownership is refreshed at steps 2, 4, 6 and 8, so
  at step 1 some Gaussians have crossed a split plane since the initial assignment (a high
  learning rate of the means makes sure of it): they keep their stale leaf only if the
  checkpoint holds it.  gsplat refines at steps 6 and 8 from statistics gathered on both sides
  of the save;
- nothing in the folder resumed from changes (checksums);
- with no checkpoint that loads (every one unreadable, or none complete) every rank stops with
  one error naming the files, exit status 1 and no traceback (ns-train, torchrun, landmark-train).
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Dict, List

import pytest
import torch
from test_distributed_train import BIN, CITY, TRAIN, _finish, _scalars, _start, _torchrun

STEPS, SAVED, LOST = 10, 1, 2
"""Steps 0..9, a checkpoint at every step; a crash after step 2's save truncated it."""
EXACT = ["--deterministic", "True", "--max-num-iterations", str(STEPS), "--steps-per-save", "1",
         "--save-only-latest-checkpoint", "False", "--steps-per-eval-all-images", "1000",
         "--optimizers.means.optimizer.lr", "0.01"]  # fmt: skip


def _ns_train(*args: str) -> List[str]:
    return [str(BIN / "ns-train"), "retina-gs-small", *args]


def _command(nproc: int, data: Path, out: Path, timestamp: str, *extra: str) -> List[str]:
    args = ["--data", str(data), "--output-dir", str(out), "--timestamp", timestamp, *TRAIN, *EXACT, *extra, "synthetic-city"]
    return _torchrun(nproc, *args) if nproc > 1 else _ns_train(*args)


def _checksums(folder: Path) -> Dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _checkpoint(run_dir: Path, nproc: int, step: int) -> Dict:
    """The checkpoint of ``step`` (the shards merged)."""
    if nproc > 1:
        from landmark_plugin.distributed.checkpoint import load_shards, merge_shards

        return merge_shards(load_shards(run_dir, step))
    return torch.load(run_dir / "nerfstudio_models" / f"step-{step:09d}.ckpt", map_location="cpu", weights_only=True)


def _final_state(run_dir: Path, nproc: int) -> Dict[str, torch.Tensor]:
    """The step-9 parameters, optimiser moments and leaf ids."""
    state = _checkpoint(run_dir, nproc, STEPS - 1)
    out = {f"pipeline.{k}": v for k, v in state["pipeline"].items() if isinstance(v, torch.Tensor)}
    for name, opt in state["optimizers"].items():
        for key, value in (opt["state"].get(0) or {}).items():
            out[f"adam.{name}.{key}"] = value
    assert "pipeline._model.leaf_ids" in out
    return out


def assert_some_leaves_are_stale(pipeline: Dict) -> None:
    """Some Gaussians' saved leaf is not the leaf of their mean (they moved since the last refresh)."""
    from landmark_plugin.core.partition import KDTree, assign_leaves

    tree = KDTree(bounds=pipeline["_model.tree_bounds"], split_axis=pipeline["_model.tree_split_axis"],
                  split_value=pipeline["_model.tree_split_value"], depth=2)  # fmt: skip
    moved = assign_leaves(tree, pipeline["_model.gauss_params.means"]) != pipeline["_model.leaf_ids"]
    assert int(moved.sum()) > 0, "the test needs Gaussians that left their leaf since the last refresh"


def assert_resumed_like_unbroken(log: str, nproc: int, unbroken: Path, resumed: Path, expected: Dict[str, torch.Tensor],
                                 got: Dict[str, torch.Tensor], saved: int = SAVED, lost: int = LOST, steps: int = STEPS) -> None:
    """The resumed run (``log``) reported the truncated checkpoint of ``lost`` and resumed from
    ``saved``; its losses and final state (``got``) are the unbroken run's (``expected``) bit for bit."""
    truncated = f"step-{lost:09d}.ckpt" if nproc == 1 else f"rank-00001-of-{nproc:05d}.ckpt"
    flat = "".join(log.split())  # the console wraps long paths
    assert f"{truncated}cannotberead" in flat, log[-3000:]
    assert f"Resumedfromstep{saved}:" in flat, log[-3000:]
    losses, resumed_losses = _scalars(unbroken)["Train Loss"], _scalars(resumed)["Train Loss"]
    assert sorted(resumed_losses) == list(range(saved + 1, steps)), "the resumed run ends where the unbroken one did"
    assert resumed_losses == {s: losses[s] for s in resumed_losses}
    assert expected.keys() == got.keys()
    differing = [k for k in expected if expected[k].shape != got[k].shape or not torch.equal(expected[k], got[k])]
    assert not differing, f"differ from the unbroken run: {differing}"


@pytest.fixture(scope="module")
def city(tmp_path_factory) -> Path:
    from landmark_plugin.data.city import CityConfig, write_city

    return write_city(tmp_path_factory.mktemp("resume-city") / "city", CityConfig(**CITY))


def crash_leftovers(run_dir: Path, into: Path, nproc: int, saved: int = SAVED, lost: int = LOST) -> Path:
    """What a crash after step ``lost``'s save leaves, the checkpoints of ``saved`` and ``lost``, the
    latter truncated (on several ranks, rank 1's shard): the folder to pass to --load-dir
    (nerfstudio_models/ on one process, the run directory on several)."""
    if nproc == 1:
        into.mkdir(parents=True)
        for step in (saved, lost):
            shutil.copy(run_dir / "nerfstudio_models" / f"step-{step:09d}.ckpt", into)
        _truncate(into / f"step-{lost:09d}.ckpt")
        return into
    for step in (saved, lost):
        shutil.copytree(run_dir / "shards" / f"step-{step:09d}", into / "shards" / f"step-{step:09d}")
    _truncate(into / "shards" / f"step-{lost:09d}" / f"rank-00001-of-{nproc:05d}.ckpt")
    return into


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 3])
def test_resume_from_the_command_line_is_bit_exact(city, tmp_path, nproc):
    out = tmp_path / "out"
    _finish(_start(_command(nproc, city, out, "unbroken"), tmp_path))
    unbroken = out / "city" / "retina-gs-small" / "unbroken"
    assert_some_leaves_are_stale(_checkpoint(unbroken, nproc, SAVED)["pipeline"])
    load_dir = crash_leftovers(unbroken, tmp_path / "left", nproc)
    before = _checksums(load_dir)

    log = _finish(_start(_command(nproc, city, out, "resumed", "--load-dir", str(load_dir)), tmp_path))
    resumed = out / "city" / "retina-gs-small" / "resumed"
    assert _checksums(load_dir) == before, "resuming changed the checkpoints it read"
    assert_resumed_like_unbroken(log, nproc, unbroken, resumed, _final_state(unbroken, nproc), _final_state(resumed, nproc))
    counts = _scalars(unbroken)["Train Metrics Dict/gaussian_count"]
    assert counts[STEPS - 1] != counts[0], "densification should have changed the Gaussians within the run"


def _nothing_readable(left: Path, case: str) -> List[str]:
    """Fill ``left`` with what a --load-dir holding no usable checkpoint may hold; the names the
    error must give."""
    if case == "unreadable":  # checkpoints truncated to nothing or overwritten
        names = [f"step-{step:09d}.ckpt" for step in (SAVED, LOST)]
        for name in names:
            (left / name).write_bytes(b"PK\x03\x04 not a checkpoint")
        return names
    # a crash before any save completed: a step folder without complete.json, a torn temp file
    (left / "shards" / f"step-{SAVED:09d}").mkdir(parents=True)
    (left / "shards" / f"step-{SAVED:09d}" / "rank-00000-of-00002.ckpt").write_bytes(b"torn")
    (left / "nerfstudio_models").mkdir()
    (left / "nerfstudio_models" / f".step-{SAVED:09d}.ckpt.1234.tmp").write_bytes(b"torn")
    return [str(left), "nerfstudio_models", "shards"]


@pytest.mark.slow
@pytest.mark.parametrize("launcher, case", [("ns-train", "unreadable"), ("torchrun", "unreadable"), ("landmark-train", "nothing complete")])
def test_no_readable_checkpoint_is_one_error_naming_the_files(city, tmp_path, launcher, case):
    """Every rank ends with one message naming the files, exit status 1, no traceback of ours."""
    from test_user_errors import run

    left = tmp_path / "left"
    left.mkdir()
    names = _nothing_readable(left, case)
    before = _checksums(left)
    args = ["--data", str(city), "--output-dir", str(tmp_path / "out"), "--timestamp", "resumed", *TRAIN, *EXACT,
            "--load-dir", str(left), "synthetic-city"]  # fmt: skip
    if launcher == "ns-train":
        args, ranks = _ns_train(*args), [""]
    elif launcher == "torchrun":
        args, ranks = _torchrun(2, *args), ["[rank 0/2] ", "[rank 1/2] "]
    else:
        args, ranks = [str(BIN / "landmark-train"), "retina-gs-small", "--machine.num-devices", "2", *args], ["[rank 0/2] ", "[rank 1/2] "]
    result = run(args, tmp_path)
    log = result.stderr
    assert result.returncode == 1, log[-3000:]
    # torchrun adds its own failure report, with a traceback of torchrun: none of our frames in it
    frames = [line for line in log.splitlines() if line.lstrip().startswith("File ") and "landmark_plugin" in line]
    assert not frames and (launcher == "torchrun" or "Traceback" not in log), log[-4000:]
    errors = [line for line in log.splitlines() if "error: " in line]
    assert sorted(line.split("error: ")[0] for line in errors) == ranks, log[-4000:]  # one message per rank
    for rank in ranks:  # each rank's message (it may run over lines) names every file
        message = "".join(log[log.index(f"{rank}error: "):].split("\n[rank")[0].split())
        assert all("".join(name.split()) in message for name in names), message
    assert _checksums(left) == before
