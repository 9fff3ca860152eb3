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
    try:
        trainer.run_steps(0, 10, after_step=die)
    except BaseException as err:
        # The error text goes to a file too: ranks come from a forkserver that an earlier test
        # may have started, so their stderr is not this test's captured stderr.
        (Path(out) / f"error-rank{comm.rank}.txt").write_text(f"{type(err).__name__}: {err}")
        raise
