"""ns-train with a simulated disk fault, for test_user_errors.py's command-line cases.

usage: python _ns_train_faults.py (--fsync-fails-at-step K | --free-bytes N) NS_TRAIN_ARGS...

``--fsync-fails-at-step K``: the fsync of step K's checkpoint (its bytes written, before the
rename that publishes it) raises ENOSPC, as a full disk does.  ``--free-bytes N``: the disk
reports N bytes free.  Then nerfstudio's ns-train entry point runs with the remaining arguments.
"""

from __future__ import annotations

import errno
import os
import shutil
import sys


def fsync_fails_on(fragment: str) -> None:
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if fragment in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    os.fsync = fsync


def disk_reports_free(free: int) -> None:
    real_usage = shutil.disk_usage

    def disk_usage(path):
        total, used, _ = real_usage(path)
        return type(real_usage(path))(total, used, free)

    shutil.disk_usage = disk_usage


def main() -> None:
    fault, value, *args = sys.argv[1:]
    if fault == "--fsync-fails-at-step":
        fsync_fails_on(f"step-{int(value):09d}.ckpt")  # the temporary file of that checkpoint
    elif fault == "--free-bytes":
        disk_reports_free(int(value))
    else:
        raise SystemExit(f"unknown fault {fault}")
    from nerfstudio.scripts.train import entrypoint

    sys.argv = ["ns-train", *args]
    entrypoint()


if __name__ == "__main__":
    main()
