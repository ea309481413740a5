"""Process-group set-up for mpirun, torchrun or a single process, and one device per rank.

ADM assumed 8 GPUs per node and hid devices through CUDA_VISIBLE_DEVICES; here each rank takes
its local rank modulo the GPUs it can see (CUDA_VISIBLE_DEVICES is honoured), nccl on GPU, gloo on
CPU. The local rank comes from the launcher; only a launcher that gives none falls back to ADM's
layout, rank % GPUS_PER_NODE (change GPUS_PER_NODE, as ADM's comment asks, for other nodes).
"""

from __future__ import annotations

import atexit
import os
import socket

import torch
import torch.distributed as dist

from adm_common.launcher import launcher_env
from guided_diffusion.run.checkpoints import load_state_dict as _safe_load_state_dict

# ADM's names. GPUS_PER_NODE: GPUs of one node, for launchers that do not tell a rank its local
# rank. SETUP_RETRY_COUNT: attempts at a single-process rendezvous (a free port can be taken
# between choosing it and binding it).
GPUS_PER_NODE = 8

SETUP_RETRY_COUNT = 3


def _launcher_env() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's or Open MPI / MPICH's environment."""
    return launcher_env(GPUS_PER_NODE)


def _local_world_size(world: int) -> int:
    """Ranks on this node, from torchrun's, Open MPI's or MPICH's environment (else the world size)."""
    for name in ("LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS"):
        if name in os.environ:
            return max(1, int(os.environ[name]))
    return world


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def share_cpu_cores(world: int) -> None:
    """On a CPU, give each of this node's ranks its share of the cores this process may use.

    Launchers differ: torchrun sets OMP_NUM_THREADS=1, Open MPI here leaves OpenMP one thread per
    rank, others let every rank take every core. Oversubscribed OpenMP threads wait for each
    other: 2 ranks x 2 threads on 2 cores sample the CIFAR-10 network 2.7 times slower than
    2 x 1 (benchmarks/RESULTS.md). An explicit OMP_NUM_THREADS wins.
    """
    if world <= 1 or "OMP_NUM_THREADS" in os.environ or torch.cuda.is_available():
        return
    torch.set_num_threads(max(1, usable_cores() // _local_world_size(world)))


def _find_free_port() -> int:
    """A TCP port that was free a moment ago (the OS's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _destroy_at_exit() -> None:
    """Destroy the process group while the interpreter still runs: left to the interpreter's
    teardown, gloo's worker threads can abort the process ("terminate called without an active
    exception", pytorch/pytorch#190489), turning a finished rank's exit status into a crash."""
    if dist.is_initialized():
        dist.destroy_process_group()


atexit.register(_destroy_at_exit)


def setup_dist() -> None:
    """Initialise torch.distributed once per process (a world of one when not launched in parallel)."""
    if dist.is_initialized():
        return
    rank, world, local_rank = _launcher_env()
    share_cpu_cores(world)
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ:
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
        return
    if world > 1:
        # Launched by mpirun: rank 0 chooses the rendezvous and MPI tells the others.
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
        store, where = None, None
        if comm.rank == 0:
            # the store binds a port the OS picks (0): no free-port guess another process could take first
            addr = socket.gethostbyname(socket.getfqdn())
            store = dist.TCPStore(addr, 0, world, is_master=True, wait_for_workers=False)
            where = (addr, store.port)
        addr, port = comm.bcast(where, root=0)
        if store is None:
            store = dist.TCPStore(addr, port, world, is_master=False)
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = addr, str(port)
        dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world)
        return
    if world == 1 and backend == "gloo":
        # a world of one needs no rendezvous: an in-process store, so no port can be taken meanwhile
        dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
        return
    for attempt in range(SETUP_RETRY_COUNT):
        os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(_find_free_port())
        try:
            dist.init_process_group(backend=backend, rank=rank, world_size=world)
            return
        except (RuntimeError, OSError):  # the port was taken meanwhile: choose another
            if attempt == SETUP_RETRY_COUNT - 1:
                raise


def dev() -> torch.device:
    """The device of this rank."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def get_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def load_state_dict(path, **kwargs):
    """Load a checkpoint safely on every rank (tensors only; see checkpoints.load_state_dict)."""
    return _safe_load_state_dict(path, map_location=kwargs.get("map_location", "cpu"))


def sync_params(params) -> None:
    """Broadcast parameters from rank 0 so every rank starts from the same weights."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    for p in params:
        with torch.no_grad():
            dist.broadcast(p, 0)
