"""Rank information and rank-0 decisions, at world size 1 and across two real gloo processes."""

from __future__ import annotations

import os
import socket

import pytest
import torch.distributed as torch_dist
import torch.multiprocessing as mp

from ckpt_callbacks import dist


def test_single_process_defaults() -> None:
    info = dist.dist_info()
    assert info.format_variables() == {"rank": 0, "local_rank": 0, "world_size": 1, "local_world_size": 1, "node_rank": 0}
    assert dist.decide(lambda: "yes") == "yes"
    assert dist.all_gather_object(3) == [3]
    assert dist.broadcast_object({"a": 1}) == {"a": 1}
    dist.barrier()


def test_torchrun_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in {"RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "4", "GROUP_RANK": "1"}.items():
        monkeypatch.setenv(name, value)
    info = dist.dist_info()
    assert (info.rank, info.world_size, info.local_rank, info.local_world_size, info.node_rank) == (5, 8, 1, 4, 1)
    monkeypatch.delenv("GROUP_RANK")
    monkeypatch.setenv("NODE_RANK", "1")
    assert dist.dist_info().node_rank == 1


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch_dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        decision = dist.decide(lambda: f"decided by rank {torch_dist.get_rank()}")
        gathered = dist.all_gather_object(rank * 10)
        dist.barrier()
        results.put((rank, decision, gathered, dist.dist_info().world_size))
    finally:
        torch_dist.destroy_process_group()


def test_rank_zero_decides_for_everyone() -> None:
    context = mp.get_context("spawn")
    results = context.Queue()
    mp.start_processes(_worker, args=(_free_port(), results), nprocs=2, start_method="spawn", join=True)
    outcomes = sorted(results.get(timeout=60) for _ in range(2))
    assert outcomes == [
        (0, "decided by rank 0", [0, 10], 2),
        (1, "decided by rank 0", [0, 10], 2),
    ]
