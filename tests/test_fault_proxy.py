"""The fault proxy in front of real S3 servers: it forwards signed requests untouched and injects faults.

SeaweedFS checks SigV4 signatures, so a request that passes through the proxy and is accepted proves
the proxy rewrote nothing that is signed (a wrong secret through the same proxy is refused).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest

boto3 = pytest.importorskip("boto3")
from botocore.config import Config  # noqa: E402
from botocore.exceptions import BotoCoreError, ClientError  # noqa: E402
from fault_proxy import (  # noqa: E402
    FaultProxy,
    PassThrough,
    Reset,
    Respond,
    Stall,
    Trickle,
    fault_proxy_factory,  # noqa: F401 -- a fixture
    s3_fault_proxy,  # noqa: F401 -- a fixture
)
from servers import Bucket  # noqa: E402


def _client(
    bucket: Bucket, endpoint_url: str, *, secret: str | None = None, attempts: int = 1, read_timeout: float = 10.0
) -> Any:
    """A boto3 client of ``bucket``'s server that talks to ``endpoint_url`` (the proxy)."""
    server = bucket.server
    config = Config(
        retries={"mode": "standard", "total_max_attempts": attempts},
        connect_timeout=5, read_timeout=read_timeout, s3={"addressing_style": "path"},
    )
    return boto3.client(
        "s3", endpoint_url=endpoint_url, aws_access_key_id=server.access_key,
        aws_secret_access_key=secret or server.secret_key, region_name="us-east-1", config=config,
    )


@pytest.fixture
def proxy(s3_fault_proxy: FaultProxy) -> FaultProxy:
    return s3_fault_proxy


@pytest.fixture
def client(s3_bucket: Bucket, proxy: FaultProxy) -> Any:
    return _client(s3_bucket, proxy.endpoint_url)


KEY = "proxy/object.bin"


# -- forwarding ------------------------------------------------------------------------------------------


def test_signed_requests_pass_through_untouched(
    seaweedfs_bucket: Bucket, fault_proxy_factory: Callable[[str], FaultProxy], tmp_path: Path
) -> None:
    from boto3.s3.transfer import TransferConfig

    bucket = seaweedfs_bucket
    proxy = fault_proxy_factory(bucket.server.endpoint_url)
    client = _client(bucket, proxy.endpoint_url)
    data = bytes(range(256)) * 40_000  # 10 MB: a multipart upload of two parts
    path = tmp_path / "blob"
    path.write_bytes(data)
    config = TransferConfig(multipart_threshold=5 << 20, multipart_chunksize=5 << 20)
    client.upload_file(str(path), bucket.name, KEY, Config=config)
    assert client.get_object(Bucket=bucket.name, Key=KEY)["Body"].read() == data
    assert bucket.client().head_object(Bucket=bucket.name, Key=KEY)["ContentLength"] == len(data)
    parts = proxy.requests("PUT", r"uploadId=")
    assert len(parts) == 2 and all(s.headers.get("expect") == "100-continue" for s in parts)
    assert {s.headers["host"] for s in proxy.seen} == {proxy.endpoint_url.removeprefix("http://")}
    with pytest.raises(ClientError) as denied:  # the server really checks signatures
        _client(bucket, proxy.endpoint_url, secret="wrong").put_object(Bucket=bucket.name, Key="x", Body=b"x")
    assert denied.value.response["Error"]["Code"] == "SignatureDoesNotMatch"


def test_keep_alive_connections_serve_many_requests(s3_bucket: Bucket, proxy: FaultProxy, client: Any) -> None:
    for i in range(20):
        client.put_object(Bucket=s3_bucket.name, Key=f"many/{i}", Body=str(i).encode())
    listed = client.list_objects_v2(Bucket=s3_bucket.name, Prefix="many/")["Contents"]
    assert sorted(int(item["Key"].rsplit("/", 1)[1]) for item in listed) == list(range(20))
    assert all(isinstance(s.action, PassThrough) for s in proxy.seen)


def test_upstream_must_be_loopback_http() -> None:
    with pytest.raises(ValueError, match="loopback"):
        FaultProxy("http://10.0.0.1:9000")
    with pytest.raises(ValueError, match="loopback"):
        FaultProxy("https://127.0.0.1:9000")


# -- injected answers --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("action", "status", "code"),
    [(Respond.slow_down(), 503, "SlowDown"), (Respond.unavailable(), 503, "ServiceUnavailable"),
     (Respond.internal_error(), 500, "InternalError")],
)
def test_error_answers_reach_the_client(
    s3_bucket: Bucket, proxy: FaultProxy, client: Any, action: Respond, status: int, code: str
) -> None:
    rule = proxy.add(action, method="PUT")
    with pytest.raises(ClientError) as caught:
        client.put_object(Bucket=s3_bucket.name, Key=KEY, Body=b"payload")
    assert caught.value.response["ResponseMetadata"]["HTTPStatusCode"] == status
    assert caught.value.response["Error"]["Code"] == code
    assert rule.hits == 1 and rule.fired.is_set()
    client.put_object(Bucket=s3_bucket.name, Key=KEY, Body=b"payload")  # the rule fired once only
    assert client.get_object(Bucket=s3_bucket.name, Key=KEY)["Body"].read() == b"payload"


