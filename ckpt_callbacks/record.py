"""The saver's record: a small JSON index of every checkpoint a saver wrote, across resumes.

It lives next to the checkpoints (``.ckpt-record-<saver digest>-rank<rank>.json``), is committed
atomically like a checkpoint, and is also kept in the saver's callback state. It is derived data:
when it is missing or corrupt it is rebuilt from the checkpoints' own metadata. Pruning reads it (a
saver only deletes what it recorded), autoresume reads it ("newest" is the highest save sequence:
the last committed in the newest lineage, not the highest step counter), and ``ls`` shows it.
"""

from __future__ import annotations

import io
import json
import logging
import numbers
import os
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Mapping, Sequence

from ckpt_callbacks.archive import copy_member
from ckpt_callbacks.decoding import open_decoded
from ckpt_callbacks.errors import ConfigurationError, CorruptCheckpointError, bad_value
from ckpt_callbacks.naming import NameTemplate
from ckpt_callbacks.serialization import read_state
from ckpt_callbacks.storage import atomic_write
from ckpt_callbacks.temp_files import is_temp_name
from ckpt_callbacks.time import Timestamp

__all__ = [
    "FOLDER_METADATA", "NATIVE_METADATA_KEY", "SCORE_METRIC", "CheckpointInfo", "CheckpointRecord", "Lineage", "folder_files",
    "metric_values", "metrics_at_save", "scan_folder",
]

log = logging.getLogger(__name__)

RECORD_VERSION = 1


