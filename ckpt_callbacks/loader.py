"""Loading checkpoints into a training state, and choosing which one to resume from.

:func:`load_checkpoint` takes any checkpoint path (a file in any format the codecs know, identified by
its magic bytes, or a ``latest`` link or pointer file), decodes it with
``torch.load(weights_only=True)`` (a checkpoint never runs code) and restores the state.

:func:`find_resume_checkpoint` is autoresume's choice: the newest checkpoint of the given savers,
"newest" meaning the last committed in the newest lineage (the save sequence), not the highest step
counter and not blindly what ``latest`` points at (a crash between commit and publish leaves a newer
file than ``latest``). It verifies the candidate (zip CRCs included), sets a corrupt one aside with a
warning and falls back to the next, and repairs ``latest``.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from ckpt_callbacks import dist
from ckpt_callbacks.errors import CorruptCheckpointError
from ckpt_callbacks.serialization import apply_ignore_keys, check_ignore_keys, read_state, verify_file
from ckpt_callbacks.sharded import is_sharded_checkpoint, load_sharded, verify_sharded
from ckpt_callbacks.state import State, restore_rng_state
from ckpt_callbacks.locations import local_checkpoint

if TYPE_CHECKING:
    from ckpt_callbacks.manager import CheckpointManager

__all__ = ["find_resume_checkpoint", "load_checkpoint"]

log = logging.getLogger(__name__)


def load_checkpoint(
    path: str | os.PathLike,
    state: State,
    *,
    weights_only: bool = False,
    strict: bool = True,
    ignore_keys: Sequence[str] | Callable[[dict], None] | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Load the checkpoint at ``path`` into ``state`` and return the decoded checkpoint.

    Args:
        path: a checkpoint file (any format) or folder, a ``latest`` link or pointer file, or a URI
            of a checkpoint or of a remote ``.symlink`` pointer.
        state: the training state to restore.
        weights_only: take only the model weights (e.g. to fine-tune from a full checkpoint).
        strict: require the model's keys to match the checkpoint's exactly.
        ignore_keys: globs (``'state/optimizers'``, ``'rng'``) or a callable removing parts of the
            checkpoint before it is restored.
        storage_options: credentials and endpoint of a remote store (``path`` a URI such as
            ``s3://bucket/run/ba100.pt`` or a ``.symlink`` pointer object; downloaded to a temp file).

    Raises:
        CheckpointNotFoundError: nothing at ``path``.
        CorruptCheckpointError: the file is truncated, corrupt, not a checkpoint, or holds objects
            outside the safe-load allowlist.

    Example:
        >>> load_checkpoint("runs/exp1/checkpoints/latest-rank0.pt", trainer.state)  # doctest: +SKIP
    """
    with local_checkpoint(path, storage_options=storage_options) as target:
        return _load_local(target, state, weights_only=weights_only, strict=strict, ignore_keys=ignore_keys)


def _load_local(
    target: Path, state: State, *, weights_only: bool, strict: bool, ignore_keys: Any
) -> dict[str, Any]:
    if is_sharded_checkpoint(target):
        checkpoint = load_sharded(target, state, weights_only=weights_only, strict=strict)
        _restore_extras(checkpoint, state, ignore_keys, weights_only, target)
        return checkpoint
    checkpoint = read_state(target, check_crc=True)  # a checkpoint that resumes training is checked whole
    apply_ignore_keys(checkpoint, check_ignore_keys(ignore_keys, argument="ignore_keys"))
    body = checkpoint.get("state")
    if not isinstance(body, dict) or (weights_only and "model" not in body):
        raise CorruptCheckpointError(f"{target} is not a ckpt_callbacks checkpoint: it has no 'state' with a 'model'")
    if weights_only:
        state.load_model(body["model"], strict=strict)
        return checkpoint
    state.load_state_dict(body, strict=strict)
    seed = body.get("metadata", {}).get("seed")
    if seed is not None:
        state.seed = int(seed)
    _restore_rng(checkpoint.get("rng"), target)
    log.info("loaded %s at %s", target, state.timestamp)
    return checkpoint


