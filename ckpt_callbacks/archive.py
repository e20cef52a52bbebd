"""Tar bundles: one rank's checkpoint files in one standard tar, optionally compressed, and safe extraction.

A state-dict checkpoint saved under a tar name (``.tar``, ``.tgz``, ``.tar.gz``, ``.tar.bz2``,
``.tar.xz``, ``.tar.lzma``, ``.tar.zst``, ``.tar.lz4``; see :data:`~ckpt_callbacks.codecs.FORMATS`)
is a tar of one member, :data:`MEMBER`. Trainers that write several files (a Hugging Face
``checkpoint-N/`` folder, a DCP shard folder) are bundled whole with :func:`bundle`, members named
relative to the folder. The output is what ``tar`` writes (POSIX pax), so ``tar xzf``,
``tar --zstd -xf`` or ``lz4 -dc x.tar.lz4 | tar xf -`` unpack it.

Writing streams: tar headers are built with :class:`tarfile.TarInfo` and the data is copied in
1 MiB pieces into the codec's writer, so nothing is held in memory whole. A header states its
member's size before the data, so :func:`write_member` needs the member already complete (the
caller stages it; see :func:`~ckpt_callbacks.serialization.write_state`).

Reading never trusts member names. :func:`copy_member` streams one member's bytes out without
creating any file named by the archive. :func:`extract` checks every member first and refuses the
whole archive (a :class:`~ckpt_callbacks.errors.CheckpointError` naming the member, nothing
written) for absolute names, ``..`` components, symlinks that are absolute or go upward, hard
links outside the archive and device or fifo members; tarfile's ``data`` filter then runs as a
second line of defence (on its own it would silently strip a leading ``/`` rather than refuse).
"""

from __future__ import annotations

import os
import shutil
import stat
import tarfile
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import BinaryIO

from ckpt_callbacks.codecs import CheckpointFormat, checkpoint_format
from ckpt_callbacks.decoding import open_decoded
from ckpt_callbacks.errors import CheckpointError, ConfigurationError, CorruptCheckpointError, bad_value

__all__ = ["COMPOSER_MEMBER", "MEMBER", "bundle", "copy_member", "extract", "write_member"]

MEMBER = "checkpoint.pt"
"""The one member of a state-dict checkpoint saved as a tar."""

COMPOSER_MEMBER = "composer_states.pt"
"""The member name Composer's tar checkpoints use; read as well as :data:`MEMBER`."""

_COPY_BYTES = 4 * 2**20
_BLOCK = tarfile.BLOCKSIZE
# Extraction filters arrived in Python 3.10.12 / 3.11.4; before them only our own checks run.
_FILTER_ERRORS = getattr(tarfile, "FilterError", ())


def _tar_format(fmt: CheckpointFormat | str, argument: str) -> CheckpointFormat:
    if isinstance(fmt, str):
        fmt = checkpoint_format(fmt, argument=argument)
    if fmt.container != "tar":
        raise ConfigurationError(bad_value(argument, "a tar format (.tar, .tgz, .tar.gz, .tar.zst, ...)", fmt.extension))
    return fmt


@contextmanager
def _tar_writer(raw: BinaryIO, fmt: CheckpointFormat, level: int | None) -> Iterator[BinaryIO]:
    if fmt.codec is None:
        yield raw
        raw.write(b"\0" * (2 * _BLOCK))  # end-of-archive marker
        return
    with fmt.codec.open_writer(raw, level) as writer:
        yield writer
        writer.write(b"\0" * (2 * _BLOCK))


def _header(name: str, size: int, mode: int, mtime: float, kind: bytes = tarfile.REGTYPE) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime, info.type = size, mode, int(mtime), kind
    return info.tobuf(format=tarfile.PAX_FORMAT, encoding="utf-8", errors="surrogateescape")


def _add_file(out: BinaryIO, name: str, source: BinaryIO, size: int, mode: int, mtime: float) -> None:
    out.write(_header(name, size, mode, mtime))
    remaining = size
    while remaining:
        piece = source.read(min(_COPY_BYTES, remaining))
        if not piece:
            raise CheckpointError(f"tar member {name!r} ended {remaining} bytes short of its {size} while being written")
        out.write(piece)
        remaining -= len(piece)
    out.write(b"\0" * (-size % _BLOCK))


