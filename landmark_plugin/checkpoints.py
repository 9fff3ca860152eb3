"""Checkpoint files: atomic writes and loading nerfstudio checkpoints on torch >= 2.6.

A checkpoint is never visible half-written: it is written to a temporary file in the same
directory, flushed to disk, then renamed over the final name (rename is atomic on POSIX), and
the directory entry is synced.  A run killed mid-write leaves the previous checkpoint intact.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, List

import numpy as np
import torch

from landmark_plugin.errors import reports_write_failures


@reports_write_failures("checkpoint")
def atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save ``obj`` to ``path`` so that ``path`` holds either the old or the new file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # temp_name_pattern
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def temp_name_pattern(name: str) -> str:
    """Glob pattern of the temporary files ``atomic_torch_save`` writes for final name ``name``."""
    return f".{name}.*.tmp"


def remove_stale_temp_files(folder: Path, name: str = "step-*.ckpt") -> List[Path]:
    """Delete the temporary files of killed ``atomic_torch_save`` writes in ``folder`` (they can be
    as large as a checkpoint).  Call it from the only process writing there, after a save."""
    stale = sorted(Path(folder).glob(temp_name_pattern(name)))
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


def allow_nerfstudio_checkpoints() -> None:
    """Let ``torch.load(weights_only=True)`` (the default since torch 2.6) read nerfstudio checkpoints.

    nerfstudio's schedulers store numpy float64 learning rates; the unpickler refuses numpy
    scalars unless they are allow-listed.  These are plain value types, safe to allow.
    """
    add_safe_globals = getattr(torch.serialization, "add_safe_globals", None)
    if add_safe_globals is None:  # torch < 2.4 has no weights_only default to worry about
        return
    if int(np.__version__.split(".")[0]) >= 2:  # numpy 2 renamed numpy.core to numpy._core
        from numpy._core.multiarray import scalar
    else:
        from numpy.core.multiarray import scalar
    dtype_classes = [type(np.dtype(t)) for t in (np.float64, np.float32, np.int64, np.int32, np.bool_)]
    add_safe_globals([scalar, np.dtype, *dtype_classes])
