"""Child process of test_checkpoint_kill.py: a real retina-gs training run (nerfstudio's train
loop) on a given city that stops, mid-write, in the checkpoint of one step, so the test can
SIGKILL it there.

usage: python _pause_in_checkpoint_write.py DATA OUTPUT_DIR MAX_STEPS SAVE_EVERY PAUSE_STEP MARKER

``os.fsync`` is wrapped: the fsync of the temporary file of step PAUSE_STEP's checkpoint (after
its bytes are written, before the rename that publishes it) creates MARKER and sleeps.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def pause_in_fsync_of(fragment: str, marker: Path) -> None:
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        real_fsync(fd)
        if fragment in os.readlink(f"/proc/self/fd/{fd}"):
            marker.write_text(str(os.getpid()))
            time.sleep(600)

    os.fsync = fsync


def main() -> None:
    data, out, max_steps, save_every, pause_step, marker = sys.argv[1:]
    from _trainers import retina_config, setup_trainer

    pause_in_fsync_of(f"/.step-{int(pause_step):09d}.ckpt.", Path(marker))
    config = retina_config(Path(data), Path(out), int(max_steps))
    config.steps_per_save = int(save_every)
    config.timestamp = "run"
    config.save_config()
    setup_trainer(config).train()


if __name__ == "__main__":
    main()