def write_member(
    raw: BinaryIO, fmt: CheckpointFormat | str, source: BinaryIO, size: int, *, name: str = MEMBER,
    level: int | None = None,
) -> None:
    """Write a tar of one member, ``name``, holding ``size`` bytes read from ``source``, into ``raw``.

    Args:
        raw: Where the (compressed) tar goes; left open and not fsynced.
        fmt: A tar format, or a name such as ``'x.tar.zst'`` choosing one.
        source: The member's bytes, read from its current position.
        size: How many bytes the member has (the tar header states it before the data).
        name: The member's name.
        level: Compression level of the tar's codec (``None``: its default).

    Raises:
        ConfigurationError: ``fmt`` is not a tar format, or a bad level.
        CheckpointError: ``source`` holds fewer than ``size`` bytes.

    Example:
        >>> with open("ep1.tar.gz", "wb") as raw, open("state.pt", "rb") as src:  # doctest: +SKIP
        ...     write_member(raw, "ep1.tar.gz", src, os.path.getsize("state.pt"))
    """
    fmt = _tar_format(fmt, "fmt")
    with _tar_writer(raw, fmt, level) as out:
        _add_file(out, name, source, size, 0o644, time.time())


def _bundle_entries(sources: Path | Sequence[Path], root: Path | None) -> list[tuple[str, Path]]:
    if isinstance(sources, (str, os.PathLike)):
        folder = Path(sources)
        if not folder.is_dir():
            raise ConfigurationError(bad_value("sources", "a folder or a list of files", str(folder)))
        entries = []
        for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
            dirnames.sort()
            base = Path(dirpath)
            entries += [(p.relative_to(folder).as_posix(), p) for p in (base / d for d in dirnames)]
            entries += [(p.relative_to(folder).as_posix(), p) for p in (base / f for f in sorted(filenames))]
        return entries
    files = [Path(p) for p in sources]
    entries = []
    for path in files:
        try:
            name = path.relative_to(root).as_posix() if root is not None else path.name
        except ValueError:
            raise ConfigurationError(bad_value("sources", f"files under root={str(root)!r}", str(path))) from None
        entries.append((name, path))
    names = [name for name, _ in entries]
    if len(set(names)) != len(names):
        raise ConfigurationError(bad_value("sources", "files with distinct names (or give root=)", names))
    return entries


def bundle(
    sources: Path | str | Sequence[Path | str], raw: BinaryIO, fmt: CheckpointFormat | str, *,
    root: Path | str | None = None, level: int | None = None,
) -> list[str]:
    """Bundle a folder (everything under it) or a list of files into a tar written to ``raw``.

    Members of a folder are named relative to it, sorted, folders included; a list of files is
    named relative to ``root`` (default: the bare file names, which must then differ). Symlinks are
    stored as the files they point at (a Hugging Face hub snapshot links into its blob cache).

    Args:
        sources: A folder, or a list of files.
        raw: Where the (compressed) tar goes; left open and not fsynced (use
            :func:`~ckpt_callbacks.storage.atomic_write` to commit it).
        fmt: A tar format, or a name such as ``'ba100-rank0.tar.zst'`` choosing one.
        root: The folder that member names of a file list are relative to.
        level: Compression level of the tar's codec (``None``: its default).

    Returns:
        The member names, in archive order.

    Raises:
        ConfigurationError: Not a tar format, a missing folder, a file outside ``root``, two files
            with the same name, or a source that is not a regular file or folder.

    Example:
        >>> with atomic_write(Path("ckpt/checkpoint-500.tar.zst")) as out:  # doctest: +SKIP
        ...     bundle(Path("hf/checkpoint-500"), out.file, "checkpoint-500.tar.zst")
        ['config.json', 'model.safetensors', 'optimizer.pt', 'trainer_state.json']
    """
    fmt = _tar_format(fmt, "fmt")
    entries = _bundle_entries(sources, None if root is None else Path(root))
    stats = []
    for name, path in entries:
        st = path.stat()
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            raise ConfigurationError(bad_value("sources", "regular files and folders only", str(path)))
        stats.append(st)
    with _tar_writer(raw, fmt, level) as out:
        for (name, path), st in zip(entries, stats):
            mode = stat.S_IMODE(st.st_mode)
            if stat.S_ISDIR(st.st_mode):
                out.write(_header(name + "/", 0, mode, st.st_mtime, tarfile.DIRTYPE))
                continue
            with open(path, "rb") as source:
                _add_file(out, name, source, st.st_size, mode, st.st_mtime)
    return [name for name, _ in entries]


def _normal(name: str) -> str:
    return PurePosixPath(name).as_posix().removeprefix("./")


