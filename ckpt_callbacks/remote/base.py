"""The one small interface every object store backend implements, and the checksums it carries.

Keys are ``/``-separated and relative to the store's prefix URL (``s3://bucket/prefix``): a backend
never writes outside its prefix. Every method raises the narrow exceptions of
:mod:`ckpt_callbacks.errors` (the backend's one error translator keeps the original as ``__cause__``):

- a missing key or bucket: :class:`~ckpt_callbacks.errors.CheckpointNotFoundError`;
- denied access (HTTP 403, bad credentials): :class:`~ckpt_callbacks.errors.StorePermissionError`;
- an existing object with ``overwrite=False``: :class:`~ckpt_callbacks.errors.CheckpointExistsError`;
- a failure worth retrying (5xx, throttling, reset, timeout): :class:`~ckpt_callbacks.errors.TransientStoreError`;
- a download whose size or checksum is wrong: :class:`~ckpt_callbacks.errors.CorruptCheckpointError`;
- a deadline passed: :class:`~ckpt_callbacks.errors.UploadTimeoutError`;
- anything else: :class:`~ckpt_callbacks.errors.StoreError`.

Integrity: an object's checksum travels in its user metadata under :data:`CHECKSUM_METADATA_KEY`, as
``'<algorithm>:<8 hex digits>'`` (``crc32c:1a2b3c4d``). CRC32C is the default (S3's own choice, and
``google-crc32c`` computes it at several GB/s); CRC32 (``zlib``, always there) is the fallback. A
multipart ETag is not a content hash, so it is never used for this. :class:`Checksum` computes the
value incrementally (off the training thread, or inside a codec's pass); downloads verify it before
the file is renamed into place.

Idempotent retries: an upload with ``overwrite=False`` whose key already holds an object of the same
size and the same checksum metadata succeeds, because that object is the one being written (a retry
whose first PUT landed but whose answer was lost must not fail with 412).
"""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from typing import Callable, Mapping, Protocol

try:
    import google_crc32c
except ImportError:  # the s3 extra installs it; without it CRC32 is the default
    google_crc32c = None

from ckpt_callbacks.errors import ConfigurationError, CorruptCheckpointError, bad_value

__all__ = [
    "CHECKSUM_ALGORITHMS",
    "CHECKSUM_METADATA_KEY",
    "DEFAULT_CHECKSUM_ALGORITHM",
    "Checksum",
    "ObjectInfo",
    "ProgressCallback",
    "RemoteStore",
    "check_key",
    "checksum_file",
    "same_object",
    "verify_file",
]

CHECKSUM_METADATA_KEY = "ckpt-checksum"
"""User-metadata key of an object's checksum (lower case: S3 lower-cases metadata keys)."""

CHECKSUM_ALGORITHMS = ("crc32c", "crc32")
"""Checksum algorithms understood in ``'<algorithm>:<hex>'`` values."""

DEFAULT_CHECKSUM_ALGORITHM = "crc32c" if google_crc32c is not None else "crc32"
"""``'crc32c'`` when ``google-crc32c`` is installed, else ``'crc32'``."""

_READ_CHUNK = 8 * 1024 * 1024

ProgressCallback = Callable[[int], None]
"""Called with the number of bytes just transferred (fsspec-style progress, no-op by default)."""


class Checksum:
    """An incremental CRC32C or CRC32 whose value reads ``'<algorithm>:<8 hex digits>'``.

    Example:
        >>> c = Checksum("crc32")
        >>> c.update(b"hello")
        >>> c.value()
        'crc32:3610a686'
    """

    def __init__(self, algorithm: str = DEFAULT_CHECKSUM_ALGORITHM) -> None:
        if algorithm not in CHECKSUM_ALGORITHMS:
            raise ConfigurationError(bad_value("algorithm", f"one of {CHECKSUM_ALGORITHMS}", algorithm))
        if algorithm == "crc32c" and google_crc32c is None:
            raise ConfigurationError(
                bad_value("algorithm", "'crc32' unless google-crc32c is installed (pip install google-crc32c)",
                          algorithm)
            )
        self.algorithm = algorithm
        self._crc = 0

    def update(self, data: bytes | bytearray | memoryview) -> None:
        """Add ``data`` to the checksum.

        Example:
            >>> c = Checksum("crc32"); c.update(b"he"); c.update(b"llo"); c.value()
            'crc32:3610a686'
        """
        if self.algorithm == "crc32c":
            # google-crc32c takes only immutable bytes.
            self._crc = google_crc32c.extend(self._crc, data if isinstance(data, bytes) else bytes(data))
        else:
            self._crc = zlib.crc32(data, self._crc)

    def value(self) -> str:
        """The checksum so far, as stored in object metadata and manifests.

        Example:
            >>> Checksum("crc32").value()
            'crc32:00000000'
        """
        return f"{self.algorithm}:{self._crc:08x}"


def check_key(key: str) -> str:
    """Return ``key`` if it is a relative ``/``-separated key that stays under the prefix.

    Raises:
        ConfigurationError: an empty key, a leading ``/``, empty or ``.``/``..`` components.

    Example:
        >>> check_key("run1/ep1.pt")
        'run1/ep1.pt'
    """
    parts = key.split("/") if isinstance(key, str) else [""]
    if not key or any(part in ("", ".", "..") for part in parts):
        accepted = "a relative key such as 'run/ep1.pt' (no '', '.' or '..' parts)"
        raise ConfigurationError(bad_value("key", accepted, key))
    return key



