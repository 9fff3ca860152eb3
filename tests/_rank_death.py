"""Rank function of test_distributed_faults.py (importable by spawned ranks)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

from _trainers import retina_config, setup_trainer


def train_until_a_rank_dies(comm, data: str, out: str, dying_rank: int, dying_step: int, timeout_s: float) -> None:
    """A 2-rank retina-gs run through the real trainer; ``dying_rank`` SIGKILLs itself after
    step ``dying_step``, the other rank must fail the next collective with RankFailure."""
    config = retina_config(Path(data), Path(out), 10)
    config.deterministic = False
    config.timestamp = "run"
    config.pipeline.collective_timeout_s = timeout_s
    config.pipeline.max_batch_size = 2

    def die(step: int) -> None:
        if comm.rank == dying_rank and step == dying_step:
            (Path(out) / "died").write_text(str(step))
            os.kill(os.getpid(), signal.SIGKILL)

    trainer = config.setup(local_rank=comm.rank, world_size=comm.world_size)
    trainer.setup()
    trainer.run_steps(0, 10, after_step=die)
