"""The RemoteStore interface: one conformance suite on file://, memory://, moto and SeaweedFS, then
what only one backend can show (403 vs 404, conditional writes on the wire, parallel parts,
deadlines against a stalled server, endpoints from the environment, options)."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator

import fsspec
import pytest

from ckpt_callbacks.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    ConfigurationError,
    CorruptCheckpointError,
    StoreError,
    StorePermissionError,
    UploadTimeoutError,
)
from ckpt_callbacks.remote import open_store
from ckpt_callbacks.remote.base import CHECKSUM_METADATA_KEY, Checksum, RemoteStore, checksum_file

pytest.importorskip("botocore")
from fault_proxy import FaultProxy, PassThrough, Stall, fault_proxy_factory  # noqa: E402,F401 -- a fixture
from servers import Bucket, S3Server  # noqa: E402

MIB = 1024 * 1024
SMALL_PARTS = {"multipart_threshold": 5 * MIB, "multipart_chunksize": 5 * MIB}
SLACK = 2.0  # seconds a timeout may be late on a loaded 2-core machine


def _data(size: int) -> bytes:
    return secrets.token_bytes(size)


def _file(tmp_path: Path, data: bytes, name: str = "ckpt.pt") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _meta(path: Path) -> dict[str, str]:
    return {CHECKSUM_METADATA_KEY: checksum_file(path)}


def _forget_memory(url: str) -> None:
    memory, root = fsspec.filesystem("memory"), "/" + url.split("://", 1)[1].split("/", 1)[0]
    if memory.exists(root):
        memory.rm(root, recursive=True)


@pytest.fixture(params=["file", "memory", "moto", "seaweedfs"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RemoteStore]:
    """The same interface on every backend, under a prefix."""
    if request.param == "file":
        opened = open_store((tmp_path / "store").as_uri() + "/runs")
    elif request.param == "memory":
        opened = open_store(f"memory://ckpt-tests-{secrets.token_hex(4)}/runs")
    else:
        bucket: Bucket = request.getfixturevalue(f"{request.param}_bucket")
        opened = open_store(bucket.url("runs"), bucket.storage_options(**SMALL_PARTS))
    yield opened
    opened.close()
    if request.param == "memory":  # memory:// is one store for the whole process
        _forget_memory(opened.url)


# -- conformance: every backend ------------------------------------------------------------------------


def test_small_objects_round_trip_with_metadata(store: RemoteStore) -> None:
    metadata = {CHECKSUM_METADATA_KEY: "crc32c:e3069283", "run": "awesome"}
    store.write_bytes("run1/latest-rank0.pt.symlink", b"run1/ep1-ba5-rank0.pt", metadata=metadata)
    assert store.read_bytes("run1/latest-rank0.pt.symlink") == b"run1/ep1-ba5-rank0.pt"
    info = store.info("run1/latest-rank0.pt.symlink")
    assert info is not None and info.size == 21 and info.checksum == "crc32c:e3069283"
    assert dict(info.metadata) == metadata
    assert store.info("run1/missing.pt") is None
    with pytest.raises(CheckpointNotFoundError):
        store.read_bytes("run1/missing.pt")
    with pytest.raises(CheckpointNotFoundError):
        store.download_file("run1/missing.pt", "unused")


def test_upload_then_download_verifies_and_reports_progress(store: RemoteStore, tmp_path: Path) -> None:
    data = _data(11 * MIB + 123)  # three parts where multipart starts at 5 MiB
    source = _file(tmp_path, data)
    sent: list[int] = []
    store.upload_file(source, "run1/ep1.pt", overwrite=False, metadata=_meta(source), progress=sent.append)
    assert sum(sent) == len(data)
    info = store.info("run1/ep1.pt")
    assert info is not None and info.size == len(data) and info.checksum == checksum_file(source)
    received: list[int] = []
    target = tmp_path / "down" / "ep1.pt"
    assert store.download_file("run1/ep1.pt", target, progress=received.append) == len(data)
    assert target.read_bytes() == data and sum(received) == len(data)
    assert [p.name for p in target.parent.iterdir()] == ["ep1.pt"]  # no temp file left behind


def test_overwrite_false_refuses_another_object_but_accepts_the_same_one(store: RemoteStore, tmp_path: Path) -> None:
    first, second = _file(tmp_path, b"first", "a.pt"), _file(tmp_path, b"other", "b.pt")
    store.upload_file(first, "run1/ep1.pt", overwrite=False, metadata=_meta(first))
    with pytest.raises(CheckpointExistsError):
        store.upload_file(second, "run1/ep1.pt", overwrite=False, metadata=_meta(second))
    assert store.read_bytes("run1/ep1.pt") == b"first"
    # A retry whose first attempt landed (same size, same checksum) is a success, not a 412.
    store.upload_file(first, "run1/ep1.pt", overwrite=False, metadata=_meta(first))
    store.upload_file(second, "run1/ep1.pt", overwrite=True, metadata=_meta(second))
    assert store.read_bytes("run1/ep1.pt") == b"other"
    store.write_bytes("run1/manifest.json", b"{}", overwrite=False)
    with pytest.raises(CheckpointExistsError):
        store.write_bytes("run1/manifest.json", b"[]", overwrite=False)
    assert store.read_bytes("run1/manifest.json") == b"{}"


def test_list_is_sorted_prefix_matched_and_hides_internal_names(store: RemoteStore) -> None:
    for key in ("run1/b.pt", "run1/a.pt", "run10/c.pt", "run2/d.pt"):
        store.write_bytes(key, b"x", metadata={CHECKSUM_METADATA_KEY: "crc32:8cdc1683"})
    assert store.list("run1/") == ["run1/a.pt", "run1/b.pt"]
    assert store.list("run1") == ["run1/a.pt", "run1/b.pt", "run10/c.pt"]
    assert store.list() == ["run1/a.pt", "run1/b.pt", "run10/c.pt", "run2/d.pt"]
    assert store.list("nothing/") == []


def test_delete_removes_object_and_metadata_and_ignores_missing(store: RemoteStore) -> None:
    store.write_bytes("run1/ep1.pt", b"x", metadata={CHECKSUM_METADATA_KEY: "crc32:8cdc1683"})
    store.delete("run1/ep1.pt")
    store.delete("run1/ep1.pt")
    assert store.info("run1/ep1.pt") is None and store.list() == []
    store.write_bytes("run1/ep1.pt", b"y")  # a new object without metadata gets none of the old one's
    info = store.info("run1/ep1.pt")
    assert info is not None and info.checksum is None


def test_download_with_wrong_checksum_leaves_the_target_untouched(store: RemoteStore, tmp_path: Path) -> None:
    source = _file(tmp_path, b"checkpoint bytes")
    store.upload_file(source, "run1/ep1.pt", metadata={CHECKSUM_METADATA_KEY: "crc32:00000000"})
    (tmp_path / "down").mkdir()
    target = _file(tmp_path / "down", b"old", "ep1.pt")
    with pytest.raises(CorruptCheckpointError, match="checksum"):
        store.download_file("run1/ep1.pt", target)
    with pytest.raises(CorruptCheckpointError, match="checksum"):
        store.download_file("run1/ep1.pt", target, checksum="crc32c:00000000")
    assert target.read_bytes() == b"old" and os.listdir(target.parent) == ["ep1.pt"]
    store.download_file("run1/ep1.pt", target, checksum=checksum_file(source, "crc32"))
    assert target.read_bytes() == b"checkpoint bytes"


def test_a_passed_deadline_uploads_nothing(store: RemoteStore, tmp_path: Path) -> None:
    with pytest.raises(UploadTimeoutError):
        store.upload_file(_file(tmp_path, b"x"), "run1/ep1.pt", deadline=time.monotonic() - 1)
    assert store.info("run1/ep1.pt") is None


def test_keys_stay_under_the_prefix_and_probe_passes(store: RemoteStore) -> None:
    store.probe()
    for key in ("", "/abs.pt", "../escape.pt", "run1//x.pt", "run1/./x.pt"):
        with pytest.raises(ConfigurationError, match="'key'"):
            store.info(key)
    assert store.uri("run1/ep1.pt") == store.url + "/run1/ep1.pt"
    assert store.abort_incomplete_uploads(older_than_seconds=3600) == 0


@pytest.mark.parametrize("url", ["file", "memory"])
def test_fsspec_failed_overwrite_keeps_the_old_object_and_its_metadata(tmp_path: Path, url: str) -> None:
    prefix = (tmp_path / "store").as_uri() if url == "file" else f"memory://ckpt-tests-{secrets.token_hex(4)}"
    store = open_store(prefix)
    old, new = _file(tmp_path, b"old bytes", "old.pt"), _file(tmp_path, _data(MIB), "new.pt")
    store.upload_file(old, "run1/ep1.pt", metadata=_meta(old))

    def interrupt(sent: int) -> None:
        raise RuntimeError("interrupted mid-upload")

    with pytest.raises(StoreError):
        store.upload_file(new, "run1/ep1.pt", metadata=_meta(new), progress=interrupt)
    info = store.info("run1/ep1.pt")
    assert info is not None and info.checksum == checksum_file(old) and store.read_bytes("run1/ep1.pt") == b"old bytes"
    assert store.list() == ["run1/ep1.pt"]  # no temp object left
    with pytest.raises(FileNotFoundError) as missing:
        store.upload_file(tmp_path / "no-such-file.pt", "run1/ep2.pt")
    assert not isinstance(missing.value, CheckpointNotFoundError)  # a local problem, not a store one
    if url == "memory":
        _forget_memory(prefix)


# -- S3 servers: errors ---------------------------------------------------------------------------------


def test_missing_bucket_is_reported_as_missing(s3_server: S3Server) -> None:
    store = open_store("s3://no-such-bucket-ckpt/runs", s3_server.storage_options())
    with pytest.raises(CheckpointNotFoundError, match="no-such-bucket-ckpt"):
        store.probe()


def test_bad_secret_is_a_permission_error_never_not_found(seaweedfs_bucket: Bucket, tmp_path: Path) -> None:
    from botocore.exceptions import ClientError

    store = open_store(seaweedfs_bucket.url("runs"), seaweedfs_bucket.storage_options(secret="wrong-secret"))
    for call in (store.probe, lambda: store.info("run1/ep1.pt"), lambda: store.read_bytes("run1/ep1.pt"),
                 lambda: store.upload_file(_file(tmp_path, b"x"), "run1/ep1.pt")):
        with pytest.raises(StorePermissionError, match="s3:ListBucket") as caught:
            call()
        assert isinstance(caught.value.__cause__, ClientError)
        assert not isinstance(caught.value, FileNotFoundError)


def test_read_only_credentials_cannot_write(seaweedfs_bucket: Bucket, tmp_path: Path) -> None:
    store = open_store(seaweedfs_bucket.url("runs"), seaweedfs_bucket.storage_options(identity="reader"))
    store.probe()  # may list
    with pytest.raises(StorePermissionError):
        store.upload_file(_file(tmp_path, b"x"), "run1/ep1.pt")
    with pytest.raises(StorePermissionError):
        store.write_bytes("run1/ep1.pt.symlink", b"x")


def test_without_list_permission_probe_explains_what_is_missing(seaweedfs_bucket: Bucket) -> None:
    store = open_store(seaweedfs_bucket.url("runs"), seaweedfs_bucket.storage_options(identity="nolist"))
    with pytest.raises(StorePermissionError, match="s3:ListBucket"):
        store.probe()
    store.write_bytes("run1/ep1.pt", b"x")  # may write and read all the same
    assert store.read_bytes("run1/ep1.pt") == b"x"


# -- S3 servers: what goes over the wire -----------------------------------------------------------------


def _recorder(store: Any) -> list[tuple[str, dict[str, str], float, float]]:
    """Record (operation, headers, start, end) of every request the store's client sends."""
    seen: list[tuple[str, dict[str, str], float, float]] = []
    started: dict[int, tuple[str, dict[str, str], float]] = {}
    lock = threading.Lock()

    def before(request: Any, **kwargs: Any) -> None:
        operation = kwargs["event_name"].rsplit(".", 1)[-1]
        with lock:
            started[threading.get_ident()] = (operation, dict(request.headers), time.monotonic())

    def after(**kwargs: Any) -> None:
        with lock:
            operation, headers, start = started.pop(threading.get_ident())
            seen.append((operation, headers, start, time.monotonic()))

    store.client.meta.events.register("before-send.s3", before)
    store.client.meta.events.register("after-call.s3", after)
    return seen


