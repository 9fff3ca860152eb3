"""Where a training step makes the host wait for the device, counted by source line.

On CUDA, ``torch.cuda.set_sync_debug_mode("warn")`` flags every synchronising call (``.item()``,
``nonzero``, device-to-host copies, ...); on the CPU nothing synchronises, so ``SyncAudit``
flags the calls that would (a reading of a tensor's value on the host, or an op whose output
size depends on values).  Either way each hit is attributed to the innermost frame of the
project, nerfstudio or gsplat, so the table says which line to change.

    with SyncAudit() as audit:
        trainer.run_steps(...)
    print(audit.table(steps))
"""

from __future__ import annotations

import collections
import traceback
import warnings
from typing import Counter, Optional

import torch
from torch.overrides import TorchFunctionMode

_WATCHED = ("landmark_plugin", "nerfstudio", "gsplat")
# Calls that need a value on the host, or whose output size depends on values.
_SYNCING = {
    "item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "masked_select",
    "unique", "unique_consecutive", "numpy", "cpu", "argwhere", "any", "all",
}


def _site() -> str:
    """The innermost stack frame in watched code, as ``file:line (function)``."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if any(name in frame.filename for name in _WATCHED) and "sync_audit" not in frame.filename:
            short = frame.filename.split("site-packages/")[-1].split("landmark_plugin/", 1)[-1]
            return f"{short}:{frame.lineno} ({frame.name})"
    return "<elsewhere>"


class _CpuMode(TorchFunctionMode):
    def __init__(self, hits: Counter):
        super().__init__()
        self.hits = hits

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        boolean_index = name == "__getitem__" and len(args) > 1 and _has_bool_tensor(args[1])
        if name in _SYNCING or boolean_index or (name == "to" and _to_host(args, kwargs or {})):
            self.hits[f"{name:>12}  {_site()}"] += 1
        return func(*args, **(kwargs or {}))


def _has_bool_tensor(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


def _to_host(args, kwargs) -> bool:
    target = kwargs.get("device", args[1] if len(args) > 1 else None)
    return isinstance(target, (str, torch.device)) and str(target).startswith("cpu")


class SyncAudit:
    """Counts synchronising calls by source line while active (see module docstring)."""

    def __init__(self, device: Optional[str] = None):
        self.cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda"
        self.hits: Counter = collections.Counter()
        self._mode = None
        self._catch = None

    def __enter__(self) -> "SyncAudit":
        if self.cuda:
            # catch_warnings restores the filters and showwarning on exit.
            self._catch = warnings.catch_warnings()
            self._catch.__enter__()
            warnings.simplefilter("always")
            warnings.showwarning = self._note  # called while the syncing call's stack is live
            torch.cuda.set_sync_debug_mode("warn")
        else:
            self._mode = _CpuMode(self.hits)
            self._mode.__enter__()
        return self

    def _note(self, message, category, filename, lineno, file=None, line=None) -> None:
        text = str(message).split("\n")[0][:40]
        self.hits[f"{text:>40}  {_site()}"] += 1

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("default")
            self._catch.__exit__(*exc)
        else:
            self._mode.__exit__(*exc)

    def table(self, steps: int) -> str:
        """Calls per step by site, most frequent first."""
        kind = "CUDA synchronisations" if self.cuda else "calls that would synchronise on a GPU"
        lines = [f"{kind} per step ({sum(self.hits.values()) / max(steps, 1):.1f} in all):"]
        for site, count in self.hits.most_common():
            lines.append(f"{count / max(steps, 1):6.1f}  {site}")
        return "\n".join(lines)
