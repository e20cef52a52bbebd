"""Failing early and clearly when the local disk cannot take a checkpoint.

Two guards for the save pipeline:

- :func:`check_free_space` runs before a checkpoint is written: a new checkpoint needs about as
  much room as the previous one of the same saver (both exist until pruning), so when the folder's
  file system has less free space than that, the save fails at once with a message saying how
  much is free and how much is needed, instead of filling the disk to the last byte.
- :func:`write_failure` turns whatever a failed write raised into one
  :class:`~ckpt_callbacks.errors.CheckpointError` naming the checkpoint and the operating system's
  cause. ``torch.save`` reports a full disk as a ``RuntimeError`` ("unexpected pos ...") whose
  context holds the real ``OSError`` (ENOSPC); the cause is dug out of that chain.

Neither guard leaves anything behind: the commit protocol (:mod:`ckpt_callbacks.storage`) deletes
the temp file of a failed write, so the previous checkpoint and ``latest`` stay as they were.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ckpt_callbacks.errors import CheckpointError
from ckpt_callbacks.temp_files import is_temp_name

__all__ = ["check_free_space", "named_failures", "os_cause", "write_failure"]

_ADVICE = {
    errno.ENOSPC: "free some space or keep fewer checkpoints (num_checkpoints_to_keep)",
    errno.EDQUOT: "free some space or raise the quota",
    errno.EROFS: "the file system is mounted read-only",
    errno.EACCES: "this process may not write there",
    errno.EPERM: "this process may not write there (immutable file or folder?)",
    errno.EIO: "the device reported an I/O error",
}

_OUTCOMES = {
    "saving": "; nothing was written under that name",
    "publishing": "; the checkpoint itself is committed, and a restart finds it",
}


def _size(count: int) -> str:
    return f"{count / 2**20:.1f} MiB" if count >= 2**20 else f"{count} bytes"


def check_free_space(path: Path, needed: int, previous: str) -> None:
    """Raise when the file system of ``path``'s folder has fewer than ``needed`` bytes free.

    Args:
        path: the checkpoint about to be written (its folder exists).
        needed: the size of the previous checkpoint, the best estimate of the next one's.
        previous: the previous checkpoint's name, for the message.

    Raises:
        CheckpointError: naming the checkpoint, the free space and the space needed.

    Example:
        >>> check_free_space(Path("ckpt/ba200.pt"), 1, "ba100.pt")  # doctest: +SKIP
    """
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        return  # no statistics here (some FUSE mounts): the write itself reports a full disk
    if free < needed:
        raise CheckpointError(
            f"not enough free space for {path}: {_size(free)} free in its folder, while the previous "
            f"checkpoint ({previous}) took {_size(needed)}; nothing was written. {_ADVICE[errno.ENOSPC]}"
        )


def os_cause(error: BaseException) -> OSError | None:
    """The first ``OSError`` in ``error``'s chain of causes and contexts, ``error`` included.

    Example:
        >>> os_cause(RuntimeError("unexpected pos")) is None
        True
    """
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def write_failure(path: Path, error: BaseException, *, doing: str = "saving") -> CheckpointError:
    """The :class:`CheckpointError` to raise for a failed write of ``path`` (chain it to ``error``).

    ``doing`` starts the message: ``'saving'`` a checkpoint (nothing is left under its name),
    ``'publishing'`` it (it is committed; ``latest`` or the record lag behind), ``'preparing'`` its folder.

    Example:
        >>> str(write_failure(Path("ckpt/ba5.pt"), OSError(30, "Read-only file system")))
        'saving ckpt/ba5.pt failed: Read-only file system (the file system is mounted read-only); nothing was written under that name'
    """
    cause = os_cause(error)
    if cause is None:
        reason = f"{type(error).__name__}: {error}"
    else:
        reason = cause.strerror or os.strerror(cause.errno or 0) or str(cause)
        if cause.errno in _ADVICE:
            reason += f" ({_ADVICE[cause.errno]})"
        where = None if cause.filename is None else Path(os.fsdecode(cause.filename))
        if where is not None and where != path and not is_temp_name(where.name):
            reason += f" at {where}"  # e.g. a folder that could not be created
    return CheckpointError(f"{doing} {path} failed: {reason}{_OUTCOMES.get(doing, '')}")


@contextmanager
def named_failures(path: Path, *, doing: str = "saving") -> Iterator[None]:
    """Re-raise what fails in the block for want of a working disk (an ``OSError`` anywhere in its
    chain) as :func:`write_failure`'s error; other errors, CheckpointErrors included
    (``CheckpointExistsError`` is an ``OSError`` too), pass unchanged.

    Example:
        >>> with named_failures(Path("ckpt/ba5.pt")):  # doctest: +SKIP
        ...     torch.save(state, out.file)
    """
    try:
        yield
    except CheckpointError:
        raise
    except Exception as error:
        if os_cause(error) is None:
            raise
        raise write_failure(path, error, doing=doing) from error
