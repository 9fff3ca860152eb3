"""End to end: a rank of a 2-process retina-gs training run (gloo, the real trainer) dies with
SIGKILL mid-run; the other rank exits on its own with a clear RankFailure, well within the
collective timeout (the collective-level cases, dying and hanging, are in
test_distributed_collectives.py)."""

from __future__ import annotations

import time

import pytest
from _trainers import micro_city  # noqa: F401 (fixture)

from landmark_plugin.distributed.launch import spawn

TIMEOUT_S = 60.0


@pytest.mark.slow
def test_survivor_exits_with_a_clear_message_when_a_rank_is_killed(micro_city, tmp_path, capfd):
    start = time.monotonic()
    codes = spawn(
        _rank_death_fn(), 2, args=(str(micro_city), str(tmp_path), 1, 2, TIMEOUT_S), timeout_s=TIMEOUT_S,
        join_timeout_s=240, start_method="forkserver", preload=("landmark_plugin.gaussians.trainer", "_rank_death"),
    )
    elapsed = time.monotonic() - start
    err = capfd.readouterr().err
    assert (tmp_path / "died").exists(), err[-4000:]
    assert codes[1] == -9, codes  # SIGKILLed itself
    assert codes[0] == 1, f"the surviving rank should fail, not hang or succeed: {codes}\n{err[-4000:]}"
    report = tmp_path / "error-rank0.txt"
    assert report.exists(), f"rank 0 left no error report\n{err[-4000:]}"
    message = report.read_text()
    assert message.startswith("RankFailure") and "rank 0/2" in message and "a peer rank died" in message, message
    assert elapsed < 240


def _rank_death_fn():
    from _rank_death import train_until_a_rank_dies

    return train_until_a_rank_dies
