"""``landmark-train``: ns-train's command line for runs of several processes, on CPU or GPU.

nerfstudio's ``ns-train --machine.num-devices N`` launcher asserts CUDA and fixes a 30-minute
collective timeout.  This entry point takes the same arguments and starts ranks in two ways:

- under torchrun (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` / ``MASTER_PORT``
  in the environment), one rank per process, single or multi node::

      torchrun --nproc-per-node 2 -m landmark_plugin.distributed.train retina-gs \\
          --data data/city --machine.device-type cpu synthetic-city

- by itself, with nerfstudio's machine options (``--machine.num-devices``,
  ``--machine.num-machines``, ``--machine.machine-rank``, ``--machine.dist-url``): it spawns
  ``num_devices`` local processes and rendezvouses them through the same environment.

One process (no torchrun, one device) is plain ``ns-train``.  Every rank parses the same
command line; rank 0 picks the run's timestamp and shares it, prints and saves config.yml;
then each rank runs nerfstudio's ``train_loop`` (seed + rank, trainer setup, train).  The
default process group uses NCCL on CUDA and gloo on CPU, with the pipeline's
``collective_timeout_s``; ranks other than 0 print nothing but errors.
"""

from __future__ import annotations

import datetime
import os
import sys
from typing import Tuple
from urllib.parse import urlparse

import torch
import torch.multiprocessing as mp
import tyro
import yaml
from nerfstudio.configs.config_utils import convert_markup_to_ansi
from nerfstudio.engine.trainer import TrainerConfig
from nerfstudio.utils.rich_utils import CONSOLE

from landmark_plugin.config_checks import check_before_start
from landmark_plugin.distributed.collectives import barrier, broadcast_object
from landmark_plugin.distributed.groups import DEFAULT_TIMEOUT, cuda_index, init_comm, teardown
from landmark_plugin.distributed.launch import free_port
from landmark_plugin.errors import ConfigError, UserError, exit_rank

TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _timeout(config: TrainerConfig) -> datetime.timedelta:
    seconds = getattr(config.pipeline, "collective_timeout_s", None)
    return DEFAULT_TIMEOUT if seconds is None else datetime.timedelta(seconds=seconds)


def _prepare(config: TrainerConfig) -> TrainerConfig:
    """What ns-train's ``main`` does to the parsed config before launching."""
    if config.data:
        config.pipeline.datamanager.data = config.data
    if config.prompt:
        config.pipeline.model.prompt = config.prompt
    if config.load_config:
        CONSOLE.log(f"Loading pre-set config from: {config.load_config}")
        config = yaml.load(config.load_config.read_text(), Loader=yaml.Loader)
    return config


def run_rank(config: TrainerConfig, rank: int, local_rank: int, world_size: int) -> None:
    """One rank of a run whose rendezvous is in the environment (``env://``)."""
    from nerfstudio.scripts.train import train_loop

    prefix = f"[rank {rank}/{world_size}]"
    if rank > 0:
        CONSOLE.quiet = True  # one log; errors still reach stderr
    try:
        config = _prepare(config)
        check_before_start(config, world_size)  # every torchrun rank refuses alone, before the rendezvous
    except UserError as error:
        exit_rank(error, prefix)
    device_type = config.machine.device_type
    backend = getattr(config.pipeline, "backend", "auto")
    if device_type == "cuda":
        torch.cuda.set_device(cuda_index(local_rank, backend))
    comm = init_comm(device_type, timeout=_timeout(config), backend=backend)
    try:
        config.set_timestamp()
        config.timestamp = broadcast_object(comm, config.timestamp, what="run timestamp")
        if comm.is_main:
            config.print_to_terminal()
            config.save_config()
        barrier(comm, "config saved")
        train_loop(local_rank, world_size, config, global_rank=rank)
        barrier(comm, "training finished")
    except BaseException as error:
        # No teardown: the group may be broken; torchrun / the launcher reports the exit code.
        exit_rank(error, prefix)
    teardown(comm)


def _rendezvous(config: TrainerConfig) -> Tuple[str, int]:
    url = config.machine.dist_url
    if url == "auto":
        if config.machine.num_machines > 1:
            raise ConfigError("--machine.dist-url auto works on one machine only; pass tcp://HOST:PORT of machine 0")
        return "127.0.0.1", free_port()
    parsed = urlparse(url)
    if parsed.scheme != "tcp" or parsed.hostname is None or parsed.port is None:
        raise ConfigError(f"--machine.dist-url must look like tcp://HOST:PORT, got {url!r}")
    return parsed.hostname, parsed.port


def _spawned(local_rank: int, config: TrainerConfig, address: str, port: int) -> None:
    machine = config.machine
    world_size = machine.num_devices * machine.num_machines
    rank = machine.machine_rank * machine.num_devices + local_rank
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(local_rank),
        MASTER_ADDR=address, MASTER_PORT=str(port),
    )
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // machine.num_devices))
    run_rank(config, rank, local_rank, world_size)


def main(config: TrainerConfig) -> None:
    if all(name in os.environ for name in TORCHRUN_VARIABLES) and int(os.environ["WORLD_SIZE"]) > 1:
        run_rank(config, int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"]), int(os.environ["WORLD_SIZE"]))
        return
    machine = config.machine
    world_size = machine.num_devices * machine.num_machines
    if world_size <= 1:
        from nerfstudio.scripts.train import main as ns_train_main

        ns_train_main(config)
        return
    check_before_start(config, world_size)  # refused here, not by every spawned process
    address, port = _rendezvous(config)
    try:
        mp.start_processes(_spawned, args=(config, address, port), nprocs=machine.num_devices, join=True, start_method="spawn")
    except mp.ProcessExitedException as error:
        # The rank printed its own message (or traceback); the launcher's traceback adds nothing.
        print(f"landmark-train: rank {error.error_index} exited with status {error.exit_code}", file=sys.stderr)
        sys.exit(1)


def entrypoint() -> None:
    from nerfstudio.configs.method_configs import AnnotatedBaseConfigUnion

    tyro.extras.set_accent_color("bright_yellow")
    main(tyro.cli(AnnotatedBaseConfigUnion, description=convert_markup_to_ansi(__doc__)))


if __name__ == "__main__":
    entrypoint()
