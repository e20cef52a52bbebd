"""The safetensors format for weights-only checkpoints, written and read in-process, streaming.

A ``.safetensors`` file is an 8-byte little-endian header length N, N bytes of JSON (for each
tensor its dtype, shape and ``[begin, end)`` byte range; an optional ``"__metadata__"`` map of
strings), then the tensors' raw little-endian bytes, back to back. It holds tensors only, never a
pickle, which is why Hugging Face and others publish weights in it.

We write and read it ourselves, and test interop with the ``safetensors`` package both ways: its
Python API builds the whole file in memory (``save``) or wants a path (``save_file``), while a
commit hands us an open temp file to stream into; the layout is a JSON header and raw bytes. Tensors
are laid out by descending element size, so every tensor starts aligned to its own size.

safetensors has no checksum. Ours carry one: ``ckpt_callbacks.crc32`` in the metadata, the CRC-32
of the header's content (as canonical JSON, without that key) and of the data section, checked on
every read; files from other writers are read without it.

Example::

    with open("model.safetensors", "wb") as raw:
        write_safetensors(model.state_dict(), raw, {"format": "pt"})
    tensors, metadata = read_safetensors("model.safetensors")
"""

from __future__ import annotations

import json
import math
import os
import struct
import sys
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import BinaryIO

import torch

from ckpt_callbacks.errors import CheckpointNotFoundError, ConfigurationError, CorruptCheckpointError, bad_value

__all__ = ["CRC_KEY", "DTYPES", "read_safetensors", "write_safetensors"]

