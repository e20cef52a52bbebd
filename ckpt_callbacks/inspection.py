"""What is inside a checkpoint, whatever its format: ``ckpt-callbacks inspect``.

:func:`identify` says what a path IS, from its bytes, never its name: a ``torch.save`` zip, a tar
bundle or a safetensors file, each possibly compressed (``torch+zstd``, ``tar+gzip``), a DCP folder
(``dcp``: it has a ``.metadata`` index) or another folder of files (``folder``: a Hugging Face
``checkpoint-N/``, say). :func:`describe` reads it as cheaply as the format allows and returns a
:class:`Description`: the metadata (versions, timestamp, world size, run name), the top-level keys,
and every tensor with its shape, dtype and bytes, grouped into sections (``state/model``,
``state/optimizers``, ``rng``) with totals.

How each format is read:

- ``torch.save`` files load with ``torch.load(weights_only=True)`` and ``mmap=True``
  (:func:`~ckpt_callbacks.serialization.read_state`): shapes and dtypes come without touching the
  tensor bytes. A file holding objects outside the safe-load allowlist (a trainer's pickled
  hyper-parameters) is not loaded: its description lists those classes and its storage records.
- safetensors files: only the JSON header is read.
- DCP folders: the index, unpickled with DCP's classes only (:mod:`ckpt_callbacks.dcp_index`), plus
  ``extras.pt`` and ``ckpt_callbacks.json`` when the folder is ours.
- other folders: each checkpoint file in it, as a section named after the file.
"""

from __future__ import annotations

import json
import struct
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ckpt_callbacks import dcp_index
from ckpt_callbacks.decoding import open_decoded
from ckpt_callbacks.errors import CorruptCheckpointError
from ckpt_callbacks.record import FOLDER_METADATA
from ckpt_callbacks.safetensors_format import DTYPES
from ckpt_callbacks.serialization import SAFE_GLOBALS, read_state
from ckpt_callbacks.sharded import EXTRAS, is_sharded_checkpoint

__all__ = [
    "METADATA_KEY",
    "Description",
    "FormatInfo",
    "TensorEntry",
    "TreeNode",
    "describe",
    "foreign_globals",
    "identify",
    "safetensors_header",
    "tensor_tree",
]

METADATA_KEY = "ckpt_callbacks"
"""Key of our metadata (JSON) in a safetensors header's ``__metadata__``."""

_KINDS = {"zip": "torch", "tar": "tar", "safetensors": "safetensors"}
_HEADER_MAX = 100 * 2**20
_SAFE_NAMES = frozenset(f"{t.__module__}.{t.__qualname__}" for t in SAFE_GLOBALS)


@dataclass(frozen=True)
class FormatInfo:
    """What a checkpoint path is.

    Attributes:
        container: ``'torch'`` (a ``torch.save`` zip), ``'tar'``, ``'safetensors'``, ``'dcp'`` or
            ``'folder'``.
        codec: The compression around it (``'zstd'``, ``'gzip'``, ...), or None.
        checksummed: Whether the codec checks its content (every codec but ``lzma``).

    Example:
        >>> FormatInfo("torch", "zstd", True).label
        'torch+zstd'
    """

    container: str
    codec: str | None = None
    checksummed: bool = False

    @property
    def label(self) -> str:
        """``container`` or ``container+codec``: what ``ls`` and ``inspect`` show."""
        return self.container if self.codec is None else f"{self.container}+{self.codec}"


def identify(path: Path) -> FormatInfo:
    """Say what ``path`` is from its bytes (a compressed file's content is sniffed too).

    Raises:
        CheckpointNotFoundError: Nothing at ``path``.
        CorruptCheckpointError: A file of no known checkpoint format.
        UnsupportedFormatError: zstd or lz4 content without that package installed.

    Example:
        >>> identify(Path("checkpoints/ep1-ba10-rank0.pt.gz")).label  # doctest: +SKIP
        'torch+gzip'
    """
    path = Path(path)
    if path.is_dir():
        return FormatInfo("dcp" if is_sharded_checkpoint(path) else "folder")
    with open_decoded(path) as decoded:
        codec = decoded.codec
        return FormatInfo(_KINDS[decoded.kind], None if codec is None else codec.name, bool(codec and codec.checksummed))


