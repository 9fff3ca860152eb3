"""landmark-render (ns-render + --edits) on a tiny trained retina-gs checkpoint: the frames it writes
are the renders of the loaded model with the edits installed, and the edits change them.  The command
installs edits through the same ``apply_edits`` for both methods (landmark-grid's edits are tested in
process in test_edits.py); one method keeps this subprocess test short."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from _trainers import micro_city, retina_config, setup_trainer  # noqa: F401 (fixture)
from landmark_plugin.edits import CopyBlock, LayoutEdits, RemoveBlock, apply_edits

BIN = Path(sys.executable).parent
# float32 renders of the same model in two processes: same ops, same order; rounding only
SAME_RENDER_TOL = 1e-5


def landmark_render(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1", PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    result = subprocess.run(
        [str(BIN / "landmark-render"), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, f"landmark-render failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.mark.slow
def test_landmark_render_writes_the_edited_scene(micro_city, tmp_path):  # noqa: F811
    config = retina_config(micro_city, tmp_path / "out", 2)
    trainer = setup_trainer(config)
    config.save_config()
    trainer.run_steps(0, 2)
    trainer.save_checkpoint(1)
    edits = LayoutEdits(ops=(CopyBlock(1, to_block=0), RemoveBlock(3)))
    edits_file = tmp_path / "edits.json"
    edits_file.write_text(edits.to_json())

    frames = tmp_path / "frames"
    landmark_render(
        "dataset", "--load-config", str(config.get_base_dir() / "config.yml"), "--edits", str(edits_file),
        "--output-path", str(frames), "--split", "test", "--rendered-output-names", "raw-rgb", cwd=tmp_path,
    )
    written = {p.name.split(".")[0]: p for p in (frames / "test" / "raw-rgb").rglob("*.npy.gz")}
    dataset = trainer.pipeline.datamanager.eval_dataset
    names = [Path(f).stem for f in dataset._dataparser_outputs.image_filenames]
    assert sorted(written) == sorted(names) and len(names) == 2

    # the reference: the checkpoint loaded here as ns-render loads it (the trained pipeline in this
    # process differs from a loaded one, e.g. in the proposal sampler's annealing state)
    from nerfstudio.utils.eval_utils import eval_setup

    _, pipeline, _, _ = eval_setup(config.get_base_dir() / "config.yml", test_mode="inference")
    model = pipeline.model
    for index, name in enumerate(names):
        with gzip.open(written[name], "rb") as f:
            frame = torch.from_numpy(np.load(f))
        camera = dataset.cameras[index : index + 1]
        with torch.no_grad():
            apply_edits(model, edits)
            edited = model.get_outputs_for_camera(camera)["rgb"]
            apply_edits(model, LayoutEdits())
            plain = model.get_outputs_for_camera(camera)["rgb"]
        torch.testing.assert_close(frame, edited, atol=SAME_RENDER_TOL, rtol=0)
        assert (edited - plain).abs().max() > 1e-3  # the edits are visible in this view


def test_a_bad_edits_file_stops_landmark_render_before_loading(tmp_path, monkeypatch):
    """In process (tyro parses the same arguments as the command line): the error names the file and
    the entry, and no checkpoint is opened."""
    import tyro

    from landmark_plugin import render_cli
    from landmark_plugin.edits import EditsError

    edits_file = tmp_path / "edits.json"
    edits_file.write_text('{"ops": [{"op": "remove_block", "block": "x"}]}')
    command = tyro.cli(
        render_cli.Commands,
        args=["dataset", "--load-config", str(tmp_path / "config.yml"), "--edits", str(edits_file)],
    )
    assert isinstance(command, render_cli.DatasetRender) and command.edits == edits_file

    def no_loading(*args, **kwargs):
        raise AssertionError("the checkpoint was loaded before the edits were checked")

    monkeypatch.setattr(render_cli.ns_render, "eval_setup", no_loading)
    with pytest.raises(EditsError, match=r"edits.json: ops\[0\]\.block"):
        command.main()
