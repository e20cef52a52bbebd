"""Which checkpoints exist under a folder or a remote prefix: ``ckpt-callbacks ls``.

Local folders are walked (symlinked folders are not followed). What each checkpoint is comes from
the best source at hand, in this order:

1. **the savers' records** (``.ckpt-record-*.json``, :mod:`ckpt_callbacks.record`): save sequence,
   timestamp, size, weights-only or full, wall-clock time, for every checkpoint a saver wrote;
2. **the checkpoint's own metadata**, where reading it is cheap: a plain ``torch.save`` file (its
   pickle, tensors memory-mapped, never read), a safetensors header, a DCP folder's
   ``ckpt_callbacks.json``. Compressed files are not decoded just to be listed;
3. **the name**: ``ep3``, ``epoch=3``, ``ba500``, ``step500``, ``checkpoint-500`` and the like.

Files are recognised by their bytes (:func:`~ckpt_callbacks.inspection.identify`); folders are
checkpoints when they hold a DCP index or a Hugging Face ``trainer_state.json``. ``latest`` (and
``best``) symlinks and pointer files mark what they point at.

In an object store (any URI :func:`~ckpt_callbacks.remote.open_store` opens) keys are listed under
the prefix and sizes come from the store. A saver's **manifest** (``<key>.manifest.json``, its
remote commit marker) gives the timestamp, weights-only flag and save time; a checkpoint without
one, next to others that have one, is marked uncommitted (an upload that never finished). Formats
come from the names (downloading every object to sniff it would cost more than the listing is
worth) and ``.symlink`` pointer objects mark their targets.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ckpt_callbacks.codecs import checkpoint_format
from ckpt_callbacks.errors import CheckpointError, CheckpointNotFoundError
from ckpt_callbacks.inspection import METADATA_KEY, identify, safetensors_header
from ckpt_callbacks.locations import is_uri
from ckpt_callbacks.record import FOLDER_METADATA, CheckpointInfo, CheckpointRecord
from ckpt_callbacks.remote import open_store
from ckpt_callbacks.remote.publisher import MANIFEST_SUFFIX, POINTER_SUFFIX
from ckpt_callbacks.serialization import read_state
from ckpt_callbacks.sharded import is_sharded_checkpoint
from ckpt_callbacks.storage import POINTER_MAGIC, resolve_latest

__all__ = ["HF_MARKER", "ListedCheckpoint", "counters_from_name", "list_checkpoints"]

HF_MARKER = "trainer_state.json"
"""A folder holding this file is a Hugging Face Trainer checkpoint."""

_RECORD = re.compile(r"^\.ckpt-record-.*\.json$")
_EPOCH = re.compile(r"(?<![a-z])(?:ep|epoch)[=_-]?(\d+)", re.IGNORECASE)
_BATCH = re.compile(r"(?<![a-z])(?:ba|batch|step|global_step|checkpoint)[=_-]?(\d+)", re.IGNORECASE)


def counters_from_name(name: str) -> tuple[int | None, int | None]:
    """``(epoch, batch)`` read from a checkpoint's name; None for what the name does not say.

    Example:
        >>> counters_from_name("ep3-ba500-rank0.pt.zst"), counters_from_name("epoch=1-step=20.ckpt")
        ((3, 500), (1, 20))
        >>> counters_from_name("checkpoint-500")
        (None, 500)
    """
    epoch, batch = _EPOCH.search(name), _BATCH.search(name)
    return (int(epoch[1]) if epoch else None, int(batch[1]) if batch else None)


@dataclass
class ListedCheckpoint:
    """One checkpoint found by :func:`list_checkpoints`.

    Attributes:
        name: Its path relative to the location listed (``/``-separated).
        location: The location listed.
        where: ``'local'`` or ``'remote'``.
        format: Its format label (``'torch+gzip'``, ``'dcp'``, ...).
        size: Bytes (every file of a folder).
        epoch: The epoch it was saved at, if known.
        batch: The batch (optimizer step) it was saved at, if known.
        weights_only: Whether it holds the model weights only (None: unknown).
        pointers: The ``latest``/``best`` links or ``.symlink`` objects pointing at it.
        source: Where the facts came from: ``'record'``, ``'manifest'``, ``'metadata'`` or ``'name'``.
        seq: The saver's save sequence number (record or metadata).
        saved_at: Wall-clock time of the save (seconds since the epoch), else the file's mtime.
        run_name: The run that wrote it, if known.
        timestamp: The full training timestamp, if known.
        committed: In a store: whether the saver's manifest (its remote commit marker) exists;
            None where no manifests are written (Composer, copies made by hand) and for local files.

    Example:
        >>> ListedCheckpoint("ep1.pt", "runs", "local", "torch", 1024, 1, 10, pointers=["latest.pt"]).latest
        True
    """

    name: str
    location: str
    where: str
    format: str | None
    size: int
    epoch: int | None = None
    batch: int | None = None
    weights_only: bool | None = None
    pointers: list[str] = field(default_factory=list)
    source: str = "name"
    seq: int | None = None
    saved_at: float | None = None
    run_name: str | None = None
    timestamp: dict[str, Any] | None = None
    committed: bool | None = None

    @property
    def latest(self) -> bool:
        """Whether a ``latest`` link or pointer points at it."""
        return any("latest" in os.path.basename(pointer).lower() for pointer in self.pointers)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (one element of ``ls --json``)."""
        return {
            "name": self.name, "location": self.location, "where": self.where, "format": self.format,
            "size": self.size, "epoch": self.epoch, "batch": self.batch, "weights_only": self.weights_only,
            "latest": self.latest, "pointers": self.pointers, "source": self.source, "seq": self.seq,
            "saved_at": self.saved_at, "run_name": self.run_name, "timestamp": self.timestamp,
            "committed": self.committed,
        }


