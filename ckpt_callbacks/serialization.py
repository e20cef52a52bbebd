"""Checkpoint dicts to bytes and back: streaming torch.save, safe torch.load, integrity checks, ignore_keys.

Writing streams ``torch.save`` into the format the file name chose (:mod:`ckpt_callbacks.codecs`),
so a checkpoint is never built in memory twice: straight into the codec's writer for ``.pt.zst``
and friends; via a staged member for a tar bundle (:mod:`ckpt_callbacks.archive`: a tar header
states the member's size before its data); tensor by tensor for ``.safetensors``
(:mod:`ckpt_callbacks.safetensors_format`).

``torch.save`` spends about half its time on the CRC-32 of every zip member, which a codec with its
own checksum makes redundant, so for those codecs it is switched off. The switch
(``torch.utils.serialization.config.save.compute_crc32``) is process-global, so every ``torch.save``
of this library runs under one lock that sets it as the file needs; a plain ``.pt`` (and LZMA-alone,
which has no checksum) keeps its CRCs. A ``torch.save`` that other code runs in another thread
during one of our compressed saves would also skip its CRCs.

Reading always uses ``torch.load(weights_only=True)`` with a short, explicit allowlist: a checkpoint
is data and never runs code, whoever wrote it. A compressed file (or a tar's member) is decoded into
a temp file next to it and loaded with ``mmap=True``, so the checkpoint is in memory once, as page
cache, not twice. Every way an existing file can fail to load (truncated, garbage, bit flips, foreign
objects) surfaces as one :class:`~ckpt_callbacks.errors.CorruptCheckpointError` naming the file.

``torch.load`` does not check the zip CRC-32s, so a flipped bit inside a tensor of a plain ``.pt``
loads silently; :func:`verify_file` checks them (or the codec's checksum, for compressed files).

``ignore_keys`` follows Composer's glob semantics (see :func:`apply_ignore_keys`).
"""

from __future__ import annotations

import datetime
import fnmatch
import json
import os
import pickle
import re
import shutil
import tempfile
import threading
import warnings
import zipfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, BinaryIO, Union

import torch
from torch.torch_version import TorchVersion

from ckpt_callbacks import archive
from ckpt_callbacks.codecs import SNIFF_BYTES, CheckpointFormat, sniff
from ckpt_callbacks.decoding import open_decoded
from ckpt_callbacks.errors import ConfigurationError, CorruptCheckpointError, bad_value
from ckpt_callbacks.safetensors_format import read_safetensors, write_safetensors
from ckpt_callbacks.temp_files import temp_path_for

__all__ = [
    "SAFE_GLOBALS",
    "SCHEMA_VERSION",
    "IgnoreKeys",
    "MapLocation",
    "apply_ignore_keys",
    "check_ignore_keys",
    "read_state",
    "verify_file",
    "write_state",
]

SCHEMA_VERSION = 1
"""Version of the checkpoint layout (DESIGN.md 4b), stored in ``state['metadata']``."""

SAFE_GLOBALS: tuple[type, ...] = (datetime.timedelta, TorchVersion)
"""The only non-tensor types a checkpoint may hold beyond what ``weights_only`` allows by default:
Composer timestamps' wall-clock fields, and ``torch.__version__`` in metadata."""

IgnoreKeys = Union[Sequence[str], Callable[[dict], None], None]
"""What ``ignore_keys`` accepts: globs such as ``['state/optimizers']``, a callable, or None."""

MapLocation = Union[str, torch.device, dict[str, str], Callable[..., Any], None]
"""Where loaded tensors go, as ``torch.load``'s ``map_location`` takes it (default ``'cpu'``)."""

_CHUNK = 2**20
_COPY_BYTES = 4 * 2**20
# torch's safe_globals adds to a process-wide set on entry and removes from it on exit: without
# the lock, one thread's exit would strip the allowlist from another thread's load in progress.
_LOAD_LOCK = threading.Lock()
# Guards torch's process-global compute_crc32 switch for the whole of each torch.save we run.
_SAVE_LOCK = threading.Lock()
_SAFE_GLOBAL_NAMES = frozenset(f"{t.__module__}.{t.__qualname__}" for t in SAFE_GLOBALS)
# A tar member up to this size is staged in memory; a larger one in an unnamed temp file in the
# destination folder (the file system that is about to hold the checkpoint anyway).
_STAGE_IN_MEMORY = 64 * 2**20
_METADATA_KEY = "ckpt_callbacks"


