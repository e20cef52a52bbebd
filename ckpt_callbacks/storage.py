"""Local disk layer: atomic commit of checkpoint files, an atomic ``latest`` pointer, and cleanup.

The commit protocol (a crash at any instant leaves the old state or the new one, never a half file
under a final name):

1. Write to ``.<final name>.tmp-<host>-<pid>-<8 random hex>`` in the SAME folder as the final file.
   Never in ``$TMPDIR``: across devices ``rename`` becomes copy-then-delete, which is not atomic.
2. Flush and fsync the temp file, so its bytes are on disk before any name points at them.
3. ``os.replace(temp, final)``, or without overwrite ``os.link(temp, final)`` + unlink (the link
   fails if ``final`` exists: no check-then-act race). Readers see the whole old or new file.
4. fsync the folder, so the new directory entry itself survives a power cut.

A failed fsync means the data is lost (Linux may drop the dirty pages and report success to a second
fsync), so it is never retried: the temp file is deleted and ``CheckpointError`` raised. ``latest``
moves the same way: a temp symlink (or pointer file) is ``os.replace``-d over the old one, so it is
never absent, unlike a remove-then-create swap.

Temp names carry host and pid so that :func:`sweep_stale_temp_files` can remove what crashed writers
left behind without touching files of live writers of other jobs sharing the folder. Names that look
like temp names are refused as final names, so a sweep can never delete a real checkpoint.

Platforms: Linux is the tested target. macOS gets ``fcntl.F_FULLFSYNC`` (plain fsync there does not
flush the drive cache). Windows cannot open or fsync a folder, so folder fsync is skipped there.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ckpt_callbacks.direct_io import open_for_payload
from ckpt_callbacks.temp_files import TEMP_INFIX, is_temp_name, temp_path_for
from ckpt_callbacks.errors import (
    CheckpointError,
    CheckpointExistsError,
    ConfigurationError,
    CorruptCheckpointError,
    bad_value,
)

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "POINTER_MAGIC",
    "AtomicFile",
    "atomic_write",
    "fsync_dir",
    "makedirs_durable",
    "publish_latest",
    "remove_checkpoint",
    "replace_folder",
    "resolve_latest",
]

logger = logging.getLogger(__name__)

POINTER_MAGIC = b"ckpt-callbacks-pointer v1\n"
"""First bytes of a pointer file; the relative target and a newline follow."""

_PUBLISH_MODES = ("auto", "symlink", "pointer")
# errno values meaning "this filesystem cannot do that", not "the data is lost".
_UNSUPPORTED = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS}
_POINTER_MAX = 64 * 1024


@dataclass
class AtomicFile:
    """The open temp file of an :func:`atomic_write` block.

    Attributes:
        file: binary file opened by us on ``temp`` (mode ``'xb'``). Give writers such as ``torch.save``
            this object, not a path: then a full disk is an ``OSError`` (ENOSPC), not a bare RuntimeError.
        final: the name the data gets on commit; temp: where it is written until then.
        size: bytes committed; ``None`` until the block has committed.

    Example:
        >>> with atomic_write(Path("ep1-ba5.pt")) as out:  # doctest: +SKIP
        ...     torch.save(state, out.file)
    """

    file: BinaryIO
    final: Path
    temp: Path
    size: int | None = None


def _refuse_temp_name(argument: str, path: Path) -> None:
    if is_temp_name(path.name):
        accepted = f"a path whose name does not look like a temp name ('.<name>{TEMP_INFIX}<host>-<pid>-<hex>')"
        raise ConfigurationError(bad_value(argument, accepted, str(path)))


def _fsync_fd(fd: int) -> None:
    full_fsync = getattr(fcntl, "F_FULLFSYNC", None) if sys.platform == "darwin" else None
    if full_fsync is not None:
        try:
            fcntl.fcntl(fd, full_fsync)
            return
        except OSError as exc:
            # Some macOS filesystems (network, FUSE) lack F_FULLFSYNC; that is not a write error.
            if exc.errno not in _UNSUPPORTED | {errno.EINVAL}:
                raise
    os.fsync(fd)


def fsync_dir(folder: Path) -> None:
    """fsync a folder so that entries created, renamed or removed in it survive a power cut.

    A no-op on Windows, which cannot open a folder for fsync. Filesystems that do not support folder
    fsync (EINVAL/ENOTSUP, e.g. some FUSE mounts) are tolerated: there is nothing more we can do.

    Example:
        >>> fsync_dir(Path("checkpoints"))  # doctest: +SKIP
    """
    if os.name == "nt":
        return
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        _fsync_fd(fd)
    except OSError as exc:
        if exc.errno not in {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP}:
            raise
    finally:
        os.close(fd)


def makedirs_durable(folder: Path) -> None:
    """Create ``folder`` and missing parents, fsyncing each new folder's parent.

    Without the parent fsync a power cut can lose a new folder together with every checkpoint that
    was committed inside it. Concurrent creation by another process is fine.

    Raises:
        ConfigurationError: something that is not a folder is in the way.

    Example:
        >>> makedirs_durable(Path("runs/my-run/checkpoints"))  # doctest: +SKIP
    """
    missing: list[Path] = []
    probe = Path(os.path.abspath(folder))
    while not probe.is_dir():
        if os.path.lexists(probe):
            raise ConfigurationError(bad_value("folder", "a folder path with no file in the way", str(probe)))
        missing.append(probe)
        probe = probe.parent
    for new in reversed(missing):
        try:
            os.mkdir(new)
        except FileExistsError:  # another process made it meanwhile; a file in the way is caught below
            pass
        if not new.is_dir():
            raise ConfigurationError(bad_value("folder", "a folder path with no file in the way", str(new)))
        fsync_dir(new.parent)


def _fsync_temp(out: AtomicFile) -> int:
    """fsync the temp file and close it; return its size."""
    reopened = out.file.closed
    if reopened:
        # A wrapping writer (e.g. a compression stream) may close the file it was given; fsync
        # through any descriptor flushes the same inode.
        fd = os.open(out.temp, os.O_RDONLY)
    else:
        out.file.flush()  # write errors such as ENOSPC surface here as the OSError they are
        fd = out.file.fileno()
    try:
        try:
            _fsync_fd(fd)
        except OSError as exc:
            raise CheckpointError(
                f"fsync of {str(out.temp)!r} failed ({exc.strerror or exc}), so its data may never reach the "
                "disk; the file is discarded (a second fsync could falsely report success, so it is not retried)"
            ) from exc
        return os.fstat(fd).st_size
    finally:
        if reopened:
            os.close(fd)
        else:
            out.file.close()


def _move_into_place(temp: Path, final: Path, overwrite: bool) -> None:
    if overwrite:
        os.replace(temp, final)
        return
    exists = f"{str(final)!r} already exists and was left untouched; overwrite=True would replace it"
    try:
        os.link(temp, final)
    except FileExistsError as exc:
        raise CheckpointExistsError(exists) from exc
    except OSError as exc:
        if exc.errno not in _UNSUPPORTED:
            raise
        # No hard links here (FAT, some FUSE mounts): check-then-rename has a small race window.
        if os.path.lexists(final):
            raise CheckpointExistsError(exists) from None
        os.rename(temp, final)
        return
    os.unlink(temp)


@contextmanager
def atomic_write(final: Path, *, overwrite: bool = True, payload: bool = False) -> Iterator[AtomicFile]:
    """Write a file that appears under ``final`` complete and durable, or not at all.

    The block writes to ``out.file``; on normal exit the data is flushed, fsynced, moved onto
    ``final`` and the folder fsynced. On an exception in the block or during commit the temp file
    is deleted and the exception re-raised. The folder of ``final`` must exist. ``payload=True``
    marks a large file written once (a checkpoint): it bypasses the page cache where the
    filesystem allows (:mod:`ckpt_callbacks.direct_io`).

    Raises:
        ConfigurationError: ``final`` has a temp name.
        CheckpointExistsError: ``final`` exists and ``overwrite`` is False (it is left untouched).
        CheckpointError: fsync failed (the data is discarded).

    Example:
        >>> with atomic_write(Path("ckpt/ep1-ba5.pt"), overwrite=False) as out:  # doctest: +SKIP
        ...     torch.save(state_dict, out.file)
    """
    final = Path(final)
    _refuse_temp_name("final", final)
    temp = temp_path_for(final)
    out = AtomicFile(file=open_for_payload(temp) if payload else open(temp, "xb"), final=final, temp=temp)
    try:
        yield out
        size = _fsync_temp(out)
        _move_into_place(temp, final, overwrite)
    except BaseException:
        with suppress(OSError):  # flushing a half-written file we are about to delete may fail too
            out.file.close()
        temp.unlink(missing_ok=True)
        raise
    try:
        fsync_dir(final.parent)
    except OSError as exc:
        # The rename has happened and cannot be undone (the old file is gone); only its durability
        # across a power cut is in doubt.
        raise CheckpointError(
            f"fsync of folder {str(final.parent)!r} failed: {str(final)!r} may not survive a crash"
        ) from exc
    out.size = size


def _swap_in(temp: Path, link: Path) -> None:
    try:
        # rename(2) swaps the directory entry in one step: readers see the old link or the new one.
        os.replace(temp, link)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_dir(link.parent)


def _publish_pointer(link: Path, relative: str) -> None:
    with atomic_write(link, overwrite=True) as out:
        out.file.write(POINTER_MAGIC + os.fsencode(Path(relative).as_posix()) + b"\n")


def publish_latest(link: Path, target: Path, *, mode: str = "auto") -> str:
    """Atomically make ``link`` point at ``target`` by a relative path; return what was written.

    ``link`` is never absent while it moves. Relative targets (``latest-rank0.pt -> ep1-ba5-rank0.pt``,
    ``../ep1-ba5.pt`` from a subfolder) keep working when the whole folder is moved or mounted elsewhere.

    Args:
        link: the pointer to create or replace, e.g. ``ckpt/latest-rank0.pt``.
        target: the checkpoint it points at.
        mode: ``'symlink'``, ``'pointer'`` (a small file: :data:`POINTER_MAGIC`, the relative target,
            a newline), or ``'auto'``: a symlink, or a pointer file where the filesystem refuses
            symlinks (EPERM/ENOTSUP/ENOSYS: FUSE mounts such as mountpoint-s3, Windows).

    Returns:
        ``'symlink'`` or ``'pointer'``.

    Raises:
        ConfigurationError: bad ``mode``, ``link`` has a temp name, or ``link`` is a real folder.
        CheckpointError: ``mode='symlink'`` on a filesystem without symlinks.

    Example:
        >>> publish_latest(Path("ckpt/latest-rank0.pt"), Path("ckpt/ep1-ba5-rank0.pt"))  # doctest: +SKIP
        'symlink'
    """
    if mode not in _PUBLISH_MODES:
        raise ConfigurationError(bad_value("mode", "one of 'auto', 'symlink', 'pointer'", mode))
    link, target = Path(link), Path(target)
    _refuse_temp_name("link", link)
    if link.is_dir() and not link.is_symlink():
        raise ConfigurationError(bad_value("link", "a file or symlink path, not an existing folder", str(link)))
    relative = os.path.relpath(target, link.parent)
    if mode == "pointer":
        _publish_pointer(link, relative)
        return "pointer"
    temp = temp_path_for(link)
    try:
        os.symlink(relative, temp)
    except OSError as exc:
        if exc.errno not in _UNSUPPORTED:
            raise
        if mode == "symlink":
            raise CheckpointError(
                f"cannot create a symlink in {str(link.parent)!r} ({exc.strerror}); use mode='auto' or 'pointer'"
            ) from exc
        logger.info("symlinks are not supported in %s; %s is a pointer file", link.parent, link.name)
        _publish_pointer(link, relative)
        return "pointer"
    _swap_in(temp, link)
    return "symlink"


def _read_pointer(link: Path) -> str | None:
    """Return the relative target of a pointer file, or None when ``link`` is not one."""
    with open(link, "rb") as fh:
        if fh.read(len(POINTER_MAGIC)) != POINTER_MAGIC:
            return None
        body = fh.read(_POINTER_MAX + 1)
    lines = body.split(b"\n")
    if len(body) > _POINTER_MAX or len(lines) != 2 or lines[1] or not lines[0]:
        raise CorruptCheckpointError(f"pointer file {str(link)!r} does not hold one target path and a newline")
    return os.fsdecode(lines[0])


def resolve_latest(link: Path) -> Path | None:
    """Return what ``link`` points at, or None when there is nothing at ``link``.

    A symlink gives its target (even when dangling: callers check); a pointer file gives its target;
    any other file or folder gives ``link`` itself, since a real checkpoint may have been downloaded
    to the latest path. Targets are normalised lexically (``..`` is not resolved through symlinks).

    Raises:
        CorruptCheckpointError: a pointer file with a malformed body.

    Example:
        >>> resolve_latest(Path("ckpt/latest-rank0.pt"))  # doctest: +SKIP
        PosixPath('ckpt/ep1-ba5-rank0.pt')
    """
    link = Path(link)
    if link.is_symlink():
        return Path(os.path.normpath(link.parent / os.readlink(link)))
    if not link.exists():
        return None
    if link.is_file():
        relative = _read_pointer(link)
        if relative is not None:
            return Path(os.path.normpath(link.parent / relative))
    return link


def remove_checkpoint(path: Path) -> None:
    """Remove a checkpoint file, symlink or folder if present, then fsync its parent folder.

    A symlink is removed itself, never what it points at. A missing path is not an error.

    Example:
        >>> remove_checkpoint(Path("ckpt/ep1-ba5-rank0.pt"))  # doctest: +SKIP
    """
    path = Path(path)
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            os.unlink(path)
    except FileNotFoundError:
        return
    fsync_dir(path.parent)


def replace_folder(temp: Path, final: Path) -> None:
    """Commit a complete folder (its files already fsynced) by renaming ``temp`` onto ``final``.

    Folders cannot be ``os.replace``-d over a non-empty folder, so an older ``final`` is first
    renamed aside under a temp name (which the sweep would remove after a crash), then deleted.

    Example:
        >>> replace_folder(Path("ckpt/.ba100.tmp-node7-4242-9f1c2a0b"), Path("ckpt/ba100"))  # doctest: +SKIP
    """
    if os.path.lexists(final):
        old = temp_path_for(final)
        os.rename(final, old)
        os.rename(temp, final)
        remove_checkpoint(old)
    else:
        os.rename(temp, final)
    fsync_dir(final.parent)
