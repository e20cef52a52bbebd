"""The one small interface every object store backend implements.

Keys are ``/``-separated and relative to the store's prefix URL (``s3://bucket/prefix``): a backend
never writes outside its prefix. Every method raises the narrow exceptions of
:mod:`ckpt_callbacks.errors` (the backend's error translator keeps the original as ``__cause__``):

- a missing key or bucket: :class:`~ckpt_callbacks.errors.CheckpointNotFoundError`;
- denied access (HTTP 403, bad credentials): :class:`~ckpt_callbacks.errors.StorePermissionError`;
- an existing object with ``overwrite=False``: :class:`~ckpt_callbacks.errors.CheckpointExistsError`;
- a failure worth retrying (5xx, throttling, reset, timeout): :class:`~ckpt_callbacks.errors.TransientStoreError`;
- anything else: :class:`~ckpt_callbacks.errors.StoreError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Protocol

__all__ = ["ObjectInfo", "ProgressCallback", "RemoteStore"]

ProgressCallback = Callable[[int], None]
"""Called with the number of bytes just transferred (fsspec-style progress, no-op by default)."""


@dataclass(frozen=True)
class ObjectInfo:
    """What the store knows of one object."""

    key: str
    size: int
    metadata: Mapping[str, str]


class RemoteStore(Protocol):
    """An object store under one prefix URL."""

    url: str

    def probe(self) -> None:
        """Check credentials and the bucket with a LIST under the prefix (no object is written)."""

    def upload_file(
        self,
        local_path: str,
        key: str,
        *,
        overwrite: bool = True,
        metadata: Mapping[str, str] | None = None,
        deadline: float | None = None,
        progress: ProgressCallback | None = None,
    ) -> None:
        """Upload a local file to ``key`` (multipart when large). ``deadline`` is a
        ``time.monotonic()`` instant after which the upload is abandoned (multipart aborted) with
        :class:`~ckpt_callbacks.errors.UploadTimeoutError`."""

    def download_file(self, key: str, local_path: str, *, progress: ProgressCallback | None = None) -> None:
        """Download ``key`` to a temp sibling of ``local_path``, check its size, rename into place."""

    def info(self, key: str) -> ObjectInfo | None:
        """Size and user metadata of ``key``, or None when it does not exist."""

    def read_bytes(self, key: str) -> bytes:
        """The content of a small object (pointers, manifests)."""

    def write_bytes(self, key: str, data: bytes, *, overwrite: bool = True, metadata: Mapping[str, str] | None = None) -> None:
        """Write a small object in one request."""

    def list(self, prefix: str = "") -> list[str]:
        """Every key under ``prefix`` (relative to the store's prefix), sorted."""

    def delete(self, key: str) -> None:
        """Delete ``key``; a missing key is not an error."""
