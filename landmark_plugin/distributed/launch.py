"""Launching R processes on one machine when nerfstudio's launcher cannot (CPU / gloo).

nerfstudio's ``_distributed_worker`` asserts CUDA and fixes a 30-minute timeout, so CPU runs
(and the tests) start ranks here: each process initialises its group through
``groups.init_comm`` with an explicit tcp:// rendezvous, runs ``fn(comm, *args)``, saves the
return value to ``out_dir/rank-<r>.pt`` and tears the group down.  A rank that raises exits
with status 1 after printing the error; ``run_ranks`` reports every failed rank.
"""

from __future__ import annotations

import datetime
import socket
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence

import torch
import torch.multiprocessing as mp

from landmark_plugin.distributed.groups import Comm, init_comm, teardown
from landmark_plugin.errors import exit_rank


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _worker(
    rank: int,
    world_size: int,
    port: int,
    device_type: str,
    timeout_s: float,
    out_dir: Optional[str],
    fn: Callable[..., Any],
    args: tuple,
) -> None:
    torch.set_num_threads(1)  # R processes share the cores of one machine
    comm = init_comm(
        device_type,
        timeout=datetime.timedelta(seconds=timeout_s),
        rank=rank,
        world_size=world_size,
        init_method=f"tcp://127.0.0.1:{port}",
    )
    try:
        result = fn(comm, *args)
        if out_dir is not None:
            torch.save(result, Path(out_dir) / f"rank-{rank}.pt")
    except BaseException as error:
        # Exit without tearing down: the group may be broken, and a clean exit code matters more.
        exit_rank(error, f"[rank {rank}]")
    teardown(comm)


def spawn(
    fn: Callable[..., Any],
    world_size: int,
    args: tuple = (),
    device_type: str = "cpu",
    timeout_s: float = 600.0,
    out_dir: Optional[Path] = None,
    join_timeout_s: Optional[float] = None,
    start_method: str = "spawn",
    preload: Sequence[str] = (),
) -> List[int]:
    """Run ``fn(comm, *args)`` on ``world_size`` fresh processes; return their exit codes.

    ``fn`` must be importable by module path (spawned processes re-import it).  A process
    still alive after ``join_timeout_s`` is killed and reported with exit code -9.
    ``start_method="forkserver"`` with ``preload`` (module names) imports those once in a
    fork server and forks every rank from it: nerfstudio takes ~10 s to import, and the
    server, unlike the parent, has never run autograd or CUDA, so forking it is safe.  Tests
    use this; training uses "spawn".
    """
    ctx = mp.get_context(start_method)
    if start_method == "forkserver" and preload:
        ctx.set_forkserver_preload(list(preload))
    port = free_port()
    procs = [
        ctx.Process(
            target=_worker,
            args=(r, world_size, port, device_type, timeout_s, None if out_dir is None else str(out_dir), fn, args),
        )
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    codes = []
    for p in procs:
        p.join(join_timeout_s)
        if p.is_alive():
            p.kill()
            p.join()
            codes.append(-9)
        else:
            codes.append(int(p.exitcode))
    return codes


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    out_dir: Path,
    args: tuple = (),
    timeout_s: float = 60.0,
    start_method: str = "spawn",
    preload: Sequence[str] = (),
) -> List[Any]:
    """``spawn`` and return every rank's result; raise if any rank failed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    codes = spawn(
        fn, world_size, args, timeout_s=timeout_s, out_dir=out_dir, join_timeout_s=10 * timeout_s,
        start_method=start_method, preload=preload,
    )
    if any(codes):
        raise RuntimeError(f"ranks exited with codes {codes} (see stderr above)")
    return [torch.load(out_dir / f"rank-{r}.pt", weights_only=False) for r in range(world_size)]


def comm_of_trainer(device: str, timeout_s: float) -> Comm:
    """The Comm a trainer process uses: torchrun / nerfstudio launcher / single process."""
    return init_comm(device, timeout=datetime.timedelta(seconds=timeout_s))