def _header(headers: dict[str, str], name: str) -> str | None:
    found = {k.lower(): v for k, v in headers.items()}.get(name.lower())
    return found.decode() if isinstance(found, bytes) else found


@pytest.mark.parametrize("size", [1024, 11 * MIB])
def test_overwrite_false_is_a_conditional_write(seaweedfs_bucket: Bucket, tmp_path: Path, size: int) -> None:
    store = open_store(seaweedfs_bucket.url("runs"), seaweedfs_bucket.storage_options(**SMALL_PARTS))
    seen = _recorder(store)
    source = _file(tmp_path, _data(size))
    store.upload_file(source, "run1/ep1.pt", overwrite=False, metadata=_meta(source))
    final = "PutObject" if size < 5 * MIB else "CompleteMultipartUpload"
    assert [_header(h, "If-None-Match") for op, h, *_ in seen if op == final] == ["*"]
    assert not any(op == "HeadObject" for op, *_ in seen)  # no check-then-act
    other = _file(tmp_path, _data(size), "other.pt")
    with pytest.raises(CheckpointExistsError):  # the server refused it (412), nothing was replaced
        store.upload_file(other, "run1/ep1.pt", overwrite=False, metadata=_meta(other))
    assert checksum_file(source) == store.info("run1/ep1.pt").checksum
    assert seaweedfs_bucket.client().list_multipart_uploads(Bucket=seaweedfs_bucket.name).get("Uploads", []) == []