def _restore_extras(
    checkpoint: dict[str, Any], state: State, ignore_keys: Any, weights_only: bool, source: Path
) -> None:
    """Restore the unsharded parts of a sharded checkpoint (its tensors are already loaded)."""
    apply_ignore_keys(checkpoint, check_ignore_keys(ignore_keys, argument="ignore_keys"))
    if weights_only:
        return
    state.load_extras(checkpoint.get("state", {}))
    seed = checkpoint.get("state", {}).get("metadata", {}).get("seed")
    if seed is not None:
        state.seed = int(seed)
    _restore_rng(checkpoint.get("rng"), source)


def _restore_rng(rng: Any, source: Path) -> None:
    if not rng:
        return
    rank = dist.dist_info().rank
    if rank < len(rng) and rng[rank] is not None:
        restore_rng_state(rng[rank])
    else:
        warnings.warn(
            f"{source} holds RNG states of {len(rng)} ranks; rank {rank} keeps its own seeding",
            UserWarning,
            stacklevel=3,
        )


def find_resume_checkpoint(managers: Sequence[CheckpointManager]) -> Path | None:
    """The newest checkpoint of ``managers`` (a run's full-state savers) that every rank can read.

    A collective: every rank calls it and gets the path it must load (its own file in
    ``'per_rank'`` mode, rank 0's file or folder otherwise), or None on every rank. Ranks agree with
    one all-gather of their candidates: a per-rank checkpoint counts only if every rank has its
    file. The newest candidate is verified (zip CRCs included) on every rank that holds a part;
    one that fails anywhere is renamed aside (``<name>.corrupt``, so the ``overwrite=False`` check
    does not trip on it) with a warning, and the group falls back to the next. ``latest`` is
    repointed at the chosen checkpoint where it pointed elsewhere.
    """
    local = []
    for index, manager in enumerate(managers):
        if manager.writes:
            manager.reconcile()
            manager.fetch_from_store()
            local += [(index, info.seq, info.saved_at) for info in manager.all() if not info.weights_only]
    everyone = dist.all_gather_object(local)
    agreed = _agreed_candidates(everyone, managers)
    _set_aside_incomplete(local, agreed, managers)
    for index, seq in agreed:
        manager = managers[index]
        info = next((c for c in manager.all() if c.seq == seq), None) if manager.writes else None
        problem = None if info is None else _problem(manager.path_of(info))
        problems = dist.all_gather_object(problem)
        if any(problems):
            if problem is not None and info is not None:
                warnings.warn(f"autoresume: skipping corrupt checkpoint {manager.path_of(info)}: {problem}",
                              UserWarning, stacklevel=2)
                manager.set_aside(info, problem)
            continue
        if info is not None and manager.layout.latest_target(info.timestamp) != manager.path_of(info):
            manager.republish(info)
        if manager.ranks == "per_rank":
            return manager.path_of(info) if info is not None else None
        return Path(dist.broadcast_object(str(manager.path_of(info)) if info is not None else None))
    return None


def _agreed_candidates(
    everyone: list[list[tuple[int, int, float]]], managers: Sequence[CheckpointManager]
) -> list[tuple[int, int]]:
    """(manager index, seq) of the candidates every needed rank holds, newest first by rank 0's clock."""
    on_rank0 = {(index, seq): saved_at for index, seq, saved_at in everyone[0]}
    complete = []
    for (index, seq), saved_at in on_rank0.items():
        if managers[index].ranks == "per_rank" and not all(
            any((i, s) == (index, seq) for i, s, _ in ranks_list) for ranks_list in everyone
        ):
            continue
        complete.append((saved_at, seq, index))
    return [(index, seq) for _, seq, index in sorted(complete, reverse=True)]


def _set_aside_incomplete(
    local: list[tuple[int, int, float]], agreed: list[tuple[int, int]], managers: Sequence[CheckpointManager]
) -> None:
    """A per-rank checkpoint that some rank lacks can never be resumed: move this rank's part aside."""
    for index, seq, _ in local:
        manager = managers[index]
        if manager.ranks == "per_rank" and (index, seq) not in agreed:
            info = next(c for c in manager.all() if c.seq == seq)
            warnings.warn(f"autoresume: {manager.path_of(info)} is incomplete (another rank lacks its part)",
                          UserWarning, stacklevel=3)
            manager.set_aside(info, "another rank lacks its part", suffix=".incomplete")


def _problem(path: Path) -> str | None:
    try:
        if path.is_dir():
            verify_sharded(path)
        else:
            verify_file(path)
    except CorruptCheckpointError as error:
        return str(error)
    return None
