"""Machinery of the phased device benchmarks (scripts/bench_retina_dist.py, scripts/bench_grid_scale.py).

One driver process runs each phase of a benchmark as its own process group (``python`` for one
rank, ``torchrun`` for several, or ranks forked from a fork server for CPU smoke runs) under one
time budget.  A phase writes its results to ``OUT/phases/<tag>.json`` as it measures them
(``Record``), so a phase that dies keeps what it measured; its ranks' tracebacks land next to it,
and the driver records the phase as ok / failed / out of memory / timeout / skipped and goes on.

Also here: the background build of csrc/ while a scene is generated, the timed-steps loop both
benchmarks measure with, the linear fit of peak memory against a count, and its plot.
"""

from __future__ import annotations

import datetime
import json
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

GB = 2**30
TIMEOUT = -999
"""Exit code the driver records for a phase it ended because it ran over its time."""


def say(tag: str, start: float, message: str) -> None:
    print(f"[{tag} +{time.time() - start:6.1f}s] {message}", flush=True)


# ---- csrc/ -----------------------------------------------------------------------------------
def build_kernels_in_background() -> dict[str, Any]:
    """Build csrc/ while the scene is made: the build is cached in TORCH_EXTENSIONS_DIR, so the
    timed phases only load it."""
    state: dict[str, Any] = {}

    def build() -> None:
        from landmark_plugin import cuda

        began = time.time()
        try:
            cuda.load()
            state["available"] = True
        except cuda.CudaUnavailable as error:  # the phases fall back to the torch twins
            state.update(available=False, reason=str(error)[:500])
        state["seconds"] = round(time.time() - began, 1)

    state["thread"] = threading.Thread(target=build, daemon=True)
    state["thread"].start()
    return state


def joined(build: dict[str, Any] | None, say: Callable[[str], None]) -> dict | None:
    """The build's outcome.  Waits for the end: a build cut short leaves torch's lock file
    behind, on which every later build waits forever (the driver then runs without csrc/)."""
    if build is None:
        return None
    build.pop("thread").join()
    say(f"csrc kernels: {'built/loaded' if build['available'] else 'unavailable'} in {build['seconds']} s")
    return build


# ---- inside a phase ----------------------------------------------------------------------------
class Record:
    """A phase's results, rewritten by rank 0 after every measurement (a phase that dies keeps
    what it measured before)."""

    def __init__(self, path: Path, rank: int):
        self.path, self.rank, self.data = path, rank, {}

    def put(self, key: str, value: Any) -> None:
        self.data[key] = value
        if self.rank == 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.data, indent=2, default=str))


PhaseBody = Callable[[Record, Callable[[str], None], int, int, int], None]
"""body(record, say, rank, world, local_rank) of one rank of a phase."""


