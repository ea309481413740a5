"""Rank and world size as the launcher (torchrun, Open MPI, MPICH) set them in the environment."""

from __future__ import annotations

import os


def launcher_env(gpus_per_node: int = 8) -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's or Open MPI / MPICH's environment; (0, 1, 0)
    when the process was not launched by one. Without a local rank, it is rank % gpus_per_node."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0))
    for prefix in ("OMPI_COMM_WORLD_", "PMI_", "PMIX_"):
        if prefix + "RANK" in env and prefix + "SIZE" in env:
            rank = int(env[prefix + "RANK"])
            local = env.get("OMPI_COMM_WORLD_LOCAL_RANK", env.get("MPI_LOCALRANKID"))
            return rank, int(env[prefix + "SIZE"]), int(local) if local is not None else rank % gpus_per_node
    return 0, 1, 0


def launcher_rank() -> int:
    """This process's rank as its launcher set it; 0 when not launched."""
    return launcher_env()[0]