def write_state(obj: dict, raw: BinaryIO, fmt: CheckpointFormat, level: int | None = None) -> None:
    """Serialize a checkpoint dict into ``raw`` in the format ``fmt`` says, in one streaming pass.

    ``raw`` is left open and unflushed-to-disk: committing it (flush, fsync, rename) is the
    caller's job. ``raw`` need not be seekable. For a tar format the member is staged first, in
    memory up to 64 MiB, else in an unnamed temp file in ``raw``'s folder (``raw.name``).

    Args:
        obj: The checkpoint dict. For ``.safetensors``: ``{'state': {'model': tensors,
            'metadata': {...}}}`` only (a weights-only checkpoint).
        raw: A binary file open for writing.
        fmt: The format, from :func:`~ckpt_callbacks.codecs.checkpoint_format`.
        level: Compression level; ``None`` is the codec's default.

    Raises:
        ConfigurationError: ``obj`` is not a dict (or, for safetensors, holds more than tensors
            and metadata), or ``level`` is given for an uncompressed format or is out of range.

    Example:
        >>> with open("ep1.pt.zst", "wb") as f:  # doctest: +SKIP
        ...     write_state({"state": {"model": model.state_dict()}}, f, checkpoint_format("ep1.pt.zst"))
    """
    if not isinstance(obj, dict):
        raise ConfigurationError(bad_value("obj", "a checkpoint dict", type(obj).__name__))
    if fmt.codec is None and level is not None:
        raise ConfigurationError(bad_value("compression_level", "None for an uncompressed format", level))
    if fmt.tensors_only:
        _write_safetensors(obj, raw)
    elif fmt.container == "tar":
        if fmt.codec is not None:
            fmt.codec.check_level(level)  # before the member is serialized, not after
        name = getattr(raw, "name", None)  # an int for a pipe or socket
        folder = (os.path.dirname(name) or None) if isinstance(name, str) else None
        with tempfile.SpooledTemporaryFile(max_size=_STAGE_IN_MEMORY, dir=folder) as staged:
            _torch_save(obj, staged, crc=not fmt.checksummed)
            size = staged.tell()
            staged.seek(0)
            archive.write_member(raw, fmt, staged, size, level=level)  # type: ignore[arg-type]
    elif fmt.codec is None:
        _torch_save(obj, raw, crc=True)
    else:
        with fmt.codec.open_writer(raw, level) as writer:
            _torch_save(obj, writer, crc=not fmt.checksummed)


def _torch_save(obj: dict, file: IO[bytes], *, crc: bool) -> None:
    with _SAVE_LOCK:
        previous = torch.serialization.get_crc32_options()
        torch.serialization.set_crc32_options(crc)
        try:
            torch.save(obj, file)
        finally:
            torch.serialization.set_crc32_options(previous)


def _write_safetensors(obj: dict, raw: BinaryIO) -> None:
    body = obj.get("state")
    extra = sorted(set(obj) - {"state"}) + (sorted(set(body) - {"model", "metadata"}) if isinstance(body, dict) else [])
    if not isinstance(body, dict) or not isinstance(body.get("model"), dict) or extra:
        accepted = "a weights-only checkpoint {'state': {'model': tensors, 'metadata': {...}}} for .safetensors"
        raise ConfigurationError(bad_value("obj", accepted, f"keys {extra}" if extra else type(body).__name__))
    metadata = {"format": "pt", _METADATA_KEY: json.dumps(body.get("metadata", {}), default=str)}
    write_safetensors(body["model"], raw, metadata)


