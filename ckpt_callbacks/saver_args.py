"""Checks of :class:`~ckpt_callbacks.saver.CheckpointSaver`'s arguments, run at construction.

Each check raises :class:`~ckpt_callbacks.errors.ConfigurationError` naming the argument, the bad
value and what is accepted, so that a bad saver fails before training starts. Kept apart from the
saver so that it reads as the callback it is.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from numbers import Real
from typing import Mapping

from ckpt_callbacks.codecs import Codec
from ckpt_callbacks.errors import ConfigurationError, bad_value

__all__ = [
    "FAILURE_MODES", "check_bool", "check_failure_modes", "check_level", "check_shutdown_timeout", "check_uploads",
    "staging_folder",
]

FAILURE_MODES = ("raise", "warn")
"""What ``on_upload_error`` and ``on_save_error`` accept."""


def staging_folder(folder: str | os.PathLike, remote: str | None) -> tuple[str | os.PathLike, str | None, str | None]:
    """Composer's shorthand: a URI ``folder`` means local staging in a temp folder (removed at close)
    and ``remote`` = that URI. Returns (local folder, remote, staging folder or None).

    Example:
        >>> staging_folder("runs/exp1", None)
        ('runs/exp1', None, None)
    """
    text = os.fspath(folder)
    if "://" not in text:
        return folder, remote, None
    if remote is not None:
        raise ConfigurationError(bad_value("remote", "None when 'folder' is a URI (the folder is the remote)", remote))
    staging = os.path.join(tempfile.gettempdir(), f"ckpt-callbacks-staging-{uuid.uuid4().hex[:12]}")
    return staging, text, staging


def check_bool(argument: str, value: object) -> bool:
    """``value`` if it is a bool.

    Example:
        >>> check_bool("overwrite", True)
        True
    """
    if not isinstance(value, bool):
        raise ConfigurationError(bad_value(argument, "True or False", value))
    return value


def check_level(level: object, codec: Codec | None) -> int | None:
    """``compression_level`` checked against the codec the filename chose (None: the codec's default).

    Example:
        >>> check_level(None, None) is None
        True
    """
    if level is None:
        return None
    if codec is None:
        raise ConfigurationError(
            bad_value("compression_level", "None for an uncompressed filename (use e.g. '.pt.zst' to compress)", level)
        )
    return codec.check_level(level)


def check_uploads(concurrency: object, timeout: object, storage_options: object, on_error: object) -> None:
    """Check ``num_concurrent_uploads``, ``upload_timeout_in_seconds``, ``storage_options`` and ``on_upload_error``.

    Example:
        >>> check_uploads(4, 600, None, "warn")
    """
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        raise ConfigurationError(bad_value("num_concurrent_uploads", "an int >= 1", concurrency))
    if isinstance(timeout, bool) or not isinstance(timeout, Real) or timeout <= 0:
        raise ConfigurationError(bad_value("upload_timeout_in_seconds", "a number of seconds > 0", timeout))
    if storage_options is not None and not isinstance(storage_options, Mapping):
        raise ConfigurationError(bad_value("storage_options", "None or a dict", storage_options))
    if on_error not in FAILURE_MODES:
        raise ConfigurationError(bad_value("on_upload_error", "'raise' or 'warn'", on_error))


def check_shutdown_timeout(value: object) -> float:
    """``shutdown_timeout`` as a float of seconds >= 0.

    Example:
        >>> check_shutdown_timeout(30)
        30.0
    """
    if value is None or isinstance(value, bool) or not isinstance(value, Real) or value < 0:
        raise ConfigurationError(bad_value("shutdown_timeout", "a number of seconds >= 0", value))
    return float(value)


def check_failure_modes(on_save_error: object, max_unuploaded: object) -> None:
    """Check ``on_save_error`` and ``max_unuploaded_checkpoints``.

    Example:
        >>> check_failure_modes("warn", 8)
    """
    if on_save_error not in FAILURE_MODES:
        raise ConfigurationError(bad_value("on_save_error", "'raise' or 'warn'", on_save_error))
    if max_unuploaded is not None and (
        isinstance(max_unuploaded, bool) or not isinstance(max_unuploaded, int) or max_unuploaded < 1
    ):
        raise ConfigurationError(bad_value("max_unuploaded_checkpoints", "None or an int >= 1", max_unuploaded))
