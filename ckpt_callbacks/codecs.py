"""Checkpoint formats: the extension chooses the writer, the magic bytes the reader.

A saver's ``filename`` template decides how a file is WRITTEN, through one registry keyed by
extension (:data:`FORMATS`): a plain ``torch.save`` file, one compressed with a codec, a tar bundle
(optionally compressed), or a weights-only safetensors file. A reader never trusts a name: a file
may have been renamed, downloaded under a temp name or written by Composer's CLI compressors, so
:func:`~ckpt_callbacks.decoding.open_decoded` identifies it by its first bytes (:func:`sniff`)
and decodes it.

Codecs (:data:`CODECS`): ``gz``, ``bz2``, ``xz`` and ``lzma`` from the standard library; ``zst``
and ``lz4`` when their packages import (extras ``ckpt-callbacks[zstd]`` and ``[lz4]``; asking for a
missing one raises :class:`~ckpt_callbacks.errors.UnsupportedFormatError` naming the extra).
Everything runs in-process, streaming, on every core: zstd in its multi-threaded mode; gzip, bz2,
xz and lz4 as independent members compressed in parallel (:class:`~ckpt_callbacks._streams.
ChunkedWriter`), which their CLIs read as one file. Every codec but LZMA-alone carries a checksum
of its content (:attr:`Codec.checksummed`). ``.lzma`` is the legacy LZMA-alone format (what
``xz --format=lzma`` writes); ``.xz`` the xz container.

Name template -> format::

    ep{epoch}-ba{batch}.pt        plain torch.save (zip)       ep{epoch}-ba{batch}   plain
    ep{epoch}.pt.zst              zstandard                    model.bin.gz          gzip
    ep{epoch}.tar                 tar of checkpoint.pt         x.pt.tar              tar (Composer refuses it)
    ep{epoch}.tar.zst, .tgz, ...  compressed tar               model.safetensors     safetensors (weights only)
    latest.pt.symlink             refused: a remote pointer, never a checkpoint
    ep{epoch}.pt.lzo              refused: unknown extension
"""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import BinaryIO

from ckpt_callbacks._streams import CheckedReader, ChunkedWriter, check_zstd_frames
from ckpt_callbacks.errors import ConfigurationError, UnsupportedFormatError, bad_value