def checksum_file(path: str | os.PathLike, algorithm: str = DEFAULT_CHECKSUM_ALGORITHM) -> str:
    """Return the ``'<algorithm>:<hex>'`` checksum of a file's bytes.

    Example:
        >>> checksum_file("ckpt/ep1-ba5-rank0.pt")  # doctest: +SKIP
        'crc32c:9f1c2a0b'
    """
    checksum = Checksum(algorithm)
    with open(path, "rb") as file:
        while chunk := file.read(_READ_CHUNK):
            checksum.update(chunk)
    return checksum.value()


def verify_file(path: str | os.PathLike, *, what: str, size: int | None = None, checksum: str | None = None) -> None:
    """Check a downloaded file's size and ``'<algorithm>:<hex>'`` checksum; ``None`` skips a check.

    Raises:
        CorruptCheckpointError: the size or the checksum differs (``what`` names the source).

    Example:
        >>> verify_file("ckpt/.ep1.pt.tmp-x", what="s3://b/ep1.pt", size=4096,
        ...             checksum="crc32:1a2b3c4d")  # doctest: +SKIP
    """
    if size is not None:
        actual_size = os.path.getsize(path)
        if actual_size != size:
            raise CorruptCheckpointError(f"{what}: downloaded {actual_size} bytes, the store announced {size}")
    if checksum is not None:
        algorithm = checksum.partition(":")[0]
        if algorithm not in CHECKSUM_ALGORITHMS:
            raise CorruptCheckpointError(
                f"{what}: its checksum {checksum!r} uses an unknown algorithm (known: {CHECKSUM_ALGORITHMS})"
            )
        actual = checksum_file(path, algorithm)
        if actual != checksum.lower():
            raise CorruptCheckpointError(
                f"{what}: downloaded bytes have checksum {actual}, the store recorded {checksum}"
            )


@dataclass(frozen=True)
class ObjectInfo:
    """What the store knows of one object.

    Example:
        >>> ObjectInfo("ep1.pt", 4, {CHECKSUM_METADATA_KEY: "crc32:3610a686"}).checksum
        'crc32:3610a686'
    """

    key: str
    size: int
    metadata: Mapping[str, str]

    @property
    def checksum(self) -> str | None:
        """The ``'<algorithm>:<hex>'`` checksum recorded in the metadata, if any."""
        return self.metadata.get(CHECKSUM_METADATA_KEY)


def same_object(existing: ObjectInfo | None, size: int, metadata: Mapping[str, str] | None) -> bool:
    """Whether ``existing`` is the object about to be written: same size and same checksum metadata.

    Without a checksum in ``metadata`` nothing can be told, so the answer is False.

    Example:
        >>> same_object(ObjectInfo("k", 5, {CHECKSUM_METADATA_KEY: "crc32:3610a686"}), 5,
        ...             {CHECKSUM_METADATA_KEY: "crc32:3610a686"})
        True
    """
    checksum = (metadata or {}).get(CHECKSUM_METADATA_KEY)
    return checksum is not None and existing is not None and existing.size == size and existing.checksum == checksum


class RemoteStore(Protocol):
    """An object store under one prefix URL (see :func:`ckpt_callbacks.remote.open_store`).

    Stores are safe to share between threads. Uploads of different keys may run concurrently.

    Example:
        >>> store = open_store("s3://bucket/runs", {"endpoint_url": "http://127.0.0.1:9000"})  # doctest: +SKIP
        >>> store.probe(); store.upload_file("ckpt/ep1.pt", "run1/ep1.pt", overwrite=False)  # doctest: +SKIP
    """

    url: str

    def uri(self, key: str) -> str:
        """The full URL of ``key`` (for messages and pointers), e.g. ``s3://bucket/runs/run1/ep1.pt``."""

    def probe(self) -> None:
        """Check credentials and the bucket with a LIST under the prefix (no object is written)."""

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
        """Upload a local file to ``key`` (multipart when large, parts in parallel).

        ``overwrite=False`` refuses to replace an object (a conditional write where the store
        supports it, else a check first), except one with the same size and checksum metadata.
        ``deadline`` is a ``time.monotonic()`` instant after which the upload is abandoned (no
        object appears; a multipart upload is aborted) with
        :class:`~ckpt_callbacks.errors.UploadTimeoutError`.
        """

    def download_file(
        self,
        key: str,
        local_path: str | os.PathLike,
        *,
        checksum: str | None = None,
        progress: ProgressCallback | None = None,
    ) -> int:
        """Download ``key`` to a temp sibling of ``local_path``, verify, rename into place; return the size.

        The size is checked against the store's, and the checksum (``checksum``, else the object's
        own checksum metadata, if any) against the bytes, before the rename: a failed check raises
        :class:`~ckpt_callbacks.errors.CorruptCheckpointError` and leaves ``local_path`` untouched.
        """

    def info(self, key: str) -> ObjectInfo | None:
        """Size and user metadata of ``key``, or None when it does not exist."""

    def read_bytes(self, key: str) -> bytes:
        """The content of a small object (pointers, manifests)."""

    def write_bytes(
        self, key: str, data: bytes, *, overwrite: bool = True, metadata: Mapping[str, str] | None = None
    ) -> None:
        """Write a small object in one request (same ``overwrite`` rule as :meth:`upload_file`)."""

    def list(self, prefix: str = "") -> list[str]:
        """Every key that starts with ``prefix`` (relative to the store's prefix), sorted."""

    def delete(self, key: str) -> None:
        """Delete ``key``; a missing key is not an error."""

    def abort_incomplete_uploads(self, *, older_than_seconds: float) -> int:
        """Abort what interrupted uploads left under the prefix (multipart uploads, temp objects)
        started more than ``older_than_seconds`` ago; return how many were removed."""

    def close(self) -> None:
        """Release connections and threads; the store is unusable afterwards."""