def list_checkpoints(location: str | os.PathLike[str], *, storage_options: Mapping[str, Any] | None = None) -> list[ListedCheckpoint]:
    """Every checkpoint under a local folder (or a single file) or a remote prefix.

    Sorted by folder, then by save time (oldest first).

    Raises:
        CheckpointNotFoundError: A local location that does not exist.
        StoreError: The store could not be listed (a ``StorePermissionError`` for denied access).

    Example:
        >>> [c.name for c in list_checkpoints("runs/exp1")]  # doctest: +SKIP
        ['checkpoints/ep1-ba10-rank0.pt', 'checkpoints/ep2-ba20-rank0.pt', 'exports/ep1-ba10.pt']
    """
    text = os.fspath(location)
    found = _list_remote(text, storage_options) if is_uri(text) else _list_local(Path(text))
    return sorted(found, key=lambda c: (os.path.dirname(c.name), c.saved_at or 0.0, c.name))


# ---------------------------------------------------------------------- local


def _list_local(root: Path) -> list[ListedCheckpoint]:
    if not os.path.lexists(root):
        raise CheckpointNotFoundError(f"no folder or checkpoint at {root}")
    if not root.is_dir():
        target = resolve_latest(root)
        if target is None or not target.exists():
            raise CheckpointNotFoundError(f"{root} points at {target}, which does not exist")
        records = _records_in(target.parent, os.listdir(target.parent))
        listed = _local_entry(target, target.name, str(root), records.get(os.path.normpath(target)))
        if listed is not None and target != root:
            listed.pointers.append(root.name)
        return [listed] if listed is not None else []
    records = {}
    pointers: dict[str, list[str]] = {}
    candidates: list[Path] = []
    for folder, dirnames, filenames in os.walk(root):
        here = Path(folder)
        records.update(_records_in(here, filenames))
        for name in [*dirnames, *filenames]:
            target = _pointer_target(here / name)
            if target is not None:
                pointers.setdefault(os.path.normpath(target), []).append((here / name).relative_to(root).as_posix())
        for name in list(dirnames):
            path = here / name
            if name.startswith(".") or path.is_symlink():
                dirnames.remove(name)
            elif is_sharded_checkpoint(path) or (path / HF_MARKER).is_file():
                candidates.append(path)
                dirnames.remove(name)
        candidates += [here / n for n in filenames if not n.startswith(".") and not (here / n).is_symlink()]
    found = []
    for path in candidates:
        key = os.path.normpath(path)
        listed = _local_entry(path, path.relative_to(root).as_posix(), str(root), records.get(key))
        if listed is not None:
            listed.pointers = sorted(pointers.get(key, []))
            found.append(listed)
    return found


