"""``open_store``: the one place that picks a backend for a ``remote`` URL.

``s3://`` goes to :class:`~ckpt_callbacks.remote.s3.S3Store` (botocore + s3transfer, the ``s3`` extra);
every other scheme fsspec knows goes to :class:`~ckpt_callbacks.remote.fsspec_store.FsspecStore`.
A bare path is refused rather than guessed: ``remote`` names a store, and a typo such as
``'s3:/bucket'`` must not silently become a local folder.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from ckpt_callbacks.errors import ConfigurationError, bad_value
from ckpt_callbacks.remote.base import RemoteStore

__all__ = ["open_store"]


def open_store(url: str, storage_options: Mapping[str, Any] | None = None) -> RemoteStore:
    """Open the store under the prefix URL ``url``; options are checked now, nothing is sent yet.

    Raises:
        ConfigurationError: not a URL, an unknown scheme, a missing package, or a bad option.

    Example:
        >>> store = open_store("memory://bucket/runs")
        >>> store.write_bytes("run1/latest.pt.symlink", b"run1/ep1.pt")
        >>> store.read_bytes("run1/latest.pt.symlink")
        b'run1/ep1.pt'
    """
    scheme = urlsplit(url).scheme.lower() if isinstance(url, str) and "://" in url else ""
    if not scheme:
        raise ConfigurationError(
            bad_value("remote", "a URL with a scheme, such as 's3://bucket/prefix' or 'file:///mnt/ckpt'", url)
        )
    if scheme == "s3":
        try:
            from ckpt_callbacks.remote.s3 import S3Store
        except ImportError as exc:
            raise ConfigurationError(
                f"'remote' {url!r} needs botocore and s3transfer: pip install 'ckpt-callbacks[s3]' ({exc})"
            ) from exc
        return S3Store(url, storage_options)
    from ckpt_callbacks.remote.fsspec_store import FsspecStore

    return FsspecStore(url, storage_options)
