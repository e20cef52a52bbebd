"""Compression codecs for checkpoint files: the extension chooses the writer, magic bytes the reader.

A saver's ``filename`` template decides how a file is WRITTEN (``ep{epoch}.pt.zst`` is torch.save
output compressed with zstandard). A reader never trusts a name: a file may have been renamed,
downloaded under another key or written by Composer's CLI compressors, so :func:`open_decoded`
identifies it by its first bytes (:func:`sniff`) and hands back the decoded bytes.

Codecs live in a registry keyed by extension (like fsspec's ``compression.py``): ``gz``, ``bz2``,
``xz`` and ``lzma`` from the standard library; ``zst`` and ``lz4`` only when their packages import
(extras ``ckpt-callbacks[zstd]`` and ``[lz4]``; asking for a missing one raises a
:class:`~ckpt_callbacks.errors.ConfigurationError` naming the extra). Everything streams in-process;
nothing shells out to a CLI as Composer does.

Name template -> format::

    ep{epoch}-ba{batch}.pt        plain torch.save (zip)
    ep{epoch}-ba{batch}           plain (no extension)
    ep{epoch}.pt.zst              zstandard         model.bin.gz     gzip
    ep{epoch}.pt.tar.gz           tar bundle        (arrives with issue #3)
    latest.pt.symlink             refused: a remote pointer, never a checkpoint
    ep{epoch}.pt.lzo              refused: unknown extension
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import struct
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import BinaryIO

from ckpt_callbacks.errors import (
    CheckpointNotFoundError,
    ConfigurationError,
    CorruptCheckpointError,
    UnsupportedFormatError,
    bad_value,
)

__all__ = [
    "CODECS",
    "PLAIN_EXTENSIONS",
    "SNIFF_BYTES",
    "CheckpointFormat",
    "Codec",
    "checkpoint_format",
    "get_codec",
    "open_decoded",
    "sniff",
]

SNIFF_BYTES = 512
"""How many leading bytes :func:`sniff` wants (the tar magic sits at offset 257)."""

PLAIN_EXTENSIONS: tuple[str, ...] = ("pt", "pth", "ckpt", "bin", "torch")
"""Last name parts that mean an uncompressed ``torch.save`` file."""

_ZIP_MAGICS = (b"PK\x03\x04", b"PK\x05\x06")
_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_LZ4_MAGIC = b"\x04\x22\x4d\x18"
_GZIP_MAGIC = b"\x1f\x8b\x08"
_BZ2_MAGIC = b"BZh"
_XZ_MAGIC = b"\xfd7zXZ\x00"

# Decoded checkpoints stay in memory up to this size, then spill to a temporary file.
_SPOOL_BYTES = 64 * 2**20
_CHUNK = 2**20
# zstandard's decompressobj returns all output for the input it is given at once and an RLE block
# expands ~32,000x, so it is fed small slices: 2 KiB of input is at most ~64 MiB of output.
_ZSTD_INPUT_BYTES = 2048


@dataclass(frozen=True)
class Codec:
    """One single-file compression format: how to write it, how to read it, how to recognise it.

    Attributes:
        name: What :func:`sniff` returns for this format (``'gzip'``, ``'zstd'``, ...).
        extensions: File-name extensions (without the dot) that choose this codec as writer.
        magic: The bytes every file of this format starts with (empty for LZMA-alone, which
            has none and is recognised by its header's structure).
        default_level: Level used when the caller gives none.
        levels: Accepted levels.

    Example:
        >>> codec = get_codec("gz")
        >>> buf = io.BytesIO()
        >>> with codec.open_writer(buf, level=1) as w:
        ...     _ = w.write(b"weights")
        >>> codec.open_reader(io.BytesIO(buf.getvalue())).read()
        b'weights'
    """

    name: str
    extensions: tuple[str, ...]
    magic: bytes
    default_level: int
    levels: range
    _writer: Callable[[BinaryIO, int], BinaryIO] = field(repr=False, compare=False)
    _reader: Callable[[BinaryIO], BinaryIO] = field(repr=False, compare=False)

    def check_level(self, level: int | None, *, argument: str = "compression_level") -> int:
        """Return ``level`` (or the default for ``None``) after checking this codec accepts it.

        Raises:
            ConfigurationError: ``level`` is not an int within :attr:`levels`.

        Example:
            >>> get_codec("bz2").check_level(None)
            9
        """
        if level is None:
            return self.default_level
        if isinstance(level, bool) or not isinstance(level, int) or level not in self.levels:
            accepted = f"an int from {self.levels.start} to {self.levels.stop - 1} for {self.name}"
            raise ConfigurationError(bad_value(argument, accepted, level))
        return level

    def open_writer(self, raw: BinaryIO, level: int | None = None) -> BinaryIO:
        """Return a file object that compresses what is written to it into ``raw``.

        The writer must be closed to finish the compressed stream; closing it leaves ``raw`` open
        (the caller still has to flush and fsync it). It never seeks ``raw``.

        Example:
            >>> buf = io.BytesIO()
            >>> with get_codec("xz").open_writer(buf) as w:
            ...     _ = w.write(b"x")
            >>> buf.getvalue()[:6] == _XZ_MAGIC
            True
        """
        return self._writer(raw, self.check_level(level))

    def open_reader(self, raw: BinaryIO) -> BinaryIO:
        """Return a file object reading the decompressed bytes of ``raw`` (which it does not close).

        A truncated or damaged stream raises from ``read`` (``EOFError``, ``OSError``, the
        codec's own error), never ends silently.

        Example:
            >>> get_codec("gz").open_reader(io.BytesIO(gzip.compress(b"x"))).read()
            b'x'
        """
        return self._reader(raw)


@dataclass(frozen=True)
class CheckpointFormat:
    """How a checkpoint file is written, as decided by its name (see :func:`checkpoint_format`).

    Attributes:
        codec: The compression codec, or ``None`` for a plain ``torch.save`` file.
        extension: The name's extension with its leading dot (``'.pt.zst'``; ``''`` for none).

    Example:
        >>> fmt = checkpoint_format("ep{epoch}.pt.gz")
        >>> fmt.codec.name, fmt.extension
        ('gzip', '.pt.gz')
    """

    codec: Codec | None
    extension: str


_REGISTRY: dict[str, Codec] = {}
# Extension -> (codec name, package, extra) for optional codecs whose package did not import.
_MISSING: dict[str, tuple[str, str, str]] = {}


def _register(
    name: str,
    extension: str,
    magic: bytes,
    default_level: int,
    levels: range,
    writer: Callable[[BinaryIO, int], BinaryIO],
    reader: Callable[[BinaryIO], BinaryIO],
) -> None:
    _REGISTRY[extension] = Codec(name, (extension,), magic, default_level, levels, writer, reader)


# gzip without a file name and with mtime 0: the same state gives the same bytes, and the temp
# file's name does not leak into the checkpoint.
_register("gzip", "gz", _GZIP_MAGIC, 6, range(0, 10),
          lambda raw, level: gzip.GzipFile(filename="", mode="wb", compresslevel=level, fileobj=raw, mtime=0),
          lambda raw: gzip.GzipFile(fileobj=raw, mode="rb"))  # fmt: skip
_register("bz2", "bz2", _BZ2_MAGIC, 9, range(1, 10),
          lambda raw, level: bz2.BZ2File(raw, mode="wb", compresslevel=level),
          lambda raw: bz2.BZ2File(raw, mode="rb"))  # fmt: skip
_register("xz", "xz", _XZ_MAGIC, 6, range(0, 10),
          lambda raw, level: lzma.LZMAFile(raw, mode="wb", format=lzma.FORMAT_XZ, preset=level),
          lambda raw: lzma.LZMAFile(raw, mode="rb", format=lzma.FORMAT_XZ))  # fmt: skip
# LZMA-alone has no checksum, so a flipped bit can decode to wrong bytes; verify_file's zip CRCs
# still catch it. It is here for Composer's `.pt.lzma` files; .xz is the better choice.
_register("lzma", "lzma", b"", 6, range(0, 10),
          lambda raw, level: lzma.LZMAFile(raw, mode="wb", format=lzma.FORMAT_ALONE, preset=level),
          lambda raw: lzma.LZMAFile(raw, mode="rb", format=lzma.FORMAT_ALONE))  # fmt: skip

try:
    import zstandard
except ImportError:
    _MISSING["zst"] = ("zstd", "zstandard", "zstd")
else:

    class _ZstdReader(io.RawIOBase):
        """Decompresses zstd frames from ``raw``, raising ``EOFError`` when a frame is cut short.

        zstandard's own ``stream_reader`` ends silently at a truncated frame, which would turn
        a half-uploaded checkpoint into a shorter, "valid" stream.
        """

        def __init__(self, raw: BinaryIO) -> None:
            super().__init__()
            self._raw = raw
            self._dctx = zstandard.ZstdDecompressor()
            self._frame = None
            self._input = memoryview(b"")
            self._output = memoryview(b"")

        def readable(self) -> bool:
            return True

        def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
            while not self._output:
                if not self._decompress_more():
                    return 0
            n = min(len(buffer), len(self._output))
            buffer[:n] = self._output[:n]
            self._output = self._output[n:]
            return n

        def _decompress_more(self) -> bool:
            if not self._input:
                self._input = memoryview(self._raw.read(_CHUNK))
                if not self._input:
                    if self._frame is not None and not self._frame.eof:
                        raise EOFError("zstd stream ended before the end of its frame")
                    return False
            if self._frame is None or self._frame.eof:
                # Several concatenated frames (pzstd, `cat a.zst b.zst`) are one stream.
                self._frame = self._dctx.decompressobj()
            piece, self._input = self._input[:_ZSTD_INPUT_BYTES], self._input[_ZSTD_INPUT_BYTES:]
            self._output = memoryview(self._frame.decompress(piece))
            if self._frame.eof:
                self._input = memoryview(self._frame.unused_data + self._input)
            return True

    # Multi-threaded (one worker per core) and checksummed, so a flipped bit fails to decode.
    _register("zstd", "zst", _ZSTD_MAGIC, 3, range(-(2**17), zstandard.MAX_COMPRESSION_LEVEL + 1),
              lambda raw, level: zstandard.ZstdCompressor(level=level, threads=-1, write_checksum=True)
              .stream_writer(raw, closefd=False),
              lambda raw: io.BufferedReader(_ZstdReader(raw), buffer_size=_CHUNK))  # fmt: skip

try:
    import lz4.frame
except ImportError:
    _MISSING["lz4"] = ("lz4", "lz4", "lz4")
else:
    # lz4 leaves the frame checksum off by default; without it a flipped bit goes unseen.
    _register("lz4", "lz4", _LZ4_MAGIC, lz4.frame.COMPRESSIONLEVEL_MIN,
              range(lz4.frame.COMPRESSIONLEVEL_MIN, lz4.frame.COMPRESSIONLEVEL_MAX + 1),
              lambda raw, level: lz4.frame.LZ4FrameFile(raw, mode="wb", compression_level=level, content_checksum=True),
              lambda raw: lz4.frame.LZ4FrameFile(raw, mode="rb"))  # fmt: skip

CODECS: Mapping[str, Codec] = MappingProxyType(_REGISTRY)
"""The available codecs by extension (read-only): ``CODECS['gz'].name == 'gzip'``."""

_CODEC_EXTENSIONS: tuple[str, ...] = (*_REGISTRY, *_MISSING)


def get_codec(extension: str, *, argument: str = "extension", value: object = None) -> Codec:
    """Return the codec writing files whose name ends in ``.<extension>``.

    Args:
        extension: The extension without its dot (``'zst'``).
        argument: The argument named in error messages.
        value: The value named in error messages (defaults to ``extension``).

    Raises:
        ConfigurationError: The codec's optional package is not installed (the message says which
            extra to install), or ``extension`` is no codec's.

    Example:
        >>> get_codec("bz2").name
        'bz2'
    """
    if extension in _REGISTRY:
        return _REGISTRY[extension]
    shown = extension if value is None else value
    if extension in _MISSING:
        name, package, extra = _MISSING[extension]
        raise ConfigurationError(
            f"{argument!r} asks for {name} compression (got {shown!r}), which needs the {package!r} "
            f"package: pip install 'ckpt-callbacks[{extra}]'"
        )
    accepted = "a compression extension: " + ", ".join(_CODEC_EXTENSIONS)
    raise ConfigurationError(bad_value(argument, accepted, shown))


def checkpoint_format(template: str, *, argument: str = "filename") -> CheckpointFormat:
    """Decide from a name template how checkpoint files under that name are written.

    The extension is the text of the basename after its last ``}`` (the whole basename if it has
    none), from the first ``.`` on: format variables such as ``{total_wct:.1f}`` never count.

    Args:
        template: A file name template such as ``'ep{epoch}-ba{batch}-rank{rank}.pt.zst'``.
        argument: The argument named in error messages.

    Raises:
        UnsupportedFormatError: Unknown extension, or a ``.symlink`` name.
        ConfigurationError: The extension needs an optional package that is not installed.
        NotImplementedError: Tar bundles and safetensors (issue #3).

    Example:
        >>> checkpoint_format("ep{epoch}-ba{batch}-rank{rank}.pt.zst").codec.name
        'zstd'
        >>> checkpoint_format("ep{epoch}-ba{batch}") == CheckpointFormat(None, "")
        True
    """
    if not isinstance(template, str):
        raise ConfigurationError(bad_value(argument, "a file name template (str)", template))
    tail = template.replace("\\", "/").rsplit("/", 1)[-1].rsplit("}", 1)[-1]
    dot = tail.find(".")
    extension = tail[dot:] if dot >= 0 else ""
    parts = extension[1:].split(".") if extension else []
    last = parts[-1] if parts else ""

    is_tar = last in ("tar", "tgz") or (len(parts) >= 2 and parts[-2] == "tar" and last in _CODEC_EXTENSIONS)
    if is_tar or last == "safetensors":
        kind = "tar bundles" if is_tar else "safetensors files"
        raise NotImplementedError(
            f"{kind} ({template!r}) arrive with issue #3 (formats); name the file '.pt' or '.pt.<codec>' for now"
        )
    if last == "symlink":
        raise UnsupportedFormatError(
            bad_value(argument, "a checkpoint name: .symlink names are remote pointers, never checkpoints", template)
        )
    if last in _CODEC_EXTENSIONS:
        return CheckpointFormat(get_codec(last, argument=argument, value=template), extension)
    if not parts or last in PLAIN_EXTENSIONS:
        return CheckpointFormat(None, extension)
    plain = ", ".join("." + e for e in PLAIN_EXTENSIONS)
    codecs = ", ".join("." + e for e in _CODEC_EXTENSIONS)
    accepted = (
        f"a name ending in one of {plain}, optionally followed by a compression extension "
        f"({codecs}, e.g. 'ep{{epoch}}.pt.zst'), or a name with no extension"
    )
    raise UnsupportedFormatError(bad_value(argument, accepted, template))


def _is_lzma_alone(header: bytes) -> bool:
    # LZMA-alone has no magic, only a 13-byte header; demanding what every encoder writes keeps
    # random data out: properties lc/lp/pb (< 9*5*5), a dictionary of 2^n or 2^n + 2^(n-1) bytes
    # (the only sizes xz accepts) of at least 4 KiB, and an unknown (-1) or plausible size.
    if len(header) < 13:
        return False
    props, dict_size, size = struct.unpack_from("<BIQ", header)
    if props >= 9 * 5 * 5 or dict_size < 4096:
        return False
    base = dict_size // 3 if dict_size % 3 == 0 else dict_size
    if base & (base - 1):
        return False
    return size == 2**64 - 1 or size < 2**48


def sniff(header: bytes) -> str | None:
    """Name the format of a file from its first bytes (:data:`SNIFF_BYTES` of them, or fewer).

    Returns:
        ``'zip'`` (what ``torch.save`` writes), ``'zstd'``, ``'lz4'``, ``'gzip'``, ``'bz2'``,
        ``'xz'``, ``'lzma'`` (LZMA-alone), ``'tar'`` (needs 262 bytes), or ``None``.

    Example:
        >>> sniff(gzip.compress(b"state"))
        'gzip'
        >>> sniff(b"not a checkpoint") is None
        True
    """
    if header[:4] in _ZIP_MAGICS:
        return "zip"
    for name, magic in (("zstd", _ZSTD_MAGIC), ("lz4", _LZ4_MAGIC), ("gzip", _GZIP_MAGIC), ("xz", _XZ_MAGIC)):
        if header.startswith(magic):
            return name
    # "BZh", a block size digit, then the magic of the first block or of the end of stream.
    if header.startswith(_BZ2_MAGIC) and header[3:4].isdigit() and header[3:4] != b"0":
        if header[4:10] in (b"1AY&SY", b"\x17rE8P\x90"):
            return "bz2"
    if header[257:262] == b"ustar":
        return "tar"
    if _is_lzma_alone(header):
        return "lzma"
    return None


def _codec_named(name: str, path: Path) -> Codec:
    for codec in _REGISTRY.values():
        if codec.name == name:
            return codec
    extension = next(ext for ext, missing in _MISSING.items() if missing[0] == name)
    return get_codec(extension, argument="path", value=str(path))


def _spill_dir(path: Path) -> str | None:
    # A decoded checkpoint that outgrows memory spills next to the checkpoint itself: that file
    # system just held a checkpoint, while /tmp on training nodes is often a small RAM-backed
    # tmpfs. A read-only checkpoint folder (a mounted dataset) falls back to the system temp dir.
    parent = path.parent
    return str(parent) if os.access(parent, os.W_OK | os.X_OK) else None


@contextmanager
def open_decoded(path: Path | str) -> Iterator[BinaryIO]:
    """Open a checkpoint file and yield a seekable binary file of its decoded bytes.

    The format comes from the file's magic bytes, never its name. A plain ``torch.save`` file is
    yielded as is; a compressed one is decompressed into a spooled temporary file (in memory up
    to 64 MiB, then on disk) because ``torch.load`` seeks around its zip archive.

    Raises:
        CheckpointNotFoundError: ``path`` does not exist.
        CorruptCheckpointError: Unknown format, or the compressed stream is truncated or damaged
            (the codec's error is the ``__cause__``).
        ConfigurationError: The file is zstd or lz4 and that package is not installed.
        NotImplementedError: The file is a tar bundle (issue #3).

    Example:
        >>> with open_decoded(Path("ep1-ba10-rank0.pt.zst")) as f:  # doctest: +SKIP
        ...     state = torch.load(f, weights_only=True)
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
        if kind == "zip":
            yield file
            return
        if kind == "tar":
            raise NotImplementedError(f"{path} is a tar bundle; tar bundles arrive with issue #3 (formats)")
        if kind is None:
            empty = ", the file is empty" if not header else ""
            raise CorruptCheckpointError(
                f"{path} is not a checkpoint: unknown format (first bytes {header[:16]!r}{empty})"
            )
        codec = _codec_named(kind, path)
        with tempfile.SpooledTemporaryFile(
            max_size=_SPOOL_BYTES, prefix=".decode-", suffix=".tmp", dir=_spill_dir(path)
        ) as spool:
            with codec.open_reader(file) as reader:
                while True:
                    try:
                        chunk = reader.read(_CHUNK)
                    except Exception as e:  # every codec has its own error types; all mean damage
                        raise CorruptCheckpointError(
                            f"{path} is corrupt: its {codec.name} stream does not decode ({type(e).__name__}: {e})"
                        ) from e
                    if not chunk:
                        break
                    spool.write(chunk)
            spool.seek(0)
            if sniff(spool.read(SNIFF_BYTES)) == "tar":
                raise NotImplementedError(
                    f"{path} is a {codec.name}-compressed tar bundle; tar bundles arrive with issue #3 (formats)"
                )
            spool.seek(0)
            yield spool  # type: ignore[misc]
