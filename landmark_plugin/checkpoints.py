"""Checkpoint files: atomic writes, loading the newest readable one, and loading nerfstudio
checkpoints on torch >= 2.6.

A checkpoint is never visible half-written: it is written to a temporary file in a hidden
sibling folder of its directory (``.nerfstudio_models.partial/`` beside ``nerfstudio_models/``:
the same filesystem, so the rename stays atomic, and never listed by nerfstudio's loaders, which
parse every name in ``nerfstudio_models/`` as a step), flushed to disk, then renamed over the
final name, and the directory entry is synced.  A run killed mid-write leaves the previous
checkpoint intact.  A checkpoint that is on disk but does not load (truncated by a full disk or
a lost node) is reported by path, and resuming falls back to the newest older one that loads
(``load_newest_readable``).
"""

from __future__ import annotations

import functools
import os
import pickle
import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
import torch
from nerfstudio.utils.rich_utils import CONSOLE

LOAD_ERRORS = (RuntimeError, OSError, EOFError, pickle.UnpicklingError, ValueError)
"""What torch.load raises on a truncated, corrupt or foreign file (e.g. RuntimeError
"PytorchStreamReader failed reading zip archive")."""

from landmark_plugin.errors import reports_write_failures


CHECKPOINT_NAME = re.compile(r"^step-(\d{9})\.ckpt$")
"""A complete checkpoint of nerfstudio_models/ (temp files and anything else are not)."""


def complete_steps(checkpoint_dir: Path) -> List[int]:
    """Steps of the complete checkpoints in ``checkpoint_dir``, newest first (temp files ignored)."""
    steps = (int(m.group(1)) for p in Path(checkpoint_dir).iterdir() if (m := CHECKPOINT_NAME.match(p.name)))
    return sorted(steps, reverse=True)


def load_newest_complete(config: Any) -> Any:
    """An ``eval_setup`` ``update_config_callback``: pin --load-step to the newest complete
    checkpoint, so that nerfstudio's loader, which parses every name in nerfstudio_models/ as a
    step, never meets a temp file an older version left there.  The names passed over are
    reported (and left on disk: they may be the user's); a folder with no checkpoint at all is
    an ``InputError`` naming it."""
    checkpoint_dir = Path(config.get_checkpoint_dir())
    if config.load_step is not None or not checkpoint_dir.is_dir():
        return config  # a step the user chose, or nerfstudio's own "no checkpoint directory" message
    ignored = sorted(p.name for p in checkpoint_dir.iterdir() if not CHECKPOINT_NAME.match(p.name))
    if ignored:
        CONSOLE.print(f"[bold yellow]Ignoring {len(ignored)} name(s) in {checkpoint_dir} that are not checkpoints "
                      f"(step-<9 digits>.ckpt), e.g. temp files of an older version: {', '.join(ignored)}")  # fmt: skip
    steps = complete_steps(checkpoint_dir)
    if not steps:
        from landmark_plugin.data.validate import InputError

        raise InputError(f"{checkpoint_dir}: no checkpoint (step-<9 digits>.ckpt) to load"
                         + (f"; ignored {', '.join(ignored)}" if ignored else ""))  # fmt: skip
    config.load_step = steps[0]
    return config


def resume_files(load_dir: Optional[Path], load_step: Optional[int], load_checkpoint: Optional[Path]) -> List[Path]:
    """Checkpoint files to resume from, newest first: --load-checkpoint, --load-step's in
    --load-dir, or every complete checkpoint of --load-dir (names that are not ``step-<9
    digits>.ckpt``, such as temp files of killed writes, are passed over: nerfstudio would parse
    them as steps).  None asked for: [].

    Raises:
        InputError: what the options name is not there (the message lists what the folder holds),
            so that every rank ends with this one message rather than a traceback.
    """
    from landmark_plugin.data.validate import InputError

    if load_dir is not None:
        load_dir = Path(load_dir)
        if not load_dir.is_dir():
            raise InputError(f"--load-dir {load_dir}: no such directory")
        steps = [load_step] if load_step is not None else complete_steps(load_dir)
        if not steps:
            held = sorted(p.name for p in load_dir.iterdir())
            raise InputError(
                f"--load-dir {load_dir}: no checkpoint to resume from (step-<9 digits>.ckpt, or the shards of a "
                f"run with shards/step-*/complete.json); it holds {', '.join(held[:20]) or 'nothing'}"
                + (f" and {len(held) - 20} more" if len(held) > 20 else "")
            )
        paths = [load_dir / f"step-{step:09d}.ckpt" for step in steps]
    elif load_checkpoint is not None:
        paths = [Path(load_checkpoint)]
    else:
        return []
    if not paths[0].is_file():
        raise InputError(f"checkpoint {paths[0]} does not exist" + (f" (--load-step {load_step})" if load_step is not None else ""))
    return paths