def test_without_conditional_writes_a_check_comes_first(moto_bucket: Bucket, tmp_path: Path) -> None:
    store = open_store(moto_bucket.url("runs"), moto_bucket.storage_options(conditional_writes=False))
    seen = _recorder(store)
    store.write_bytes("run1/ep1.pt", b"first")
    with pytest.raises(CheckpointExistsError):
        store.upload_file(_file(tmp_path, b"second"), "run1/ep1.pt", overwrite=False)
    assert [op for op, *_ in seen] == ["PutObject", "HeadObject"]
    assert _header(seen[0][1], "If-None-Match") is None


def test_multipart_sends_parts_in_parallel(seaweedfs_bucket: Bucket, tmp_path: Path) -> None:
    store = open_store(seaweedfs_bucket.url("runs"), seaweedfs_bucket.storage_options(max_concurrency=4, **SMALL_PARTS))
    seen = _recorder(store)
    source = _file(tmp_path, _data(20 * MIB))
    store.upload_file(source, "run1/ep1.pt", metadata=_meta(source))
    parts = sorted((start, end) for op, _, start, end in seen if op == "UploadPart")
    assert len(parts) == 4
    overlapping = max(sum(1 for s, e in parts if s <= start < e) for start, _ in parts)
    assert overlapping >= 2, parts
    store.download_file("run1/ep1.pt", tmp_path / "back.pt")
    assert checksum_file(tmp_path / "back.pt") == checksum_file(source)


