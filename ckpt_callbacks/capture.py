"""Step 2 of the save pipeline, *capture*: what a rank writes, taken on the training thread.

The payload is the checkpoint dict of DESIGN.md section 4b (full or weights-only, ``ignore_keys``
applied, metadata added, every rank's RNG state gathered), plus for sharded models their DTensor
state dicts (written by DCP) or, for a weights-only export, the consolidated model. In async mode
every tensor is then copied into reusable buffers (:mod:`ckpt_callbacks.staging`), so that
training may go on mutating its state: this is the only step that blocks training there.

Trainers with their own checkpoint formats hand over one of two payloads instead of a state. A
:class:`NativeCheckpoint` is the trainer's own checkpoint dict (Lightning's ``dump_checkpoint``): it
is saved as the whole file, our metadata under :data:`~ckpt_callbacks.record.NATIVE_METADATA_KEY`,
so that the trainer's own loader resumes from it. A :class:`FolderCheckpoint` is a folder the trainer
has just written (a Hugging Face ``checkpoint-N/``): capture takes a snapshot of it next to our
checkpoints (hard links, or copies across file systems) with our metadata as
:data:`~ckpt_callbacks.record.FOLDER_METADATA`, so that the trainer may delete its folder (its
``save_total_limit``) while the snapshot is being committed (:mod:`ckpt_callbacks.folders`).
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any, Callable, Mapping, Union

import torch

from ckpt_callbacks import dist
from ckpt_callbacks.dist import DistInfo
from ckpt_callbacks.folders import snapshot_folder
from ckpt_callbacks.layout import Layout
from ckpt_callbacks.record import FOLDER_METADATA, NATIVE_METADATA_KEY, CheckpointInfo, CheckpointRecord
from ckpt_callbacks.serialization import SCHEMA_VERSION, apply_ignore_keys
from ckpt_callbacks.sharded import consolidate, sharded_tensors
from ckpt_callbacks.staging import StagingBuffers
from ckpt_callbacks.state import State, capture_rng_state
from ckpt_callbacks.temp_files import temp_path_for
from ckpt_callbacks.time import Timestamp

__all__ = ["Captured", "Capturer", "FolderCheckpoint", "NativeCheckpoint", "Payload"]


def _library_version() -> str:
    try:
        return importlib_metadata.version("ckpt-callbacks")
    except importlib_metadata.PackageNotFoundError:
        return "0+unknown"


@dataclasses.dataclass(frozen=True)
class NativeCheckpoint:
    """A trainer's own checkpoint dict, to be saved as the whole checkpoint file.

    Attributes:
        checkpoint: the dict (Lightning's ``dump_checkpoint``); None on ranks that hold none.

    Example:
        >>> manager.save(timestamp, NativeCheckpoint(trainer._checkpoint_connector.dump_checkpoint()))  # doctest: +SKIP
    """

    checkpoint: Mapping[str, Any] | None


@dataclasses.dataclass(frozen=True)
class FolderCheckpoint:
    """A folder a trainer has written, to be committed as the checkpoint (a folder or a tar bundle).

    Attributes:
        path: the folder (a Hugging Face ``checkpoint-N/``); read by the ranks that commit.

    Example:
        >>> manager.save(timestamp, FolderCheckpoint(Path("out/checkpoint-500")))  # doctest: +SKIP
    """

    path: Path


Payload = Union[State, Mapping[str, Any], NativeCheckpoint, FolderCheckpoint]
"""What :meth:`~ckpt_callbacks.manager.CheckpointManager.save` takes: the live training state, a
plain dict saved as the checkpoint's ``state``, a trainer's native dict, or a trainer's folder."""


@dataclasses.dataclass
class Captured:
    """One save's payload on this rank, as taken at capture time.

    Attributes:
        checkpoint: the checkpoint dict this rank commits (None on ranks that commit nothing).
        tensors: a sharded model's DTensor state dicts, written by DCP on every rank.
        spill: the temp folder holding a consolidated export's tensors (removed after the write).
        folder: the snapshot of a trainer's folder (a temp folder next to the checkpoints) to commit.
        metadata: the checkpoint's metadata (empty on ranks that commit nothing).
    """

    checkpoint: dict[str, Any] | None
    tensors: dict[str, Any] | None = None
    spill: tempfile.TemporaryDirectory | None = None
    folder: Path | None = None
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)