def install_eval_checkpoint_filter() -> None:
    """Make nerfstudio's ``eval_setup`` (ns-eval, ns-render, ns-viewer, ns-export, landmark-render)
    load the newest complete checkpoint (``load_newest_complete``) instead of parsing every name in
    nerfstudio_models/ as a step, which raises ``ValueError: invalid literal for int()`` on a temp
    file that an older version left there.

    ``eval_setup`` offers no hook to these commands' users, so its module's
    ``eval_load_checkpoint`` is wrapped.  Our pipelines call this from their ``__init__``:
    ``eval_setup`` builds the pipeline just before it lists the checkpoints, and by then
    nerfstudio.utils.eval_utils is fully imported (when the package itself is imported, inside
    that module's imports, it is not yet).  Idempotent; does nothing where eval_utils is not loaded.
    """
    eval_utils = sys.modules.get("nerfstudio.utils.eval_utils")
    original = getattr(eval_utils, "eval_load_checkpoint", None)
    if original is None or getattr(original, "landmark_filtered", False):
        return

    @functools.wraps(original)
    def eval_load_checkpoint(config: Any, pipeline: Any) -> Any:
        return original(load_newest_complete(config), pipeline)

    eval_load_checkpoint.landmark_filtered = True  # type: ignore[attr-defined]
    eval_utils.eval_load_checkpoint = eval_load_checkpoint


def temp_dir(folder: Path) -> Path:
    """Where ``atomic_torch_save`` writes the temporary files of checkpoints in ``folder``: a hidden
    sibling (``<parent>/.<name>.partial``), on the same filesystem and outside ``folder``."""
    folder = Path(os.path.abspath(folder))
    return folder.parent / f".{folder.name}.partial"


@reports_write_failures("checkpoint")
def atomic_torch_save(obj: Any, path: Path, temp_folder: Optional[Path] = None) -> None:
    """torch.save ``obj`` to ``path`` so that ``path`` holds either the old or the new file.

    The temporary file goes to ``temp_folder`` (default: ``temp_dir`` of ``path``'s folder),
    which must be on the same filesystem as ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = temp_dir(path.parent) if temp_folder is None else Path(temp_folder)
    partial.mkdir(exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=partial)  # temp_name_pattern
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
    """Delete the temporary files of killed ``atomic_torch_save`` writes for ``folder`` (they can
    be as large as a checkpoint): in its ``temp_dir``, and in ``folder`` itself, where versions
    before the temp folder wrote them.  Call it from the only process writing there, after a save."""
    pattern = temp_name_pattern(name)
    stale = sorted([*temp_dir(folder).glob(pattern), *Path(folder).glob(pattern)])
    for path in stale:
        path.unlink(missing_ok=True)
    return stale


# ---- loading ------------------------------------------------------------------------------
class UnreadableCheckpoint(Exception):
    """A checkpoint file that does not load; the message names it and torch's reason."""


def load_checkpoint_file(path: Path, weights_only: bool = True) -> Dict[str, Any]:
    """``torch.load`` of a checkpoint on the CPU (weights_only, as ns-eval / ns-render load it).

    Raises:
        UnreadableCheckpoint: the file is truncated, corrupt or not a checkpoint.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=weights_only)
    except LOAD_ERRORS as error:
        reason = (str(error).splitlines() or [""])[0]
        raise UnreadableCheckpoint(f"{path} cannot be read ({type(error).__name__}: {reason})") from error
    if not isinstance(state, dict) or "pipeline" not in state:
        raise UnreadableCheckpoint(f"{path} cannot be read (not a nerfstudio checkpoint: no 'pipeline' entry)")
    return state


@dataclass(frozen=True)
class Candidate:
    """One checkpoint a run may resume from."""

    name: str
    """How messages name it (a file, or the shards of a step)."""
    load: Callable[[], Dict[str, Any]]
    """This rank's state of it; raises ``UnreadableCheckpoint`` naming the file that does not load."""


def load_newest_readable(
    candidates: Sequence[Candidate], errors_on_every_rank: Callable[[Optional[str]], List[Optional[str]]] = lambda e: [e]
) -> Dict[str, Any]:
    """The state of the first of ``candidates`` (newest first) that loads on every rank.

    Each one that does not is reported by path, and the next (older) one is tried.

    Args:
        candidates: checkpoints, newest first.
        errors_on_every_rank: collective: every rank's error (None: it loaded), so that all
            ranks move on together when one rank's shard does not load.

    Raises:
        InputError: none loads; the message names every file tried.
    """
    failures: List[str] = []
    for i, candidate in enumerate(candidates):
        error = None
        try:
            state = candidate.load()
        except UnreadableCheckpoint as unreadable:
            error = str(unreadable)
        errors = list(dict.fromkeys(e for e in errors_on_every_rank(error) if e is not None))
        if not errors:
            if failures:
                CONSOLE.print(f"[bold yellow]Resuming from {candidate.name}, the newest checkpoint that loads")
            return state
        failures += errors
        older = f": trying the older {candidates[i + 1].name}" if i + 1 < len(candidates) else ""
        for message in errors:
            CONSOLE.print(f"[bold yellow]Checkpoint {message}{older}")
    from landmark_plugin.data.validate import InputError

    raise InputError(
        "no checkpoint to resume from can be read:\n  " + "\n  ".join(failures)
        + "\nDelete or move them to train from scratch, or pass --load-dir / --load-step of a checkpoint that loads."
    )


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
