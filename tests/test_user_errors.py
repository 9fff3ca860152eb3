"""Errors a user causes, fed as a user would (the real commands on the micro city): each ends with
exit status 1 and one message naming the file, directory or option, without a traceback, and
leaves what was written before as it was (issue 21)."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest
from _trainers import micro_city  # noqa: F401 -- fixture

BIN = Path(sys.executable).parent
HERE = Path(__file__).resolve().parent
FAULTS = HERE / "_ns_train_faults.py"
CPU = ["--machine.device-type", "cpu", "--vis", "tensorboard", "--timestamp", "t"]
SMALL = ["--pipeline.model.num-downscales", "0", "--steps-per-eval-image", "1000", "--steps-per-eval-all-images", "1000"]


def run(args: List[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "LANDMARK_DEBUG"}
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=600, env={**environment, **env})


def assert_one_error(result: subprocess.CompletedProcess, *names: object) -> str:
    """Exit status 1, no traceback, one ``error:`` line naming every one of ``names``."""
    assert result.returncode == 1, f"exit status {result.returncode}\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    assert "Traceback" not in result.stderr, result.stderr[-4000:]
    errors = [line for line in result.stderr.splitlines() if "error: " in line]
    assert len(errors) == 1, result.stderr[-4000:]
    for name in names:
        assert str(name) in errors[0], f"{name} not in {errors[0]}"
    return errors[0]


def checksums(folder: Path) -> Dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def ns_train(method: str, data: Path, out: Path, *extra: str, parser: str = "nerfstudio-data") -> List[str]:
    return [str(BIN / "ns-train"), method, "--data", str(data), "--output-dir", str(out), *CPU, *extra, parser]


@pytest.fixture()
def city(micro_city, tmp_path) -> Path:
    return Path(shutil.copytree(micro_city, tmp_path / "city"))


# ---------------------------------------------------------------- input


def as_jpeg(city: Path, png: Path) -> Path:
    """Replace ``png`` of the capture by a JPEG of it (transforms.json names the new file)."""
    from PIL import Image

    jpeg = png.with_suffix(".jpg")
    Image.open(png).convert("RGB").save(jpeg, quality=95)
    png.unlink()
    transforms = city / "transforms.json"
    transforms.write_text(transforms.read_text().replace(f"images/{png.name}", f"images/{jpeg.name}"))
    return jpeg


@pytest.mark.slow
@pytest.mark.parametrize("method, suffix", [("retina-gs-small", ".png"), ("landmark-grid", ".png"), ("retina-gs-small", ".jpg")])
def test_truncated_image_is_named(city, tmp_path, method, suffix):
    image = city / "images" / "frame_00003.png"
    if suffix == ".jpg":
        image = as_jpeg(city, image)
    data = image.read_bytes()
    image.write_bytes(data[: len(data) // 2])  # the header (and the size check) still reads
    before = checksums(city)
    extra = SMALL[:2] if method.startswith("retina") else []  # the model option of retina-gs
    result = run(ns_train(method, city, tmp_path / "out", *extra), tmp_path)
    line = assert_one_error(result, image)
    assert "truncated" in line and "copy it again" in line
    assert checksums(city) == before


# ---------------------------------------------------------------- configuration


def test_launcher_refuses_more_ranks_than_leaves_before_spawning(city, tmp_path):
    args = [str(BIN / "landmark-train"), "retina-gs", "--machine.num-devices", "8", "--data", str(city),
            "--output-dir", str(tmp_path / "out"), *CPU, "synthetic-city"]
    result = run(args, tmp_path)
    assert_one_error(result, "8 ranks", "--pipeline.model.tree-depth 3 or more")
    assert "[rank" not in result.stderr, "a rank was spawned"
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_torchrun_ranks_report_the_error_alone(city, tmp_path):
    args = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", "-m", "landmark_plugin.distributed.train",
            "retina-gs", "--pipeline.model.tree-depth", "0", "--data", str(city), "--output-dir", str(tmp_path / "out"),
            *CPU, "synthetic-city"]
    result = run(args, tmp_path)
    assert result.returncode == 1
    ours = [line for line in result.stderr.splitlines() if line.startswith("[rank")]
    assert ours and all("error: 2 ranks but --pipeline.model.tree-depth 0" in line for line in ours), result.stderr[-3000:]
    # torchrun prints its own failure report (with its own traceback); none of ours is in it
    assert "landmark_plugin/" not in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
@pytest.mark.parametrize("depth, message", [(20, "out of range: use 0 to 16"), (9, "512 leaves but the scene starts with only 400 points")])
def test_tree_depth_limits(city, tmp_path, depth, message):
    result = run(ns_train("retina-gs", city, tmp_path / "out", "--pipeline.model.tree-depth", str(depth)), tmp_path)
    assert_one_error(result, f"--pipeline.model.tree-depth {depth}", message)
    (config,) = (tmp_path / "out").rglob("config.yml")
    assert config.stat().st_size < 64 * 1024
    assert not list((tmp_path / "out").rglob("*.ckpt"))


def test_debug_verbosity_shows_the_traceback(city, tmp_path):
    args = [str(BIN / "landmark-train"), "retina-gs", "--machine.num-devices", "8", "--data", str(city),
            "--output-dir", str(tmp_path / "out"), *CPU, "synthetic-city"]
    result = run(args, tmp_path, LANDMARK_DEBUG="1")
    assert result.returncode == 1 and "Traceback" in result.stderr and "ConfigError" in result.stderr


# ---------------------------------------------------------------- output directory


def test_unwritable_output_dir(city, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the output folder would go")
    result = run(ns_train("retina-gs", city, blocker / "out"), tmp_path)
    assert_one_error(result, blocker / "out", "--output-dir")
    assert blocker.read_text() == "a file where the output folder would go"


@pytest.mark.slow
def test_full_disk_is_found_before_the_first_step(city, tmp_path):
    args = [sys.executable, str(FAULTS), "--free-bytes", "1000", *ns_train("retina-gs-small", city, tmp_path / "out")[1:]]
    result = run(args, tmp_path)
    run_dir = tmp_path / "out" / "city" / "retina-gs-small" / "t"
    assert_one_error(result, run_dir / "nerfstudio_models", "MiB free")
    assert not list(run_dir.rglob("*.ckpt")) and not list(run_dir.rglob("*.tmp"))


@pytest.mark.slow
def test_disk_full_during_a_save_keeps_the_previous_checkpoint(city, tmp_path):
    out, steps = tmp_path / "out", ["--steps-per-save", "1", *SMALL]
    first = run(ns_train("retina-gs-small", city, out, "--max-num-iterations", "2", *steps), tmp_path)
    assert first.returncode == 0, first.stderr[-4000:]
    models = out / "city" / "retina-gs-small" / "t" / "nerfstudio_models"
    before = checksums(models)
    assert list(before) == ["step-000000001.ckpt"]
    resume = ["--max-num-iterations", "4", "--load-dir", str(models), *steps]
    args = [sys.executable, str(FAULTS), "--fsync-fails-at-step", "2", *ns_train("retina-gs-small", city, out, *resume)[1:]]
    line = assert_one_error(run(args, tmp_path), models, "No space left on device")
    assert "step-000000002.ckpt" in line
    assert checksums(models) == before, "the previous checkpoint changed, or a temporary file was left"


# ---------------------------------------------------------------- the handler itself


@pytest.mark.parametrize("raised, user", [("InputError('scene/transforms.json: bad')", True), ("ValueError('a bug')", False)])
def test_only_user_errors_lose_their_traceback(tmp_path, raised, user):
    code = f"import landmark_plugin\nfrom landmark_plugin.data.validate import InputError\nraise {raised}"
    result = run([sys.executable, "-c", code], tmp_path)
    if user:
        assert_one_error(result, "scene/transforms.json: bad")
        assert result.stderr.strip().splitlines()[-1] == "error: scene/transforms.json: bad"
    else:
        assert result.returncode == 1 and "Traceback" in result.stderr and "ValueError: a bug" in result.stderr


def test_write_failures_become_output_errors_naming_the_directory(tmp_path):
    import errno

    from landmark_plugin.errors import OutputError, writing_to

    for failure in (OSError(errno.ENOSPC, "No space left on device"),
                    RuntimeError("[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing file data/3")):
        with pytest.raises(OutputError, match=str(tmp_path)):
            with writing_to(tmp_path, "checkpoint step-1.ckpt"):
                raise failure
    with pytest.raises(RuntimeError, match="unrelated"):  # not a write failure: left alone
        with writing_to(tmp_path, "checkpoint"):
            raise RuntimeError("unrelated")


def test_messages_of_ranks_sharing_stderr_never_interleave(tmp_path):
    """Ranks of torchrun share one stderr pipe; ``print`` writes a line's end separately, and
    another rank's message landed between (CI saw '...loads.[rank 0/2] error: ...')."""
    code = ("import sys\nfrom landmark_plugin.errors import say\n"
            "for _ in range(300): say(sys.argv[1] + ' error: ' + 'x' * 1500 + ' end.')")
    read, write = os.pipe()
    procs = [subprocess.Popen([sys.executable, "-c", code, f"[rank {r}/2]"], stderr=write, cwd=tmp_path) for r in (0, 1)]
    os.close(write)
    with os.fdopen(read, "rb") as stream:
        lines = stream.read().decode().splitlines()
    assert [p.wait() for p in procs] == [0, 0]
    torn = [line[:40] + "..." + line[-40:] for line in lines if line.count(" error: ") != 1 or not line.endswith(" end.")]
    assert len(lines) == 600 and not torn, f"{len(lines)} lines, torn: {torn[:3]}"
