"""Is a checkpoint intact? ``ckpt-callbacks verify``, by format, never by running a file's code.

:func:`verify_checkpoint` returns a :class:`Verdict` for a file or folder of any known format:

- our files (plain, compressed, tar, safetensors):
  :func:`~ckpt_callbacks.serialization.verify_file` decodes everything (so a codec's checksum is
  checked), checks the zip CRC-32s where no checksummed codec wraps them, and loads the state with
  ``torch.load(weights_only=True)`` and its short allowlist;
- trainers' native ``torch.save`` files that hold other objects (a Lightning ``.ckpt`` with its
  hyper-parameters, Hugging Face's ``training_args.bin``): the same decoding and CRC checks, then the
  pickle is parsed opcode by opcode, never unpickled (unpickling would run the code it names);
- DCP folders: the index, unpickled with DCP's own classes only, every shard file present and long
  enough for every byte range in the index (DCP has no checksums), plus our ``extras.pt``;
- other folders (a Hugging Face ``checkpoint-N/``): every checkpoint file in them as above, every
  ``.json`` file parsed; other files are listed as not checked.
"""

from __future__ import annotations

import json
import os
import pickle
import pickletools
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ckpt_callbacks import archive, dcp_index
from ckpt_callbacks.decoding import open_decoded
from ckpt_callbacks.errors import CheckpointError, CorruptCheckpointError
from ckpt_callbacks.inspection import FormatInfo, foreign_globals, identify, safetensors_header
from ckpt_callbacks.record import FOLDER_METADATA
from ckpt_callbacks.safetensors_format import CRC_KEY
from ckpt_callbacks.serialization import verify_file
from ckpt_callbacks.sharded import EXTRAS

__all__ = ["Verdict", "verify_checkpoint"]

_CHUNK = 2**20