def read_state(path: Path | str, *, map_location: MapLocation = "cpu", check_crc: bool = False) -> dict:
    """Load a checkpoint file of any known format, safely (``weights_only=True``, a fixed allowlist).

    Plain, compressed, tar (member ``checkpoint.pt``, or Composer's ``composer_states.pt``) and
    safetensors files all load, whatever they are called. A safetensors file comes back as
    ``{'state': {'model': tensors, 'metadata': {...}}}``. Tensors of a ``torch.save`` file are
    memory-mapped (``torch.load(mmap=True)``) from the file itself or from its decoded temp copy.

    Args:
        path: The checkpoint file; its format is sniffed from its bytes, not its name.
        map_location: Where tensors go, as in ``torch.load``.
        check_crc: Also check the CRC-32 of every zip member a codec's checksum does not cover
            (one more read of the file): ``torch.load`` alone loads a flipped bit in a tensor of a
            plain ``.pt`` silently.

    Raises:
        CheckpointNotFoundError: ``path`` does not exist.
        CorruptCheckpointError: The file exists but does not load (truncated, garbage, bad pickle,
            objects outside :data:`SAFE_GLOBALS`, a failed CRC with ``check_crc``), or does not hold a dict.

    Example:
        >>> state = read_state("checkpoints/ep1-ba10-rank0.pt.zst")  # doctest: +SKIP
        >>> state["state"]["metadata"]["schema_version"]  # doctest: +SKIP
        1
    """
    path = Path(path)
    with _payload(path) as payload:
        if payload.kind == "safetensors":
            return _read_safetensors(payload.file, path)
        if check_crc and not payload.checksummed:
            _check_zip_members(payload.file, path)
        return _load(payload.file, path, map_location)


def verify_file(path: Path | str) -> None:
    """Check a checkpoint file's integrity end to end; return only if it is sound.

    Decodes it fully (compressed streams carry their own checksums, except LZMA-alone), checks
    the CRC-32 of every member of the ``torch.save`` zip archive unless a checksummed codec wraps
    it (we write those without CRCs), then loads it as :func:`read_state` does. A plain zip whose
    members all record CRC 0 was written without CRCs (e.g. decompressed from our ``.pt.zst``):
    it has nothing to compare, so only the load check applies. safetensors files we wrote carry a
    CRC-32 of their data, checked on every read.

    Raises:
        CheckpointNotFoundError: ``path`` does not exist.
        CorruptCheckpointError: With a message saying what failed, e.g. which member's CRC.

    Example:
        >>> verify_file("checkpoints/latest-rank0.pt")  # doctest: +SKIP
    """
    path = Path(path)
    with _payload(path) as payload:
        if payload.kind == "safetensors":
            _read_safetensors(payload.file, path)
            return
        if not payload.checksummed:
            _check_zip_members(payload.file, path)
        _load(payload.file, path, "cpu")


@dataclass(frozen=True)
class _Payload:
    kind: str  # 'zip' or 'safetensors'
    file: str  # a plain file on disk: the checkpoint itself or its decoded temp copy
    checksummed: bool  # a codec's checksum covered these bytes


@contextmanager
def _payload(path: Path) -> Iterator[_Payload]:
    """The checkpoint's torch.save (or safetensors) bytes as a file on disk, decoded if need be."""
    with open_decoded(path) as decoded:
        checksummed = decoded.codec is not None and decoded.codec.checksummed
        if decoded.kind != "tar" and decoded.codec is None:
            yield _Payload(decoded.kind, str(path), False)
            return
        with _spill(path) as (temp, out):
            if decoded.kind == "tar":
                archive.copy_member(decoded.stream, out, source=path)
                # Read to the end so the codec checks its checksum, which covers the member.
                while decoded.stream.read(_CHUNK):
                    pass
            else:
                # One thread: decoding and writing on two threads measured slower here once other
                # jobs share the cores (GIL hand-offs), and no faster on an idle machine.
                shutil.copyfileobj(decoded.stream, out, _COPY_BYTES)
            out.flush()
            out.seek(0)
            kind = sniff(out.read(SNIFF_BYTES))
            if kind not in ("zip", "safetensors"):
                raise CorruptCheckpointError(f"{path} is not a checkpoint: its tar member is neither torch.save nor safetensors")
            yield _Payload(kind, temp, checksummed)