DTYPES: Mapping[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
"""safetensors dtype names and the torch dtypes they stand for."""

CRC_KEY = "ckpt_callbacks.crc32"
"""Metadata key of the data section's CRC-32 (8 hex digits) in the files we write."""

_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_MAX_HEADER = 100 * 2**20
_CHUNK = 2**20


def _bytes_of(tensor: torch.Tensor) -> memoryview:
    flat = tensor.reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def _prepare(tensors: Mapping[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    prepared = []
    for name, tensor in tensors.items():
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            shown = f"{name!r}: {type(tensor).__name__}"
            raise ConfigurationError(bad_value("tensors", "a mapping of str names to tensors (safetensors holds tensors only)", shown))
        if tensor.dtype not in _NAMES or tensor.layout != torch.strided:
            accepted = "dense tensors of dtype " + ", ".join(str(d).removeprefix("torch.") for d in _NAMES)
            raise ConfigurationError(bad_value(f"tensors[{name}]", accepted, f"{tensor.layout} {tensor.dtype}"))
        prepared.append((name, tensor))
    # Widest elements first: with the header padded to 8 bytes, every tensor starts aligned.
    prepared.sort(key=lambda item: (-item[1].element_size(), item[0]))
    return prepared


def write_safetensors(
    tensors: Mapping[str, torch.Tensor], raw: BinaryIO, metadata: Mapping[str, str] | None = None
) -> None:
    """Write ``tensors`` as a safetensors file into ``raw``, streaming one tensor at a time.

    Tensors on another device or not contiguous are copied to contiguous CPU memory one at a
    time. Tied tensors (one storage under two names) are written once per name, as the format has
    no sharing. ``raw`` is left open and not fsynced.

    Args:
        tensors: Names to tensors (a model's ``state_dict()``).
        raw: A binary file open for writing; need not be seekable.
        metadata: Strings stored in the header's ``__metadata__`` (with :data:`CRC_KEY` added).

    Raises:
        ConfigurationError: A value is not a tensor, or has a dtype or layout safetensors lacks.

    Example:
        >>> with open("model.safetensors", "wb") as raw:  # doctest: +SKIP
        ...     write_safetensors({"w": torch.ones(2)}, raw, {"format": "pt"})
    """
    prepared = _prepare(tensors)
    if sys.byteorder != "little":
        raise ConfigurationError(bad_value("tensors", "tensors on a little-endian machine", sys.byteorder))
    placed: dict[str, object] = {}
    offset = 0
    # The CRC goes in the header, which precedes the data: one pass to checksum, one to write.
    # zlib's CRC-32 reads about 2 GB/s here and releases the GIL.
    for name, tensor in prepared:
        size = tensor.numel() * tensor.element_size()
        placed[name] = {"dtype": _NAMES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    # The header lists the tensors in the caller's order (a state dict's order survives); the
    # data section is in the aligned order.
    entries = {name: placed[name] for name in tensors}
    strings = {str(k): str(v) for k, v in (metadata or {}).items()}
    crc = _header_crc({"__metadata__": strings, **entries})
    for _, tensor in prepared:
        crc = zlib.crc32(_bytes_of(tensor.detach().to("cpu").contiguous()), crc)
    strings[CRC_KEY] = f"{crc:08x}"
    header = json.dumps({"__metadata__": strings, **entries}, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)
    raw.write(struct.pack("<Q", len(header)))
    raw.write(header)
    for _, tensor in prepared:
        raw.write(_bytes_of(tensor.detach().to("cpu").contiguous()))


def _header_crc(header: dict) -> int:
    # Canonical JSON of the parsed header: the writer's and the reader's agree whatever the spacing.
    canonical = dict(header)
    canonical["__metadata__"] = {k: v for k, v in (header.get("__metadata__") or {}).items() if k != CRC_KEY}
    return zlib.crc32(json.dumps(canonical, sort_keys=True, separators=(",", ":")).encode())


def _entries(header: dict, data_size: int, path: Path) -> list[tuple[str, torch.dtype, list[int], int, int]]:
    entries = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = DTYPES[entry["dtype"]]
            shape = [int(n) for n in entry["shape"]]
            begin, end = (int(n) for n in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise CorruptCheckpointError(f"{path} is corrupt: bad safetensors entry for {name!r} ({e!r})") from e
        expected = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        if min(shape, default=0) < 0 or end - begin != expected or begin < 0 or end > data_size:
            raise CorruptCheckpointError(f"{path} is corrupt: safetensors entry {name!r} does not fit its bytes")
        entries.append((name, dtype, shape, begin, end))
    covered = sorted((begin, end) for *_, begin, end in entries)
    position = 0
    for begin, end in covered:
        if begin != position:
            raise CorruptCheckpointError(f"{path} is corrupt: safetensors data has a gap or overlap at byte {begin}")
        position = end
    if position != data_size:
        raise CorruptCheckpointError(f"{path} is corrupt: safetensors data is {data_size} bytes, tensors cover {position}")
    return entries


def read_safetensors(path: Path | str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors file into fresh CPU tensors; check its CRC-32 if it carries ours.

    Returns:
        The tensors (in file header order) and the ``__metadata__`` strings (``{}`` if none).

    Raises:
        CheckpointNotFoundError: ``path`` does not exist.
        CorruptCheckpointError: A malformed header, sizes that do not add up, a short file, or a
            CRC-32 mismatch.

    Example:
        >>> tensors, metadata = read_safetensors("model.safetensors")  # doctest: +SKIP
    """
    path = Path(path)
    try:
        file = open(path, "rb")  # noqa: SIM115 -- closed by the with block right below
    except FileNotFoundError as e:
        raise CheckpointNotFoundError(f"no checkpoint at {path}") from e
    with file:
        size = os.fstat(file.fileno()).st_size
        prefix = file.read(8)
        (length,) = struct.unpack("<Q", prefix) if len(prefix) == 8 else (size,)
        if length > min(_MAX_HEADER, size - 8):
            raise CorruptCheckpointError(f"{path} is corrupt: safetensors header length {length} exceeds the file")
        try:
            header = json.loads(file.read(length))
            metadata = header.get("__metadata__") or {}
            if not isinstance(header, dict) or not isinstance(metadata, dict):
                raise ValueError("the header is not a JSON object")
        except (ValueError, UnicodeDecodeError, AttributeError) as e:
            raise CorruptCheckpointError(f"{path} is corrupt: unreadable safetensors header ({e})") from e
        entries = _entries(header, size - 8 - length, path)
        tensors: dict[str, torch.Tensor] = {}
        crc = _header_crc(header)
        for name, dtype, shape, begin, end in sorted(entries, key=lambda e: e[3]):
            tensor = torch.empty(shape, dtype=dtype)
            view = _bytes_of(tensor)
            file.seek(8 + length + begin)
            filled = 0
            while filled < end - begin:
                n = file.readinto(view[filled : filled + _CHUNK])
                if not n:
                    raise CorruptCheckpointError(f"{path} is corrupt: the file ends inside tensor {name!r}")
                filled += n
            crc = zlib.crc32(view, crc)
            tensors[name] = tensor
    expected = metadata.get(CRC_KEY)
    if expected is not None and expected != f"{crc:08x}":
        raise CorruptCheckpointError(f"{path} is corrupt: it fails its CRC-32 check ({crc:08x}, expected {expected})")
    order = [e[0] for e in entries]
    return {name: tensors[name] for name in order}, {str(k): str(v) for k, v in metadata.items()}
