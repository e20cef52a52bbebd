"""Configuration of the ``s3://`` backend: ``storage_options`` checked once, endpoint and client settings.

Every option is checked at construction, so a typo fails before training starts, not at the first
upload an hour later. Accepted keys (s3fs's names work too, so one ``storage_options`` dict serves
both libraries):

=========================================  =============================================================
key                                        meaning (default)
=========================================  =============================================================
``endpoint_url``                           S3-compatible endpoint (see the order below)
``key`` / ``aws_access_key_id``            access key (else the AWS credential chain)
``secret`` / ``aws_secret_access_key``     secret key
``token`` / ``aws_session_token``          session token
``region`` / ``region_name``               region (else ``AWS_REGION``, the profile, ``us-east-1``)
``profile``                                a profile of ``~/.aws/config``
``client_kwargs``                          s3fs style: ``endpoint_url``, ``region_name``, ``aws_*`` keys
``config_kwargs``                          extra ``botocore.config.Config`` arguments
``checksum_mode``                          ``'when_supported'`` (botocore's default: CRC32 on every
                                           upload) or ``'when_required'`` for stores that reject those
                                           headers; ``None`` leaves botocore's setting (environment)
``conditional_writes``                     ``overwrite=False`` uses ``If-None-Match: *`` (True); False
                                           checks for the object first, for stores without it
``max_attempts``                           requests per operation, the first one included (5)
``retry_mode``                             botocore retry mode: standard, adaptive, legacy (standard)
``connect_timeout`` / ``read_timeout``     per-socket-operation timeouts in seconds (10 / 60)
``multipart_threshold``                    files at least this large go multipart (64 MiB)
``multipart_chunksize``                    part size (16 MiB)
``max_concurrency``                        parts in flight per file (8)
=========================================  =============================================================

Endpoint order: ``endpoint_url`` (or ``client_kwargs['endpoint_url']``), then ``AWS_ENDPOINT_URL_S3``
and ``AWS_ENDPOINT_URL`` (resolved by botocore itself, which also honours
``AWS_IGNORE_CONFIGURED_ENDPOINT_URLS`` and a profile's ``endpoint_url``), then Composer's
``S3_ENDPOINT_URL``, then AWS.

Retries: ``max_attempts`` is botocore's ``total_max_attempts`` (it counts requests; botocore's own
``max_attempts`` counts retries). botocore's default mode is still ``legacy``; ``standard`` retries
throttling and transient errors with jittered exponential backoff, which is what a long upload needs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ckpt_callbacks.errors import ConfigurationError, bad_value

__all__ = ["S3Options", "resolve_endpoint"]

_MIB = 1024 * 1024
_ALIASES = {
    "aws_access_key_id": "key",
    "aws_secret_access_key": "secret",
    "aws_session_token": "token",
    "region_name": "region",
}
_CLIENT_KWARGS = {"endpoint_url", "region_name", "aws_access_key_id", "aws_secret_access_key", "aws_session_token"}
_CHECKSUM_MODES = ("when_supported", "when_required")
_RETRY_MODES = ("standard", "adaptive", "legacy")


def resolve_endpoint(explicit: str | None, environ: Mapping[str, str] | None = None) -> str | None:
    """The endpoint to hand to botocore: ``explicit``, else Composer's ``S3_ENDPOINT_URL`` unless an
    ``AWS_ENDPOINT_URL*`` variable is set (botocore reads those itself), else None (AWS).

    Example:
        >>> resolve_endpoint(None, {"S3_ENDPOINT_URL": "http://127.0.0.1:9000"})
        'http://127.0.0.1:9000'
        >>> resolve_endpoint(None, {"AWS_ENDPOINT_URL": "http://a", "S3_ENDPOINT_URL": "http://b"}) is None
        True
    """
    if explicit:
        return explicit
    environ = os.environ if environ is None else environ
    if environ.get("AWS_ENDPOINT_URL_S3") or environ.get("AWS_ENDPOINT_URL"):
        return None
    return environ.get("S3_ENDPOINT_URL") or None


def _number(name: str, value: Any, minimum: float, *, integer: bool) -> Any:
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not value >= minimum:
        kind = "an integer" if integer else "a number"
        raise ConfigurationError(bad_value(f"storage_options[{name!r}]", f"{kind} >= {minimum}", value))
    return value


_SECRETS = ("secret", "token")


def _text(name: str, value: Any) -> str | None:
    if value is not None and not (isinstance(value, str) and value):
        shown = f"a hidden {type(value).__name__}" if name in _SECRETS else value
        raise ConfigurationError(bad_value(f"storage_options[{name!r}]", "a non-empty string or None", shown))
    return value


@dataclass(frozen=True, kw_only=True)
class S3Options:
    """The checked ``storage_options`` of an ``s3://`` store (the table in this module's docstring).

    Example:
        >>> S3Options.from_storage_options({"endpoint_url": "http://127.0.0.1:9000", "secret": "x", "key": "k"}).key
        'k'
    """

    endpoint_url: str | None = None
    key: str | None = None
    secret: str | None = field(default=None, repr=False)  # credentials never appear in reprs or messages
    token: str | None = field(default=None, repr=False)
    region: str | None = None
    profile: str | None = None
    config_kwargs: Mapping[str, Any] = field(default_factory=dict)
    checksum_mode: str | None = None
    conditional_writes: bool = True
    max_attempts: int = 5
    retry_mode: str = "standard"
    connect_timeout: float = 10.0
    read_timeout: float = 60.0
    multipart_threshold: int = 64 * _MIB
    multipart_chunksize: int = 16 * _MIB
    max_concurrency: int = 8

    def __post_init__(self) -> None:
        for name in ("endpoint_url", "key", "secret", "token", "region", "profile"):
            _text(name, getattr(self, name))
        if self.endpoint_url is not None and not self.endpoint_url.startswith(("http://", "https://")):
            raise ConfigurationError(
                bad_value("storage_options['endpoint_url']", "an http:// or https:// URL", self.endpoint_url)
            )
        if (self.key is None) != (self.secret is None):
            raise ConfigurationError(
                bad_value("storage_options", "both 'key' and 'secret', or neither", "only one of them")
            )
        if self.checksum_mode is not None and self.checksum_mode not in _CHECKSUM_MODES:
            raise ConfigurationError(
                bad_value("storage_options['checksum_mode']", f"one of {_CHECKSUM_MODES} or None", self.checksum_mode)
            )
        if self.retry_mode not in _RETRY_MODES:
            raise ConfigurationError(
                bad_value("storage_options['retry_mode']", f"one of {_RETRY_MODES}", self.retry_mode)
            )
        if not isinstance(self.conditional_writes, bool):
            raise ConfigurationError(
                bad_value("storage_options['conditional_writes']", "True or False", self.conditional_writes)
            )
        if not isinstance(self.config_kwargs, Mapping):
            raise ConfigurationError(bad_value("storage_options['config_kwargs']", "a dict", self.config_kwargs))
        _number("max_attempts", self.max_attempts, 1, integer=True)
        _number("max_concurrency", self.max_concurrency, 1, integer=True)
        _number("connect_timeout", self.connect_timeout, 0.001, integer=False)
        _number("read_timeout", self.read_timeout, 0.001, integer=False)
        # S3 refuses parts under 5 MiB (except the last one).
        _number("multipart_chunksize", self.multipart_chunksize, 5 * _MIB, integer=True)
        _number("multipart_threshold", self.multipart_threshold, 5 * _MIB, integer=True)

    @classmethod
    def from_storage_options(cls, storage_options: Mapping[str, Any] | None) -> S3Options:
        """Check and normalise a ``storage_options`` dict (aliases, s3fs's ``client_kwargs``).

        Raises:
            ConfigurationError: an unknown key or a bad value, named in the message.

        Example:
            >>> S3Options.from_storage_options({"client_kwargs": {"region_name": "eu-west-1"}}).region
            'eu-west-1'
        """
        if storage_options is None:
            return cls()
        if not isinstance(storage_options, Mapping):
            raise ConfigurationError(bad_value("storage_options", "a dict or None", storage_options))
        known = {f for f in cls.__dataclass_fields__}
        values: dict[str, Any] = {}
        for name, value in storage_options.items():
            if name == "client_kwargs":
                values.update(cls._client_kwargs(value))
                continue
            target = _ALIASES.get(name, name)
            if target not in known:
                accepted = f"one of {sorted(known | set(_ALIASES) | {'client_kwargs'})}"
                raise ConfigurationError(bad_value("storage_options key", accepted, name))
            values[target] = value
        return cls(**values)

    @staticmethod
    def _client_kwargs(client_kwargs: Any) -> dict[str, Any]:
        if not isinstance(client_kwargs, Mapping):
            raise ConfigurationError(bad_value("storage_options['client_kwargs']", "a dict", client_kwargs))
        unknown = set(client_kwargs) - _CLIENT_KWARGS
        if unknown:
            accepted = f"one of {sorted(_CLIENT_KWARGS)}"
            raise ConfigurationError(bad_value("storage_options['client_kwargs'] key", accepted, sorted(unknown)[0]))
        return {_ALIASES.get(name, name): value for name, value in client_kwargs.items()}

    def botocore_config(self) -> Any:
        """The ``botocore.config.Config`` of the client: retries, timeouts, pool size, checksums.

        Example:
            >>> S3Options(max_attempts=3).botocore_config().retries
            {'mode': 'standard', 'total_max_attempts': 3}
        """
        from botocore.config import Config

        settings: dict[str, Any] = {
            "retries": {"mode": self.retry_mode, "total_max_attempts": self.max_attempts},
            "connect_timeout": self.connect_timeout,
            "read_timeout": self.read_timeout,
            # Several files upload at once, each with max_concurrency parts, through one client.
            "max_pool_connections": max(10, 4 * self.max_concurrency),
        }
        if self.checksum_mode is not None:
            settings["request_checksum_calculation"] = self.checksum_mode
            settings["response_checksum_validation"] = self.checksum_mode
        settings.update(self.config_kwargs)
        try:
            return Config(**settings)
        except TypeError as exc:
            accepted = "arguments of botocore.config.Config"
            raise ConfigurationError(
                bad_value("storage_options['config_kwargs']", accepted, dict(self.config_kwargs))
            ) from exc

    def transfer_config(self) -> Any:
        """The ``s3transfer`` configuration of one file's transfer.

        Example:
            >>> S3Options(max_concurrency=4).transfer_config().max_request_concurrency
            4
        """
        from s3transfer.manager import TransferConfig

        return TransferConfig(
            multipart_threshold=self.multipart_threshold,
            multipart_chunksize=self.multipart_chunksize,
            max_request_concurrency=self.max_concurrency,
        )