@contextmanager
def _spill(path: Path) -> Iterator[tuple[str, BinaryIO]]:
    # Decoded bytes go next to the checkpoint: that file system just held a checkpoint, while /tmp
    # on training nodes is often a small RAM-backed tmpfs. The temp name carries host and pid, so a
    # saver's stale-temp sweep removes what a crash leaves. A read-only folder (a mounted dataset)
    # falls back to the system temp dir. torch.load(mmap=True) needs a path, hence a named file;
    # it is unlinked right after loading and the mapping stays valid.
    if os.access(path.parent, os.W_OK | os.X_OK):
        temp = temp_path_for(path.parent / ("decoded-" + path.name))
        out = open(temp, "w+b")  # noqa: SIM115 -- closed in the finally block
    else:
        fd, name = tempfile.mkstemp(prefix=".decoded-", suffix=".tmp")
        temp, out = Path(name), os.fdopen(fd, "w+b")
    try:
        yield str(temp), out
    finally:
        out.close()
        temp.unlink(missing_ok=True)


def _read_safetensors(file: str, path: Path) -> dict:
    try:
        tensors, strings = read_safetensors(file)
    except CorruptCheckpointError as e:
        raise CorruptCheckpointError(str(e).replace(file, str(path))) from e.__cause__
    try:
        metadata = json.loads(strings[_METADATA_KEY]) if _METADATA_KEY in strings else dict(strings)
    except ValueError as e:
        raise CorruptCheckpointError(f"{path} is corrupt: unreadable metadata in its safetensors header ({e})") from e
    return {"state": {"model": tensors, "metadata": metadata}}


def _check_zip_members(file: str, path: Path) -> None:
    try:
        archive_ = zipfile.ZipFile(file)
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        raise CorruptCheckpointError(f"{path} is corrupt: not a readable torch.save zip archive ({e})") from e
    with archive_:
        members = archive_.infolist()
        if all(m.CRC == 0 for m in members if m.file_size):
            return  # written without CRCs: nothing to compare, the load check still runs
        for member in members:
            try:
                with archive_.open(member) as data:
                    while data.read(_CHUNK):
                        pass
            # zipfile raises BadZipFile for a CRC mismatch but EOFError, OSError, zlib.error... for
            # other damage; all of them mean this member is not what was written.
            except Exception as e:
                raise CorruptCheckpointError(
                    f"{path} is corrupt: zip member {member.filename!r} failed its check ({e})"
                ) from e


def _load(file: str, path: Path, map_location: MapLocation) -> dict:
    try:
        with _LOAD_LOCK, torch.serialization.safe_globals(list(SAFE_GLOBALS)):
            # weights_only is passed explicitly: TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD flips the default.
            obj = torch.load(file, map_location=map_location, weights_only=True, mmap=True)
    except Exception as e:  # torch surfaces damage as RuntimeError, UnpicklingError, EOFError, ...
        foreign = _foreign_globals(file) if isinstance(e, pickle.UnpicklingError) else []
        if foreign:
            allowed = ", ".join(sorted(_SAFE_GLOBAL_NAMES))
            raise CorruptCheckpointError(
                f"{path} contains objects outside the allowlist ({', '.join(foreign)}): a checkpoint never "
                f"runs code, so only tensors, plain containers and {allowed} are loaded"
            ) from e
        reason = (str(e).strip().splitlines() or [""])[0]
        reason = reason if len(reason) <= 200 else reason[:200] + "..."
        raise CorruptCheckpointError(f"{path} is corrupt: torch.load failed ({type(e).__name__}: {reason})") from e
    if not isinstance(obj, dict):
        raise CorruptCheckpointError(f"{path} is not a checkpoint: it holds a {type(obj).__name__}, not a dict")
    return obj