__all__ = [
    "CODECS",
    "FORMATS",
    "PLAIN_EXTENSIONS",
    "SNIFF_BYTES",
    "CheckpointFormat",
    "Codec",
    "checkpoint_format",
    "codec_named",
    "get_codec",
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
_CHUNK = 2**20
# A safetensors header is JSON behind its 8-byte length; real ones are kilobytes to a few MB.
_SAFETENSORS_MAX_HEADER = 100 * 2**20


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
        checksummed: Whether the format checks its decoded content (all but LZMA-alone), which
            makes ``torch.save``'s own CRC-32s redundant inside it.

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
    checksummed: bool
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

        A truncated or damaged stream raises from ``read`` or here (``EOFError``, ``OSError``,
        ``ValueError``, the codec's own error), never ends silently. zstd needs a seekable ``raw``.

        Example:
            >>> get_codec("gz").open_reader(io.BytesIO(gzip.compress(b"x"))).read()
            b'x'
        """
        return self._reader(raw)


@dataclass(frozen=True)
class CheckpointFormat:
    """How a checkpoint file is written, as decided by its name (see :func:`checkpoint_format`).

    Attributes:
        codec: The compression codec (of the tar, for a compressed tar), or ``None``.
        extension: The name's extension with its leading dot (``'.pt.zst'``; ``''`` for none).
        container: ``'torch'`` (a ``torch.save`` file), ``'tar'`` (a tar bundle) or
            ``'safetensors'`` (tensors only, for weights-only saves).

    Example:
        >>> fmt = checkpoint_format("ep{epoch}.tar.gz")
        >>> fmt.container, fmt.codec.name, fmt.extension
        ('tar', 'gzip', '.tar.gz')
    """

    codec: Codec | None
    extension: str
    container: str = "torch"

    @property
    def tensors_only(self) -> bool:
        """Whether the format holds tensors only (safetensors), so only weights-only saves fit."""
        return self.container == "safetensors"

    @property
    def checksummed(self) -> bool:
        """Whether the outer codec checks the content, so the inner zip CRC-32s are redundant."""
        return self.codec is not None and self.codec.checksummed


_REGISTRY: dict[str, Codec] = {}
# Extension -> (codec name, package, extra) for optional codecs whose package did not import.
_MISSING: dict[str, tuple[str, str, str]] = {}


def _register(
    name: str,
    extension: str,
    magic: bytes,
    levels: tuple[int, range],
    writer: Callable[[BinaryIO, int], BinaryIO],
    reader: Callable[[BinaryIO], BinaryIO],
    *,
    checksummed: bool = True,
) -> None:
    default, accepted = levels
    _REGISTRY[extension] = Codec(name, (extension,), magic, default, accepted, checksummed, writer, reader)


def _chunked(compress: Callable[[bytearray, int], bytes]) -> Callable[[BinaryIO, int], BinaryIO]:
    return lambda raw, level: ChunkedWriter(raw, lambda chunk: compress(chunk, level))


# gzip members without a file name and with mtime 0: the same state gives the same bytes, and the
# temp file's name does not leak into the checkpoint.
_register("gzip", "gz", _GZIP_MAGIC, (6, range(0, 10)),
          _chunked(lambda chunk, level: gzip.compress(chunk, compresslevel=level, mtime=0)),
          lambda raw: gzip.GzipFile(fileobj=raw, mode="rb"))  # fmt: skip
_register("bz2", "bz2", _BZ2_MAGIC, (9, range(1, 10)),
          _chunked(lambda chunk, level: bz2.compress(chunk, compresslevel=level)),
          lambda raw: bz2.BZ2File(raw, mode="rb"))  # fmt: skip
_register("xz", "xz", _XZ_MAGIC, (6, range(0, 10)),
          _chunked(lambda chunk, level: lzma.compress(chunk, format=lzma.FORMAT_XZ, preset=level)),
          lambda raw: lzma.LZMAFile(raw, mode="rb", format=lzma.FORMAT_XZ))  # fmt: skip
# LZMA-alone has no checksum, so a flipped bit can decode to wrong bytes; the zip CRCs inside stay
# on for it and verify_file checks them. One stream only: its readers do not concatenate streams.
_register("lzma", "lzma", b"", (6, range(0, 10)),
          lambda raw, level: lzma.LZMAFile(raw, mode="wb", format=lzma.FORMAT_ALONE, preset=level),
          lambda raw: lzma.LZMAFile(raw, mode="rb", format=lzma.FORMAT_ALONE), checksummed=False)  # fmt: skip

try:
    import zstandard
except ImportError:
    _MISSING["zst"] = ("zstd", "zstandard", "zstd")
else:

    def _zstd_reader(raw: BinaryIO) -> BinaryIO:
        expected = check_zstd_frames(raw)
        reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=False)
        return reader if expected is None else io.BufferedReader(CheckedReader(reader, expected), _CHUNK)

    # threads=-1: one compression worker per core while torch.save feeds the stream.
    _register("zstd", "zst", _ZSTD_MAGIC, (3, range(-(2**17), zstandard.MAX_COMPRESSION_LEVEL + 1)),
              lambda raw, level: zstandard.ZstdCompressor(
                  level=level, threads=-1, write_checksum=True, write_content_size=True,
              ).stream_writer(raw, closefd=False),
              _zstd_reader)  # fmt: skip

try:
    import lz4.frame
except ImportError:
    _MISSING["lz4"] = ("lz4", "lz4", "lz4")
else:
    # lz4 leaves the frame checksum off by default; without it a flipped bit goes unseen. 4 MiB
    # independent blocks, as the lz4 CLI writes: about 10% less CPU than 64 KiB linked ones.
    _register("lz4", "lz4", _LZ4_MAGIC,
              (lz4.frame.COMPRESSIONLEVEL_MIN, range(lz4.frame.COMPRESSIONLEVEL_MIN, lz4.frame.COMPRESSIONLEVEL_MAX + 1)),
              _chunked(lambda chunk, level: lz4.frame.compress(
                  chunk, compression_level=level, content_checksum=True,
                  block_size=lz4.frame.BLOCKSIZE_MAX4MB, block_linked=False,
              )),
              lambda raw: lz4.frame.LZ4FrameFile(raw, mode="rb"))  # fmt: skip

CODECS: Mapping[str, Codec] = MappingProxyType(_REGISTRY)
"""The available codecs by extension (read-only): ``CODECS['gz'].name == 'gzip'``."""

_CODEC_EXTENSIONS: tuple[str, ...] = (*_REGISTRY, *_MISSING)

_FORMAT_TABLE: dict[str, tuple[str, str | None]] = {
    **{ext: ("torch", None) for ext in PLAIN_EXTENSIONS},
    "tar": ("tar", None),
    "tgz": ("tar", "gz"),
    "safetensors": ("safetensors", None),
    **{ext: ("torch", ext) for ext in _CODEC_EXTENSIONS},
    **{f"tar.{ext}": ("tar", ext) for ext in _CODEC_EXTENSIONS},
}

FORMATS: Mapping[str, tuple[str, str | None]] = MappingProxyType(_FORMAT_TABLE)
"""The writer registry: name ending -> (container, codec extension or None), e.g.
``FORMATS['tar.zst'] == ('tar', 'zst')``. The longest ending of a name that is a key decides."""


def _available() -> str:
    return ", ".join("." + key for key, (_, codec) in _FORMAT_TABLE.items() if codec is None or codec in _REGISTRY)


def get_codec(extension: str, *, argument: str = "extension", value: object = None) -> Codec:
    """Return the codec writing files whose name ends in ``.<extension>``.

    Args:
        extension: The extension without its dot (``'zst'``).
        argument: The argument named in error messages.
        value: The value named in error messages (defaults to ``extension``).

    Raises:
        UnsupportedFormatError: ``extension`` is no codec's, or the codec's optional package is
            not installed (the message lists what is available and which extra to install).

    Example:
        >>> get_codec("bz2").name
        'bz2'
    """
    if extension in _REGISTRY:
        return _REGISTRY[extension]
    shown = extension if value is None else value
    if extension in _MISSING:
        name, package, extra = _MISSING[extension]
        raise UnsupportedFormatError(
            f"{argument!r} asks for {name} compression (got {shown!r}), which needs the {package!r} "
            f"package: pip install 'ckpt-callbacks[{extra}]'. Available now: {_available()}"
        )
    accepted = "a compression extension: " + ", ".join(_CODEC_EXTENSIONS)
    raise UnsupportedFormatError(bad_value(argument, accepted, shown))


def checkpoint_format(template: str, *, argument: str = "filename") -> CheckpointFormat:
    """Decide from a name template how checkpoint files under that name are written.

    The extension is the text of the basename after its last ``}`` (the whole basename if it has
    none), from the first ``.`` on: format variables such as ``{total_wct:.1f}`` never count. Its
    last two parts, else its last part, are looked up in :data:`FORMATS`.

    Args:
        template: A file name template such as ``'ep{epoch}-ba{batch}-rank{rank}.pt.zst'``.
        argument: The argument named in error messages.

    Raises:
        UnsupportedFormatError: Unknown extension, a ``.symlink`` name, or an extension that
            needs an optional package that is not installed.
        ConfigurationError: ``template`` is not a str.

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
    if not parts:
        return CheckpointFormat(None, "")
    if parts[-1] == "symlink":
        raise UnsupportedFormatError(
            bad_value(argument, "a checkpoint name: .symlink names are remote pointers, never checkpoints", template)
        )
    key = ".".join(parts[-2:])
    if key not in _FORMAT_TABLE or len(parts) < 2:
        key = parts[-1]
    # A compressed safetensors name would promise a layout that nothing writes.
    if key in _FORMAT_TABLE and not (len(parts) >= 2 and parts[-2] == "safetensors"):
        container, codec = _FORMAT_TABLE[key]
        return CheckpointFormat(
            None if codec is None else get_codec(codec, argument=argument, value=template), extension, container
        )
    plain = ", ".join("." + e for e in PLAIN_EXTENSIONS)
    codecs = ", ".join("." + e for e in _CODEC_EXTENSIONS)
    accepted = (
        f"a name ending in one of {plain}, optionally followed by a compression extension "
        f"({codecs}, e.g. 'ep{{epoch}}.pt.zst'); a tar bundle (.tar, .tgz, .tar.<compression>); "
        "'.safetensors' (weights only); or a name with no extension"
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


def _is_safetensors(header: bytes) -> bool:
    # No magic either: an 8-byte little-endian header length, then the JSON header itself.
    if len(header) < 10:
        return False
    (length,) = struct.unpack_from("<Q", header)
    return 2 <= length <= _SAFETENSORS_MAX_HEADER and header[8:10] in (b'{"', b"{}", b"{ ")


def sniff(header: bytes) -> str | None:
    """Name the format of a file from its first bytes (:data:`SNIFF_BYTES` of them, or fewer).

    Returns:
        ``'zip'`` (what ``torch.save`` writes), ``'zstd'``, ``'lz4'``, ``'gzip'``, ``'bz2'``,
        ``'xz'``, ``'lzma'`` (LZMA-alone), ``'tar'`` (needs 262 bytes), ``'safetensors'``, or
        ``None``.

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
    if _is_safetensors(header):
        return "safetensors"
    if _is_lzma_alone(header):
        return "lzma"
    return None


def codec_named(name: str, *, path: Path | str | None = None) -> Codec:
    """Return the codec that :func:`sniff` calls ``name`` (``'zstd'``, ``'gzip'``, ...).

    Raises:
        UnsupportedFormatError: The codec's optional package is not installed (the message names
            ``path``, the file that needs it, and the extra to install).

    Example:
        >>> codec_named("gzip").extensions
        ('gz',)
    """
    for codec in _REGISTRY.values():
        if codec.name == name:
            return codec
    extension = next(ext for ext, missing in _MISSING.items() if missing[0] == name)
    return get_codec(extension, argument="path", value=None if path is None else str(path))
