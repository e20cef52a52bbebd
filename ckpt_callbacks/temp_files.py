"""Temp names of writes in progress, and the sweep of what crashed writers left behind.

Every file or folder this library writes is first written under a temp name in the folder of its
final name (``.<final name>.tmp-<host>-<pid>-<8 random hex>``) and renamed into place when
complete (:mod:`ckpt_callbacks.storage`). The host and pid in the name let
:func:`sweep_stale_temp_files` remove the leftovers of writers that died, and only those, even
when other jobs share the folder.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
import socket
import time
from pathlib import Path

from ckpt_callbacks.errors import ConfigurationError, bad_value

__all__ = ["TEMP_INFIX", "is_temp_name", "sweep_stale_temp_files", "temp_path_for"]

logger = logging.getLogger(__name__)

TEMP_INFIX = ".tmp-"
"""Marks temp names: ``.<final name>.tmp-<host>-<pid>-<8 hex>``."""

# Greedy <final> so a final name containing ".tmp-" still parses; a host containing ".tmp-" then
# parses as a foreign host, which only makes the sweep more conservative.
_TEMP_RE = re.compile(
    r"^\.(?P<final>.+)" + re.escape(TEMP_INFIX) + r"(?P<host>.+)-(?P<pid>[1-9][0-9]*)-(?P<rand>[0-9a-f]{8})$",
    re.DOTALL,
)
_NAME_MAX = 255  # bytes per path component on ext4, xfs, btrfs, APFS
_HOST_MAX = 64


def _host_tag() -> str:
    host = re.sub(r"[^A-Za-z0-9.-]", "_", socket.gethostname())[:_HOST_MAX]
    return host or "localhost"


def temp_path_for(final: Path) -> Path:
    """Return a fresh temp path for ``final``, in the same folder so that the rename is atomic.

    The name is ``.<final name>.tmp-<host>-<pid>-<8 random hex>``; the final-name part is shortened
    when the whole would exceed 255 bytes.

    Example:
        >>> temp_path_for(Path("ckpt/ep1.pt")).name  # doctest: +SKIP
        '.ep1.pt.tmp-node7-4242-9f1c2a0b'
    """
    final = Path(final)
    suffix = f"{TEMP_INFIX}{_host_tag()}-{os.getpid()}-{secrets.token_hex(4)}"
    room = _NAME_MAX - 1 - len(os.fsencode(suffix))
    stem = os.fsdecode(os.fsencode(final.name)[:room])
    return final.parent / f".{stem}{suffix}"


def is_temp_name(name: str) -> bool:
    """Tell whether a file name (not a path) is a temp name made by :func:`temp_path_for`.

    Example:
        >>> is_temp_name(".ep1.pt.tmp-node7-4242-9f1c2a0b"), is_temp_name("ep1.pt")
        (True, False)
    """
    return _TEMP_RE.match(name) is not None


def _pid_alive(pid: int) -> bool:
    if os.name == "nt":
        # os.kill on Windows terminates the process; without a safe probe, only age decides there.
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        pass
    return True


def sweep_stale_temp_files(folder: Path, *, max_age_seconds: float = 24 * 3600) -> list[Path]:
    """Delete temp files and folders that crashed writers left in ``folder``; return what was removed.

    A temp file, symlink or folder (a sharded checkpoint or a download being assembled) is stale when
    its host is this host and its pid is not alive, or when it is older (mtime) than
    ``max_age_seconds``. Temp entries of live local processes younger than the bound, foreign hosts'
    young ones and every non-temp entry are never touched: other jobs may share the folder. A
    missing folder is fine. A recycled pid only delays removal until the age bound; hosts that
    share a hostname but not a pid namespace (containers with host networking) are not told apart.

    Example:
        >>> sweep_stale_temp_files(Path("ckpt"))  # doctest: +SKIP
        [PosixPath('ckpt/.ep1.pt.tmp-node7-4242-9f1c2a0b')]
    """
    if not max_age_seconds >= 0:
        raise ConfigurationError(bad_value("max_age_seconds", "a number of seconds >= 0", max_age_seconds))
    folder = Path(folder)
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return []
    host, now, removed = _host_tag(), time.time(), []
    for entry in entries:
        match = _TEMP_RE.match(entry.name)
        if match is None:
            continue
        try:
            age = now - entry.stat(follow_symlinks=False).st_mtime
        except FileNotFoundError:
            continue
        dead = match["host"] == host and not _pid_alive(int(match["pid"]))
        if not (dead or age > max_age_seconds):
            continue
        try:
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path)
            else:
                os.unlink(entry.path)
        except FileNotFoundError:  # another sweeper got there first
            continue
        reason = "its process is gone" if dead else f"it is {age:.0f}s old"
        logger.info("removed stale temp file %s (%s)", entry.path, reason)
        removed.append(Path(entry.path))
    return removed
