"""Sharded checkpoints: a folder written by ``torch.distributed.checkpoint`` (DCP), for FSDP2 and
other DTensor-sharded models (``ranks='sharded'``).

One checkpoint folder holds::

    .metadata             DCP's index of every shard, written last by DCP's coordinator
    __<rank>_0.distcp     each rank's shards of the model and optimizer states
    extras.pt             what is not sharded: timestamp, schedulers, callbacks, every rank's RNG
                          states, run name and metadata (written by rank 0 with torch.save)
    ckpt_callbacks.json   the metadata as JSON, so the saver's record can adopt the folder

Commit: every rank writes into one temp folder (named by rank 0 and broadcast) next to the final
name; DCP's writer fsyncs every file; after DCP's collective finish step, rank 0 adds the extras,
fsyncs the folder and renames it onto its final name. A crash leaves either no folder under the
final name or a complete one. Loading goes through DCP, which reshards: a checkpoint saved by 4
ranks loads on 2, or on 1 without a process group.

DCP's collectives run on the checkpoint process group (:func:`ckpt_callbacks.dist.checkpoint_group`),
never on the training group. Weights-only exports of a sharded model are one consolidated file,
gathered one tensor at a time into file-backed memory (:func:`consolidate`), so no
rank ever holds the whole model in RAM.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

from ckpt_callbacks import dist
from ckpt_callbacks.errors import CorruptCheckpointError
from ckpt_callbacks.record import FOLDER_METADATA
from ckpt_callbacks.serialization import read_state, verify_file
from ckpt_callbacks.state import State
from ckpt_callbacks.storage import fsync_dir, makedirs_durable, remove_checkpoint, replace_folder
from ckpt_callbacks.temp_files import temp_path_for

__all__ = [
    "EXTRAS",
    "consolidate",
    "is_sharded_checkpoint",
    "load_sharded",
    "sharded_tensors",
    "verify_sharded",
    "write_sharded",
    "write_sharded_checkpoint",
]

EXTRAS = "extras.pt"
"""The file of a sharded checkpoint that holds everything that is not a sharded tensor."""


def is_sharded_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a folder written by DCP (it has a ``.metadata`` index).

    Example:
        >>> is_sharded_checkpoint(Path("runs/exp1/checkpoints/ep1-ba100"))  # doctest: +SKIP
        True
    """
    return path.is_dir() and (path / ".metadata").is_file()


def sharded_tensors(state: State) -> dict[str, Any]:
    """The sharded part of a checkpoint: model and optimizer state dicts of DTensors, keyed by
    parameter names (so that DCP can reshard them on load).

    Example:
        >>> sorted(sharded_tensors(trainer.state))  # doctest: +SKIP
        ['model', 'optimizers']
    """
    return {
        "model": get_model_state_dict(state.model),
        "optimizers": [get_optimizer_state_dict(state.model, optimizer) for optimizer in state.optimizers],
    }


def write_sharded_checkpoint(
    path: Path,
    tensors: dict[str, Any] | None,
    checkpoint: dict[str, Any] | None,
    write_file: Callable[[Path, dict[str, Any]], int],
) -> int:
    """Save a sharded model as the checkpoint ``path``, on every rank; returns its size on rank 0.

    With ``tensors`` (from :func:`sharded_tensors`, maybe staged) the checkpoint is a DCP folder
    committed by rank 0 (see the module docstring); without, it is a weights-only export whose
    consolidated model is already in rank 0's ``checkpoint``, committed by ``write_file``.
    ``checkpoint`` is rank 0's checkpoint dict without the sharded tensors (None on other ranks).
    """
    rank0 = dist.dist_info().rank == 0
    if rank0:
        makedirs_durable(path.parent)
    if tensors is None:
        return 0 if checkpoint is None else write_file(path, checkpoint)
    temp = Path(dist.broadcast_object(str(temp_path_for(path)) if rank0 else None))
    error = None
    try:
        write_sharded(temp, tensors, checkpoint or {}, checkpoint["state"]["metadata"] if checkpoint else {})
        if rank0:
            replace_folder(temp, path)
    except Exception as failure:  # noqa: BLE001 -- reported to every rank below
        error = failure
        if rank0:
            remove_checkpoint(temp)
    # Every rank returns only once rank 0 has committed the folder (or learns that it failed).
    dist.raise_if_any_failed(error, action=f"committing the sharded checkpoint {path}")
    return sum(file.stat().st_size for file in path.rglob("*") if file.is_file()) if rank0 else 0