@pytest.mark.parametrize("checksum_mode", ["when_supported", "when_required"])
def test_checksum_mode_controls_transport_checksums(
    seaweedfs_bucket: Bucket, tmp_path: Path, checksum_mode: str
) -> None:
    store = open_store(seaweedfs_bucket.url("runs"), seaweedfs_bucket.storage_options(checksum_mode=checksum_mode))
    seen = _recorder(store)
    store.upload_file(_file(tmp_path, b"x" * 1000), "run1/ep1.pt")
    headers = {k.lower() for op, h, *_ in seen if op == "PutObject" for k in h}
    sends_crc = any(name.startswith("x-amz-checksum-") or name == "x-amz-trailer" for name in headers)
    assert sends_crc == (checksum_mode == "when_supported")
    assert store.read_bytes("run1/ep1.pt") == b"x" * 1000


def test_deadline_abandons_an_upload_stuck_on_a_stalled_server(
    seaweedfs_bucket: Bucket, tmp_path: Path, fault_proxy_factory: Callable[[str], FaultProxy]
) -> None:
    proxy = fault_proxy_factory(seaweedfs_bucket.server.endpoint_url)
    proxy.add(Stall(), method="PUT", path=r"partNumber=2", times=None)
    abort = proxy.add(PassThrough(), method="DELETE", path=r"uploadId=")
    options = seaweedfs_bucket.storage_options(endpoint_url=proxy.endpoint_url, read_timeout=30, **SMALL_PARTS)
    store = open_store(seaweedfs_bucket.url("runs"), options)
    source = _file(tmp_path, _data(12 * MIB))
    started = time.monotonic()
    with pytest.raises(UploadTimeoutError, match="deadline"):
        store.upload_file(source, "run1/ep1.pt", deadline=started + 2.0)
    assert time.monotonic() - started < 2.0 + SLACK  # not read_timeout (30 s), not for ever
    # The multipart upload is aborted from the caller's side while part 2 is still stuck.
    assert abort.fired.wait(10.0)
    client = seaweedfs_bucket.client()
    for _ in range(50):  # the abort is in another process: poll it, bounded
        if not client.list_multipart_uploads(Bucket=seaweedfs_bucket.name).get("Uploads"):
            break
        threading.Event().wait(0.1)
    assert not client.list_multipart_uploads(Bucket=seaweedfs_bucket.name).get("Uploads")
    assert "Contents" not in client.list_objects_v2(Bucket=seaweedfs_bucket.name)


