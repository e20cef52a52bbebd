"""The uploader pool against real S3 servers (moto, SeaweedFS) behind the fault proxy: retries of
503/500/SlowDown/resets, deadlines of stalled and trickling servers, permanent failures, close.

Each store makes one request per attempt (``max_attempts=1`` for botocore), so every injected fault
reaches the pool's own retry loop.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("boto3")

from ckpt_callbacks.errors import (  # noqa: E402
    CheckpointNotFoundError,
    StorePermissionError,
    TransientStoreError,
    UploadError,
    UploadTimeoutError,
)
from ckpt_callbacks.remote import open_store  # noqa: E402
from ckpt_callbacks.remote.uploader import UploadFuture, Uploader  # noqa: E402
from fault_proxy import (  # noqa: E402,F401 -- fixtures too
    FaultProxy,
    Reset,
    Respond,
    Stall,
    Trickle,
    fault_proxy_factory,
    s3_fault_proxy,
)
from servers import Bucket  # noqa: E402

WAIT = 10.0  # bound on every wait for an event that should come at once
SLACK = 1.0  # how late past its deadline a timeout may be reported


def _file(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


class Recorder:
    """A done-callback that records each call and when it came."""

    def __init__(self) -> None:
        self.calls: list[tuple[UploadFuture, float]] = []
        self.event = threading.Event()

    def __call__(self, future: UploadFuture) -> None:
        self.calls.append((future, time.monotonic()))
        self.event.set()


def _s3_store(bucket: Bucket, proxy: FaultProxy, **options: Any) -> Any:
    """An s3:// store reached through ``proxy``; one request per attempt, so every fault reaches the pool."""
    options = {"endpoint_url": proxy.endpoint_url, "max_attempts": 1, "connect_timeout": 2, "read_timeout": 5,
               **options}
    return open_store(bucket.url("uploader"), bucket.storage_options(**options))


@pytest.fixture
def proxy(s3_fault_proxy: FaultProxy) -> FaultProxy:
    return s3_fault_proxy


@pytest.mark.parametrize(
    "fault",
    [Respond.unavailable(), Respond.slow_down(), Respond.internal_error(), Reset(after_request_bytes=10_000)],
    ids=["503", "SlowDown", "500", "reset-mid-body"],
)
def test_transient_store_errors_are_retried(s3_bucket: Bucket, proxy: FaultProxy, tmp_path: Path, fault: Any) -> None:
    remote = _s3_store(s3_bucket, proxy)
    data = os.urandom(200_000)
    rule = proxy.add(fault, method="PUT", times=2)
    with Uploader(remote, max_attempts=4, backoff_seconds=0.01) as uploader:
        future = uploader.submit(_file(tmp_path, "ba1.pt", data), "ba1.pt", metadata={"crc32c": "x"})
        future.result(timeout=WAIT)
    assert future.attempts == 3 and rule.hits == 2
    assert len(proxy.requests("PUT")) == 3
    assert remote.read_bytes("ba1.pt") == data
    assert uploader.poll_errors() == []


def test_retries_end_after_max_attempts(s3_bucket: Bucket, proxy: FaultProxy, tmp_path: Path) -> None:
    remote = _s3_store(s3_bucket, proxy)
    proxy.add(Respond.slow_down(), method="PUT", times=None)
    with Uploader(remote, max_attempts=3, backoff_seconds=0.01) as uploader:
        future = uploader.submit(_file(tmp_path, "ba1.pt", b"bytes"), "ba1.pt")
        error = future.exception(timeout=WAIT)
    assert isinstance(error, UploadError) and not isinstance(error, UploadTimeoutError)
    assert isinstance(error.__cause__, TransientStoreError) and "after 3 attempt(s)" in str(error)
    assert future.attempts == 3 and len(proxy.requests("PUT")) == 3
    assert remote.info("ba1.pt") is None


@pytest.mark.parametrize("fault", [Stall(), Trickle(bytes_per_second=20)], ids=["stall", "trickle"])
def test_a_hung_server_fails_the_upload_at_its_deadline(
    s3_bucket: Bucket, proxy: FaultProxy, tmp_path: Path, fault: Any
) -> None:
    remote = _s3_store(s3_bucket, proxy)
    rule = proxy.add(fault, method="PUT", times=None)
    done = Recorder()
    with Uploader(remote, upload_timeout_in_seconds=1.0, max_attempts=5, backoff_seconds=0.01) as uploader:
        start = time.monotonic()
        future = uploader.submit(_file(tmp_path, "ba1.pt", b"b" * 50_000), "ba1.pt", on_done=done)
        assert done.event.wait(WAIT)
        assert 1.0 <= done.calls[0][1] - start <= 1.0 + SLACK
        assert rule.fired.is_set()
        error = future.exception()
        assert isinstance(error, UploadTimeoutError) and "upload_timeout_in_seconds=1" in str(error)
        assert "ba1.pt" in str(error) and str(tmp_path / "ba1.pt") in str(error)
        assert error.__cause__ is not None
        proxy.clear()  # the pool goes on with the next upload
        uploader.submit(_file(tmp_path, "ba2.pt", b"ok"), "ba2.pt").result(timeout=WAIT)
    assert remote.read_bytes("ba2.pt") == b"ok"


def test_denied_access_is_not_retried(seaweedfs_bucket: Bucket, fault_proxy_factory: Any, tmp_path: Path) -> None:
    proxy = fault_proxy_factory(seaweedfs_bucket.server.endpoint_url)  # SeaweedFS checks secrets; moto does not
    remote = _s3_store(seaweedfs_bucket, proxy, identity="reader")  # may read and list, not write
    with Uploader(remote, max_attempts=5, backoff_seconds=0.01) as uploader:
        future = uploader.submit(_file(tmp_path, "ba1.pt", b"bytes"), "ba1.pt")
        error = future.exception(timeout=WAIT)
    assert isinstance(error, UploadError) and isinstance(error.__cause__, StorePermissionError)
    assert future.attempts == 1 and len(proxy.requests("PUT")) == 1


def test_a_missing_bucket_is_not_retried(moto_bucket: Bucket, fault_proxy_factory: Any, tmp_path: Path) -> None:
    proxy = fault_proxy_factory(moto_bucket.server.endpoint_url)  # SeaweedFS makes the bucket on a PUT
    remote = _s3_store(Bucket(moto_bucket.server, "no-such-bucket-here"), proxy)
    with Uploader(remote, max_attempts=5, backoff_seconds=0.01) as uploader:
        future = uploader.submit(_file(tmp_path, "ba1.pt", b"bytes"), "ba1.pt")
        error = future.exception(timeout=WAIT)
    assert isinstance(error, UploadError) and isinstance(error.__cause__, CheckpointNotFoundError)
    assert future.attempts == 1


def test_close_interrupts_a_backoff(moto_bucket: Bucket, fault_proxy_factory: Any, tmp_path: Path) -> None:
    proxy = fault_proxy_factory(moto_bucket.server.endpoint_url)
    remote = _s3_store(moto_bucket, proxy)
    rule = proxy.add(Respond.slow_down(), method="PUT", times=None)
    uploader = Uploader(remote, max_attempts=3, backoff_seconds=60)  # the first retry would wait 30-60 s
    future = uploader.submit(_file(tmp_path, "ba1.pt", b"bytes"), "ba1.pt")
    assert rule.fired.wait(WAIT)
    start = time.monotonic()
    assert uploader.close(drain_timeout=0.2) == ["ba1.pt"]
    assert time.monotonic() - start < 0.2 + SLACK
    assert future.attempts == 1 and "was not uploaded" in str(future.exception())
