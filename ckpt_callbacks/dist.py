"""Who this process is among its peers, and the few collectives checkpointing needs.

Rank information comes from an initialised ``torch.distributed`` process group when there is one, and
otherwise from the environment torchrun sets (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
``LOCAL_WORLD_SIZE``, ``GROUP_RANK`` or ``NODE_RANK``), so that every format variable is right on
every rank.

Decisions that ranks share (save now?, which checkpoint to resume from?) are taken on rank 0 and
broadcast (:func:`decide`), because wall-clock intervals, user callables and signals can differ
between ranks. Checkpoint collectives run on a dedicated gloo group with a timeout
(:func:`checkpoint_group`), never on the training group, so that they can also run from a
background thread. At world size 1 the same functions run and simply return.
"""

from __future__ import annotations

import datetime
import os
import threading
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import torch.distributed as torch_dist

from ckpt_callbacks.errors import CheckpointError

__all__ = [
    "DistInfo",
    "all_gather_object",
    "barrier",
    "broadcast_object",
    "checkpoint_group",
    "decide",
    "dist_info",
    "is_distributed",
    "raise_if_any_failed",
]

T = TypeVar("T")

CHECKPOINT_COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)

_group_lock = threading.Lock()
_checkpoint_group: Any = None


@dataclass(frozen=True)
class DistInfo:
    """The rank layout of this process.

    Example:
        >>> DistInfo(rank=0, world_size=1, local_rank=0, local_world_size=1, node_rank=0).format_variables()
        {'rank': 0, 'local_rank': 0, 'world_size': 1, 'local_world_size': 1, 'node_rank': 0}
    """

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    node_rank: int

    def format_variables(self) -> dict[str, int]:
        """The values of the rank variables of name templates."""
        return {
            "rank": self.rank,
            "local_rank": self.local_rank,
            "world_size": self.world_size,
            "local_world_size": self.local_world_size,
            "node_rank": self.node_rank,
        }


def _env_int(*names: str, default: int) -> int:
    for name in names:
        value = os.environ.get(name)
        if value not in (None, ""):
            return int(value)
    return default


def is_distributed() -> bool:
    """Whether a ``torch.distributed`` process group is initialised with more than one rank."""
    return torch_dist.is_available() and torch_dist.is_initialized() and torch_dist.get_world_size() > 1


def dist_info() -> DistInfo:
    """Read this process's rank layout from torch.distributed and the torchrun environment.

    Example:
        >>> dist_info().rank  # 0 in a single process
        0
    """
    if torch_dist.is_available() and torch_dist.is_initialized():
        rank, world_size = torch_dist.get_rank(), torch_dist.get_world_size()
    else:
        rank, world_size = _env_int("RANK", default=0), _env_int("WORLD_SIZE", default=1)
    local_world_size = _env_int("LOCAL_WORLD_SIZE", default=1 if world_size == 1 else world_size)
    return DistInfo(
        rank=rank,
        world_size=world_size,
        local_rank=_env_int("LOCAL_RANK", default=rank % max(local_world_size, 1)),
        local_world_size=local_world_size,
        node_rank=_env_int("GROUP_RANK", "NODE_RANK", default=rank // max(local_world_size, 1)),
    )


def checkpoint_group() -> Any:
    """The gloo process group that checkpoint collectives use, created on first use on every rank.

    Returns ``None`` (meaning: no collective needed) when not distributed.
    """
    global _checkpoint_group
    if not is_distributed():
        return None
    with _group_lock:
        if _checkpoint_group is None:
            _checkpoint_group = torch_dist.new_group(backend="gloo", timeout=CHECKPOINT_COLLECTIVE_TIMEOUT)
        return _checkpoint_group


def barrier() -> None:
    """Wait until every rank reaches this point (a no-op in a single process)."""
    group = checkpoint_group()
    if group is not None:
        torch_dist.barrier(group=group)


def broadcast_object(obj: T, src: int = 0) -> T:
    """Return rank ``src``'s ``obj`` on every rank (``obj`` itself in a single process)."""
    group = checkpoint_group()
    if group is None:
        return obj
    holder = [obj]
    torch_dist.broadcast_object_list(holder, src=src, group=group)
    return holder[0]


def all_gather_object(obj: T) -> list[T]:
    """Return every rank's ``obj``, indexed by rank (``[obj]`` in a single process)."""
    group = checkpoint_group()
    if group is None:
        return [obj]
    gathered: list[Any] = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(gathered, obj, group=group)
    return gathered


def decide(decision: Callable[[], T]) -> T:
    """Take a decision on rank 0 and return it on every rank.

    Only rank 0 calls ``decision``; other ranks receive its result, so ranks never disagree on
    whether to save or which checkpoint to resume from, even when the decision reads wall clocks.

    Example:
        >>> decide(lambda: 42)
        42
    """
    mine = decision() if dist_info().rank == 0 else None
    return broadcast_object(mine, src=0)


def raise_if_any_failed(error: BaseException | None, *, action: str) -> None:
    """Tell every rank whether ``action`` failed anywhere, and raise the same error on every rank.

    Each rank passes its own failure (or None). This is a collective: every rank must call it, which
    also makes it a barrier: no rank runs ahead of a commit. In a single process the original
    exception is re-raised unchanged.

    Raises:
        CheckpointError: on every rank, naming the ranks that failed and why (chained to the
            local exception on a failing rank).

    Example:
        >>> raise_if_any_failed(None, action="saving ba100.pt")  # every rank succeeded: returns
    """
    if not is_distributed():
        if error is not None:
            raise error
        return
    statuses = all_gather_object(None if error is None else f"{type(error).__name__}: {error}")
    failures = [f"rank {rank}: {status}" for rank, status in enumerate(statuses) if status is not None]
    if failures:
        raise CheckpointError(f"{action} failed on {'; '.join(failures)}") from error
