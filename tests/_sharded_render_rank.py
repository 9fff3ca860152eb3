"""Rank functions of test_distributed_render.py (importable by spawned ranks): a tiny sharded run of
each method trained on 2 gloo ranks through the real trainer, then landmark-render (with and without
an edits file) and ns-eval on the same 2 ranks, each rank loading its own shard, as under torchrun."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Dict, List

from _trainers import grid_config, retina_config

STEPS = 2
EDITS = {"ops": [{"op": "copy_block", "block": 0, "to_block": 3}, {"op": "remove_block", "block": 1}]}
"""Both methods have 4 blocks (kd-tree leaves / x-y blocks), blocks 0-1 on rank 0 and 2-3 on rank 1:
the copy lands on the other rank."""


def _config(method: str, data: Path, out: Path):
    if method == "retina-gs":
        config = retina_config(data, out, STEPS)
        config.pipeline.max_batch_size = 2
    else:
        config = grid_config(data, out, STEPS)
        config.pipeline.model.parallel = "branch"
    config.deterministic = False
    config.timestamp = "sharded"
    config.pipeline.collective_timeout_s = 120.0
    return config


def train(comm, method: str, data: str, out: str) -> Path:
    """``STEPS`` steps on every rank; the end of training saves the shards (and the pointer)."""
    config = _config(method, Path(data), Path(out))
    if comm.is_main:
        config.save_config()  # what landmark-render / ns-eval read
    trainer = config.setup(local_rank=comm.rank, world_size=comm.world_size)
    trainer.setup()
    trainer.train()
    return config.get_base_dir() / "config.yml"


def _run_cli(entrypoint, argv: List[str]) -> None:
    saved = sys.argv
    sys.argv = argv
    try:
        entrypoint()
    finally:
        sys.argv = saved


def train_render_evaluate(comm, methods: List[str], data: str, work: str, edits_file: str) -> Dict:
    """Per method: train, then ``landmark-render dataset`` of the test split as raw float frames,
    plain and with ``edits_file``; for landmark-grid also ns-eval (each rank its own JSON).

    Returns what the test checks on this rank: the config paths, and what is left in the folder
    this rank's temporary files go to (a rank other than 0 renders into one that is removed)."""
    from nerfstudio.scripts import eval as ns_eval

    from landmark_plugin import render_cli

    work_dir = Path(work)
    scratch = work_dir / f"tmp-rank{comm.rank}"
    scratch.mkdir(parents=True, exist_ok=True)
    tempfile.tempdir = str(scratch)
    result: Dict = {"configs": {}}
    for method in methods:
        config = train(comm, method, data, str(work_dir / "out"))
        result["configs"][method] = config
        frames = work_dir / "frames" / method
        common = ["dataset", "--load-config", str(config), "--split", "test", "--rendered-output-names", "raw-rgb"]
        _run_cli(render_cli.entrypoint, ["landmark-render", *common, "--output-path", str(frames / "plain")])
        _run_cli(render_cli.entrypoint,
                 ["landmark-render", *common, "--output-path", str(frames / "edited"), "--edits", edits_file])
        if method == "landmark-grid":
            eval_json = work_dir / f"eval-{method}-rank{comm.rank}.json"
            _run_cli(ns_eval.entrypoint, ["ns-eval", "--load-config", str(config), "--output-path", str(eval_json)])
    result["scratch_left"] = sorted(p.name for p in scratch.iterdir())
    return result
