"""Process groups for landmark runs: backend by device, a collective timeout, clear failures.

Every collective in landmark_plugin takes a ``Comm`` (the group, this rank, the world size)
as an argument; nothing reads a global group.  ``Comm.single()`` stands for a one-process run
and every collective returns early on it.

Three ways a run starts, all ending in ``init_comm``:
- torchrun (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` ... in the environment): we initialise
  the default group from ``env://`` with our backend and timeout;
- nerfstudio's launcher (``ns-train ... --machine.num-devices N``) has already initialised a
  default NCCL group with its fixed 30-minute timeout: we create a sub-group over all ranks
  with our backend and timeout and use that one;
- our own launcher (``launch.spawn``, used on CPU where nerfstudio's launcher asserts CUDA, and
  by the tests) passes rank, world size and a tcp:// address explicitly.

A dead rank shows up on its peers as a connection reset (gloo) or a timed-out wait; a hung
rank as a timeout after ``timeout``.  ``guard`` turns either into ``RankFailure`` whose
message says which rank saw it, in which collective, and what the timeout was.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import Iterator, Literal, Optional, Tuple

import torch
import torch.distributed as dist

Backend = Literal["auto", "nccl", "gloo"]
DEFAULT_TIMEOUT = datetime.timedelta(minutes=10)


class RankFailure(RuntimeError):
    """A collective failed because a peer died, hung past the timeout, or the link broke."""


@dataclass(frozen=True)
class Comm:
    """The process group a distributed run communicates over, passed explicitly everywhere.

    Attributes:
        group: the torch ProcessGroup (None for a single process).
        rank: this process's rank in ``group``.
        world_size: number of ranks R.
        timeout: collective timeout (reported in failure messages).
        backend: "nccl", "gloo" or "none".
    """

    group: Optional["dist.ProcessGroup"]
    rank: int
    world_size: int
    timeout: datetime.timedelta = DEFAULT_TIMEOUT
    backend: str = "none"

    @classmethod
    def single(cls) -> "Comm":
        return cls(group=None, rank=0, world_size=1)

    @property
    def is_single(self) -> bool:
        return self.world_size == 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def backend_for(device: torch.device | str, backend: Backend = "auto") -> str:
    """NCCL for CUDA tensors, gloo otherwise (gloo cannot reduce CUDA tensors everywhere and
    NCCL cannot touch CPU tensors)."""
    if backend != "auto":
        return backend
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def cuda_index(local_rank: int, backend: Backend = "auto") -> int:
    """The GPU of a local rank: its own with NCCL (one GPU per rank); with gloo, ranks share
    the GPUs round robin (``--pipeline.backend gloo`` runs several ranks on one GPU, the whole
    multi-rank GPU path on a single-GPU machine; gloo stages CUDA tensors through host memory)."""
    count = max(1, torch.cuda.device_count())
    if local_rank < count:
        return local_rank
    if backend == "gloo":
        return local_rank % count
    raise ValueError(
        f"local rank {local_rank} has no GPU of its own ({count} visible) and NCCL needs one per rank: "
        "pass --pipeline.backend gloo to run several ranks on one GPU"
    )


def _prepare_nccl_env() -> None:
    # Without these an NCCL wait on a dead peer blocks forever: async error handling tears the
    # process down when a collective times out, blocking wait makes wait() raise instead.
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    os.environ.setdefault("TORCH_NCCL_BLOCKING_WAIT", "1")


def env_world_size() -> int:
    """WORLD_SIZE from the environment (torchrun), 1 when absent."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_rank() -> int:
    """This process's rank among those it was started with, before ``init_comm`` (as
    ``launched_world_size``): the default group's rank, else torchrun's RANK, else 0."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def launched_world_size() -> int:
    """The number of ranks this process was started among, before ``init_comm``: the default
    group's size when a launcher made one, else torchrun's WORLD_SIZE, else 1."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return env_world_size()


