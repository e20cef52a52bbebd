"""Stream plumbing behind the codecs: parallel compression, a zstd frame check, and stream guards.

Three small pieces that :mod:`ckpt_callbacks.codecs` and :mod:`ckpt_callbacks.archive` build on:

* :class:`ChunkedWriter` compresses what ``torch.save`` writes in independent chunks on a thread
  pool, one complete member per chunk (a gzip member, a bz2 stream, an xz stream, an lz4 frame).
  Those formats define a file of several members as the concatenation of their contents, so
  ``gzip -d``, ``bzip2 -d``, ``xz -d`` and ``lz4 -d`` read it as one file. With ``torch.utils.
  serialization.config.save.compute_crc32`` off, ``torch.save`` only hands tensor memory to
  ``write`` (about 1 ms for 170 MB here), so the work to overlap is compression itself: one chunk
  fills while the others compress on the remaining cores (zlib, bz2, lzma and lz4 release the GIL).
* :func:`check_zstd_frames` walks a zstd file's frame and block headers. zstandard's readers end
  silently at a truncated frame, and a frame cut exactly before its checksum still decodes, so a
  half-written file would load as a shorter, "valid" stream; the walk refuses it before decoding.
* :class:`CheckedReader` fails at the end of a stream whose decoded length differs from what its
  headers declared.
"""

from __future__ import annotations

import io
import os
import struct
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import BinaryIO

__all__ = [
    "CHUNK_BYTES",
    "CheckedReader",
    "ChunkedWriter",
    "ReplayReader",
    "check_zstd_frames",
    "worker_count",
]

CHUNK_BYTES = 32 * 2**20
"""Input bytes per independently compressed chunk: large enough that the ratio loss against one
stream is negligible (xz's default dictionary is 8 MiB), small enough to keep two cores busy."""

_ZSTD_FRAME = 0xFD2FB528
_ZSTD_SKIPPABLE = 0x184D2A50  # the low 4 bits are free
_BLOCK_RESERVED = 3
_BLOCK_RLE = 1