@dataclass(frozen=True)
class TensorEntry:
    """One tensor: where it sits in the checkpoint, its shape, dtype and size.

    Attributes:
        keys: The keys leading to it (``('state', 'model', '0.weight')``).
        shape: Its shape.
        dtype: Its dtype without the ``torch.`` prefix (``'float32'``).
        nbytes: Its size in bytes.

    Example:
        >>> TensorEntry(("state", "model", "0.weight"), (8, 4), "float32", 128).name
        'state/model/0.weight'
    """

    keys: tuple[str, ...]
    shape: tuple[int, ...]
    dtype: str
    nbytes: int

    @property
    def name(self) -> str:
        """The keys joined with ``/``."""
        return "/".join(self.keys)

    @property
    def section(self) -> str:
        """The part of the checkpoint it belongs to: ``state/<part>`` in our layout, else the first key."""
        if len(self.keys) > 2 and self.keys[0] == "state":
            return "/".join(self.keys[:2])
        return self.keys[0] if len(self.keys) > 1 else "(top level)"

    @classmethod
    def of(cls, keys: Iterable[str], tensor: torch.Tensor) -> TensorEntry:
        """The entry of ``tensor`` (no byte of its data is read)."""
        shape = tuple(tensor.shape)
        return cls(tuple(keys), shape, str(tensor.dtype).removeprefix("torch."), tensor.numel() * tensor.element_size())