def write_sharded(folder: Path, tensors: dict[str, Any], extras: dict[str, Any], json_metadata: dict[str, Any]) -> None:
    """Write ``tensors`` (every rank's shards) into ``folder``; rank 0 adds ``extras`` and the JSON metadata.

    ``extras`` is the rest of the checkpoint (timestamp, schedulers, callbacks, RNG, metadata).
    Every rank must call this with the same ``folder``. Files are fsynced; the caller renames
    the folder into place.
    """
    dcp.save(
        tensors,
        storage_writer=dcp.FileSystemWriter(folder, sync_files=True),
        process_group=dist.checkpoint_group(),
        no_dist=not dist.is_distributed(),
    )
    if dist.dist_info().rank == 0:
        with open(folder / EXTRAS, "wb") as file:
            torch.save(extras, file)
            file.flush()
            os.fsync(file.fileno())
        (folder / FOLDER_METADATA).write_text(json.dumps(json_metadata, sort_keys=True))
        with open(folder / FOLDER_METADATA, "rb") as file:
            os.fsync(file.fileno())
        fsync_dir(folder)


def verify_sharded(folder: Path) -> None:
    """Check a sharded checkpoint folder: DCP's index reads, every shard it names is present, and
    the extras pass :func:`~ckpt_callbacks.serialization.verify_file`.

    Raises:
        CorruptCheckpointError: naming what is missing or unreadable.
    """
    try:
        metadata = dcp.FileSystemReader(folder).read_metadata()
    except Exception as error:  # noqa: BLE001 -- a missing or torn index surfaces in many forms
        raise CorruptCheckpointError(f"{folder} has no readable DCP index (.metadata): {error}") from error
    storage = getattr(metadata, "storage_data", None) or {}
    for item in storage.values():
        relative = getattr(item, "relative_path", None)
        if relative and not (folder / relative).is_file():
            raise CorruptCheckpointError(f"{folder} lacks the shard file {relative}")
    verify_file(folder / EXTRAS)


def load_sharded(folder: Path, state: State, *, weights_only: bool = False, strict: bool = True) -> dict[str, Any]:
    """Load a sharded checkpoint folder into ``state``, resharding to this run's layout.

    Returns the checkpoint's extras (``{'state': {...}, 'rng': [...]}`` without the tensors).

    Raises:
        CorruptCheckpointError: the folder's index, shards or extras cannot be read.
    """
    template = sharded_tensors(state)
    if weights_only:
        del template["optimizers"]
    try:
        dcp.load(
            template,
            storage_reader=dcp.FileSystemReader(folder),
            process_group=dist.checkpoint_group(),
            no_dist=not dist.is_distributed(),
        )
    except Exception as error:  # noqa: BLE001 -- DCP raises many types (CheckpointException, RuntimeError, ...)
        raise CorruptCheckpointError(f"cannot load the sharded checkpoint {folder}: {error}") from error
    set_model_state_dict(state.model, template["model"], options=StateDictOptions(strict=strict))
    for optimizer, optimizer_state in zip(state.optimizers, template.get("optimizers", [])):
        set_optimizer_state_dict(state.model, optimizer, optimizer_state)
    return read_state(folder / EXTRAS)


def consolidate(model: torch.nn.Module, spill_folder: Path) -> tuple[dict[str, torch.Tensor], tempfile.TemporaryDirectory]:
    """The full (unsharded) model state dict on rank 0, gathered one tensor at a time.

    Each DTensor is all-gathered on every rank (a collective per tensor, on the training group: call
    it from the training thread), and rank 0 copies it into a file-backed tensor in a temp folder
    under ``spill_folder`` (``torch.from_file``), so the consolidated model lives in the page cache,
    not in anonymous memory: the kernel can write it back instead of running out of RAM. Other ranks
    get an empty dict. Clean the returned temp folder up once the export is written.
    """
    rank = dist.dist_info().rank
    consolidated: dict[str, torch.Tensor] = {}
    spill_folder.mkdir(parents=True, exist_ok=True)
    spill = tempfile.TemporaryDirectory(dir=spill_folder, prefix=".consolidate-")
    for index, (key, value) in enumerate(model.state_dict().items()):
        full = value.full_tensor() if isinstance(value, DTensor) else value
        if rank == 0:
            consolidated[key] = _spill(full.detach().cpu(), Path(spill.name) / f"{index}.bin")
        del full
    return consolidated, spill


def _spill(tensor: torch.Tensor, path: Path) -> torch.Tensor:
    if tensor.numel() == 0:
        return tensor.clone()
    spilled = torch.from_file(str(path), shared=True, size=tensor.numel(), dtype=tensor.dtype).view(tensor.shape)
    spilled.copy_(tensor)
    return spilled