def _records_in(folder: Path, names: list[str]) -> dict[str, CheckpointInfo]:
    """The checkpoints recorded by the savers' records among ``names`` in ``folder``, by normalised path."""
    found = {}
    for name in names:
        if _RECORD.match(name):
            for info in CheckpointRecord.load(folder / name).checkpoints:
                found[os.path.normpath(folder / info.name)] = info
    return found


def _pointer_target(path: Path) -> Path | None:
    """What a ``latest``-style symlink or pointer file points at (None for anything else)."""
    if not path.is_symlink():
        if not path.is_file():
            return None
        with open(path, "rb") as file:
            if file.read(len(POINTER_MAGIC)) != POINTER_MAGIC:
                return None
    try:
        return resolve_latest(path)
    except CheckpointError:
        return None


def _local_entry(path: Path, name: str, location: str, info: CheckpointInfo | None) -> ListedCheckpoint | None:
    try:
        label = identify(path).label
    except (CheckpointError, OSError):
        return None  # not a checkpoint (a log, a config file, a pointer file)
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else path.stat().st_size
    listed = ListedCheckpoint(name, location, "local", label, size, saved_at=path.stat().st_mtime)
    if info is not None:
        return _from_record(listed, info)
    metadata = _cheap_metadata(path, label)
    if metadata:
        return _from_metadata(listed, metadata)
    listed.epoch, listed.batch = counters_from_name(name)
    return listed


def _from_record(listed: ListedCheckpoint, info: CheckpointInfo) -> ListedCheckpoint:
    return replace(
        listed, epoch=info.timestamp.epoch, batch=info.timestamp.batch, weights_only=info.weights_only,
        source="record", seq=info.seq, saved_at=info.saved_at, timestamp=info.timestamp.state_dict(),
    )


def _from_metadata(listed: ListedCheckpoint, metadata: Mapping[str, Any]) -> ListedCheckpoint:
    timestamp = metadata.get("timestamp") if isinstance(metadata.get("timestamp"), Mapping) else None
    epoch, batch = counters_from_name(listed.name)
    saved_at = metadata.get("saved_at")
    return replace(
        listed,
        epoch=timestamp.get("epoch", epoch) if timestamp else epoch,
        batch=timestamp.get("batch", batch) if timestamp else batch,
        weights_only=metadata.get("weights_only"), source="metadata", seq=metadata.get("save_sequence"),
        saved_at=float(saved_at) if isinstance(saved_at, (int, float)) else listed.saved_at,
        run_name=metadata.get("run_name"), timestamp=dict(timestamp) if timestamp else None,
    )


def _cheap_metadata(path: Path, label: str) -> dict[str, Any] | None:
    """Our metadata where it costs no decoding: plain torch files, safetensors headers, DCP folders."""
    try:
        if label == "dcp" and (path / FOLDER_METADATA).is_file():
            return json.loads((path / FOLDER_METADATA).read_text())
        if label == "safetensors":
            strings = safetensors_header(path)[1]
            return json.loads(strings[METADATA_KEY]) if METADATA_KEY in strings else None
        if label == "torch":
            metadata = read_state(path).get("state", {}).get("metadata")
            return dict(metadata) if isinstance(metadata, Mapping) else None
    except (CheckpointError, OSError, ValueError, AttributeError):
        return None  # a foreign file: the name is all there is to go on
    return None