_EXIT_SCRIPT = """
import json, sys, time
from ckpt_callbacks.errors import UploadTimeoutError
from ckpt_callbacks.remote import open_store
url, options, path = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
try:
    # Past 3 s the body has been sent: the worker waits in recv() for an answer that never comes.
    open_store(url, options).upload_file(path, "run1/ep1.pt", deadline=time.monotonic() + 3.0)
except UploadTimeoutError:
    print("timed out", flush=True)
"""


def test_an_upload_stuck_in_a_socket_does_not_hold_up_interpreter_exit(
    seaweedfs_bucket: Bucket, tmp_path: Path, fault_proxy_factory: Callable[[str], FaultProxy]
) -> None:
    proxy = fault_proxy_factory(seaweedfs_bucket.server.endpoint_url)
    stall = proxy.add(Stall(), method="PUT", times=None)
    options = seaweedfs_bucket.storage_options(endpoint_url=proxy.endpoint_url, read_timeout=60)
    command = [sys.executable, "-c", _EXIT_SCRIPT, seaweedfs_bucket.url("runs"), json.dumps(options),
               str(_file(tmp_path, b"x" * 1000))]
    started = time.monotonic()
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    assert done.stdout == "timed out\n", done.stderr
    assert stall.fired.is_set()
    # A joined (non-daemon) transfer thread would wait out the 60 s read timeout (measured: 66 s).
    assert time.monotonic() - started < 30


