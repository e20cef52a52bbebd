"""Run a test function in N real processes joined by a gloo process group (torch.multiprocessing spawn)."""

from __future__ import annotations

import faulthandler
import os
import socket
import traceback
from typing import Any, Callable

import torch.distributed as torch_dist
import torch.multiprocessing as mp

TIMEOUT_SECONDS = 180


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, fn: Callable[..., Any], args: tuple, results: Any) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
    )
    # A hung collective shows up in the test log as every thread's stack, not as a silent timeout.
    faulthandler.dump_traceback_later(TIMEOUT_SECONDS - 30, exit=True)
    torch_dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        results.put((rank, "ok", fn(*args)))
    except BaseException as error:  # noqa: BLE001 -- reported to the parent test
        results.put((rank, "error", f"{type(error).__name__}: {error}\n{traceback.format_exc()}"))
    finally:
        torch_dist.destroy_process_group()


def run(world_size: int, fn: Callable[..., Any], *args: Any) -> dict[int, tuple[str, Any]]:
    """Run ``fn(*args)`` on every rank; return {rank: ('ok', result) or ('error', text)}."""
    context = mp.get_context("spawn")
    results = context.Queue()
    processes = mp.start_processes(
        _entry, args=(world_size, _free_port(), fn, args, results), nprocs=world_size, start_method="spawn", join=False
    )
    outcomes = {}
    for _ in range(world_size):
        rank, status, value = results.get(timeout=TIMEOUT_SECONDS)
        outcomes[rank] = (status, value)
    processes.join(timeout=TIMEOUT_SECONDS)
    return outcomes


def values(outcomes: dict[int, tuple[str, Any]]) -> list[Any]:
    """The results of every rank, in rank order; fails the test with the first error."""
    for rank, (status, value) in sorted(outcomes.items()):
        assert status == "ok", f"rank {rank} failed:\n{value}"
    return [value for _, (_, value) in sorted(outcomes.items())]