def test_botocore_retries_through_injected_errors(s3_bucket: Bucket, proxy: FaultProxy, tmp_path: Path) -> None:
    client = _client(s3_bucket, proxy.endpoint_url, attempts=4)
    proxy.add(Respond.slow_down(), method="PUT", times=2)
    local = tmp_path / "f"
    local.write_bytes(b"z" * 100_000)
    client.upload_file(str(local), s3_bucket.name, KEY)  # a file body: Expect: 100-continue
    assert [type(s.action).__name__ for s in proxy.requests("PUT")] == ["Respond", "Respond", "PassThrough"]
    assert client.get_object(Bucket=s3_bucket.name, Key=KEY)["Body"].read() == b"z" * 100_000


def test_rules_match_by_method_path_and_count(s3_bucket: Bucket, proxy: FaultProxy, client: Any) -> None:
    client.put_object(Bucket=s3_bucket.name, Key=KEY, Body=b"v")
    proxy.add(Respond.internal_error(), method="GET", path=r"/never-matches$", times=None)
    always = proxy.add(Respond.internal_error(), method="HEAD", path=r"/proxy/object\.bin$", times=None)
    for _ in range(3):
        with pytest.raises(ClientError):
            client.head_object(Bucket=s3_bucket.name, Key=KEY)
    assert client.get_object(Bucket=s3_bucket.name, Key=KEY)["Body"].read() == b"v"
    assert always.hits == 3
    proxy.clear()
    assert client.head_object(Bucket=s3_bucket.name, Key=KEY)["ContentLength"] == 1


# -- broken connections -----------------------------------------------------------------------------------


def test_reset_in_the_middle_of_an_upload(s3_bucket: Bucket, proxy: FaultProxy, client: Any) -> None:
    rule = proxy.add(Reset(after_request_bytes=64 * 1024), method="PUT")
    with pytest.raises((BotoCoreError, ClientError)):
        client.put_object(Bucket=s3_bucket.name, Key=KEY, Body=b"x" * 1_000_000)
    assert rule.hits == 1
    with pytest.raises(ClientError):  # nothing was published
        client.head_object(Bucket=s3_bucket.name, Key=KEY)
    _client(s3_bucket, proxy.endpoint_url, attempts=3).put_object(Bucket=s3_bucket.name, Key=KEY, Body=b"x" * 1_000_000)
    assert client.head_object(Bucket=s3_bucket.name, Key=KEY)["ContentLength"] == 1_000_000


def test_reset_in_the_middle_of_a_download(s3_bucket: Bucket, proxy: FaultProxy, client: Any) -> None:
    client.put_object(Bucket=s3_bucket.name, Key=KEY, Body=b"y" * 500_000)
    proxy.add(Reset(after_response_bytes=100_000), method="GET")
    with pytest.raises(BotoCoreError):
        client.get_object(Bucket=s3_bucket.name, Key=KEY)["Body"].read()
    assert client.get_object(Bucket=s3_bucket.name, Key=KEY)["Body"].read() == b"y" * 500_000


def test_an_answer_lost_after_the_object_landed(s3_bucket: Bucket, proxy: FaultProxy, client: Any) -> None:
    proxy.add(Reset(after_response_bytes=0), method="PUT")
    with pytest.raises(BotoCoreError):
        client.put_object(Bucket=s3_bucket.name, Key=KEY, Body=b"landed")
    assert client.get_object(Bucket=s3_bucket.name, Key=KEY)["Body"].read() == b"landed"


# -- slow servers -----------------------------------------------------------------------------------------


def test_a_stall_trips_the_read_timeout_and_ends_with_the_proxy(s3_bucket: Bucket) -> None:
    proxy = FaultProxy(s3_bucket.server.endpoint_url).start()
    client = _client(s3_bucket, proxy.endpoint_url, read_timeout=0.5)
    rule = proxy.add(Stall(), method="PUT")
    start = time.monotonic()
    with pytest.raises(BotoCoreError, match="[Rr]ead timeout"):
        client.put_object(Bucket=s3_bucket.name, Key=KEY, Body=b"s" * 1000)
    assert 0.5 <= time.monotonic() - start < 0.5 + 5.0
    assert rule.fired.is_set()
    stalled = proxy.add(Stall(read_body=False), method="PUT")
    patient = _client(s3_bucket, proxy.endpoint_url, read_timeout=30)
    put = lambda: patient.put_object(Bucket=s3_bucket.name, Key=KEY, Body=b"s")  # noqa: E731
    caller = threading.Thread(target=_swallow, args=(put,))
    caller.start()
    assert stalled.fired.wait(10)
    start = time.monotonic()
    proxy.close()  # ends the stall: the waiting client sees its connection close
    caller.join(10)
    assert not caller.is_alive() and time.monotonic() - start < 10


def test_a_trickle_keeps_a_request_alive_past_the_read_timeout(s3_bucket: Bucket, proxy: FaultProxy) -> None:
    client = _client(s3_bucket, proxy.endpoint_url, read_timeout=0.3)
    client.put_object(Bucket=s3_bucket.name, Key=KEY, Body=b"t" * 50)
    proxy.add(Trickle(bytes_per_second=800), method="GET")
    start = time.monotonic()
    assert client.get_object(Bucket=s3_bucket.name, Key=KEY)["Body"].read() == b"t" * 50
    assert time.monotonic() - start > 0.3  # each read came in time; the request as a whole did not


def _swallow(call: Callable[[], object]) -> None:
    try:
        call()
    except (BotoCoreError, ClientError):
        pass