@dataclass
class Verdict:
    """The outcome of verifying one checkpoint.

    Attributes:
        path: What was verified.
        ok: Whether it is intact.
        format: Its format label (``'torch+zstd'``, ``'dcp'``, ...), or None if unknown.
        size: Bytes on disk.
        checks: What was checked, in order (``'zstd checksum'``, ``'loads with weights_only=True'``).
        error: Why it is not intact (None when ``ok``).
        notes: Remarks that do not make it fail (objects not loaded, files not checked).
        missing: Whether it failed because nothing is there (rather than damage).

    Example:
        >>> verify_checkpoint(Path("checkpoints/ep1-ba10-rank0.pt.gz")).checks  # doctest: +SKIP
        ['gzip checksum', 'loads with weights_only=True']
    """

    path: str
    ok: bool
    format: str | None
    size: int
    checks: list[str] = field(default_factory=list)
    error: str | None = None
    notes: list[str] = field(default_factory=list)
    missing: bool = False

    @property
    def status(self) -> str:
        """``'ok'``, ``'corrupt'`` or ``'missing'``."""
        return "ok" if self.ok else "missing" if self.missing else "corrupt"

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (one element of ``verify --json``)."""
        return {
            "path": self.path, "ok": self.ok, "status": self.status, "format": self.format, "size": self.size,
            "checks": self.checks, "error": self.error, "notes": self.notes,
        }


def verify_checkpoint(path: Path) -> Verdict:
    """Verify a checkpoint file or folder by format (see the module docstring); never raises for damage.

    A missing path, an unknown format or any damage gives a Verdict with ``ok=False`` and the
    reason in ``error``.

    Example:
        >>> verdict = verify_checkpoint(Path("runs/exp1/checkpoints/ep1-ba100"))  # doctest: +SKIP
        >>> verdict.ok, verdict.format  # doctest: +SKIP
        (True, 'dcp')
    """
    path = Path(path)
    verdict = Verdict(str(path), False, None, 0)
    try:
        fmt = identify(path)
        verdict.format = fmt.label
        verdict.size = _disk_size(path)
        if fmt.container == "dcp":
            _verify_dcp(path, verdict)
        elif fmt.container == "folder":
            _verify_folder(path, verdict)
        else:
            _verify_file(path, fmt, verdict)
    except (CheckpointError, OSError) as error:
        verdict.error = str(error)
        verdict.missing = isinstance(error, FileNotFoundError) and not os.path.lexists(path)
        return verdict
    verdict.ok = True
    return verdict


def _disk_size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


def _integrity_checks(fmt: FormatInfo) -> list[str]:
    if fmt.codec is not None and fmt.checksummed:
        return [f"{fmt.codec} checksum"]
    checks = [f"{fmt.codec} stream decodes ({fmt.codec} has no checksum)"] if fmt.codec else []
    return [*checks, "tar structure"] if fmt.container == "tar" else checks


def _verify_file(path: Path, fmt: FormatInfo, verdict: Verdict) -> None:
    verdict.checks += _integrity_checks(fmt)
    if fmt.container == "tar" and _verify_folder_bundle(path, verdict):
        return
    if fmt.container == "safetensors":
        verify_file(path)
        verdict.checks.append("safetensors header and sizes")
        if fmt.codec is None and CRC_KEY in safetensors_header(path)[1]:
            verdict.checks.append("CRC-32 of the data")
        return
    try:
        verify_file(path)
    except CorruptCheckpointError as error:
        # torch's safe loader refuses unknown classes with UnpicklingError; CRCs and decoding
        # passed before it. Anything else is damage.
        if not isinstance(error.__cause__, pickle.UnpicklingError):
            raise
        with _decoded_zip(path, fmt) as decoded:
            foreign = foreign_globals(decoded)
            if not foreign:
                raise
            _check_pickle(decoded, path)
        if fmt.codec is None:
            verdict.checks.append("zip CRC-32s")
        verdict.checks.append("pickle structure (not unpickled)")
        verdict.notes.append(f"not loaded: holds objects outside the safe-load allowlist ({', '.join(foreign)})")
        return
    if fmt.codec is None:
        verdict.checks.append("zip CRC-32s")
    verdict.checks.append("loads with weights_only=True")


def _verify_folder_bundle(path: Path, verdict: Verdict) -> bool:
    """A tar of a trainer's folder (a Hugging Face ``checkpoint-N/``), not of one state dict: extract
    it safely into a scratch folder and verify that like a folder. False for a state-dict tar."""
    folder = path.parent if os.access(path.parent, os.W_OK) else None
    with tempfile.TemporaryDirectory(prefix=".verify-", dir=folder) as scratch:
        root = Path(scratch) / "bundle"
        archive.extract(path, root)
        if any((root / member).is_file() for member in (archive.MEMBER, archive.COMPOSER_MEMBER)):
            return False
        verdict.checks.append("members extract safely")
        _verify_folder(root, verdict)
    return True


@contextmanager
def _decoded_zip(path: Path, fmt: FormatInfo) -> Iterator[Path]:
    """The ``torch.save`` zip inside ``path``: the file itself, or a decoded temp copy."""
    if fmt.codec is None and fmt.container == "torch":
        yield path
        return
    folder = path.parent if os.access(path.parent, os.W_OK) else None
    with tempfile.TemporaryDirectory(prefix=".verify-", dir=folder) as scratch:
        decoded_path = Path(scratch) / "checkpoint.pt"
        with open_decoded(path) as decoded, open(decoded_path, "wb") as out:
            if decoded.kind == "tar":
                archive.copy_member(decoded.stream, out, source=path)
            else:
                shutil.copyfileobj(decoded.stream, out, _CHUNK)
        yield decoded_path


def _check_pickle(zip_path: Path, shown: Path) -> None:
    """Walk the pickle of a ``torch.save`` zip opcode by opcode: complete, ending in STOP."""
    with zipfile.ZipFile(zip_path) as archive_:
        names = [n for n in archive_.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
        if not names:
            raise CorruptCheckpointError(f"{shown} is not a torch.save archive: it has no data.pkl")
        data = archive_.read(names[0])
    try:
        for _ in pickletools.genops(data):
            pass
    except ValueError as error:  # genops reports bad opcodes and a missing STOP as ValueError
        raise CorruptCheckpointError(f"{shown} is corrupt: its pickle does not parse ({error})") from error


def _verify_dcp(path: Path, verdict: Verdict) -> None:
    index, shards = dcp_index.check_folder(path)
    tensors = len(dcp_index.tensors_in(index))
    verdict.checks += ["DCP index (DCP's classes only)", f"{shards} shard files hold every byte range of {tensors} tensors"]
    if (path / EXTRAS).is_file():
        verify_file(path / EXTRAS)
        verdict.checks.append(f"{EXTRAS} loads with weights_only=True")
    if (path / FOLDER_METADATA).is_file():
        _check_json(path / FOLDER_METADATA)
        verdict.checks.append(f"{FOLDER_METADATA} parses")
    verdict.notes.append("DCP stores no checksums: a flipped bit inside a shard cannot be detected")


def _check_json(path: Path) -> None:
    try:
        json.loads(path.read_bytes())
    except ValueError as error:
        raise CorruptCheckpointError(f"{path} is corrupt: not valid JSON ({error})") from error


def _verify_folder(path: Path, verdict: Verdict) -> None:
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    if not files:
        raise CorruptCheckpointError(f"{path} is an empty folder, not a checkpoint")
    checked, skipped = 0, []
    for file in files:
        relative = file.relative_to(path).as_posix()
        if file.suffix == ".json":
            _check_json(file)
            verdict.checks.append(f"{relative}: parses")
            checked += 1
            continue
        try:
            fmt = identify(file)
        except CorruptCheckpointError:
            skipped.append(relative)
            continue
        inner = Verdict(relative, False, fmt.label, file.stat().st_size)
        _verify_file(file, fmt, inner)
        verdict.checks += [f"{relative}: {check}" for check in inner.checks]
        verdict.notes += [f"{relative}: {note}" for note in inner.notes]
        checked += 1
    if not checked:
        raise CorruptCheckpointError(f"{path} holds no checkpoint file (only {', '.join(skipped)})")
    if skipped:
        verdict.notes.append(f"not checked (no checkpoint format): {', '.join(skipped)}")