def run_phase_rank(comm, out: Path, default_world: int, tag_of: Callable[[int], str], body: PhaseBody) -> None:
    """One rank of a phase.  ``comm``: given by ``launch.spawn``; None under torchrun / python
    (the rank then comes from torchrun's environment).  A rank that fails (out of memory too)
    writes its traceback to ``out/phases/<tag>.rank<r>.error.txt`` and exits with status 3."""
    start = time.time()
    rank = comm.rank if comm is not None else int(os.environ.get("RANK", "0"))
    world = comm.world_size if comm is not None else int(os.environ.get("WORLD_SIZE", str(default_world)))
    local_rank = rank if comm is not None else int(os.environ.get("LOCAL_RANK", "0"))
    tag = tag_of(world)
    speak = (lambda m: say(tag, start, m)) if rank == 0 else (lambda m: None)
    try:
        body(Record(out / "phases" / f"{tag}.json", rank), speak, rank, world, local_rank)
    except BaseException as error:  # noqa: BLE001 - out of memory too: record it, then end this rank
        text = "".join(traceback.format_exception(error))
        (out / "phases").mkdir(parents=True, exist_ok=True)
        (out / "phases" / f"{tag}.rank{rank}.error.txt").write_text(text)
        print(f"[{tag} rank {rank}] failed: {text[-3000:]}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(3)  # peers blocked in a collective are ended by torchrun (or by the driver)
    speak(f"done in {time.time() - start:.1f}s")
    import torch.distributed as dist

    if comm is None and dist.is_available() and dist.is_initialized():  # the pipeline made torchrun's group
        dist.destroy_process_group()


def timed_steps(step: Callable[[int], int], warmup: int, steps: int, deadline: float | None, comm,
                sync: Callable[[], None], reset_peak: Callable[[], None],
                warm: Callable[[int], Any] | None = None, warm_cost: float = 1.0) -> tuple[int, int, float]:
    """(timed steps, units they did, seconds): ``steps`` calls of ``step(i)`` (which returns the
    units it did: images, rays, frames) after ``warmup`` untimed ones, synchronised.  With a
    deadline the timed steps are cut to fit it (15 s to spare), judged from the last warm-up
    step; rank 0 decides for all, so every rank takes the same number of steps.  ``warm``, when
    given, is the warm-up instead of ``step`` (a cheaper one), costing 1 / ``warm_cost`` of a step."""
    from landmark_plugin.distributed.collectives import broadcast_object

    per_step = 0.0
    for i in range(warmup):  # the last warm-up step times one step (the first ones load and build)
        began = time.perf_counter()
        (warm or step)(i)
        sync()
        per_step = (time.perf_counter() - began) * warm_cost
    if deadline is not None and warmup:
        fits = int((deadline - time.time() - 15.0) / max(per_step, 1e-3))
        steps = int(broadcast_object(comm, max(1, min(steps, fits)), what="timed steps"))
    reset_peak()
    units, start = 0, time.perf_counter()
    for i in range(warmup, warmup + steps):
        units += step(i)
    sync()
    return steps, units, time.perf_counter() - start


def cuda_peak(device: torch.device) -> dict[str, Any]:
    """This rank's peak device memory since the last reset."""
    return {"allocated": torch.cuda.max_memory_allocated(device),
            "reserved": torch.cuda.max_memory_reserved(device), "kind": "cuda"}


# ---- the driver --------------------------------------------------------------------------------
class PhaseDriver:
    """Runs phases as process groups under ``args.budget_s``.

    ``args`` needs out, work, budget_s, launcher (torchrun / spawn) and smoke.  A phase is
    ``script --phase NAME --world N --deadline T`` plus the driver's own command line; it is
    skipped when less than ``min_phase_s[NAME]`` of the budget is left, planned to end within
    ``phase_cap_s[NAME]`` and ended 15 s later.
    """

    def __init__(self, args, argv: list[str], script: Path, entry: Callable, preload: Sequence[str],
                 min_phase_s: dict[str, float], phase_cap_s: dict[str, float]):
        self.args, self.start = args, time.time()
        self.script, self.entry, self.preload = script, entry, tuple(preload)
        self.min_phase_s, self.phase_cap_s = min_phase_s, phase_cap_s
        self.deadline = self.start + args.budget_s
        args.out.mkdir(parents=True, exist_ok=True)
        args.work.mkdir(parents=True, exist_ok=True)
        for old in (args.out / "phases").glob("*"):
            old.unlink()
        # children run elsewhere (cwd = --work): absolute paths, given last so they win
        self.argv = list(argv) + ["--out", str(args.out.resolve()), "--work", str(args.work.resolve())]
        self.phases: dict[str, dict] = {}
        self.gpus = 0 if args.smoke else torch.cuda.device_count()  # no CUDA context in the driver

    def say(self, message: str) -> None:
        say("driver", self.start, message)

    def write_report(self, name: str, summary: dict, plot: Callable[[Path], None], png: str, **extra: Any) -> None:
        """``out/<name>.json`` (settings, date, seconds, summary, ``extra``, phases), then the plot
        ``out/<png>`` (a failed plot is said, not raised: the numbers matter more than the picture)."""
        args = self.args
        report = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                  "date": datetime.date.today().isoformat(), "seconds": round(time.time() - self.start, 1),
                  **extra, "summary": summary, "phases": self.phases}
        (args.out / f"{name}.json").write_text(json.dumps(report, indent=2, default=str))
        try:
            plot(args.out / png)
        except Exception as error:  # noqa: BLE001
            self.say(f"plot failed: {error}")

    def skip(self, tag: str, reason: str) -> dict:
        self.say(f"skip {tag}: {reason}")
        self.phases[tag] = {"status": "skipped", "reason": reason}
        return self.phases[tag]

    def run(self, phase: str, world: int, extra: Sequence[str] = (), tag: str | None = None) -> dict:
        """Run one phase on ``world`` ranks; its record is ``phases[tag]`` (default tag: the
        phase name, with ``-wN`` unless it is ``gen``), which the phase must write under the
        same tag."""
        tag = tag or ("gen" if phase == "gen" else f"{phase}-w{world}")
        left = self.deadline - time.time()
        if left < self.min_phase_s[phase]:
            return self.skip(tag, f"only {left:.0f} s of the budget left")
        if world > 1 and not self.args.smoke and self.gpus < world:
            return self.skip(tag, f"{world} ranks need {world} GPUs, {self.gpus} visible")
        self.say(f"start {tag} ({left:.0f} s of budget left)")
        began = time.time()
        ends = min(self.deadline, began + self.phase_cap_s[phase])
        timeout = min(ends + 15.0, self.deadline) - began
        argv = self.argv + ["--phase", phase, "--world", str(world), "--deadline", str(ends), *extra]
        code = self._spawn(argv, world, timeout) if self.args.launcher == "spawn" else self._process(argv, world, timeout)
        folder = self.args.out / "phases"
        record = folder / f"{tag}.json"
        errors = [p.read_text()[-2000:] for p in sorted(folder.glob(f"{tag}.rank*.error.txt"))]
        status = "ok" if code == 0 else ("timeout" if code == TIMEOUT else "failed")
        if status != "ok" and any("OutOfMemoryError" in e for e in errors):
            status = "out of memory"
        self.phases[tag] = {"status": status, "exit_code": code, "seconds": round(time.time() - began, 1),
                            "result": json.loads(record.read_text()) if record.exists() else {}, "errors": errors}
        self.say(f"{tag}: {status} after {time.time() - began:.1f} s")
        return self.phases[tag]

    def _process(self, argv: list[str], world: int, timeout: float) -> int:
        if world == 1:
            cmd = [sys.executable, str(self.script), *argv]
        else:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
                   str(self.script), *argv]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if "--phase" in argv and argv[argv.index("--phase") + 1] != "gen":
            env.setdefault("OMP_NUM_THREADS", "1")  # what torchrun gives each rank: the same on 1 and N ranks
        # Fewer, larger segments: the memory curve measures what the model needs, not fragmentation.
        env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
        proc = subprocess.Popen(cmd, cwd=self.args.work, env=env, start_new_session=True)
        try:
            return proc.wait(timeout=max(1.0, timeout))
        except subprocess.TimeoutExpired:
            self.say(f"phase over its time, ending process group {proc.pid}")
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            return TIMEOUT

    def _spawn(self, argv: list[str], world: int, timeout: float) -> int:
        from landmark_plugin.distributed.launch import spawn

        codes = spawn(self.entry, world, args=(argv,), device_type="cpu" if self.gpus == 0 else "cuda",
                      timeout_s=180.0, join_timeout_s=max(1.0, timeout), start_method="forkserver",
                      preload=self.preload)
        bad = [c for c in codes if c != 0]
        return 0 if not bad else (TIMEOUT if -9 in bad else bad[0])


