"""Exceptions raised by ckpt_callbacks.

The tree::

    CheckpointError
     +-- CheckpointNotFoundError     (also FileNotFoundError)
     +-- CorruptCheckpointError
     +-- CheckpointExistsError       (also FileExistsError)
     +-- StoreError                  (the object store failed)
     |    +-- StorePermissionError   (also PermissionError: HTTP 403, bad credentials)
     |    +-- TransientStoreError    (worth retrying: 5xx, throttling, resets, timeouts)
     +-- UploadError
     |    +-- UploadTimeoutError     (also TimeoutError)
     +-- ConfigurationError          (also ValueError)
          +-- InvalidTemplateError
          +-- UnsupportedFormatError

Bad input raises a :class:`ConfigurationError` at construction or at fit start, before anything is
written. Its message follows one pattern: ``'<argument>' must be <what is accepted> (got <value>)``.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "CheckpointExistsError",
    "CheckpointNotFoundError",
    "ConfigurationError",
    "CorruptCheckpointError",
    "InvalidTemplateError",
    "StoreError",
    "StorePermissionError",
    "TransientStoreError",
    "UnsupportedFormatError",
    "UploadError",
    "UploadTimeoutError",
]


class CheckpointError(Exception):
    """Base class of every exception this library raises on purpose."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A checkpoint, or a ``latest`` pointer, does not exist where it was looked for."""


class CorruptCheckpointError(CheckpointError):
    """A checkpoint exists but cannot be decoded: truncated, bit-flipped, or not a checkpoint."""


class CheckpointExistsError(CheckpointError, FileExistsError):
    """Saving would overwrite a checkpoint, or conflict with one, while ``overwrite=False``."""


class StoreError(CheckpointError):
    """The object store failed in a way not covered by a narrower exception."""


class StorePermissionError(StoreError, PermissionError):
    """The object store denied access (HTTP 403, bad or missing credentials)."""


class TransientStoreError(StoreError):
    """A store failure that a retry may cure: 5xx, throttling, connection resets, timeouts."""


class UploadError(CheckpointError):
    """Uploading a checkpoint to the object store failed after all retries."""


class UploadTimeoutError(UploadError, TimeoutError):
    """An upload did not finish within ``upload_timeout_in_seconds``."""


class ConfigurationError(CheckpointError, ValueError):
    """An argument has a value that is not accepted."""


class InvalidTemplateError(ConfigurationError):
    """A name template uses an unknown variable, is malformed, or escapes its folder."""


class UnsupportedFormatError(ConfigurationError):
    """A file name asks for a checkpoint format (extension) that is not known."""


def bad_value(argument: str, accepted: str, value: object) -> str:
    """Return the message of a bad-input error in the one pattern used across the library.

    Example:
        >>> bad_value("save_interval", "a time string such as '1ep' or '500ba'", "5xx")
        "'save_interval' must be a time string such as '1ep' or '500ba' (got '5xx')"
    """
    return f"{argument!r} must be {accepted} (got {value!r})"