def init_comm(
    device: torch.device | str,
    timeout: datetime.timedelta = DEFAULT_TIMEOUT,
    backend: Backend = "auto",
    rank: Optional[int] = None,
    world_size: Optional[int] = None,
    init_method: Optional[str] = None,
) -> Comm:
    """The ``Comm`` of this process, initialising torch.distributed if nobody has yet.

    Args:
        device: the training device; picks the backend when ``backend == "auto"``.
        timeout: how long any collective may wait for a peer before failing.
        rank, world_size, init_method: explicit rendezvous (our launcher); default: the
            torchrun environment (``env://``), or the already initialised default group.

    Returns:
        ``Comm.single()`` for one process, else a Comm over all ranks with our timeout.
    """
    chosen = backend_for(device, backend)
    if chosen == "nccl":
        _prepare_nccl_env()
    if dist.is_available() and dist.is_initialized():
        size = dist.get_world_size()
        if size == 1:
            return Comm.single()
        # nerfstudio's launcher made the default group (NCCL, 30 min): a sub-group over all
        # ranks carries our backend and timeout.  new_group is itself collective.
        group = dist.new_group(ranks=list(range(size)), timeout=timeout, backend=chosen)
        return Comm(group, dist.get_rank(), size, timeout, chosen)
    size = world_size if world_size is not None else env_world_size()
    if size == 1:
        return Comm.single()
    dist.init_process_group(
        backend=chosen,
        init_method=init_method or "env://",
        rank=rank if rank is not None else int(os.environ["RANK"]),
        world_size=size,
        timeout=timeout,
    )
    return Comm(dist.group.WORLD, dist.get_rank(), size, timeout, chosen)


def teardown(comm: Comm) -> None:
    """Destroy the default group if we own one (safe to call twice, or for a single process)."""
    if comm.is_single or not (dist.is_available() and dist.is_initialized()):
        return
    dist.destroy_process_group()


@contextlib.contextmanager
def guard(comm: Comm, what: str) -> Iterator[None]:
    """Re-raise a failed collective as ``RankFailure`` naming rank, phase and timeout."""
    try:
        yield
    except RankFailure:
        raise
    except (RuntimeError, dist.DistError) as error:  # DistBackendError subclasses RuntimeError too
        raise RankFailure(
            f"rank {comm.rank}/{comm.world_size}: collective '{what}' failed: a peer rank died, hung "
            f"longer than the collective timeout ({comm.timeout.total_seconds():g} s), or the link broke. "
            f"Check the other ranks' logs. Cause: {error}"
        ) from error


def model_parallel_comms(comm: Comm, size: int) -> Tuple[Comm, Comm]:
    """Split ``comm`` into model-parallel groups of ``size`` consecutive ranks and the
    data-parallel groups across them (one rank of every model-parallel group, same position).

    Collective: every rank of ``comm`` must call it with the same ``size`` (``new_group`` is).

    Returns:
        (model-parallel Comm of this rank, data-parallel Comm of this rank); a group of one
        rank is ``Comm.single()``.
    """
    if size < 1 or comm.world_size % size:
        raise ValueError(f"model-parallel size {size} does not divide the world size {comm.world_size}")
    data = comm.world_size // size
    if comm.is_single or (size == 1 and data == 1):
        return Comm.single(), Comm.single()
    mine_mp, mine_dp = Comm.single(), Comm.single()
    base = comm.group if comm.group is not None else dist.group.WORLD
    members = dist.get_process_group_ranks(base)  # global ranks of comm, in comm-rank order
    if size > 1:  # every rank creates every group, in the same order
        for first in range(0, comm.world_size, size):
            ranks = list(range(first, first + size))
            group = dist.new_group([members[r] for r in ranks], timeout=comm.timeout, backend=comm.backend)
            if comm.rank in ranks:
                mine_mp = Comm(group, comm.rank - first, size, comm.timeout, comm.backend)
    if data > 1:
        for position in range(size):
            ranks = list(range(position, comm.world_size, size))
            group = dist.new_group([members[r] for r in ranks], timeout=comm.timeout, backend=comm.backend)
            if comm.rank in ranks:
                mine_dp = Comm(group, comm.rank // size, data, comm.timeout, comm.backend)
    return mine_mp, mine_dp
