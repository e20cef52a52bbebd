"""Committing a folder that a trainer wrote (a Hugging Face ``checkpoint-N/``) as one of our checkpoints.

It takes two steps, placed like the rest of the save pipeline:

1. **snapshot** (:func:`snapshot_folder`, at capture, on the training thread): every file of the
   trainer's folder is hard-linked into a temp folder next to our checkpoints
   (``.<name>.tmp-<host>-<pid>-<hex>``), or copied where hard links are impossible (another file
   system, some FUSE mounts). From then on the trainer may delete its folder (its
   ``save_total_limit``) while the snapshot is committed, in the background in async mode. A hard
   link copies no data; sharing the files is safe because trainers write each checkpoint into a new
   folder and never rewrite one in place.
2. **commit** (:func:`commit_folder`): for a tar name (``.tar``, ``.tar.zst``, ...) the snapshot is
   bundled into one file (:func:`~ckpt_callbacks.archive.bundle`, compressed as the extension says),
   committed atomically like any checkpoint file, and removed. For a name without an extension the
   snapshot becomes the checkpoint folder: its files and folders are fsynced (trainers do not
   fsync), then it is renamed onto the final name and the parent folder is fsynced, so a crash
   leaves no folder under the final name or a complete one.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from ckpt_callbacks.archive import bundle
from ckpt_callbacks.codecs import CheckpointFormat
from ckpt_callbacks.errors import CheckpointNotFoundError, ConfigurationError, bad_value
from ckpt_callbacks.storage import atomic_write, fsync_dir, makedirs_durable, remove_checkpoint, replace_folder

__all__ = ["check_folder_format", "commit_folder", "snapshot_folder"]

# "This file system cannot hard-link here": copy instead. Anything else is a real error.
_NO_HARD_LINK = {errno.EXDEV, errno.EPERM, errno.EACCES, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS}
_ACCEPTED = "a tar name (.tar, .tar.zst, .tgz, ...) or a name without an extension (a folder)"


def check_folder_format(fmt: CheckpointFormat, template: str, *, argument: str = "filename") -> None:
    """Refuse a name that cannot hold a folder: only tar bundles and extensionless folders can.

    Raises:
        ConfigurationError: naming ``argument``, its value and what is accepted.

    Example:
        >>> from ckpt_callbacks.codecs import checkpoint_format
        >>> check_folder_format(checkpoint_format("ba{batch}.tar.zst"), "ba{batch}.tar.zst")  # accepted
        >>> check_folder_format(checkpoint_format("ba{batch}.pt"), "ba{batch}.pt")  # doctest: +SKIP
        ConfigurationError: 'filename' must be a tar name (.tar, .tar.zst, .tgz, ...) or ... (got 'ba{batch}.pt')
    """
    if fmt.container != "tar" and fmt.extension:
        raise ConfigurationError(bad_value(argument, f"{_ACCEPTED} to hold a trainer's checkpoint folder", template))


def snapshot_folder(source: Path, staging: Path) -> None:
    """Hard-link (or copy) every file under ``source`` into the new folder ``staging``, keeping paths.

    ``staging`` should be a temp name (:func:`~ckpt_callbacks.temp_files.temp_path_for`) in the folder
    where the checkpoint will be committed, so that hard links and the final rename stay on one
    file system. A failure removes what was made.

    Raises:
        CheckpointNotFoundError: ``source`` is not a folder.

    Example:
        >>> snapshot_folder(Path("out/checkpoint-500"), temp_path_for(Path("ckpt/ba500.tar")))  # doctest: +SKIP
    """
    source, staging = Path(source), Path(staging)
    if not source.is_dir():
        raise CheckpointNotFoundError(f"no checkpoint folder at {source} to commit")
    makedirs_durable(staging.parent)
    try:
        for root, _, files in os.walk(source):
            target = staging / Path(root).relative_to(source)
            target.mkdir(parents=True, exist_ok=True)
            for name in files:
                _link_or_copy(Path(root) / name, target / name)
    except BaseException:
        remove_checkpoint(staging)
        raise


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError as error:
        if error.errno not in _NO_HARD_LINK:
            raise
        shutil.copy2(source, target)


def commit_folder(staging: Path, final: Path, fmt: CheckpointFormat, level: int | None = None) -> int:
    """Commit a snapshot as the checkpoint ``final``: a tar bundle or a folder; returns its size in bytes.

    The snapshot is consumed: bundled and removed, or renamed onto ``final`` (replacing an older
    checkpoint of that name).

    Raises:
        ConfigurationError: ``final``'s format can hold no folder (see :func:`check_folder_format`).

    Example:
        >>> commit_folder(staging, Path("ckpt/ba500.tar.zst"), checkpoint_format("ba500.tar.zst"))  # doctest: +SKIP
        48213
    """
    staging, final = Path(staging), Path(final)
    try:
        check_folder_format(fmt, final.name)
        makedirs_durable(final.parent)
        if fmt.container == "tar":
            with atomic_write(final, payload=True) as out:
                bundle(staging, out.file, fmt, level=level)
            return out.size or 0
        size = _fsync_tree(staging)
        replace_folder(staging, final)
        return size
    finally:
        remove_checkpoint(staging)  # nothing is left there once renamed


def _fsync_tree(folder: Path) -> int:
    """fsync every file, then every folder bottom-up; return the files' total size."""
    size = 0
    for root, _, files in os.walk(folder, topdown=False):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
                size += os.fstat(fd).st_size
            finally:
                os.close(fd)
        fsync_dir(Path(root))
    return size