def copy_member(stream: BinaryIO, out: BinaryIO, *, source: Path, names: Sequence[str] = (MEMBER, COMPOSER_MEMBER)) -> str:
    """Stream the first regular member whose name is in ``names`` from a decoded tar into ``out``.

    Args:
        stream: The tar's decoded bytes from the start (need not be seekable).
        out: Where the member's bytes go.
        source: The tar file, named in errors.
        names: Accepted member names (a leading ``./`` is ignored).

    Returns:
        The member's name.

    Raises:
        CorruptCheckpointError: The tar is damaged or has no such member.

    Example:
        >>> with open_decoded("ep1.tar.zst") as d, open("state.pt", "wb") as out:  # doctest: +SKIP
        ...     copy_member(d.stream, out, source=d.path)
        'checkpoint.pt'
    """
    wanted = {_normal(n) for n in names}
    seen = []
    try:
        with tarfile.open(fileobj=stream, mode="r|", bufsize=_COPY_BYTES) as tar:
            for member in tar:
                seen.append(member.name)
                if member.isreg() and _normal(member.name) in wanted:
                    data = tar.extractfile(member)
                    assert data is not None  # a regular member always has data
                    shutil.copyfileobj(data, out, _COPY_BYTES)
                    if data.tell() != member.size:
                        raise CorruptCheckpointError(f"{source} is corrupt: tar member {member.name!r} is cut short")
                    return member.name
    except (tarfile.TarError, EOFError, OSError) as e:
        raise CorruptCheckpointError(f"{source} is corrupt: not a readable tar ({type(e).__name__}: {e})") from e
    shown = ", ".join(repr(n) for n in seen[:10]) or "no members"
    raise CorruptCheckpointError(
        f"{source} is a tar without a checkpoint member ({' or '.join(sorted(wanted))}); it holds {shown}"
    )


def _refusal(member: tarfile.TarInfo) -> str | None:
    name = member.name
    if PurePosixPath(name).is_absolute() or PureWindowsPath(name).drive or PureWindowsPath(name).root:
        return "has an absolute name"
    if ".." in PurePosixPath(name.replace("\\", "/")).parts:
        return "has a '..' component"
    if member.isdev():  # character, block and fifo members
        return "is a device or fifo"
    if member.issym():
        link = PurePosixPath(member.linkname)
        if link.is_absolute() or PureWindowsPath(member.linkname).drive or ".." in link.parts:
            return f"is a symlink to {member.linkname!r}, outside the archive (only links downward are accepted)"
    if member.islnk():
        link = PurePosixPath(member.linkname)
        if link.is_absolute() or ".." in link.parts:
            return f"is a hard link to {member.linkname!r}, outside the archive"
    if not (member.isreg() or member.isdir() or member.issym() or member.islnk()):
        return f"has an unsupported type {member.type!r}"
    return None


@contextmanager
def _seekable_tar(path: Path, scratch: Path) -> Iterator[BinaryIO]:
    with open_decoded(path) as decoded:
        if decoded.kind != "tar":
            raise CorruptCheckpointError(f"{path} is not a tar bundle (it holds {decoded.kind})")
        if decoded.codec is None:
            yield decoded.stream
            return
        # Checking every member before writing any needs two passes: decode once to disk.
        with tempfile.TemporaryFile(dir=scratch) as spill:
            shutil.copyfileobj(decoded.stream, spill, _COPY_BYTES)
            spill.seek(0)
            yield spill  # type: ignore[misc]


def extract(path: Path | str, dest: Path | str) -> list[Path]:
    """Extract a tar bundle (any of the tar formats, sniffed) into ``dest``, refusing unsafe members.

    Every member is checked before anything is written: absolute names, ``..`` components,
    symlinks that are absolute or contain ``..``, hard links outside the archive, device and fifo
    members make the whole call fail. Then tarfile's ``data`` filter extracts (second line of
    defence: it also drops setuid bits and foreign ownership).

    Returns:
        The extracted paths, in archive order.

    Raises:
        CheckpointNotFoundError: No file at ``path``.
        CorruptCheckpointError: ``path`` is not a readable tar bundle.
        CheckpointError: A member was refused (named in the message); nothing was written.

    Example:
        >>> extract("ckpt/checkpoint-500.tar.zst", "restore/checkpoint-500")  # doctest: +SKIP
        [PosixPath('restore/checkpoint-500/config.json'), ...]
    """
    path, dest = Path(path), Path(dest)
    scratch = dest.parent if dest.parent.is_dir() else Path(tempfile.gettempdir())
    with _seekable_tar(path, scratch) as file:
        try:
            with tarfile.open(fileobj=file, mode="r:") as tar:
                members = tar.getmembers()
                for member in members:
                    reason = _refusal(member)
                    if reason is not None:
                        raise CheckpointError(
                            f"{path}: refusing to extract member {member.name!r}, which {reason}; nothing was extracted"
                        )
                dest.mkdir(parents=True, exist_ok=True)
                if hasattr(tarfile, "data_filter"):
                    tar.extractall(dest, members=members, filter="data")
                else:  # Python < 3.10.12 / 3.11.4: the checks above are the only ones
                    tar.extractall(dest, members=members)
        except _FILTER_ERRORS as e:
            raise CheckpointError(f"{path}: tarfile's data filter refused member {e.tarinfo.name!r}: {e}") from e
        except (tarfile.TarError, EOFError) as e:
            raise CorruptCheckpointError(f"{path} is corrupt: not a readable tar ({type(e).__name__}: {e})") from e
    return [dest / _normal(member.name) for member in members]