# ---- memory against a count ---------------------------------------------------------------------
def fit_to_capacity(points: Sequence[tuple[float, float]], capacity: float) -> tuple[float, float, int] | None:
    """(bytes per unit, fixed bytes, largest count within ``capacity``) of the least-squares line
    through (count, peak bytes) points, or None without two counts, a capacity or a rising line."""
    import numpy as np

    if len({c for c, _ in points}) < 2 or capacity <= 0:
        return None
    slope, intercept = np.polyfit([c for c, _ in points], [m for _, m in points], 1)
    if slope <= 0:
        return None
    return float(slope), float(intercept), int((capacity - intercept) / slope)


def plot_memory_curves(path: Path, curves: Sequence[dict[str, Any]], xlabel: str, ylabel: str, title: str,
                       x_scale: float, y_scale: float, x_unit: str) -> None:
    """Measured points, fitted lines up to the predicted largest count, capacities and the
    verification steps of several curves in one PNG.

    Each curve: ``name``, ``points`` [(count, bytes)], optionally ``fit`` (bytes per unit, fixed
    bytes, largest count), ``capacity`` (bytes) and ``verify`` (count, bytes, status).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for curve, color in zip(curves, ("tab:blue", "tab:orange", "tab:green", "tab:red")):
        name = curve["name"]
        if curve["points"]:
            xs, ys = zip(*curve["points"])
            ax.plot([x / x_scale for x in xs], [y / y_scale for y in ys], "o", color=color, label=f"{name}: measured")
        if curve.get("fit"):
            slope, fixed, largest = curve["fit"]
            x = np.linspace(0, largest, 50)
            ax.plot(x / x_scale, (fixed + slope * x) / y_scale, "-", color=color, alpha=0.6,
                    label=f"{name}: fit, max {largest / x_scale:.2f} {x_unit}")
        if curve.get("capacity"):
            ax.axhline(curve["capacity"] / y_scale, color=color, ls=":", alpha=0.6)
        if curve.get("verify"):
            count, peak, status = curve["verify"]
            ax.plot([count / x_scale], [peak / y_scale], "*" if status == "ok" else "x", color=color, ms=12,
                    label=f"{name}: step at {count / x_scale:.2f} {x_unit}: {status}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
