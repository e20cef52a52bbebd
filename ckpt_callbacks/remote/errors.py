"""Store errors translated into the narrowest :mod:`ckpt_callbacks.errors` exception, one function per backend.

A user who sees "not found" for what was really "access denied" debugs the wrong thing for hours
(Composer reports S3's 403 as a missing object), so the translators keep the classes apart:

=======================================  ==============================================
store answer                             raised
=======================================  ==============================================
404, NoSuchKey, NoSuchBucket             CheckpointNotFoundError
403, AccessDenied, bad signature or key  StorePermissionError (with the IAM hint)
missing or unreadable credentials        StorePermissionError
412 PreconditionFailed                   CheckpointExistsError (a conditional write lost)
5xx, 429, SlowDown, resets, timeouts     TransientStoreError (a retry may cure it)
anything else                            StoreError
=======================================  ==============================================

The original exception always stays as ``__cause__``. Translation happens inside each backend
method through :func:`translated`, so callers only ever see the exceptions above.
"""

from __future__ import annotations

import errno
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from ckpt_callbacks.errors import (
    CheckpointError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    StoreError,
    StorePermissionError,
    TransientStoreError,
)

__all__ = ["PERMISSIONS_HINT", "translate_boto_error", "translate_fsspec_error", "translated"]

PERMISSIONS_HINT = (
    "check the credentials, and that they allow s3:ListBucket on the bucket (without it S3 answers 403 even "
    "for a missing key), s3:GetObject, s3:PutObject, s3:DeleteObject, s3:ListBucketMultipartUploads and "
    "s3:AbortMultipartUpload under the prefix (see the IAM policy in docs/remote.md)"
)
"""What a permission error tells the user to check."""

Translator = Callable[..., CheckpointError]

_DENIED_CODES = frozenset({
    "AccessDenied", "AllAccessDisabled", "AccountProblem", "ExpiredToken", "Forbidden", "InvalidAccessKeyId",
    "InvalidToken", "SignatureDoesNotMatch", "TokenRefreshRequired", "UnauthorizedAccess",
})
_TRANSIENT_CODES = frozenset({
    "ConditionalRequestConflict", "InternalError", "OperationAborted", "RequestLimitExceeded", "RequestTimeout",
    "RequestTimeoutException", "ServiceUnavailable", "SlowDown", "Throttling", "ThrottlingException",
    "TooManyRequests", "TooManyRequestsException",
})
_TRANSIENT_BOTOCORE = frozenset({
    "ConnectionClosedError", "ConnectTimeoutError", "EndpointConnectionError", "IncompleteReadError",
    "ProxyConnectionError", "ReadTimeoutError", "ResponseStreamingError", "RetriesExceededError",
})
_CREDENTIAL_BOTOCORE = frozenset({
    "CredentialRetrievalError", "NoCredentialsError", "PartialCredentialsError", "ProfileNotFound",
    "TokenRetrievalError", "UnauthorizedSSOTokenError",
})
_TRANSIENT_ERRNOS = frozenset({
    errno.ECONNABORTED, errno.ECONNREFUSED, errno.ECONNRESET, errno.EHOSTUNREACH, errno.ENETUNREACH,
    errno.EPIPE, errno.ETIMEDOUT,
})


def _by_status(status: int | None, what: str) -> CheckpointError | None:
    if status == 404:
        return CheckpointNotFoundError(f"{what}: not found (HTTP 404)")
    if status in (401, 403):
        return StorePermissionError(f"{what}: access denied (HTTP {status}); {PERMISSIONS_HINT}")
    if status == 412:
        return CheckpointExistsError(f"{what}: the object already exists and overwrite=False (HTTP 412)")
    if status is not None and (status == 429 or status >= 500):
        return TransientStoreError(f"{what}: the store answered HTTP {status}; a retry may succeed")
    return None