def _foreign_globals(file: str) -> list[str]:
    """The globals the pickle in ``file`` references beyond the default and our allowlist."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(file)
    except Exception:  # a damaged pickle is reported as damage by the caller
        return []
    return [name for name in names if name not in _SAFE_GLOBAL_NAMES]


def check_ignore_keys(
    value: object, *, argument: str = "ignore_keys"
) -> tuple[str, ...] | Callable[[dict], None] | None:
    """Validate an ``ignore_keys`` argument at construction time and return it normalised.

    Args:
        value: None, a list or tuple of non-empty glob strings, or a callable mutating the dict.
        argument: The argument named in error messages.

    Returns:
        None, a tuple of globs, or the callable.

    Raises:
        ConfigurationError: A bare string (did you mean ``['<value>']``?), an empty or non-str
            glob, or any other type.

    Example:
        >>> check_ignore_keys(["state/optimizers", "rng"])
        ('state/optimizers', 'rng')
    """
    if value is None or callable(value):
        return value  # type: ignore[return-value]
    if isinstance(value, str):
        raise ConfigurationError(bad_value(argument, f"a list of globs such as [{value!r}], not a bare string", value))
    if isinstance(value, (list, tuple)):
        for index, glob in enumerate(value):
            if not isinstance(glob, str) or not glob:
                raise ConfigurationError(
                    bad_value(f"{argument}[{index}]", "a non-empty glob string such as 'state/model/*'", glob)
                )
        return tuple(value)
    raise ConfigurationError(
        bad_value(argument, "None, a list of globs such as ['state/optimizers'] or a callable(state_dict)", value)
    )


def apply_ignore_keys(state: dict, ignore_keys: IgnoreKeys) -> None:
    """Remove the parts of a checkpoint dict that ``ignore_keys`` names, in place (Composer semantics).

    Each glob is matched (``fnmatch``, case-sensitive, ``*`` also crosses ``/``) against the
    ``/``-joined path of every node of the dict: intermediate nodes too, dict keys as ``str(key)``,
    list elements by index (``state/model``, ``state/model/layer1.weight``, ``state/optimizers/0``).
    Every matched node is deleted, deepest first and list elements from the highest index down,
    so ``['state/optimizers/0', 'state/optimizers/1']`` empties a two-element list. A glob that
    matches nothing draws a ``UserWarning``. Afterwards a top-level ``'state'`` key always exists
    (``'*'`` leaves ``{'state': {}}``), as in Composer. A callable is called with the dict and
    mutates it itself.

    Args:
        state: The checkpoint dict (``{'state': {...}, 'rng': [...]}``).
        ignore_keys: Globs, a callable, or None (nothing to do).

    Raises:
        ConfigurationError: ``ignore_keys`` is malformed (see :func:`check_ignore_keys`).

    Example:
        >>> ckpt = {"state": {"model": {"w": 1}, "optimizers": [{}, {}]}, "rng": [0]}
        >>> apply_ignore_keys(ckpt, ["state/optimizers/*", "rng"])
        >>> ckpt
        {'state': {'model': {'w': 1}, 'optimizers': []}}
    """
    checked = check_ignore_keys(ignore_keys)
    if checked is None:
        return
    if callable(checked):
        checked(state)
        return
    if not checked:
        return
    nodes = _flatten(state)
    doomed: dict[tuple[Any, ...], bool] = {}
    for glob in checked:
        matches = re.compile(fnmatch.translate(glob)).match
        hits = [(keys, in_list) for text, keys, in_list in nodes if matches(text)]
        if not hits:
            warnings.warn(
                f"'ignore_keys' glob {glob!r} matched nothing in the checkpoint; nothing was removed for it",
                UserWarning,
                stacklevel=2,
            )
        doomed.update(hits)
    # Deepest first, so no deletion moves a path still to be deleted; within a list the highest
    # index first, so the indices below it stay valid.
    order = sorted(doomed.items(), key=lambda item: (len(item[0]), item[0][-1] if item[1] else -1), reverse=True)
    for keys, _ in order:
        parent: Any = state
        for key in keys[:-1]:
            parent = parent[key]
        del parent[keys[-1]]
    state.setdefault("state", {})


def _flatten(root: dict) -> list[tuple[str, tuple[Any, ...], bool]]:
    """Every node below ``root`` as (``/``-joined path, the keys leading to it, is a list element)."""
    nodes: list[tuple[str, tuple[Any, ...], bool]] = []
    stack: list[tuple[Any, str, tuple[Any, ...]]] = [(root, "", ())]
    while stack:
        node, text, keys = stack.pop()
        if isinstance(node, dict):
            children = [(key, str(key), False) for key in node]
        elif isinstance(node, list):
            children = [(index, str(index), True) for index in range(len(node))]
        else:
            continue
        for key, name, in_list in children:
            child_text = f"{text}/{name}" if keys else name
            child_keys = (*keys, key)
            nodes.append((child_text, child_keys, in_list))
            stack.append((node[key], child_text, child_keys))
    return nodes