@dataclass
class Description:
    """Everything :func:`describe` found out about a checkpoint.

    Attributes:
        path: The checkpoint described.
        format: Its format label (:attr:`FormatInfo.label`).
        size: Bytes on disk (every file of a folder).
        metadata: Our metadata (``schema_version``, versions, ``timestamp``, ``world_size``,
            ``run_name``, ...); for other files, their top-level plain values.
        keys: Top-level keys, each with the keys one level below (``{'state': ['model', ...]}``).
        tensors: Every tensor, in checkpoint order.
        notes: What could not be read, and why.

    Example:
        >>> description = describe(Path("checkpoints/ep1-ba10-rank0.pt"))  # doctest: +SKIP
        >>> description.sections()[0]  # doctest: +SKIP
        ('state/model', 4, 164)
    """

    path: str
    format: str
    size: int
    metadata: dict[str, Any] = field(default_factory=dict)
    keys: dict[str, list[str]] = field(default_factory=dict)
    tensors: list[TensorEntry] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def sections(self) -> list[tuple[str, int, int]]:
        """``(section, tensor count, bytes)`` for each section, in order of first appearance."""
        totals: dict[str, list[int]] = {}
        for entry in self.tensors:
            total = totals.setdefault(entry.section, [0, 0])
            total[0] += 1
            total[1] += entry.nbytes
        return [(name, count, nbytes) for name, (count, nbytes) in totals.items()]

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (what ``inspect --json`` prints)."""
        return {
            "path": self.path,
            "format": self.format,
            "size": self.size,
            "metadata": json.loads(json.dumps(self.metadata, default=str)),
            "keys": self.keys,
            "sections": [{"name": n, "tensors": c, "bytes": b} for n, c, b in self.sections()],
            "total": {"tensors": len(self.tensors), "bytes": sum(t.nbytes for t in self.tensors)},
            "tensors": [
                {"name": t.name, "shape": list(t.shape), "dtype": t.dtype, "bytes": t.nbytes} for t in self.tensors
            ],
            "notes": self.notes,
        }


@dataclass
class TreeNode:
    """A node of the tensor tree: dict keys, and the dotted parts of a key, are levels.

    Example:
        >>> root = tensor_tree([TensorEntry(("model", "0.weight"), (8, 4), "float32", 128)])
        >>> root.children["model"].children["0"].children["weight"].tensor.shape
        (8, 4)
    """

    name: str
    tensors: int = 0
    nbytes: int = 0
    tensor: TensorEntry | None = None
    children: dict[str, TreeNode] = field(default_factory=dict)


def tensor_tree(entries: Iterable[TensorEntry]) -> TreeNode:
    """Arrange tensors in a tree with counts and bytes at every node.

    Example:
        >>> tensor_tree([TensorEntry(("model", "w"), (2,), "float32", 8)]).nbytes
        8
    """
    root = TreeNode("")
    for entry in entries:
        node = root
        node.tensors, node.nbytes = node.tensors + 1, node.nbytes + entry.nbytes
        for part in (piece for key in entry.keys for piece in key.split(".")):
            node = node.children.setdefault(part, TreeNode(part))
            node.tensors, node.nbytes = node.tensors + 1, node.nbytes + entry.nbytes
        node.tensor = entry
    return root


def describe(path: Path) -> Description:
    """Describe a checkpoint file or folder of any known format (see the module docstring).

    Raises:
        CheckpointNotFoundError: Nothing at ``path``.
        CorruptCheckpointError: It cannot be read as any checkpoint format.

    Example:
        >>> describe(Path("checkpoints/latest-rank0.pt")).metadata["run_name"]  # doctest: +SKIP
        'awesome-training-run'
    """
    path = Path(path)
    fmt = identify(path)
    if fmt.container == "dcp":
        description = _describe_dcp(path)
    elif fmt.container == "folder":
        description = _describe_folder(path)
    elif fmt.container == "safetensors" and fmt.codec is None:
        description = _describe_safetensors(path)
    else:
        description = _describe_loaded(path)
    description.format = fmt.label
    description.size = _disk_size(path)
    return description


def _disk_size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def _walk(obj: Any, keys: tuple[str, ...], found: list[TensorEntry]) -> None:
    if isinstance(obj, torch.Tensor):
        found.append(TensorEntry.of(keys, obj))
    elif isinstance(obj, Mapping):
        for key, value in obj.items():
            _walk(value, (*keys, str(key)), found)
    elif isinstance(obj, (list, tuple)):
        for index, value in enumerate(obj):
            _walk(value, (*keys, str(index)), found)


def _plain(value: Any) -> bool:
    return isinstance(value, (str, int, float, bool)) or value is None


def _fill(description: Description, checkpoint: Mapping[str, Any]) -> None:
    """Metadata, keys and tensors of a loaded checkpoint dict."""
    body = checkpoint.get("state")
    if isinstance(body, Mapping) and isinstance(body.get("metadata"), Mapping):
        description.metadata = dict(body["metadata"])
    else:
        description.metadata = {str(k): v for k, v in checkpoint.items() if _plain(v)}
    description.keys = {
        str(key): [str(k) for k in value] if isinstance(value, Mapping) else [] for key, value in checkpoint.items()
    }
    _walk(checkpoint, (), description.tensors)


def _describe_loaded(path: Path) -> Description:
    description = Description(str(path), "", 0)
    try:
        checkpoint = read_state(path)
    except CorruptCheckpointError:
        foreign = foreign_globals(path)
        if not foreign:
            raise
        description.notes.append(
            f"not loaded: it holds objects outside the safe-load allowlist ({', '.join(foreign)}), and "
            "loading them would run their code"
        )
        description.notes.extend(_storage_summary(path))
        return description
    _fill(description, checkpoint)
    return description


def foreign_globals(path: Path) -> list[str]:
    """The classes and functions a plain ``torch.save`` file names beyond the safe-load allowlist.

    Found by reading the pickle's opcodes, never by unpickling. ``[]`` for a file that is not a
    plain (uncompressed) ``torch.save`` zip, or whose pickle cannot even be parsed.

    Example:
        >>> foreign_globals(Path("lightning_logs/version_0/checkpoints/epoch=1-step=10.ckpt"))  # doctest: +SKIP
        ['lightning.fabric.utilities.data.AttributeDict']
    """
    if not zipfile.is_zipfile(path):
        return []
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # a damaged or non-torch zip: nothing to report
        return []
    return sorted(name for name in names if name not in _SAFE_NAMES)


def _storage_summary(path: Path) -> list[str]:
    with zipfile.ZipFile(path) as archive:
        records = [m for m in archive.infolist() if "/data/" in m.filename and not m.filename.endswith("/")]
    return [f"{len(records)} tensor storages, {sum(m.file_size for m in records)} bytes"]


def safetensors_header(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """The tensor entries and the ``__metadata__`` strings of an uncompressed safetensors file.

    Raises:
        CorruptCheckpointError: A header that does not parse or does not fit in the file.

    Example:
        >>> entries, strings = safetensors_header(Path("model.safetensors"))  # doctest: +SKIP
        >>> entries["0.weight"]["shape"]  # doctest: +SKIP
        [8, 4]
    """
    with open(path, "rb") as file:
        size = file.seek(0, 2)
        file.seek(0)
        prefix = file.read(8)
        (length,) = struct.unpack("<Q", prefix) if len(prefix) == 8 else (size,)
        if length > min(_HEADER_MAX, size - 8):
            raise CorruptCheckpointError(f"{path} is corrupt: its safetensors header length {length} exceeds the file")
        try:
            header = json.loads(file.read(length))
        except (ValueError, UnicodeDecodeError) as e:
            raise CorruptCheckpointError(f"{path} is corrupt: unreadable safetensors header ({e})") from e
    if not isinstance(header, dict):
        raise CorruptCheckpointError(f"{path} is corrupt: its safetensors header is not a JSON object")
    strings = header.pop("__metadata__", None) or {}
    return header, {str(k): str(v) for k, v in strings.items()}


def _describe_safetensors(path: Path) -> Description:
    entries, strings = safetensors_header(path)
    description = Description(str(path), "", 0)
    try:
        description.metadata = json.loads(strings[METADATA_KEY]) if METADATA_KEY in strings else dict(strings)
    except ValueError:
        description.metadata = dict(strings)
    description.keys = {name: [] for name in entries}
    for name, entry in entries.items():
        begin, end = entry.get("data_offsets", (0, 0))
        dtype = DTYPES.get(entry.get("dtype"))
        shown = str(dtype).removeprefix("torch.") if dtype is not None else str(entry.get("dtype"))
        description.tensors.append(TensorEntry((name,), tuple(entry.get("shape", ())), shown, int(end) - int(begin)))
    return description


def _describe_dcp(path: Path) -> Description:
    index, _ = dcp_index.check_folder(path)
    description = Description(str(path), "", 0)
    for tensor in dcp_index.tensors_in(index):
        parts = tuple(tensor.name.split(".", 1))
        description.tensors.append(TensorEntry(parts, tensor.shape, str(tensor.dtype).removeprefix("torch."), tensor.nbytes))
    tops: dict[str, list[str]] = {}
    for name in index.state_dict_metadata:
        top, _, rest = str(name).partition(".")
        child = rest.split(".", 1)[0]
        if child and child not in tops.setdefault(top, []):
            tops[top].append(child)
        tops.setdefault(top, [])
    description.keys = tops
    if (path / FOLDER_METADATA).is_file():
        description.metadata = json.loads((path / FOLDER_METADATA).read_text())
    if (path / EXTRAS).is_file():
        extras = read_state(path / EXTRAS)
        extra_tensors: list[TensorEntry] = []
        _walk(extras, (EXTRAS,), extra_tensors)
        description.tensors.extend(extra_tensors)
        description.keys[EXTRAS] = [str(k) for k in extras]
    return description


def _describe_folder(path: Path) -> Description:
    description = Description(str(path), "", 0)
    for file in sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith(".")):
        relative = file.relative_to(path).as_posix()
        try:
            inner = describe(file)
        except CorruptCheckpointError:
            description.keys[relative] = []
            continue
        description.keys[relative] = sorted(inner.keys)
        description.tensors.extend(TensorEntry((relative, *t.keys), t.shape, t.dtype, t.nbytes) for t in inner.tensors)
        description.notes.extend(f"{relative}: {note}" for note in inner.notes)
        if inner.metadata and not description.metadata:
            description.metadata = inner.metadata
    return description
