"""The fsspec backend: every scheme but ``s3://`` (``file://``, ``memory://``, ``gs://``, ``az://``, ...).

The same guarantees as the S3 backend, built from what every fsspec filesystem has:

- **No partial object under a final name.** A file is written under a temp name
  (``.<name>.tmp-<host>-<pid>-<hex>`` of :mod:`ckpt_callbacks.storage`) and then moved onto its key;
  on the local disk through :func:`~ckpt_callbacks.storage.atomic_write` (fsync, rename, folder
  fsync). Writing straight into ``fs.open(key, 'wb')`` would publish a truncated object when an
  exception (a deadline, a read error) leaves the ``with`` block: the close commits what was written.
- **Metadata** (the checksum) lives in a small hidden sidecar ``.<name>.ckpt-meta.json`` beside the
  object, since ``file://`` and ``memory://`` have no user metadata. It is written before the
  object, so an object is never visible without it, and put back as it was if writing the object
  fails; only a crash in between leaves a sidecar that does not match, which a download then
  reports as corrupt rather than passing silently. :meth:`FsspecStore.list` hides sidecars and
  temp objects, and keys with such names are refused.
- **overwrite=False** checks for the object first (fsspec has no conditional write); on the local
  disk the final ``link`` closes the race as well.
- **Deadlines** are checked between chunks (the local copy loop, fsspec's put callback).
- After a fork the filesystem object is rebuilt (fsspec clears its instance cache per pid).
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import fsspec
from fsspec.callbacks import Callback
from fsspec.implementations.local import LocalFileSystem

from ckpt_callbacks.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    ConfigurationError,
    UploadTimeoutError,
    bad_value,
)
from ckpt_callbacks.remote.base import ObjectInfo, ProgressCallback, check_key, same_object, verify_file
from ckpt_callbacks.remote.errors import translate_fsspec_error, translated
from ckpt_callbacks.storage import atomic_write, makedirs_durable
from ckpt_callbacks.temp_files import is_temp_name, sweep_stale_temp_files, temp_path_for

__all__ = ["FsspecStore"]

logger = logging.getLogger(__name__)

_CHUNK = 8 * 1024 * 1024
_SIDECAR = re.compile(r"^\..+\.ckpt-meta\.json$")


def _sidecar_name(name: str) -> str:
    return f".{name}.ckpt-meta.json"


def _hidden(name: str) -> bool:
    return bool(_SIDECAR.match(name)) or is_temp_name(name)


class _Deadline(Callback):
    """fsspec progress callback that reports progress and raises once the deadline has passed."""

    def __init__(self, what: str, deadline: float | None, progress: ProgressCallback | None) -> None:
        super().__init__()
        self._what, self._deadline, self._progress = what, deadline, progress

    def relative_update(self, inc: int = 1) -> None:
        self.check()
        self.value += inc
        if self._progress is not None:
            self._progress(inc)

    def check(self) -> None:
        if self._deadline is not None and time.monotonic() >= self._deadline:
            raise UploadTimeoutError(
                f"{self._what} did not finish by its deadline ({self.value} bytes sent); abandoned"
            )


class FsspecStore:
    """A :class:`~ckpt_callbacks.remote.base.RemoteStore` over any fsspec URL.

    Example:
        >>> store = FsspecStore("file:///mnt/ckpt/runs")
        >>> store.upload_file("ckpt/ep1.pt", "run1/ep1.pt", overwrite=False)  # doctest: +SKIP
        >>> store.list("run1/")  # doctest: +SKIP
        ['run1/ep1.pt']
    """

    def __init__(self, url: str, storage_options: Mapping[str, Any] | None = None) -> None:
        if not isinstance(url, str) or "://" not in url:
            accepted = "a URL such as 'file:///mnt/ckpt' or 'gs://bucket/prefix'"
            raise ConfigurationError(bad_value("remote", accepted, url))
        if storage_options is not None and not isinstance(storage_options, Mapping):
            raise ConfigurationError(bad_value("storage_options", "a dict or None", storage_options))
        self.url = url.rstrip("/")
        self._options = dict(storage_options or {})
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._fs_obj: Any = None
        self._root = ""
        self._fs()  # an unknown scheme, a missing package or a bad option fails here

    def _fs(self) -> Any:
        with self._lock:
            if self._pid != os.getpid():
                try:
                    fs, root = fsspec.core.url_to_fs(self.url, **self._options)
                except ImportError as exc:
                    raise ConfigurationError(
                        f"'remote' {self.url!r} needs a package that is not installed: {exc}"
                    ) from exc
                except (ValueError, TypeError) as exc:
                    raise ConfigurationError(
                        bad_value("remote", f"a URL and storage_options fsspec accepts ({exc})", self.url)
                    ) from exc
                self._fs_obj, self._root, self._pid = fs, root.rstrip("/"), os.getpid()
            return self._fs_obj

    @property
    def _is_local(self) -> bool:
        return isinstance(self._fs(), LocalFileSystem)

    def _path(self, key: str) -> str:
        check_key(key)
        if _hidden(key.rpartition("/")[2]):
            raise ConfigurationError(bad_value("key", "a name that is not a temp or metadata-sidecar name", key))
        self._fs()
        return f"{self._root}/{key}"

    def _sidecar(self, key: str) -> str:
        folder, _, name = self._path(key).rpartition("/")
        return f"{folder}/{_sidecar_name(name)}"

    def uri(self, key: str) -> str:
        """The full URL of ``key``.

        Example:
            >>> FsspecStore("memory://bucket/runs").uri("run1/ep1.pt")
            'memory://bucket/runs/run1/ep1.pt'
        """
        check_key(key)
        return f"{self.url}/{key}"

    def _errors(self, operation: str, uri: str) -> Any:
        return translated(translate_fsspec_error, operation, uri)

    # -- reading --------------------------------------------------------------------------------

    def probe(self) -> None:
        """List the prefix (a missing prefix is fine: it is created on the first write)."""
        with self._errors("LIST", self.url):
            fs = self._fs()
            if fs.exists(self._root):
                fs.ls(self._root, detail=False)

    def info(self, key: str) -> ObjectInfo | None:
        """Size and metadata (from the sidecar) of ``key``, or None when it does not exist."""
        path = self._path(key)
        with self._errors("HEAD", self.uri(key)):
            try:
                details = self._fs().info(path)
            except FileNotFoundError:
                return None
            if details.get("type") == "directory":
                return None
            return ObjectInfo(key=key, size=int(details["size"]), metadata=self._read_metadata(key))

    def _read_metadata(self, key: str) -> dict[str, str]:
        try:
            metadata = json.loads(self._fs().cat_file(self._sidecar(key)))
        except FileNotFoundError:
            return {}
        except ValueError:
            logger.warning("ignoring the unreadable metadata sidecar of %s", self.uri(key))
            return {}
        return {str(name): str(value) for name, value in metadata.items()} if isinstance(metadata, dict) else {}

    def read_bytes(self, key: str) -> bytes:
        """The content of a small object."""
        path = self._path(key)
        with self._errors("GET", self.uri(key)):
            return self._fs().cat_file(path)

    def list(self, prefix: str = "") -> list[str]:
        """Every key that starts with ``prefix``, sorted (sidecars and temp objects hidden)."""
        folder = prefix.rpartition("/")[0]
        base = f"{self._root}/{folder}".rstrip("/")
        with self._errors("LIST", f"{self.url}/{prefix}"):
            try:
                paths = self._fs().find(base)
            except FileNotFoundError:
                return []
        keys = (path[len(self._root) + 1:] for path in paths if path.startswith(self._root + "/"))
        return sorted(k for k in keys if k.startswith(prefix) and not _hidden(k.rpartition("/")[2]))

    def download_file(
        self,
        key: str,
        local_path: str | os.PathLike,
        *,
        checksum: str | None = None,
        progress: ProgressCallback | None = None,
    ) -> int:
        """Copy ``key`` to a temp sibling of ``local_path``, verify size and checksum, rename into place.

        Raises:
            CheckpointNotFoundError: no such object.
            CorruptCheckpointError: wrong size or checksum; ``local_path`` is left untouched.
        """
        uri, path = self.uri(key), self._path(key)
        info = self.info(key)
        if info is None:
            raise CheckpointNotFoundError(f"GET {uri}: no such object")
        final = Path(local_path)
        final.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(final) as out:
            with self._errors("GET", uri), self._fs().open(path, "rb") as source:
                while chunk := source.read(_CHUNK):
                    out.file.write(chunk)
                    if progress is not None:
                        progress(len(chunk))
            out.file.flush()
            verify_file(out.temp, what=uri, size=info.size, checksum=checksum or info.checksum)
        return info.size

    # -- writing --------------------------------------------------------------------------------

    def _refuse_existing(self, key: str, size: int, metadata: Mapping[str, str] | None) -> bool:
        """True if ``key`` already holds this object (nothing to do); raise if it holds another one."""
        existing = self.info(key)
        if existing is None:
            return False
        if same_object(existing, size, metadata):
            return True
        raise CheckpointExistsError(f"{self.uri(key)} already exists and overwrite=False refuses to replace it")

    @contextmanager
    def _metadata_first(self, key: str, metadata: Mapping[str, str] | None) -> Iterator[None]:
        """Write ``key``'s sidecar, then run the block that writes the object; if the block fails, put
        the old sidecar back (an object that stayed in place keeps metadata that describes it)."""
        sidecar, fs = self._sidecar(key), self._fs()
        try:
            previous = fs.cat_file(sidecar)
        except FileNotFoundError:
            previous = None
        if metadata:
            data = json.dumps({str(k).lower(): str(v) for k, v in metadata.items()}, sort_keys=True).encode()
            self._write_sidecar(sidecar, data)
        elif previous is not None:  # an old sidecar would describe the old object
            fs.rm_file(sidecar)
        try:
            yield
        except BaseException:
            with suppress(Exception):
                if previous is not None:
                    self._write_sidecar(sidecar, previous)
                elif metadata:
                    fs.rm_file(sidecar)
            raise

    def _write_sidecar(self, sidecar: str, data: bytes) -> None:
        fs = self._fs()
        if self._is_local:
            makedirs_durable(Path(sidecar).parent)
            with atomic_write(Path(sidecar)) as out:
                out.file.write(data)
        else:
            fs.pipe_file(sidecar, data)

    def write_bytes(
        self, key: str, data: bytes, *, overwrite: bool = True, metadata: Mapping[str, str] | None = None
    ) -> None:
        """Write a small object (atomically: a rename on disk, one request elsewhere)."""
        uri, path = self.uri(key), self._path(key)
        with self._errors("PUT", uri):
            if not overwrite and self._refuse_existing(key, len(data), metadata):
                return
            with self._metadata_first(key, metadata):
                if self._is_local:
                    makedirs_durable(Path(path).parent)
                    with atomic_write(Path(path), overwrite=overwrite) as out:
                        out.file.write(data)
                else:
                    self._fs().pipe_file(path, bytes(data))

    def upload_file(
        self,
        local_path: str | os.PathLike,
        key: str,
        *,
        overwrite: bool = True,
        metadata: Mapping[str, str] | None = None,
        deadline: float | None = None,
        progress: ProgressCallback | None = None,
    ) -> None:
        """Copy a file to ``key`` under a temp name, then move it into place.

        Raises:
            UploadTimeoutError: ``deadline`` (a ``time.monotonic()`` instant) passed; nothing was published.
            CheckpointExistsError: ``overwrite`` is False and ``key`` holds a different object.
        """
        uri, path, local = self.uri(key), self._path(key), os.fspath(local_path)
        size = os.path.getsize(local)  # a missing local file is not a missing object: not translated
        callback = _Deadline(f"upload of {local!r} to {uri}", deadline, progress)
        callback.check()
        with self._errors("upload", uri):
            if not overwrite and self._refuse_existing(key, size, metadata):
                return
            with self._metadata_first(key, metadata):
                if self._is_local:
                    self._copy_local(local, Path(path), overwrite, callback)
                else:
                    self._put_remote(local, path, callback)

    @staticmethod
    def _copy_local(local: str, final: Path, overwrite: bool, callback: _Deadline) -> None:
        makedirs_durable(final.parent)
        with open(local, "rb") as source, atomic_write(final, overwrite=overwrite) as out:
            while chunk := source.read(_CHUNK):
                out.file.write(chunk)
                callback.relative_update(len(chunk))

    def _put_remote(self, local: str, path: str, callback: _Deadline) -> None:
        fs = self._fs()
        temp = temp_path_for(Path(path)).as_posix()
        try:
            fs.put_file(local, temp, callback=callback)
            callback.check()
            fs.mv(temp, path)
        except BaseException:
            with suppress(Exception):
                fs.rm_file(temp)
            raise

    def delete(self, key: str) -> None:
        """Delete ``key`` and its metadata; a missing key is not an error."""
        path, sidecar = self._path(key), self._sidecar(key)
        with self._errors("DELETE", self.uri(key)):
            for target in (path, sidecar):
                with suppress(FileNotFoundError):
                    self._fs().rm_file(target)

    def abort_incomplete_uploads(self, *, older_than_seconds: float) -> int:
        """Remove temp objects that interrupted uploads left under the prefix; return how many.

        On the local disk a temp file goes when its writer's process is gone or it is older than
        the bound (:func:`~ckpt_callbacks.temp_files.sweep_stale_temp_files`); elsewhere when it is
        older than the bound, where the filesystem reports modification times.
        """
        if not older_than_seconds >= 0:
            raise ConfigurationError(bad_value("older_than_seconds", "a number of seconds >= 0", older_than_seconds))
        fs = self._fs()
        with self._errors("LIST", self.url):
            try:
                temps = [p for p in fs.find(self._root) if is_temp_name(p.rpartition("/")[2])]
            except FileNotFoundError:
                return 0
        if self._is_local:
            folders = {str(Path(p).parent) for p in temps}
            return sum(len(sweep_stale_temp_files(Path(f), max_age_seconds=older_than_seconds)) for f in folders)
        removed = 0
        for temp in temps:
            with self._errors("DELETE", temp), suppress(NotImplementedError, FileNotFoundError):
                if time.time() - fs.modified(temp).timestamp() > older_than_seconds:
                    fs.rm_file(temp)
                    removed += 1
        return removed

    def close(self) -> None:
        """Nothing to release: fsspec keeps its filesystem instances itself."""
