"""landmark-render and ns-eval on several ranks of a sharded run (2 gloo CPU processes).

One spawn of 2 ranks (``_sharded_render_rank``) trains a tiny sharded run of each method (retina-gs,
and landmark-grid with branch parallelism) through the real trainer, then runs landmark-render's
command line on both ranks, each loading its own shard: the dataset's test views as raw float
frames, plain and with an edits file whose copy lands on the other rank.  The checks:
- the frames equal the one-process render of the merged checkpoint (ns-render's loader merges the
  shards in memory), with the edits installed there by the one-process ``apply_edits``;
- the edits are visible, and only rank 0 wrote frames (rank 1's temporary output is gone);
- landmark-grid: ns-eval on the 2 ranks gives the one-process metrics.
"""

from __future__ import annotations

import gzip
import json
import sys
import time
from pathlib import Path
from typing import Dict

import numpy as np
import pytest
import torch

from _trainers import micro_city  # noqa: F401 (fixture)
from landmark_plugin.distributed.launch import run_ranks
from landmark_plugin.edits import LayoutEdits, apply_edits

METHODS = ["retina-gs", "landmark-grid"]
SAME_RENDER_TOL = dict(rtol=0.0, atol=1e-5)
"""float32 renders of the same model: the composite of the ranks' partials (retina-gs) or the
gathered per-sample outputs (landmark-grid) vs one process; rounding only."""
METRIC_TOL = 1e-6


@pytest.fixture(scope="module")
def two_ranks(micro_city, tmp_path_factory):  # noqa: F811
    """(work dir, rank results, edits): both methods trained, rendered and evaluated on 2 ranks."""
    from _sharded_render_rank import EDITS, train_render_evaluate

    work = tmp_path_factory.mktemp("sharded-render")
    edits_file = work / "edits.json"
    edits_file.write_text(json.dumps(EDITS))
    started = time.monotonic()
    results = run_ranks(
        train_render_evaluate, 2, work / "ranks", args=(METHODS, str(micro_city), str(work), str(edits_file)),
        timeout_s=120.0, start_method="forkserver",
        preload=("landmark_plugin.gaussians.trainer", "landmark_plugin.grid.trainer", "landmark_plugin.render_cli",
                 "_sharded_render_rank"),
    )
    print(f"\n2 ranks: train, render and evaluate both methods: {time.monotonic() - started:.1f} s")
    return work, results, LayoutEdits.from_dict(EDITS)


def _frames(folder: Path) -> Dict[str, torch.Tensor]:
    out = {}
    for path in (folder / "test" / "raw-rgb").rglob("*.npy.gz"):
        with gzip.open(path, "rb") as f:
            out[path.name.split(".")[0]] = torch.from_numpy(np.load(f))
    return out


def _one_process_renders(config: Path, edits: LayoutEdits) -> Dict[str, Dict[str, torch.Tensor]]:
    """The test views rendered by one process loading the run (the shards merged in memory)."""
    from nerfstudio.utils.eval_utils import eval_setup

    _, pipeline, _, _ = eval_setup(config, test_mode="test")
    dataset = pipeline.datamanager.eval_dataset
    names = [Path(f).stem for f in dataset._dataparser_outputs.image_filenames]
    out: Dict[str, Dict[str, torch.Tensor]] = {"plain": {}, "edited": {}}
    for kind, installed in (("plain", LayoutEdits()), ("edited", edits)):
        apply_edits(pipeline.model, installed)
        for index, name in enumerate(names):
            with torch.no_grad():
                out[kind][name] = pipeline.model.get_outputs_for_camera(dataset.cameras[index : index + 1])["rgb"].cpu()
    return out


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_two_rank_render_equals_the_merged_model(two_ranks, method):
    work, results, edits = two_ranks
    config = results[0]["configs"][method]
    assert config == results[1]["configs"][method]
    reference = _one_process_renders(config, edits)
    for kind in ("plain", "edited"):
        frames = _frames(work / "frames" / method / kind)
        assert sorted(frames) == sorted(reference[kind]) and len(frames) == 2, "one frame per test view, once"
        for name, frame in frames.items():
            torch.testing.assert_close(frame, reference[kind][name], **SAME_RENDER_TOL)
    assert all((reference["edited"][n] - reference["plain"][n]).abs().max() > 1e-3 for n in reference["plain"]), \
        "the edits change every test view"
    for result in results:
        assert result["scratch_left"] == [], "a rank's temporary output is removed"
    assert sorted(p.name for p in (work / "frames" / method).iterdir()) == ["edited", "plain"]


@pytest.mark.slow
def test_two_rank_grid_eval_equals_one_process(two_ranks, tmp_path):
    from nerfstudio.scripts import eval as ns_eval

    work, results, _ = two_ranks
    config = results[0]["configs"]["landmark-grid"]
    saved = sys.argv
    sys.argv = ["ns-eval", "--load-config", str(config), "--output-path", str(tmp_path / "one.json")]
    try:
        ns_eval.entrypoint()
    finally:
        sys.argv = saved
    one = json.loads((tmp_path / "one.json").read_text())["results"]
    for rank in range(2):
        two = json.loads((work / f"eval-landmark-grid-rank{rank}.json").read_text())["results"]
        for key in ("psnr", "ssim", "psnr_std", "ssim_std"):
            assert two[key] == pytest.approx(one[key], abs=METRIC_TOL), (rank, key)


def test_only_rank_zero_writes_redirects_other_ranks(tmp_path, monkeypatch):
    """In process: on rank 1 of 2 the command's output goes to a temporary folder, removed after."""
    from landmark_plugin import render_cli

    monkeypatch.setattr(render_cli, "launched_world_size", lambda: 2)
    monkeypatch.setattr(render_cli.tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    command = render_cli.DatasetRender(load_config=tmp_path / "config.yml", output_path=tmp_path / "renders")
    for rank, inside in ((0, True), (1, False)):
        monkeypatch.setattr(render_cli, "launched_rank", lambda rank=rank: rank)
        with render_cli.only_rank_zero_writes(command):
            command.output_path.mkdir(parents=True)
            assert (command.output_path == tmp_path / "renders") == inside
            assert command.output_path.name == "renders"
        assert command.output_path == tmp_path / "renders"
    assert list((tmp_path / "tmp").iterdir()) == [], "rank 1's folder is removed"