def test_abort_incomplete_uploads_only_under_the_prefix(s3_bucket: Bucket) -> None:
    client = s3_bucket.client()
    ours = client.create_multipart_upload(Bucket=s3_bucket.name, Key="runs/run1/ep1.pt")["UploadId"]
    client.create_multipart_upload(Bucket=s3_bucket.name, Key="elsewhere/ep1.pt")
    store = open_store(s3_bucket.url("runs"), s3_bucket.storage_options())
    if s3_bucket.server.name != "moto":  # moto reports every upload as initiated in 2010
        assert store.abort_incomplete_uploads(older_than_seconds=3600) == 0  # young uploads may be alive
    assert store.abort_incomplete_uploads(older_than_seconds=0) == 1
    left = client.list_multipart_uploads(Bucket=s3_bucket.name).get("Uploads", [])
    assert [u["Key"] for u in left] == ["elsewhere/ep1.pt"] and ours not in {u["UploadId"] for u in left}


# -- configuration ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("variable", ["AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "S3_ENDPOINT_URL"])
def test_endpoint_from_the_environment(moto_bucket: Bucket, monkeypatch: pytest.MonkeyPatch, variable: str) -> None:
    for name in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "S3_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv(variable, moto_bucket.server.endpoint_url)
    if variable.startswith("AWS"):  # botocore's own variables win over Composer's
        monkeypatch.setenv("S3_ENDPOINT_URL", "http://127.0.0.1:9")
    options = {k: v for k, v in moto_bucket.storage_options().items() if k != "endpoint_url"}
    store = open_store(moto_bucket.url("runs"), options)
    assert store.endpoint_url == moto_bucket.server.endpoint_url
    store.write_bytes("run1/x", b"x")
    assert moto_bucket.client().get_object(Bucket=moto_bucket.name, Key="runs/run1/x")["Body"].read() == b"x"
    explicit = open_store(moto_bucket.url("runs"), {**options, "endpoint_url": "http://127.0.0.1:9"})
    assert explicit.endpoint_url == "http://127.0.0.1:9"


def test_s3fs_style_options_work(moto_bucket: Bucket) -> None:
    server = moto_bucket.server
    options = {"key": server.access_key, "secret": server.secret_key,
               "client_kwargs": {"endpoint_url": server.endpoint_url, "region_name": "eu-west-1"}}
    store = open_store(moto_bucket.url(), options)
    store.write_bytes("x", b"x")
    assert store.list() == ["x"] and store.client.meta.region_name == "eu-west-1"


@pytest.mark.parametrize(
    ("options", "named"),
    [
        ({"endpoint": "http://x"}, "storage_options key"),
        ({"key": "k"}, "'storage_options'"),
        ({"checksum_mode": "always"}, "checksum_mode"),
        ({"max_attempts": 0}, "max_attempts"),
        ({"read_timeout": "60"}, "read_timeout"),
        ({"multipart_chunksize": 1024}, "multipart_chunksize"),
        ({"endpoint_url": "127.0.0.1:9000"}, "endpoint_url"),
        ({"conditional_writes": "yes"}, "conditional_writes"),
        ({"client_kwargs": {"verify": False}}, "client_kwargs"),
        ({"config_kwargs": {"no_such_setting": 1}}, "config_kwargs"),
        ({"profile": "no-such-profile-ckpt"}, "no-such-profile-ckpt"),
    ],
)
def test_bad_storage_options_fail_at_construction(options: dict[str, Any], named: str) -> None:
    with pytest.raises(ConfigurationError, match=named):
        open_store("s3://bucket/prefix", options)


@pytest.mark.parametrize("url", ["bucket/prefix", "s3:/bucket", "s3://", "nosuchscheme://x/y", 42])
def test_bad_remote_urls_fail_at_construction(url: Any) -> None:
    with pytest.raises(ConfigurationError, match="remote"):
        open_store(url)


def test_checksums_match_the_standard_check_values() -> None:
    for algorithm, expected in (("crc32c", "e3069283"), ("crc32", f"{zlib.crc32(b'123456789'):08x}")):
        checksum = Checksum(algorithm)
        checksum.update(b"1234")
        checksum.update(memoryview(b"56789"))
        assert checksum.value() == f"{algorithm}:{expected}"
    with pytest.raises(ConfigurationError, match="algorithm"):
        Checksum("md5")