# ---------------------------------------------------------------------- remote


def _remote_format(name: str) -> str | None:
    """The format label a remote name implies (None: not a checkpoint name)."""
    try:
        fmt = checkpoint_format(name, argument="name")
    except CheckpointError:
        return None
    if not fmt.extension and counters_from_name(name) == (None, None):
        return None
    container = {"torch": "torch", "tar": "tar", "safetensors": "safetensors"}[fmt.container]
    return container if fmt.codec is None else f"{container}+{fmt.codec.name}"


def _list_remote(url: str, storage_options: Mapping[str, Any] | None) -> list[ListedCheckpoint]:
    store = open_store(url.rstrip("/"), storage_options)
    try:
        keys = store.list("")
        folders: dict[str, str] = {}
        for key in keys:
            folder, _, base = key.rpartition("/")
            if base == ".metadata":
                folders[folder] = "dcp"
            elif base == HF_MARKER:
                folders.setdefault(folder, "folder")
        found: dict[str, ListedCheckpoint] = {}
        pointers, manifests = [], []
        for key in keys:
            if key.endswith(MANIFEST_SUFFIX):
                manifests.append(key)
                continue
            owner = next((f for f in folders if key.startswith(f + "/") or f == ""), None)
            info = store.info(key)
            size = info.size if info is not None else 0
            if owner is not None:
                listed = found.setdefault(owner, ListedCheckpoint(owner or ".", url, "remote", folders[owner], 0))
                listed.size += size
                continue
            base = key.rpartition("/")[2]
            if key.endswith(POINTER_SUFFIX):
                pointers.append(key)
            elif not base.startswith(".") and (label := _remote_format(base)) is not None:
                found[key] = ListedCheckpoint(key, url, "remote", label, size)
        for listed in found.values():
            listed.epoch, listed.batch = counters_from_name(listed.name)
        _apply_manifests(store, manifests, found)
        for key in pointers:
            for target in _pointer_candidates(store.read_bytes(key), key, store.url):
                if target in found:
                    found[target].pointers.append(key)
                    break
    finally:
        store.close()
    return list(found.values())


def _apply_manifests(store: Any, manifests: list[str], found: dict[str, ListedCheckpoint]) -> None:
    """Facts from the savers' manifests (the remote commit markers); without one a checkpoint is
    uncommitted, when the savers of that folder write manifests at all."""
    folders_with_manifests = set()
    for key in manifests:
        name = key[: -len(MANIFEST_SUFFIX)]
        folders_with_manifests.add(name.rpartition("/")[0])
        if name not in found:
            continue
        try:
            manifest = json.loads(store.read_bytes(key))
        except (CheckpointError, ValueError):
            continue  # an unreadable manifest commits nothing
        if isinstance(manifest, Mapping):
            listed = _from_metadata(found[name], manifest)
            found[name] = replace(listed, source="manifest", committed=True)
    for name, listed in found.items():
        if listed.committed is None and name.rpartition("/")[0] in folders_with_manifests:
            listed.committed = False


def _pointer_candidates(content: bytes, pointer: str, url: str) -> list[str]:
    """The keys (relative to the listed prefix) a pointer object's content may mean."""
    target = content.decode("utf-8", errors="replace").strip()
    if target.startswith(url + "/"):
        return [target[len(url) + 1:]]
    folder = pointer.rpartition("/")[0]
    prefix = url.split("://", 1)[1].split("/", 1)[1] if "/" in url.split("://", 1)[1] else ""
    candidates = [target.lstrip("/")]
    if folder:
        candidates.append(f"{folder}/{target}")
    if prefix and target.startswith(prefix + "/"):
        candidates.append(target[len(prefix) + 1:])  # Composer's keys are relative to the bucket
    return candidates