class Capturer:
    """Builds each save's payload for one saver on one rank.

    Example:
        >>> capturer = Capturer(key="CheckpointSaver-1a2b", run_name="exp1", rank_info=dist.dist_info(),
        ...                     ranks="rank0", weights_only=False, ignore_keys=None, layout=layout,
        ...                     staging=None)  # doctest: +SKIP
    """

    def __init__(
        self, *, key: str, run_name: str, rank_info: DistInfo, ranks: str, weights_only: bool, ignore_keys: Any,
        layout: Layout, staging: StagingBuffers | None,
    ) -> None:
        self.key = key
        self.run_name = run_name
        self.rank_info = rank_info
        self.ranks = ranks
        self.weights_only = weights_only
        self.ignore_keys = ignore_keys
        self.layout = layout
        self.staging = staging
        self._record: CheckpointRecord | None = None
        self._callback_state: Callable[[CheckpointInfo], dict[str, Any]] | None = None

    @property
    def writes(self) -> bool:
        """Whether this rank commits checkpoints (every rank in ``'per_rank'`` mode, rank 0 otherwise)."""
        return self.ranks == "per_rank" or self.rank_info.rank == 0

    def capture(
        self, state: Payload, timestamp: Timestamp, record: CheckpointRecord,
        callback_state: Callable[[CheckpointInfo], dict[str, Any]],
    ) -> Captured:
        """The payload of a save at ``timestamp``; ``callback_state`` gives the saver's state that
        the checkpoint stores about itself (it lists itself, as in Composer)."""
        self._record, self._callback_state = record, callback_state
        if isinstance(state, FolderCheckpoint):
            return self._snapshot(state.path, timestamp)
        if isinstance(state, NativeCheckpoint):
            captured = self._native(state.checkpoint, timestamp)
            if self.staging is not None:
                captured.checkpoint = self.staging.stage(captured.checkpoint)
            return captured
        captured = Captured(self._checkpoint_dict(state, timestamp))
        if captured.checkpoint is not None:
            captured.metadata = captured.checkpoint["state"].get("metadata", {})
        if self.ranks == "sharded" and isinstance(state, State):
            if self.weights_only:
                model, captured.spill = consolidate(state.model, self.layout.folder)
                if captured.checkpoint is not None:
                    captured.checkpoint["state"]["model"] = model
            else:
                captured.tensors = sharded_tensors(state)
        if self.staging is not None:
            captured.checkpoint = self.staging.stage(captured.checkpoint)
            captured.tensors = self.staging.stage(captured.tensors)
        return captured

    def _checkpoint_dict(self, state: State | Mapping[str, Any], timestamp: Timestamp) -> dict[str, Any] | None:
        """The checkpoint dict this rank writes (None if it writes none), without sharded tensors."""
        full = isinstance(state, State) and not self.weights_only
        rng = self._capture_rng() if full else None
        if not self.writes:
            return None
        seq = self._record.take_seq()
        if isinstance(state, State):
            body = state.weights_state_dict() if self.weights_only and not self.ranks == "sharded" else {}
            if full:
                body = state.state_dict()
                if self.ranks == "sharded":
                    del body["model"], body["optimizers"]
                body["callbacks"][self.key] = self._callback_state(self._pending(seq, timestamp))
        else:
            body = dict(state)
        body["metadata"] = self._metadata(seq, timestamp, state)
        checkpoint: dict[str, Any] = {"state": body}
        if rng is not None:
            checkpoint["rng"] = rng
        apply_ignore_keys(checkpoint, self.ignore_keys)
        checkpoint.setdefault("state", {})
        return checkpoint

    def _native(self, native: Mapping[str, Any] | None, timestamp: Timestamp) -> Captured:
        """A trainer's own dict with our metadata under the reserved key, on the ranks that write."""
        if not self.writes or native is None:
            return Captured(None)
        metadata = self._metadata(self._record.take_seq(), timestamp, native)
        checkpoint = {**native, NATIVE_METADATA_KEY: metadata}
        apply_ignore_keys(checkpoint, self.ignore_keys)
        if "state" not in native and checkpoint.get("state") == {}:
            del checkpoint["state"]  # apply_ignore_keys adds it for our own layout; a native dict has none
        return Captured(checkpoint, metadata=metadata)

    def _snapshot(self, source: Path, timestamp: Timestamp) -> Captured:
        """Snapshot a trainer's folder next to the checkpoints, with our metadata, on the ranks that write."""
        if not self.writes:
            return Captured(None)
        metadata = self._metadata(self._record.take_seq(), timestamp, {})
        staging = temp_path_for(self.layout.folder / self.layout.name(timestamp))
        snapshot_folder(Path(source), staging)
        (staging / FOLDER_METADATA).write_text(json.dumps(metadata, sort_keys=True))
        return Captured(None, folder=staging, metadata=metadata)

    def _capture_rng(self) -> list[Any]:
        if self.ranks == "per_rank":
            rng: list[Any] = [None] * self.rank_info.world_size
            rng[self.rank_info.rank] = capture_rng_state()
            return rng
        return dist.all_gather_object(capture_rng_state())

    def _metadata(self, seq: int, timestamp: Timestamp, state: Any) -> dict[str, Any]:
        lineage = self._record.lineage
        return {
            "schema_version": SCHEMA_VERSION,
            "library_version": _library_version(),
            "torch_version": str(torch.__version__),
            "world_size": self.rank_info.world_size,
            "ranks": self.ranks,
            "run_name": self.run_name,
            "timestamp": timestamp.state_dict(),
            "save_sequence": seq,
            "lineage": lineage.id if lineage else "",
            "resumed_from": lineage.resumed_from if lineage else None,
            "saved_at": time.time(),
            "weights_only": self.weights_only,
            "saver": self.key,
            "seed": state.seed if isinstance(state, State) else None,
        }

    def _pending(self, seq: int, timestamp: Timestamp) -> CheckpointInfo:
        """The record entry of the checkpoint being written (its size is not known yet)."""
        return CheckpointInfo(
            seq=seq, name=self.layout.name(timestamp), timestamp=timestamp,
            lineage=self._record.lineage.id if self._record.lineage else "", size=0,
            saved_at=time.time(), weights_only=self.weights_only,
        )