def translate_boto_error(
    exc: BaseException, *, operation: str, uri: str, endpoint: str | None = None
) -> CheckpointError:
    """Translate an exception raised by botocore or s3transfer.

    Example:
        >>> translate_boto_error(TimeoutError("read"), operation="PUT", uri="s3://b/k")
        TransientStoreError('PUT s3://b/k failed: read')
    """
    name = type(exc).__name__
    what = f"{operation} {uri}" + (f" (endpoint {endpoint})" if endpoint else "")
    response = getattr(exc, "response", None)
    if isinstance(response, dict):  # botocore ClientError
        error = response.get("Error", {})
        code = str(error.get("Code", ""))
        message = error.get("Message") or ""
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        detail = f"{code}: {message}".rstrip(": ")
        if code == "NoSuchBucket":
            bucket = error.get("BucketName") or uri.split("/")[2]
            return CheckpointNotFoundError(f"{what}: the bucket {bucket!r} does not exist ({detail})")
        if code in ("NoSuchKey", "NotFound", "NoSuchUpload"):
            return CheckpointNotFoundError(f"{what}: no such object ({detail})")
        if code in _DENIED_CODES:
            return StorePermissionError(f"{what}: access denied ({detail}); {PERMISSIONS_HINT}")
        if code == "PreconditionFailed":
            return CheckpointExistsError(f"{uri} already exists and overwrite=False refuses to replace it ({detail})")
        if code in _TRANSIENT_CODES:
            return TransientStoreError(f"{what}: {detail}; a retry may succeed")
        by_status = _by_status(status, what)
        if by_status is not None:
            return by_status
        return StoreError(f"{what} failed ({detail}, HTTP {status})")
    if name in _CREDENTIAL_BOTOCORE:
        return StorePermissionError(f"{what}: no usable credentials ({exc}); {PERMISSIONS_HINT}")
    last = getattr(exc, "last_exception", None)  # s3transfer's RetriesExceededError wraps the real one
    if isinstance(last, BaseException):
        return translate_boto_error(last, operation=operation, uri=uri, endpoint=endpoint)
    if name in _TRANSIENT_BOTOCORE or isinstance(exc, (TimeoutError, ConnectionError)):
        return TransientStoreError(f"{what} failed: {exc}")
    return StoreError(f"{what} failed: {name}: {exc}")


def translate_fsspec_error(exc: BaseException, *, operation: str, uri: str) -> CheckpointError:
    """Translate an exception raised by an fsspec filesystem (local, memory, gcsfs, adlfs, ...).

    Example:
        >>> translate_fsspec_error(FileNotFoundError("x"), operation="GET", uri="memory://a/b")
        CheckpointNotFoundError('GET memory://a/b: no such object (x)')
    """
    what = f"{operation} {uri}"
    if isinstance(exc, FileNotFoundError):
        return CheckpointNotFoundError(f"{what}: no such object ({exc})")
    if isinstance(exc, FileExistsError):
        return CheckpointExistsError(f"{uri} already exists and overwrite=False refuses to replace it")
    if isinstance(exc, PermissionError):
        return StorePermissionError(f"{what}: access denied ({exc}); check the credentials and the permissions")
    if isinstance(exc, (TimeoutError, ConnectionError)) or getattr(exc, "errno", None) in _TRANSIENT_ERRNOS:
        return TransientStoreError(f"{what} failed: {exc}")
    # Cloud filesystems raise their own HTTP errors; most carry the status under one of these names.
    for attribute in ("status", "code", "status_code"):
        status = getattr(exc, attribute, None)
        if isinstance(status, int):
            by_status = _by_status(status, what)
            if by_status is not None:
                return by_status
    return StoreError(f"{what} failed: {type(exc).__name__}: {exc}")


@contextmanager
def translated(translate: Translator, operation: str, uri: str, **context: str | None) -> Iterator[None]:
    """Run a block, turning any store exception into ``translate(exc, ...)`` raised from it.

    Exceptions of this library pass through unchanged.

    Example:
        >>> with translated(translate_fsspec_error, "GET", "memory://a/b"):  # doctest: +SKIP
        ...     data = fs.cat_file("/a/b")
    """
    try:
        yield
    except CheckpointError:
        raise
    except Exception as exc:
        raise translate(exc, operation=operation, uri=uri, **context) from exc
