"""Reading DCP checkpoint folders (``torch.distributed.checkpoint``) without trusting them.

A DCP folder holds ``.metadata``, a pickle of DCP's index: for every tensor its fully qualified
name (``model.0.weight``, ``optimizers.0.state.0.exp_avg``), shape, dtype and where its bytes lie
(``__0_0.distcp``, offset, length). DCP reads that index with a plain ``pickle.load``, which runs
whatever code a crafted file names; the command line looks at folders that other jobs and other
people wrote, so here the index is unpickled with an allowlist of DCP's own metadata classes
(:func:`read_index`) and nothing else: a foreign class makes it a
:class:`~ckpt_callbacks.errors.CorruptCheckpointError`, never a call.

On top of the index: :func:`check_folder` checks that every shard file the index names exists
and is long enough for every byte range in it (DCP has no checksums, so that is what "intact"
can mean), and :func:`load_tensors` reads the tensors under one prefix (the model) into plain CPU
tensors, the consolidation ``export`` needs, in one process without a process group.
"""

from __future__ import annotations

import io
import pickle
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ckpt_callbacks.errors import CheckpointNotFoundError, CorruptCheckpointError

__all__ = ["INDEX", "DcpTensor", "check_folder", "load_tensors", "read_index", "tensors_in"]

INDEX = ".metadata"
"""The file of a DCP folder that indexes its shards."""

