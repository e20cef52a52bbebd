"""What a checkpoint location on the command line points at, and fetching remote ones.

A location is a local path or a URI (``s3://bucket/runs/ep1.pt``, ``file:///mnt/ckpt/x``,
``memory://...``). Local paths go through :func:`resolve_checkpoint_path`
(a ``latest`` symlink or pointer file leads to its target). A URI is resolved by
:class:`RemoteLocations` against the store that :func:`~ckpt_callbacks.remote.open_store` opens
for its parent prefix, in this order:

1. a name ending in ``.symlink`` is a pointer object: its content is the key of the checkpoint
   (Composer's convention: the whole content is the key, no scheme, no bucket). The key is
   relative to the prefix the saver uploads under, which the pointer does not record, so it is
   tried under the pointer's own prefix first and then under each ancestor up to the bucket;
   the first that exists wins. Pointers to pointers are followed, a bounded number of times;
2. an object with that key;
3. a folder: every object under ``<key>/`` (a DCP checkpoint folder, say);
4. ``<key>.symlink``: Composer's fallback for a latest name given without its suffix.

:meth:`RemoteLocations.download` writes a file atomically (a temp sibling, verified against the
store's size and checksum, renamed into place: the store's ``download_file``) and a folder into a
temp folder renamed into place at the end, so an interrupted download never leaves a partial
checkpoint under the final name.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ckpt_callbacks.errors import CheckpointExistsError, CheckpointNotFoundError, ConfigurationError, bad_value
from ckpt_callbacks.progress import Progress
from ckpt_callbacks.remote import RemoteStore, open_store
from ckpt_callbacks.remote.publisher import POINTER_SUFFIX
from ckpt_callbacks.storage import makedirs_durable, remove_checkpoint, replace_folder, resolve_latest
from ckpt_callbacks.temp_files import temp_path_for

__all__ = ["RemoteLocations", "RemoteTarget", "is_uri", "local_checkpoint", "resolve_checkpoint_path", "split_uri"]

_MAX_POINTER_HOPS = 8
_MAX_POINTER_BYTES = 4096


def is_uri(location: str | os.PathLike[str]) -> bool:
    """Whether a location names an object store (``scheme://...``) rather than a local path.

    Example:
        >>> is_uri("s3://bucket/runs/ep1.pt"), is_uri("runs/ep1.pt")
        (True, False)
    """
    return "://" in os.fspath(location)


def split_uri(uri: str) -> tuple[str, str]:
    """Split an object URI into its parent prefix URL and its last name.

    Raises:
        ConfigurationError: The URI names no object (a bare bucket or scheme).

    Example:
        >>> split_uri("s3://bucket/runs/ep1.pt")
        ('s3://bucket/runs', 'ep1.pt')
    """
    parts = urlsplit(uri)
    path = parts.path.rstrip("/")
    parent, _, name = path.rpartition("/")
    if not parts.scheme or not name or (not parts.netloc and not parent):
        raise ConfigurationError(bad_value("location", "a URI naming an object, such as 's3://bucket/runs/ep1.pt'", uri))
    return f"{parts.scheme}://{parts.netloc}{parent}", name


def _ancestors(prefix: str) -> list[str]:
    """``prefix`` and every prefix above it, deepest first, down to the bucket (or top folder)."""
    parts = urlsplit(prefix)
    segments = [s for s in parts.path.split("/") if s]
    # A bucket (netloc) may be a prefix of its own; a local path needs at least one folder.
    lowest = 0 if parts.netloc else 1
    return [
        f"{parts.scheme}://{parts.netloc}" + "".join("/" + s for s in segments[:depth])
        for depth in range(len(segments), lowest - 1, -1)
    ]


@dataclass(frozen=True)
class RemoteTarget:
    """What a URI resolved to: one object, or a folder of objects.

    Attributes:
        uri: The URI of the object or folder (after following pointers).
        store: The store opened at the parent prefix of ``uri``.
        name: The last name of ``uri`` (the object's key in ``store``, or the folder's).
        keys: The keys to fetch, relative to ``store``: ``(name,)`` for an object, every object
            under ``name/`` for a folder.
        sizes: The size of each key, in bytes.
        is_folder: Whether ``uri`` is a folder.
        via: The pointer URIs that were followed to get here, in order.

    Example:
        >>> target = RemoteLocations().resolve("memory://bucket/runs/latest.pt.symlink")  # doctest: +SKIP
        >>> target.uri, target.via  # doctest: +SKIP
        ('memory://bucket/runs/ep2.pt', ('memory://bucket/runs/latest.pt.symlink',))
    """

    uri: str
    store: RemoteStore
    name: str
    keys: tuple[str, ...]
    sizes: tuple[int, ...]
    is_folder: bool
    via: tuple[str, ...] = ()

    @property
    def size(self) -> int:
        """Bytes of every object together."""
        return sum(self.sizes)


class RemoteLocations:
    """Resolves and downloads remote locations; caches one store per prefix. Close it after use.

    Args:
        storage_options: Credentials, endpoint, ... for every store opened (see docs/remote.md).

    Example:
        >>> with RemoteLocations() as remote:  # doctest: +SKIP
        ...     target = remote.resolve("s3://bucket/runs/exp1/checkpoints/latest-rank0.pt.symlink")
        ...     remote.download(target, Path("restore"))
        PosixPath('restore/ep3-ba300-rank0.pt')
    """

    def __init__(self, storage_options: Mapping[str, Any] | None = None) -> None:
        self._options = storage_options
        self._stores: dict[str, RemoteStore] = {}

    def store(self, prefix: str) -> RemoteStore:
        """The store under ``prefix``, opened once."""
        if prefix not in self._stores:
            self._stores[prefix] = open_store(prefix, self._options)
        return self._stores[prefix]

    def close(self) -> None:
        """Close every store opened."""
        stores, self._stores = list(self._stores.values()), {}
        for store in stores:
            store.close()

    def __enter__(self) -> RemoteLocations:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def resolve(self, uri: str) -> RemoteTarget:
        """Follow pointers and find the object or folder ``uri`` names (see the module docstring).

        Raises:
            CheckpointNotFoundError: Nothing there, or a pointer to something missing.
            CorruptCheckpointError: Not raised here; the bytes are checked when downloaded.

        Example:
            >>> RemoteLocations().resolve("file:///mnt/ckpt/runs/ep1.pt").keys  # doctest: +SKIP
            ('ep1.pt',)
        """
        via: list[str] = []
        current = uri.rstrip("/")
        for _ in range(_MAX_POINTER_HOPS):
            prefix, name = split_uri(current)
            store = self.store(prefix)
            if name.endswith(POINTER_SUFFIX) and store.info(name) is not None:
                via.append(current)
                current = self._follow(store, prefix, name)
                continue
            found = self._find(store, prefix, name, tuple(via))
            if found is not None:
                return found
            if not name.endswith(POINTER_SUFFIX) and store.info(name + POINTER_SUFFIX) is not None:
                current += POINTER_SUFFIX
                continue
            pointers = f" (reached through {' -> '.join(via)})" if via else ""
            raise CheckpointNotFoundError(f"no object or folder at {current}, nor {current}{POINTER_SUFFIX}{pointers}")
        raise CheckpointNotFoundError(f"{uri}: more than {_MAX_POINTER_HOPS} pointers in a row ({' -> '.join(via)})")

    def _find(self, store: RemoteStore, prefix: str, name: str, via: tuple[str, ...]) -> RemoteTarget | None:
        uri = f"{prefix}/{name}"
        info = store.info(name)
        if info is not None:
            return RemoteTarget(uri, store, name, (name,), (info.size,), False, via)
        keys = store.list(name + "/")
        if not keys:
            return None
        sizes = []
        for key in keys:
            found = store.info(key)
            sizes.append(found.size if found is not None else 0)
        return RemoteTarget(uri, store, name, tuple(keys), tuple(sizes), True, via)

    def _follow(self, store: RemoteStore, prefix: str, name: str) -> str:
        raw = store.read_bytes(name)
        target = raw[:_MAX_POINTER_BYTES].decode("utf-8", errors="replace").strip()
        if not target or len(raw) > _MAX_POINTER_BYTES or "\n" in target:
            raise CheckpointNotFoundError(f"{prefix}/{name} is not a pointer: it does not hold one object key")
        if is_uri(target):
            return target
        target = target.lstrip("/")
        candidates = [f"{ancestor}/{target}" for ancestor in _ancestors(prefix)]
        for candidate in candidates:
            parent, last = split_uri(candidate)
            candidate_store = self.store(parent)
            if candidate_store.info(last) is not None or candidate_store.list(last + "/"):
                return candidate
        raise CheckpointNotFoundError(
            f"{prefix}/{name} points at {target!r}, which exists under none of {', '.join(_ancestors(prefix))}"
        )

    def download(
        self, target: RemoteTarget, dest: Path | str, *, overwrite: bool = False, progress: Progress | None = None
    ) -> Path:
        """Fetch ``target`` to ``dest``; into it, under the target's name, if ``dest`` is a folder
        or ends with ``/`` (as ``cp`` does).

        Returns:
            The local path written.

        Raises:
            CheckpointExistsError: The local path exists and ``overwrite`` is False.
            CorruptCheckpointError: A downloaded object's size or checksum differs from the store's.

        Example:
            >>> remote.download(remote.resolve("s3://bucket/runs/ep1.pt"), Path("."))  # doctest: +SKIP
            PosixPath('ep1.pt')
        """
        progress = progress or Progress()
        into = os.fspath(dest).endswith(("/", os.sep)) or (Path(dest).is_dir() and not Path(dest).is_symlink())
        final = Path(dest) / target.name if into else Path(dest)
        if os.path.lexists(final) and not overwrite:
            raise CheckpointExistsError(f"{final} already exists and was left untouched; --overwrite replaces it")
        makedirs_durable(final.parent)
        progress.set_total(target.size)
        progress.set_description(target.name)
        if not target.is_folder:
            target.store.download_file(target.name, final, progress=progress)
            return final
        temp = temp_path_for(final)
        try:
            for key in target.keys:
                relative = key[len(target.name) + 1:]
                target.store.download_file(key, temp / relative, progress=progress)
            replace_folder(temp, final)
        except BaseException:
            remove_checkpoint(temp)
            raise
        return final


def resolve_checkpoint_path(path: str | os.PathLike) -> Path:
    """Follow a ``latest`` symlink or pointer file to the checkpoint it names.

    Raises:
        CheckpointNotFoundError: nothing at ``path``, or a ``latest`` pointing at a missing file.

    Example:
        >>> resolve_checkpoint_path("runs/exp1/checkpoints/latest-rank0.pt")  # doctest: +SKIP
        PosixPath('runs/exp1/checkpoints/ep2-ba10-rank0.pt')
    """
    text = os.fspath(path)
    target = resolve_latest(Path(text))
    if target is None:
        raise CheckpointNotFoundError(f"no checkpoint at {text}")
    if not target.exists():
        raise CheckpointNotFoundError(f"{text} points at {target}, which does not exist")
    return target


@contextmanager
def local_checkpoint(
    location: str | os.PathLike[str],
    *,
    storage_options: Mapping[str, Any] | None = None,
    progress: Progress | None = None,
) -> Iterator[Path]:
    """A local path for any location: the file itself, ``latest``'s target, or a temp download.

    A remote checkpoint is downloaded into a temp folder that is removed when the block ends.

    Raises:
        CheckpointNotFoundError: Nothing at ``location``.

    Example:
        >>> with local_checkpoint("s3://bucket/runs/latest-rank0.pt.symlink") as path:  # doctest: +SKIP
        ...     verify_file(path)
    """
    if not is_uri(location):
        yield resolve_checkpoint_path(location)
        return
    with RemoteLocations(storage_options) as remote:
        target = remote.resolve(os.fspath(location))
        scratch = tempfile.mkdtemp(prefix="ckpt-callbacks-")
        try:
            yield remote.download(target, Path(scratch), progress=progress)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