def worker_count() -> int:
    """The cores this process may use, capped at 8 (compression threads to start).

    Example:
        >>> worker_count() >= 1
        True
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    return max(1, min(cores, 8))


class ChunkedWriter(io.RawIOBase):
    """A writable file that compresses fixed-size chunks in parallel and writes them in order.

    ``compress(chunk)`` must return one complete, self-contained member of a format whose readers
    concatenate members. At most ``workers`` chunks are in flight plus the one filling, so memory
    stays bounded (about ``(workers + 1) * chunk_bytes`` of input). Closing it writes the last
    chunk (an empty stream still gets one member, so the output is a valid file) and leaves ``raw``
    open.

    Example:
        >>> import gzip
        >>> raw = io.BytesIO()
        >>> with ChunkedWriter(raw, lambda b: gzip.compress(b, mtime=0), chunk_bytes=4) as w:
        ...     _ = w.write(b"0123456789")
        >>> gzip.decompress(raw.getvalue())
        b'0123456789'
    """

    def __init__(
        self,
        raw: BinaryIO,
        compress: Callable[[bytearray], bytes],
        *,
        chunk_bytes: int = CHUNK_BYTES,
        workers: int | None = None,
    ) -> None:
        super().__init__()
        self._raw = raw
        self._compress = compress
        self._chunk_bytes = chunk_bytes
        self._workers = workers or worker_count()
        self._pool = ThreadPoolExecutor(self._workers, thread_name_prefix="ckpt-compress")
        self._pending: deque[Future] = deque()
        self._buffer = bytearray()
        self._members = 0

    def writable(self) -> bool:
        return True

    def write(self, data: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        view = memoryview(data).cast("B")
        size = len(view)
        while view:
            take = min(len(view), self._chunk_bytes - len(self._buffer))
            self._buffer += view[:take]
            view = view[take:]
            if len(self._buffer) == self._chunk_bytes:
                self._submit()
        return size

    def _submit(self) -> None:
        # The filled buffer goes to the worker as is and a new one starts: no copy.
        chunk, self._buffer = self._buffer, bytearray()
        self._pending.append(self._pool.submit(self._compress, chunk))
        self._members += 1
        while len(self._pending) > self._workers:
            self._raw.write(self._pending.popleft().result())

    def close(self) -> None:
        if self.closed:
            return
        try:
            if self._buffer or not self._members:
                self._submit()
            while self._pending:
                self._raw.write(self._pending.popleft().result())
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)
            super().close()


class CheckedReader(io.RawIOBase):
    """Reads ``inner`` and raises ``EOFError`` at its end if the length is not ``expected``.

    Example:
        >>> CheckedReader(io.BytesIO(b"abc"), 3).read()
        b'abc'
    """

    def __init__(self, inner: BinaryIO, expected: int) -> None:
        super().__init__()
        self._inner = inner
        self._expected = expected
        self._seen = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        data = self._inner.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        self._seen += n
        if n == 0 and self._seen != self._expected:
            raise EOFError(f"decoded {self._seen} bytes where the headers declare {self._expected}")
        if self._seen > self._expected:
            raise EOFError(f"decoded more than the {self._expected} bytes the headers declare")
        return n


class ReplayReader(io.RawIOBase):
    """Reads ``head`` first, then the rest of ``stream``: un-reads the bytes a sniff consumed.

    Example:
        >>> ReplayReader(b"ab", io.BytesIO(b"cd")).read()
        b'abcd'
    """

    def __init__(self, head: bytes, stream: BinaryIO) -> None:
        super().__init__()
        self._head = memoryview(head)
        self._stream = stream

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        if self._head:
            n = min(len(buffer), len(self._head))
            buffer[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        return self._stream.readinto(buffer)


def _read_exact(raw: BinaryIO, size: int, what: str) -> bytes:
    data = raw.read(size)
    if len(data) != size:
        raise EOFError(f"zstd stream ends inside {what}")
    return data


def check_zstd_frames(raw: BinaryIO) -> int | None:
    """Walk every frame of a seekable zstd file without decoding it; rewind it afterwards.

    Checks that each frame's blocks run up to one flagged as last, that the 4-byte checksum
    follows when the frame header announces one, and that nothing but further frames (regular or
    skippable) follows. Costs one small read per 128 KiB block.

    Returns:
        The total decoded size if every frame declares its content size, else ``None``.

    Raises:
        EOFError: A frame is cut short.
        ValueError: A frame header is malformed, or bytes that are no frame follow the last one.

    Example:
        >>> import zstandard
        >>> check_zstd_frames(io.BytesIO(zstandard.ZstdCompressor().compress(b"x" * 1000)))
        1000
    """
    end = raw.seek(0, io.SEEK_END)
    raw.seek(0)
    position, total = 0, 0
    sized = True
    while position < end:
        (magic,) = struct.unpack("<I", _read_exact(raw, 4, "a frame magic number"))
        if magic & 0xFFFFFFF0 == _ZSTD_SKIPPABLE:
            (length,) = struct.unpack("<I", _read_exact(raw, 4, "a skippable frame header"))
            position += 8 + length
            if position > end:
                raise EOFError("zstd stream ends inside a skippable frame")
            raw.seek(position)
            continue
        if magic != _ZSTD_FRAME:
            raise ValueError(f"bytes at offset {position} are not a zstd frame (magic {magic:#010x})")
        descriptor = _read_exact(raw, 1, "a frame header")[0]
        if descriptor & 0x08:
            raise ValueError(f"zstd frame header at offset {position} has its reserved bit set")
        single_segment = bool(descriptor & 0x20)
        size_bytes = (1 if single_segment else 0, 2, 4, 8)[descriptor >> 6]
        rest = (0 if single_segment else 1) + (0, 1, 2, 4)[descriptor & 0x03] + size_bytes
        header = _read_exact(raw, rest, "a frame header")
        if size_bytes:
            content = int.from_bytes(header[rest - size_bytes :], "little") + (256 if size_bytes == 2 else 0)
            total += content
        else:
            sized = False
        position += 5 + rest
        last = False
        while not last:
            raw.seek(position)
            (block,) = struct.unpack("<I", _read_exact(raw, 3, "a block header") + b"\0")
            last, kind, size = bool(block & 1), (block >> 1) & 3, block >> 3
            if kind == _BLOCK_RESERVED:
                raise ValueError(f"zstd block at offset {position} has the reserved type")
            position += 3 + (1 if kind == _BLOCK_RLE else size)
            if position > end:
                raise EOFError("zstd stream ends inside a block")
        if descriptor & 0x04:
            position += 4
            if position > end:
                raise EOFError("zstd stream ends inside a frame checksum")
        raw.seek(position)
    raw.seek(0)
    return total if sized else None
