"""dist_util: the launcher's environment read right, and CPU ranks that do not oversubscribe the cores."""

import os
import subprocess
import sys

import pytest
import torch

from guided_diffusion import dist_util
from sample_scripts import script_env


@pytest.fixture
def threads_set(monkeypatch):
    """Record torch.set_num_threads calls instead of changing the test process."""
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(dist_util.os, "sched_getaffinity", lambda pid: set(range(6)), raising=False)
    for name in ("OMP_NUM_THREADS", "LOCAL_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS"):
        monkeypatch.delenv(name, raising=False)
    return calls


@pytest.mark.parametrize("env,world,expected", [
    ({"OMPI_COMM_WORLD_LOCAL_SIZE": "2"}, 4, [3]),  # mpirun: 2 ranks on this node share 6 cores
    ({"LOCAL_WORLD_SIZE": "4"}, 8, [1]),  # torchrun: 6 cores over 4 ranks, rounded down
    ({"MPI_LOCALNRANKS": "12"}, 12, [1]),  # more ranks than cores: never 0 threads
    ({}, 3, [2]),  # no local size: the world is on this node
    ({}, 1, []),  # one process keeps torch's default
    ({"OMP_NUM_THREADS": "5"}, 2, []),  # the user's choice wins
])
def test_cpu_ranks_share_the_cores(monkeypatch, threads_set, env, world, expected):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    dist_util.share_cpu_cores(world)
    assert threads_set == expected


def test_gpu_ranks_keep_their_threads(monkeypatch, threads_set):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    dist_util.share_cpu_cores(4)
    assert threads_set == []


@pytest.mark.parametrize("env,expected", [
    ({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1"}, (3, 8, 1)),
    ({"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "6", "OMPI_COMM_WORLD_LOCAL_RANK": "2"}, (5, 6, 2)),
    ({"PMI_RANK": "1", "PMI_SIZE": "2"}, (1, 2, 1)),
    ({}, (0, 1, 0)),
])
def test_launcher_environment(monkeypatch, env, expected):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
                 "OMPI_COMM_WORLD_LOCAL_RANK", "PMI_RANK", "PMI_SIZE", "PMIX_RANK", "PMIX_SIZE", "MPI_LOCALRANKID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert dist_util._launcher_env() == expected


@pytest.mark.parametrize("env,printed", [({"PMI_RANK": "1", "PMI_SIZE": "2"}, False),
                                         ({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2"}, True)])
def test_only_rank_zero_prints_a_user_error(monkeypatch, capsys, env, printed):
    from adm_common.errors import UsageError
    from adm_common.cli import cli_main

    for name in ("RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_RANK", "PMI_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)

    def main():
        raise UsageError("--thing is wrong")

    with pytest.raises(SystemExit) as exit_info:
        cli_main(main)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == ("error: --thing is wrong\n" if printed else "")


def test_a_launcher_without_local_rank_falls_back_to_adms_gpus_per_node(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
                 "OMPI_COMM_WORLD_LOCAL_RANK", "PMIX_RANK", "PMIX_SIZE", "MPI_LOCALRANKID"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PMI_RANK", "13")
    monkeypatch.setenv("PMI_SIZE", "16")
    assert dist_util.GPUS_PER_NODE == 8 and dist_util.SETUP_RETRY_COUNT == 3  # ADM's values
    assert dist_util._launcher_env() == (13, 16, 5)  # ADM: the GPU of a rank is rank % GPUS_PER_NODE
    monkeypatch.setattr(dist_util, "GPUS_PER_NODE", 4)  # ADM-ES's clusters
    assert dist_util._launcher_env() == (13, 16, 1)
    monkeypatch.setenv("MPI_LOCALRANKID", "2")  # a local rank from the launcher wins
    assert dist_util._launcher_env() == (13, 16, 2)


def test_find_free_port_gives_a_bindable_port():
    import socket

    port = dist_util._find_free_port()
    assert 0 < port < 65536
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", port))


def _single_process(monkeypatch, cuda: bool):
    for name in ("RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_RANK", "PMI_SIZE",
                 "PMIX_RANK", "PMIX_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.setenv(name, "")  # recorded, so what setup_dist sets is undone after the test
        monkeypatch.delenv(name)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: None)
    monkeypatch.setattr(dist_util.dist, "is_initialized", lambda: False)


def test_a_single_cpu_process_opens_no_port(monkeypatch):
    """A world of one on gloo rendezvous in-process: no port another process could take first."""
    _single_process(monkeypatch, cuda=False)
    calls = []
    monkeypatch.setattr(dist_util.dist, "init_process_group", lambda **kw: calls.append(kw))
    dist_util.setup_dist()
    assert len(calls) == 1 and isinstance(calls[0]["store"], dist_util.dist.HashStore)
    assert (calls[0]["backend"], calls[0]["rank"], calls[0]["world_size"]) == ("gloo", 0, 1)
    assert "MASTER_PORT" not in os.environ


@pytest.mark.parametrize("failures,retries,succeeds", [(2, 3, True), (3, 3, False), (1, 1, False)])
def test_single_gpu_process_setup_retries_a_taken_port(monkeypatch, failures, retries, succeeds):
    _single_process(monkeypatch, cuda=True)
    monkeypatch.setattr(dist_util, "SETUP_RETRY_COUNT", retries)
    calls = []

    def init_process_group(backend, rank, world_size):
        calls.append((backend, rank, world_size, os.environ["MASTER_PORT"]))
        if len(calls) <= failures:
            raise RuntimeError("address already in use")

    monkeypatch.setattr(dist_util.dist, "init_process_group", init_process_group)
    if succeeds:
        dist_util.setup_dist()
    else:
        with pytest.raises(RuntimeError, match="address already in use"):
            dist_util.setup_dist()
    assert len(calls) == (failures + 1 if succeeds else retries)
    assert all(c[:3] == ("nccl", 0, 1) for c in calls)


def test_the_process_group_is_destroyed_before_the_interpreter_tears_down(tmp_path):
    """A group left to the interpreter's teardown can abort a finished rank (gloo's threads call
    std::terminate); by the time the last exit handler runs it must be gone. The probe handler is
    registered before dist_util is imported, so it runs after dist_util's own (handlers run in
    reverse order)."""
    probe = (
        "import atexit, torch.distributed as dist\n"
        "atexit.register(lambda: print('initialized at exit:', dist.is_initialized()))\n"
        "from guided_diffusion import dist_util\n"
        "dist_util.setup_dist()\n"
        "assert dist.is_initialized()\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          env=script_env(), cwd=tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "initialized at exit: False"
