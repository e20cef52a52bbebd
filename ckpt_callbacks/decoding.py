"""Open any checkpoint file by its magic bytes and stream its decoded content.

The reading half of :mod:`ckpt_callbacks.codecs`: :func:`open_decoded` sniffs a file's first
bytes, picks the codec whatever the file is called, and sniffs the decoded bytes again (a
``.tar.zst`` is zstd around a tar, a ``.pt.gz`` gzip around a ``torch.save`` zip). It hands back a
stream, never a buffer, so callers (:mod:`ckpt_callbacks.serialization`,
:mod:`ckpt_callbacks.archive`) copy the content where it goes without holding it in memory. Any
error of a codec while decoding becomes one :class:`~ckpt_callbacks.errors.CorruptCheckpointError`
naming the file.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ckpt_callbacks._streams import ReplayReader
from ckpt_callbacks.codecs import SNIFF_BYTES, Codec, codec_named, sniff
from ckpt_callbacks.errors import CheckpointNotFoundError, CorruptCheckpointError

__all__ = ["CONTENT_KINDS", "Decoded", "open_decoded"]

CONTENT_KINDS = ("zip", "tar", "safetensors")
"""What a checkpoint's decoded content may be: a ``torch.save`` zip, a tar bundle, safetensors."""

_CHUNK = 2**20


@dataclass
class Decoded:
    """A checkpoint file opened for reading by :func:`open_decoded`.

    Attributes:
        path: The file.
        codec: The compression around the content, or ``None`` for an uncompressed file.
        kind: What the decoded content is: ``'zip'`` (``torch.save``), ``'tar'`` or
            ``'safetensors'``.
        stream: The decoded bytes from the first one on. Not seekable when ``codec`` is set; a
            damaged stream raises :class:`~ckpt_callbacks.errors.CorruptCheckpointError` from
            ``read``.

    Example:
        >>> with open_decoded("ep1-ba10-rank0.pt.zst") as decoded:  # doctest: +SKIP
        ...     decoded.codec.name, decoded.kind
        ('zstd', 'zip')
    """

    path: Path
    codec: Codec | None
    kind: str
    stream: BinaryIO


class _Guarded(io.RawIOBase):
    """Turns any error of a codec's reader into CorruptCheckpointError naming the file."""

    def __init__(self, reader: BinaryIO, codec: Codec, path: Path) -> None:
        super().__init__()
        self._reader, self._codec, self._path = reader, codec, path

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        try:
            return self._reader.readinto(buffer)  # type: ignore[attr-defined]
        except Exception as e:  # every codec has its own error types; all mean damage
            raise _damaged(self._path, self._codec, e) from e


def _damaged(path: Path, codec: Codec, error: Exception) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"{path} is corrupt: its {codec.name} stream does not decode ({type(error).__name__}: {error})"
    )


def _read_head(stream: BinaryIO) -> bytes:
    head = b""
    while len(head) < SNIFF_BYTES:
        piece = stream.read(SNIFF_BYTES - len(head))
        if not piece:
            break
        head += piece
    return head


@contextmanager
def open_decoded(path: Path | str) -> Iterator[Decoded]:
    """Open a checkpoint file of any known format and yield its decoded content as a stream.

    The format comes from the file's magic bytes, never its name; for a compressed file the
    decoded bytes are sniffed again (a ``.tar.zst`` is zstd around a tar). Only a 1 MiB read
    buffer is held: callers stream the content to where it goes.

    Raises:
        CheckpointNotFoundError: ``path`` does not exist.
        CorruptCheckpointError: Unknown format (outside or inside the compression), or the
            compressed stream is truncated or damaged (the codec's error is the ``__cause__``).
        UnsupportedFormatError: The file is zstd or lz4 and that package is not installed.

    Example:
        >>> with open_decoded(Path("ep1-ba10-rank0.pt.zst")) as decoded:  # doctest: +SKIP
        ...     first = decoded.stream.read(4)
    """
    path = Path(path)
    try:
        file = open(path, "rb")  # noqa: SIM115 -- closed by the with block right below
    except FileNotFoundError as e:
        raise CheckpointNotFoundError(f"no checkpoint at {path}") from e
    except IsADirectoryError as e:
        raise CorruptCheckpointError(f"{path} is a directory, not a checkpoint file") from e
    with file:
        header = file.read(SNIFF_BYTES)
        kind = sniff(header)
        file.seek(0)
        if kind is None:
            empty = ", the file is empty" if not header else ""
            raise CorruptCheckpointError(
                f"{path} is not a checkpoint: unknown format (first bytes {header[:16]!r}{empty})"
            )
        if kind in CONTENT_KINDS:
            yield Decoded(path, None, kind, file)  # type: ignore[arg-type]
            return
        codec = codec_named(kind, path=path)
        try:
            reader = codec.open_reader(file)
        except Exception as e:  # the zstd frame walk refuses a cut stream before decoding
            raise _damaged(path, codec, e) from e
        with reader:
            guarded = io.BufferedReader(_Guarded(reader, codec, path), _CHUNK)
            head = _read_head(guarded)
            inner = sniff(head)
            if inner not in CONTENT_KINDS:
                raise CorruptCheckpointError(
                    f"{path} is not a checkpoint: its {codec.name} stream holds an unknown format "
                    f"(first bytes {head[:16]!r})"
                )
            yield Decoded(path, codec, inner, io.BufferedReader(ReplayReader(head, guarded), _CHUNK))  # type: ignore[arg-type]
