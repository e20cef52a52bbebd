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

from ckpt_callbacks.dist import dist_info
from ckpt_callbacks.errors import CheckpointNotFoundError, CorruptCheckpointError
from ckpt_callbacks.serialization import apply_ignore_keys, check_ignore_keys, read_state, verify_file
from ckpt_callbacks.state import State, restore_rng_state
from ckpt_callbacks.storage import resolve_latest

if TYPE_CHECKING:
    from ckpt_callbacks.manager import CheckpointManager

__all__ = ["find_resume_checkpoint", "load_checkpoint", "resolve_checkpoint_path"]

log = logging.getLogger(__name__)


def resolve_checkpoint_path(path: str | os.PathLike) -> Path:
    """Follow a ``latest`` symlink or pointer file to the checkpoint it names.

    Raises:
        CheckpointNotFoundError: nothing at ``path``, or a ``latest`` pointing at a missing file.

    Example:
        >>> resolve_checkpoint_path("runs/exp1/checkpoints/latest-rank0.pt")  # doctest: +SKIP
        PosixPath('runs/exp1/checkpoints/ep2-ba10-rank0.pt')
    """
    text = os.fspath(path)
    if "://" in text:
        raise NotImplementedError(f"loading from {text!r} (a remote URI) arrives with issue #4 (remote object stores)")
    target = resolve_latest(Path(text))
    if target is None:
        raise CheckpointNotFoundError(f"no checkpoint at {text}")
    if not target.exists():
        raise CheckpointNotFoundError(f"{text} points at {target}, which does not exist")
    return target


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
        path: a checkpoint file (plain or compressed), or a ``latest`` link or pointer file.
        state: the training state to restore.
        weights_only: take only the model weights (e.g. to fine-tune from a full checkpoint).
        strict: require the model's keys to match the checkpoint's exactly.
        ignore_keys: globs (``'state/optimizers'``, ``'rng'``) or a callable removing parts of the
            checkpoint before it is restored.
        storage_options: options of a remote store (issue #4).

    Raises:
        CheckpointNotFoundError: nothing at ``path``.
        CorruptCheckpointError: the file is truncated, corrupt, not a checkpoint, or holds objects
            outside the safe-load allowlist.

    Example:
        >>> load_checkpoint("runs/exp1/checkpoints/latest-rank0.pt", trainer.state)  # doctest: +SKIP
    """
    if storage_options is not None:
        raise NotImplementedError("storage_options arrive with issue #4 (remote object stores)")
    target = resolve_checkpoint_path(path)
    checkpoint = read_state(target)
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


def _restore_rng(rng: Any, source: Path) -> None:
    if not rng:
        return
    rank = dist_info().rank
    if rank < len(rng):
        restore_rng_state(rng[rank])
    else:
        warnings.warn(
            f"{source} holds RNG states of {len(rng)} ranks; rank {rank} keeps its own seeding",
            UserWarning,
            stacklevel=3,
        )


def find_resume_checkpoint(managers: Sequence[CheckpointManager]) -> Path | None:
    """The newest verified checkpoint of ``managers`` (the full-state savers of a run), or None.

    A candidate that fails verification is renamed aside (``<name>.corrupt``, so that the
    ``overwrite=False`` check does not trip on it) with a warning, and the next newest is tried.
    ``latest`` is repointed at the chosen checkpoint if it pointed elsewhere.
    """
    candidates = []
    for manager in managers:
        manager.reconcile()
        candidates += [(info.saved_at, info.seq, info, manager) for info in manager.all() if not info.weights_only]
    for _, _, info, manager in sorted(candidates, key=lambda item: item[:2], reverse=True):
        path = manager.path_of(info)
        try:
            verify_file(path)
        except CorruptCheckpointError as error:
            warnings.warn(f"autoresume: skipping corrupt checkpoint {path}: {error}", UserWarning, stacklevel=2)
            manager.set_aside(info, str(error))
            continue
        if manager.latest_link_target(info.timestamp) != path:
            manager.republish(info)
        return path
    return None