@dataclass(frozen=True)
class CheckpointInfo:
    """One committed checkpoint.

    Attributes:
        seq: save sequence number, increasing across every run of the saver.
        name: the checkpoint's path relative to the saver's folder.
        timestamp: the training time it was saved at.
        lineage: the id of the run (lineage) that wrote it.
        size: bytes on disk.
        saved_at: wall-clock time of the commit (seconds since the epoch).
        weights_only: whether it holds the model weights only.
        files: the files that make it up, relative to the folder (one file, or a folder's files).
        uploaded: whether it is committed in the object store (its manifest written).
        metrics: the training metrics when it was saved (what score-based retention reads).

    Example:
        >>> CheckpointInfo(seq=1, name="ep1-ba5.pt", timestamp=Timestamp(epoch=1, batch=5),
        ...                lineage="3f9a", size=1024, saved_at=0.0, weights_only=False).name
        'ep1-ba5.pt'
    """

    seq: int
    name: str
    timestamp: Timestamp
    lineage: str
    size: int
    saved_at: float
    weights_only: bool
    files: tuple[str, ...] = ()
    metrics: dict[str, float] = field(default_factory=dict)
    uploaded: bool = False

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (also used in the callback state: plain types only)."""
        data = asdict(self)
        data["timestamp"] = self.timestamp.state_dict()
        data["files"] = list(self.files)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CheckpointInfo:
        """The inverse of :meth:`to_json`."""
        return cls(**{
            **data,
            "timestamp": Timestamp.from_state_dict(data["timestamp"]),
            "files": tuple(data.get("files", ())),
            "metrics": dict(data.get("metrics", {})),
        })


@dataclass(frozen=True)
class Lineage:
    """One run of a saver: its id, when it started, and the checkpoint it resumed from."""

    id: str
    started_at: float
    resumed_from: str | None

    @classmethod
    def new(cls, resumed_from: str | None) -> Lineage:
        """A fresh lineage starting now."""
        return cls(id=uuid.uuid4().hex[:12], started_at=time.time(), resumed_from=resumed_from)


@dataclass
class CheckpointRecord:
    """The in-memory record of one saver on one rank, persisted to :attr:`path`."""

    path: Path
    checkpoints: list[CheckpointInfo] = field(default_factory=list)
    lineages: list[Lineage] = field(default_factory=list)
    next_seq: int = 1

    @classmethod
    def load(cls, path: Path) -> CheckpointRecord:
        """Read the record at ``path``; a missing or unreadable one gives an empty record (it is rebuilt)."""
        record = cls(path=path)
        try:
            data = json.loads(path.read_text())
            if data.get("version") != RECORD_VERSION:
                raise ValueError(f"unknown record version {data.get('version')!r}")
            record.checkpoints = [CheckpointInfo.from_json(item) for item in data["checkpoints"]]
            record.lineages = [Lineage(**item) for item in data["lineages"]]
            record.next_seq = int(data["next_seq"])
        except FileNotFoundError:
            pass
        except (OSError, ValueError, KeyError, TypeError) as error:
            log.warning("the checkpoint record %s is unreadable (%s); rebuilding it from the checkpoints", path, error)
            record = cls(path=path)
        return record

    @property
    def lineage(self) -> Lineage | None:
        """The current (newest) lineage."""
        return self.lineages[-1] if self.lineages else None

    def start_lineage(self, resumed_from: str | None) -> Lineage:
        """Begin a new run of the saver."""
        lineage = Lineage.new(resumed_from)
        self.lineages.append(lineage)
        return lineage

    def take_seq(self) -> int:
        """Reserve the next save sequence number."""
        seq = self.next_seq
        self.next_seq += 1
        return seq

    def find(self, name: str) -> CheckpointInfo | None:
        """The recorded checkpoint called ``name``, if any."""
        return next((c for c in self.checkpoints if c.name == name), None)

    def add(self, info: CheckpointInfo) -> None:
        """Record a committed checkpoint (replacing an older entry of the same name)."""
        self.checkpoints = [c for c in self.checkpoints if c.name != info.name] + [info]
        self.checkpoints.sort(key=lambda c: c.seq)
        self.next_seq = max(self.next_seq, info.seq + 1)

    def remove(self, name: str) -> None:
        """Forget a checkpoint (after it was pruned or set aside)."""
        self.checkpoints = [c for c in self.checkpoints if c.name != name]

    def newest(self) -> CheckpointInfo | None:
        """The last committed checkpoint, by save sequence."""
        return self.checkpoints[-1] if self.checkpoints else None

    def add_metrics(self, metrics: Mapping[str, float], *, batch: int | None = None) -> list[CheckpointInfo]:
        """Give metrics that arrived after a save to the checkpoints they describe; return those changed.

        The targets are the current lineage's checkpoints saved at training batch ``batch`` (default:
        the newest checkpoint): only they hold the weights the metrics were measured on. A metric
        a checkpoint already has is kept.
        """
        if batch is None:
            targets = self.checkpoints[-1:]
        else:
            lineage = self.lineage.id if self.lineage else ""
            targets = [c for c in self.checkpoints if c.timestamp.batch == batch and c.lineage == lineage]
        changed = []
        for target in targets:
            missing = {name: value for name, value in metrics.items() if name not in target.metrics}
            if missing:
                info = replace(target, metrics={**target.metrics, **missing})
                self.checkpoints[self.checkpoints.index(target)] = info
                changed.append(info)
        return changed

    def callback_state(self, folder: Path, pending: CheckpointInfo | None = None) -> dict[str, Any]:
        """The saver's callback state: Composer's ``all_saved_checkpoints_to_timestamp`` (pairs of
        path and timestamp) and our entries, plus ``pending`` (a checkpoint lists itself)."""
        checkpoints = [*self.checkpoints, *([pending] if pending else [])]
        return {
            "all_saved_checkpoints_to_timestamp": [
                (str(folder / c.name), c.timestamp.state_dict()) for c in checkpoints
            ],
            "checkpoints": [c.to_json() for c in checkpoints],
        }

    def to_json(self) -> dict[str, Any]:
        """The JSON document written to disk."""
        return {
            "version": RECORD_VERSION,
            "next_seq": self.next_seq,
            "lineages": [asdict(lineage) for lineage in self.lineages],
            "checkpoints": [c.to_json() for c in self.checkpoints],
        }

    def save(self) -> None:
        """Commit the record atomically next to the checkpoints."""
        with atomic_write(self.path) as target:
            target.file.write(json.dumps(self.to_json(), indent=1, sort_keys=True).encode())

    def reconcile(
        self,
        folder: Path,
        template: NameTemplate,
        fixed: dict[str, Any],
        *,
        saver: str,
        run_name: str,
        remembered: Sequence[CheckpointInfo] = (),
    ) -> None:
        """Bring the record in line with the disk.

        Entries whose files vanished are forgotten; entries kept in a resumed checkpoint's callback
        state (``remembered``) are restored when their files exist; checkpoints under ``folder`` that
        ``template`` could have written and whose own metadata names this saver and run, but that the
        record lacks (a crash between commit and publish), are adopted.
        """
        for info in remembered:
            if self.find(info.name) is None and (folder / info.name).exists() and info.size:
                self.add(info)
        self.checkpoints = [c for c in self.checkpoints if (folder / c.name).exists()]
        recorded = {c.name for c in self.checkpoints}
        for name in scan_folder(folder, template, fixed):
            if name not in recorded:
                info = _adopt(folder, name, saver=saver, run_name=run_name)
                if info is not None:
                    self.add(info)


def scan_folder(folder: Path, template: NameTemplate, fixed: dict[str, Any]) -> list[str]:
    """Names (``/``-separated, relative to ``folder``) of files and folders that ``template`` could
    have written there, with the ``fixed`` variables (run name, ranks) substituted.

    Example:
        >>> scan_folder(Path("runs/exp1"), NameTemplate("ba{batch}.pt", argument="filename"), {})  # doctest: +SKIP
        ['ba100.pt', 'ba200.pt']
    """
    pattern = template.pattern(**fixed)
    depth = template.template.count("/")
    names = []
    for root, dirs, files in os.walk(folder):
        relative_root = os.path.relpath(root, folder)
        prefix = "" if relative_root == "." else relative_root.replace(os.sep, "/") + "/"
        candidates = [(entry, False) for entry in files] + [(entry, True) for entry in dirs]
        for entry, is_dir in candidates:
            name = prefix + entry
            if is_temp_name(entry) or not pattern.fullmatch(name) or os.path.islink(os.path.join(root, entry)):
                continue
            names.append(name)
            if is_dir:
                dirs.remove(entry)
        if prefix.count("/") >= depth:
            dirs.clear()
    return sorted(names)


FOLDER_METADATA = "ckpt_callbacks.json"
"""The metadata file inside a checkpoint that is a folder (a sharded checkpoint, a trainer's folder),
also inside the tar that bundles such a folder."""

NATIVE_METADATA_KEY = "ckpt_callbacks"
"""The reserved top-level key holding our metadata in a trainer's native checkpoint dict (Lightning's),
which is saved as the whole file so that the trainer's own loader resumes from it."""


