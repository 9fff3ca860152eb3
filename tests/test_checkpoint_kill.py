"""A run killed with SIGKILL while it writes a checkpoint resumes from the last complete one with
identical parameters, losing only the steps since; the killed write's temporary file is ignored
on resume and removed by the next save.  ns-eval, ns-render and landmark-export load such a run,
also where an older version left its temp files in nerfstudio_models/."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from landmark_plugin.checkpoints import temp_dir
from _trainers import micro_city, model_state, setup_trainer  # noqa: F401 (fixture)

BIN = Path(sys.executable).parent
CHILD = Path(__file__).resolve().parent / "_pause_in_checkpoint_write.py"
SAVE_EVERY, KILLED_AT = 2, 4  # saves at steps 2 and 4; killed while step 4's is written


@pytest.fixture()
def deterministic():
    yield
    torch.use_deterministic_algorithms(False)


def run_until_paused(data: Path, out: Path, marker: Path, log: Path) -> None:
    """Start the child, wait for it to sit inside step KILLED_AT's checkpoint write, SIGKILL it."""
    args = [sys.executable, str(CHILD), str(data), str(out), "8", str(SAVE_EVERY), str(KILLED_AT), str(marker)]
    with log.open("w") as output:
        child = subprocess.Popen(args, stdout=output, stderr=subprocess.STDOUT, cwd=out.parent)
        try:
            deadline = time.monotonic() + 300
            while not marker.exists():
                if child.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"the child never reached the checkpoint write (exit {child.returncode}):\n"
                                f"{log.read_text()[-4000:]}")  # fmt: skip
                time.sleep(0.2)
            child.send_signal(signal.SIGKILL)
        finally:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL


@pytest.mark.slow
def test_sigkill_during_a_checkpoint_write(micro_city, tmp_path, deterministic):
    out, marker = tmp_path / "outputs", tmp_path / "writing"
    run_until_paused(micro_city, out, marker, tmp_path / "child.log")
    config_path = next(out.rglob("config.yml"))
    checkpoints = config_path.parent / "nerfstudio_models"
    names = sorted(p.name for p in checkpoints.iterdir())
    # (with save_only_latest_checkpoint the older one goes only once the newer one is complete)
    assert f"step-{SAVE_EVERY:09d}.ckpt" in names
    assert f"step-{KILLED_AT:09d}.ckpt" not in names, "the killed write must not publish its checkpoint"
    assert all(name.startswith("step-") for name in names), f"nerfstudio parses every name here as a step: {names}"
    partial = [p.name for p in temp_dir(checkpoints).iterdir()]
    assert any(name.startswith(f".step-{KILLED_AT:09d}.ckpt.") for name in partial), partial  # the torn temp file

    config = yaml.load(config_path.read_text(), Loader=yaml.Loader)
    config.load_dir = checkpoints
    resumed = setup_trainer(config)
    assert resumed._start_step == SAVE_EVERY + 1, "resume from the last complete checkpoint"
    saved = torch.load(checkpoints / f"step-{SAVE_EVERY:09d}.ckpt", map_location="cpu", weights_only=True)
    state = model_state(resumed)
    model_keys = {k.removeprefix("_model."): v for k, v in saved["pipeline"].items() if k.startswith("_model.")}
    assert state.keys() == model_keys.keys()
    assert all(torch.equal(state[k], model_keys[k]) for k in state), "parameters differ from the checkpoint"

    resumed.run_steps(SAVE_EVERY + 1, KILLED_AT - SAVE_EVERY)  # redo the lost steps
    resumed.save_checkpoint(KILLED_AT)
    names = sorted(p.name for p in checkpoints.iterdir())
    assert f"step-{KILLED_AT:09d}.ckpt" in names
    assert not list(temp_dir(checkpoints).iterdir()), "the next save removes the stale temp file"


@pytest.mark.slow
def test_killed_run_with_temp_files_of_older_versions_evaluates_renders_and_exports(micro_city, tmp_path):
    """A run killed while saving is usable by ns-eval, ns-render and landmark-export, also where an
    older version left temp files in nerfstudio_models/ (nerfstudio's eval_setup parses every name
    there as a step: ``ValueError: invalid literal for int()``).  The commands load the newest
    complete checkpoint, say which names they ignored, and leave every file as it was."""
    from test_user_errors import checksums, run

    out = tmp_path / "outputs"
    run_until_paused(micro_city, out, tmp_path / "writing", tmp_path / "child.log")
    config = next(out.rglob("config.yml"))
    models = config.parent / "nerfstudio_models"
    # what an older version killed while saving step 6 left: mkstemp's name, and a fixed-suffix one
    # that parses as step 6 (whose checkpoint does not exist)
    stale = [".step-000000006.ckpt.1234.tmp", "step-000000006.ckpt.tmp"]
    for name in stale:
        (models / name).write_bytes(b"half a checkpoint")
    before = checksums(config.parent)
    commands = {
        "ns-eval": [str(BIN / "ns-eval"), "--load-config", str(config), "--output-path", str(tmp_path / "eval.json")],
        "ns-render": [str(BIN / "ns-render"), "dataset", "--load-config", str(config), "--split", "test",
                      "--output-path", str(tmp_path / "renders")],  # fmt: skip
        "landmark-export": [str(BIN / "landmark-export"), "--load-config", str(config), "--output-dir", str(tmp_path / "export")],
    }
    for name, args in commands.items():
        result = run(args, tmp_path)
        log = "".join((result.stdout + result.stderr).split())  # the console wraps long paths
        assert result.returncode == 0, f"{name}:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
        assert f"step-{SAVE_EVERY:09d}.ckpt" in log, f"{name} did not load the newest complete checkpoint:\n{result.stdout[-2000:]}"
        assert all(s in log for s in stale) and "notcheckpoints" in log, f"{name} did not name what it ignored"
    assert (tmp_path / "eval.json").is_file() and (tmp_path / "export" / "splat.ply").is_file()
    assert list((tmp_path / "renders").rglob("*.jpg")) or list((tmp_path / "renders").rglob("*.png"))
    assert checksums(config.parent) == before, "the run's files changed"