# What DCP's index pickles: its metadata dataclasses and enums, torch.Size and dtypes, paths.
_ALLOWED_MODULES = frozenset({"torch.distributed.checkpoint.metadata"})
_ALLOWED = frozenset({
    ("torch", "Size"), ("torch.serialization", "_get_layout"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"),
})


class _IndexUnpickler(pickle.Unpickler):
    """Builds DCP's metadata objects and refuses every other global."""

    def find_class(self, module: str, name: str) -> Any:
        allowed = module in _ALLOWED_MODULES or (module, name) in _ALLOWED
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            allowed = True
        if not allowed:
            raise pickle.UnpicklingError(f"the index references {module}.{name}, which is not part of a DCP index")
        return super().find_class(module, name)


def read_index(folder: Path) -> Any:
    """Unpickle a DCP folder's ``.metadata`` with DCP's classes only; return DCP's ``Metadata``.

    Raises:
        CheckpointNotFoundError: The folder has no ``.metadata``.
        CorruptCheckpointError: It does not unpickle, names a class outside DCP's index, or is not
            an index.

    Example:
        >>> index = read_index(Path("runs/exp1/checkpoints/ep1-ba100"))  # doctest: +SKIP
        >>> sorted(index.state_dict_metadata)[:1]  # doctest: +SKIP
        ['model.0.bias']
    """
    path = Path(folder) / INDEX
    try:
        data = path.read_bytes()
    except FileNotFoundError as e:
        raise CheckpointNotFoundError(f"{folder} is not a DCP checkpoint: it has no {INDEX}") from e
    try:
        index = _IndexUnpickler(io.BytesIO(data)).load()
    except Exception as e:  # a torn or foreign pickle fails in many ways; all mean "not a usable index"
        raise CorruptCheckpointError(f"{folder} has an unreadable DCP index ({INDEX}): {type(e).__name__}: {e}") from e
    if not isinstance(getattr(index, "state_dict_metadata", None), Mapping):
        raise CorruptCheckpointError(f"{folder}/{INDEX} is not a DCP index (it holds a {type(index).__name__})")
    return index


@dataclass(frozen=True)
class DcpTensor:
    """One tensor of a DCP index.

    Attributes:
        name: Its fully qualified name (``'model.0.weight'``).
        shape: Its global shape (all shards together).
        dtype: Its dtype.

    Example:
        >>> DcpTensor("model.0.weight", (8, 4), torch.float32).nbytes
        128
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        """Bytes of the whole tensor."""
        count = 1
        for size in self.shape:
            count *= size
        return count * torch.empty((), dtype=self.dtype).element_size()


def tensors_in(index: Any) -> list[DcpTensor]:
    """The tensors of a DCP index, in index order (non-tensor entries, pickled values, are left out).

    Example:
        >>> [t.name for t in tensors_in(read_index(folder))][:2]  # doctest: +SKIP
        ['model.0.weight', 'model.0.bias']
    """
    found = []
    for name, entry in index.state_dict_metadata.items():
        properties = getattr(entry, "properties", None)
        size = getattr(entry, "size", None)
        if properties is not None and size is not None:
            found.append(DcpTensor(str(name), tuple(int(n) for n in size), properties.dtype))
    return found


def check_folder(folder: Path) -> tuple[Any, int]:
    """Check a DCP folder by format: a readable index, and every byte range it names present.

    Returns:
        The index and the number of shard files it names.

    Raises:
        CheckpointNotFoundError: No ``.metadata``.
        CorruptCheckpointError: An unreadable index, a missing shard file, or a shard file shorter
            than a byte range the index puts in it (a truncated write).

    Example:
        >>> index, shards = check_folder(Path("runs/exp1/checkpoints/ep1-ba100"))  # doctest: +SKIP
    """
    folder = Path(folder)
    index = read_index(folder)
    storage = getattr(index, "storage_data", None)
    if not isinstance(storage, Mapping):
        raise CorruptCheckpointError(f"{folder}/{INDEX} lists no shard files")
    needed: dict[str, int] = {}
    for item in storage.values():
        relative = getattr(item, "relative_path", None)
        if not isinstance(relative, str) or not relative or relative.startswith("/") or ".." in relative.split("/"):
            raise CorruptCheckpointError(f"{folder}/{INDEX} names an unsafe shard path {relative!r}")
        end = int(getattr(item, "offset", 0) or 0) + int(getattr(item, "length", 0) or 0)
        needed[relative] = max(needed.get(relative, 0), end)
    for relative, end in sorted(needed.items()):
        shard = folder / relative
        if not shard.is_file():
            raise CorruptCheckpointError(f"{folder} lacks the shard file {relative} that its index names")
        size = shard.stat().st_size
        if size < end:
            raise CorruptCheckpointError(
                f"{folder}/{relative} is truncated: {size} bytes, the index places data up to byte {end}"
            )
    return index, len(needed)


def load_tensors(folder: Path, prefix: str) -> dict[str, torch.Tensor]:
    """Read the tensors whose names start with ``prefix`` into CPU tensors, names without the prefix.

    The index is checked first (:func:`check_folder`), so DCP's own reader, which unpickles it
    again, sees only what passed the allowlist. Pickled (non-tensor) entries are never read:
    DCP would load them with ``torch.load(weights_only=False)``.

    Raises:
        CorruptCheckpointError: The folder fails :func:`check_folder`, no tensor has the prefix,
            or DCP fails to read the bytes.

    Example:
        >>> load_tensors(Path("runs/exp1/checkpoints/ep1-ba100"), "model.")  # doctest: +SKIP
        {'0.weight': tensor(...), ...}
    """
    import torch.distributed.checkpoint as dcp

    index, _ = check_folder(folder)
    wanted = [t for t in tensors_in(index) if t.name.startswith(prefix)]
    if not wanted:
        prefixes = sorted({t.name.split(".", 1)[0] + "." for t in tensors_in(index)})
        raise CorruptCheckpointError(f"{folder} holds no tensor under {prefix!r} (its tensors are under {prefixes})")
    template = {t.name: torch.empty(t.shape, dtype=t.dtype) for t in wanted}
    try:
        with warnings.catch_warnings():
            # "torch.distributed is disabled ... assuming a single process": exactly our intent.
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(template, storage_reader=dcp.FileSystemReader(folder), no_dist=True)
    except Exception as e:  # DCP raises CheckpointException, RuntimeError, ... for damaged shards
        raise CorruptCheckpointError(f"cannot read the tensors of {folder}: {e}") from e
    return {name[len(prefix):]: tensor for name, tensor in template.items()}