def folder_files(checkpoint: Path, folder: Path) -> tuple[str, ...]:
    """The files of a checkpoint that is a folder, relative to ``folder`` (``/``-separated), sorted.

    Example:
        >>> folder_files(Path("ckpt/ba100"), Path("ckpt"))  # doctest: +SKIP
        ('ba100/.metadata', 'ba100/__0_0.distcp', 'ba100/ckpt_callbacks.json', 'ba100/extras.pt')
    """
    return tuple(sorted(p.relative_to(folder).as_posix() for p in checkpoint.rglob("*") if p.is_file()))


def _read_metadata(path: Path) -> dict[str, Any]:
    if path.is_dir():
        return json.loads((path / FOLDER_METADATA).read_text())
    with open_decoded(path) as decoded:
        if decoded.kind == "tar":
            try:  # a bundled folder; a state-dict tar has no such member and is read below
                found = io.BytesIO()
                copy_member(decoded.stream, found, source=path, names=(FOLDER_METADATA,))
                return json.loads(found.getvalue())
            except CorruptCheckpointError:
                pass
    checkpoint = read_state(path)
    if NATIVE_METADATA_KEY in checkpoint:
        return checkpoint[NATIVE_METADATA_KEY]
    return checkpoint["state"]["metadata"]


def _adopt(folder: Path, name: str, *, saver: str, run_name: str) -> CheckpointInfo | None:
    """A record entry for a checkpoint this saver committed but did not record, from its own metadata."""
    path = folder / name
    try:
        meta = _read_metadata(path)
    except (CorruptCheckpointError, OSError, ValueError, KeyError, TypeError):
        return None
    if meta.get("saver") != saver or meta.get("run_name") != run_name:
        return None
    log.info("found %s, committed but not recorded (an interrupted save); recording it", path)
    files = folder_files(path, folder) if path.is_dir() else (name,)
    return CheckpointInfo(
        seq=int(meta["save_sequence"]), name=name, timestamp=Timestamp.from_state_dict(meta["timestamp"]),
        lineage=meta.get("lineage", ""), size=sum((folder / f).stat().st_size for f in files),
        saved_at=float(meta["saved_at"]), weights_only=bool(meta.get("weights_only")), files=files,
    )


SCORE_METRIC = "score"
"""The metric name of ``CheckpointManager.save(..., score=<number>)``: ``KeepBest(n, 'score')``."""


def metric_values(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The numeric metrics (numbers, one-element tensors) as floats, ready for JSON; others are skipped.

    Example:
        >>> metric_values({"val/loss": 0.25, "phase": "warmup"})
        {'val/loss': 0.25}
    """
    values = {}
    for name, value in metrics.items():
        if isinstance(value, (str, bytes)):
            continue
        try:
            values[str(name)] = float(value)
        except (TypeError, ValueError, RuntimeError):
            log.debug("metric %r is not a number (%r): not recorded", name, value)
    return values


def metrics_at_save(state: Any, timestamp: Timestamp, score: float | Mapping[str, float] | None) -> dict[str, float]:
    """The metrics recorded with a checkpoint saved at ``timestamp``.

    The state's ``metrics`` count only if they were measured at the checkpoint's batch (or when
    is unknown): metrics of an earlier evaluation describe other weights. ``score`` adds to them:
    a number as the metric :data:`SCORE_METRIC`, a dict as metrics of those names.

    Raises:
        ConfigurationError: ``score`` is not None, a number, or a dict of metric name -> number.

    Example:
        >>> metrics_at_save(None, Timestamp(batch=5), 0.5)
        {'score': 0.5}
    """
    measured = getattr(state, "metrics_timestamp", None)
    fresh = measured is None or measured.batch == timestamp.batch
    metrics = metric_values(getattr(state, "metrics", None) or {}) if fresh else {}
    accepted = "None, a number, or a dict of metric name -> number"
    if score is None:
        return metrics
    if isinstance(score, Mapping):
        explicit = metric_values(score)
        if len(explicit) != len(score):
            raise ConfigurationError(bad_value("score", accepted, score))
        return {**metrics, **explicit}
    if isinstance(score, bool) or not isinstance(score, numbers.Real):
        raise ConfigurationError(bad_value("score", accepted, score))
    return {**metrics, SCORE_METRIC: float(score)}
