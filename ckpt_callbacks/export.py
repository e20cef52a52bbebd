"""A full checkpoint to a weights-only file for inference: ``ckpt-callbacks export``.

:func:`export_weights` takes the model's weights out of a checkpoint of any format (a file, or a
DCP folder whose shards it consolidates in one process), optionally casts the floating-point
tensors (``bf16`` halves an fp32 model), strips the prefixes that wrappers add to every name, and
writes a new file, atomically, in the format its name asks for: ``.pt`` with any codec
(``.pt.zst``, ...) or ``.safetensors``.

Prefixes: ``torch.compile`` inserts ``_orig_mod.`` at the level of the compiled module, and
DDP/DataParallel put ``module.`` in front of every name; the exported names are those of the bare
model, so ``model.load_state_dict`` works without the wrapper. ``_orig_mod`` parts are removed
wherever they are (no real submodule has that name); ``module.`` only when every name starts with
it (a model may well have a submodule called ``module``).

Where the weights are: ``state/model`` in our checkpoints, ``state_dict`` in Lightning's,
``model`` in the common ``{'model': ..., 'optimizer': ...}`` dicts, or the whole dict when every
value is a tensor (a bare state dict, a safetensors file); ``key=`` names another place.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ckpt_callbacks import dcp_index
from ckpt_callbacks.codecs import checkpoint_format
from ckpt_callbacks.errors import CheckpointError, ConfigurationError, CorruptCheckpointError, bad_value
from ckpt_callbacks.record import FOLDER_METADATA
from ckpt_callbacks.serialization import read_state, write_state
from ckpt_callbacks.sharded import is_sharded_checkpoint
from ckpt_callbacks.storage import atomic_write, makedirs_durable

__all__ = ["DTYPES", "WRAPPER_PREFIXES", "ExportResult", "export_weights", "find_weights", "strip_prefixes"]

DTYPES: dict[str, torch.dtype | None] = {
    "keep": None, "bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64,
}
"""``--dtype`` names and the floating-point dtype they cast to (``keep``: no cast)."""

WRAPPER_PREFIXES = ("_orig_mod.", "module.")
"""What ``torch.compile`` and DDP/DataParallel add to parameter names."""

_SAVER_KEYS = ("saver", "save_sequence", "lineage", "resumed_from", "ranks")
_AUTO_KEYS = (("state", "model"), ("state_dict",), ("model",))


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_weights` wrote.

    Attributes:
        out: The file written.
        format: Its format (``'torch+zstd'``, ``'safetensors'``, ...).
        tensors: How many tensors it holds.
        nbytes: Their bytes (before compression).
        dtype: The dtype floating-point tensors were cast to, or None.
        stripped: The wrapper prefixes removed from the names.
        source_key: Where in the source the weights were found (``'state/model'``).

    Example:
        >>> export_weights(Path("ckpt/ep3.pt.gz"), Path("model.safetensors")).tensors  # doctest: +SKIP
        4
    """

    out: Path
    format: str
    tensors: int
    nbytes: int
    dtype: str | None
    stripped: tuple[str, ...]
    source_key: str

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (what ``export --json`` prints)."""
        return {
            "out": str(self.out), "format": self.format, "tensors": self.tensors, "bytes": self.nbytes,
            "dtype": self.dtype, "stripped": list(self.stripped), "source_key": self.source_key,
        }


def find_weights(checkpoint: Mapping[str, Any], key: str | None = None) -> tuple[dict[str, Any], str]:
    """The model's state dict inside a loaded checkpoint, and where it was (``'state/model'``).

    Args:
        checkpoint: A loaded checkpoint dict.
        key: A ``/``-separated path to the weights; None tries ``state/model``, ``state_dict``,
            ``model``, then the whole dict if every value is a tensor.

    Raises:
        CorruptCheckpointError: No state dict where asked, or none found.

    Example:
        >>> find_weights({"state": {"model": {"w": torch.ones(1)}}})[1]
        'state/model'
    """
    paths = [tuple(key.strip("/").split("/"))] if key else list(_AUTO_KEYS)
    for parts in paths:
        node: Any = checkpoint
        for part in parts:
            node = node.get(part) if isinstance(node, Mapping) else None
        if isinstance(node, Mapping) and any(isinstance(v, torch.Tensor) for v in node.values()):
            return dict(node), "/".join(parts)
    if key is None and checkpoint and all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        return dict(checkpoint), ""
    where = f"at {key!r}" if key else "at state/model, state_dict or model, and it is not a bare state dict"
    raise CorruptCheckpointError(
        f"no model state dict {where} (top-level keys: {sorted(str(k) for k in checkpoint)}); --key names where it is"
    )


def strip_prefixes(weights: Mapping[str, Any]) -> tuple[dict[str, Any], tuple[str, ...]]:
    """Remove ``_orig_mod`` parts everywhere and a ``module.`` prefix every name has.

    Returns:
        The renamed state dict and the prefixes removed.

    Raises:
        CheckpointError: Two names become one (keep the prefixes, then).

    Example:
        >>> strip_prefixes({"module._orig_mod.0.weight": 1, "module._orig_mod.0.bias": 2})
        ({'0.weight': 1, '0.bias': 2}, ('_orig_mod.', 'module.'))
    """
    stripped: list[str] = []
    names = {name: name for name in weights}
    if any("_orig_mod" in name.split(".") for name in names):
        names = {old: ".".join(p for p in new.split(".") if p != "_orig_mod") for old, new in names.items()}
        stripped.append("_orig_mod.")
    while names and all(new.startswith("module.") for new in names.values()):
        names = {old: new[len("module."):] for old, new in names.items()}
        if "module." not in stripped:
            stripped.append("module.")
    if len(set(names.values())) != len(names):
        raise CheckpointError(f"removing {stripped} would merge different weights into one name; use --keep-prefixes")
    return {names[old]: value for old, value in weights.items()}, tuple(stripped)


def _cast(weights: Mapping[str, Any], dtype: torch.dtype | None) -> dict[str, Any]:
    if dtype is None:
        return dict(weights)
    # Tied weights (one storage under two names) stay tied: each view is converted once.
    converted: dict[tuple[int, int, tuple[int, ...], tuple[int, ...]], torch.Tensor] = {}
    out = {}
    for name, value in weights.items():
        if not isinstance(value, torch.Tensor) or not value.is_floating_point() or value.dtype == dtype:
            out[name] = value
            continue
        view = (value.untyped_storage().data_ptr(), value.storage_offset(), tuple(value.shape), tuple(value.stride()))
        if view not in converted:
            converted[view] = value.detach().to(dtype)
        out[name] = converted[view]
    return out


def _load_source(source: Path, key: str | None) -> tuple[dict[str, Any], str, dict[str, Any]]:
    """(weights, where they were, metadata) of a checkpoint file or DCP folder."""
    if is_sharded_checkpoint(source):
        prefix = (key or "model").strip("/").replace("/", ".") + "."
        metadata_file = source / FOLDER_METADATA
        metadata = _json_metadata(metadata_file) if metadata_file.is_file() else {}
        return dcp_index.load_tensors(source, prefix), prefix.rstrip("."), metadata
    if source.is_dir():
        raise ConfigurationError(bad_value("PATH", "a checkpoint file or a DCP folder (with .metadata)", str(source)))
    checkpoint = read_state(source)
    weights, where = find_weights(checkpoint, key)
    body = checkpoint.get("state")
    metadata = body.get("metadata") if isinstance(body, Mapping) else None
    return weights, where, dict(metadata) if isinstance(metadata, Mapping) else {}


def _json_metadata(path: Path) -> dict[str, Any]:
    try:
        loaded = json.loads(path.read_text())
    except ValueError as error:
        raise CorruptCheckpointError(f"{path} is corrupt: not valid JSON ({error})") from error
    return loaded if isinstance(loaded, dict) else {}


def export_weights(
    source: Path,
    out: Path,
    *,
    dtype: str = "keep",
    keep_prefixes: bool = False,
    key: str | None = None,
    bare: bool = False,
    overwrite: bool = False,
    compression_level: int | None = None,
) -> ExportResult:
    """Write the model weights of ``source`` to ``out``, a new weights-only file.

    Args:
        source: A checkpoint file of any format, or a DCP folder.
        out: The file to write; its name chooses the format (``.pt``, ``.pt.zst``, ``.safetensors``...).
        dtype: A key of :data:`DTYPES`: cast floating-point tensors (``'bf16'``), or ``'keep'``.
        keep_prefixes: Keep ``_orig_mod.`` and ``module.`` in the names.
        key: Where the weights are (see :func:`find_weights`; for a DCP folder, the name prefix).
        bare: For ``.pt`` names, write the state dict alone (``torch.load(out)`` returns it), not
            our weights-only layout ``{'state': {'model': ..., 'metadata': ...}}``, which
            :func:`~ckpt_callbacks.loader.load_checkpoint` reads.
        overwrite: Replace an existing ``out``.
        compression_level: The level of the codec ``out``'s name chooses.

    Raises:
        ConfigurationError: A bad ``dtype``, an unknown extension, non-tensor values for
            safetensors, a bad level.
        CheckpointExistsError: ``out`` exists and ``overwrite`` is False.
        CorruptCheckpointError: The source does not load, or has no model weights.

    Example:
        >>> export_weights(Path("ckpt/ep3-ba300-rank0.pt.zst"), Path("model.safetensors"), dtype="bf16")  # doctest: +SKIP
        ExportResult(out=PosixPath('model.safetensors'), format='safetensors', tensors=4, ...)
    """
    if dtype not in DTYPES:
        raise ConfigurationError(bad_value("dtype", f"one of {', '.join(DTYPES)}", dtype))
    out = Path(out)
    fmt = checkpoint_format(out.name, argument="OUT")
    weights, where, metadata = _load_source(Path(source), key)
    stripped: tuple[str, ...] = ()
    if not keep_prefixes:
        weights, stripped = strip_prefixes(weights)
    weights = _cast(weights, DTYPES[dtype])
    others = sorted(name for name, value in weights.items() if not isinstance(value, torch.Tensor))
    if fmt.tensors_only and others:
        raise ConfigurationError(bad_value("OUT", "a .pt name for weights with non-tensor values", f"{out.name} ({others})"))
    # Provenance of a saver's own checkpoint would let that saver adopt (and prune) the export.
    for name in _SAVER_KEYS:
        metadata.pop(name, None)
    metadata.update({
        "weights_only": True, "exported_from": Path(source).name, "exported_at": time.time(),
        "export_dtype": dtype, "stripped_prefixes": list(stripped),
    })
    payload = weights if bare and not fmt.tensors_only else {"state": {"model": weights, "metadata": metadata}}
    makedirs_durable(out.parent)
    with atomic_write(out, overwrite=overwrite, payload=True) as target:
        write_state(payload, target.file, fmt, compression_level)
    tensors = [value for value in weights.values() if isinstance(value, torch.Tensor)]
    label = fmt.container if fmt.codec is None else f"{fmt.container}+{fmt.codec.name}"
    return ExportResult(
        out, label, len(tensors), sum(t.numel() * t.element_size() for t in tensors),
        None if dtype == "keep" else dtype, stripped, where,
    )
