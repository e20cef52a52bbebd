"""A loopback HTTP proxy that injects faults between a client and a real S3-compatible server.

Point the client's endpoint at :attr:`FaultProxy.endpoint_url`; the proxy forwards each request
byte for byte to the upstream server, so a SigV4 signature (which covers the ``Host`` header the
client sent, i.e. the proxy's address) still verifies there: nothing signed is rewritten. Each
request is matched against the rules, first added first, by method and a regex on the request
target (path and query); a rule fires ``times`` times (None: for ever), then passes through.

Actions (frozen dataclasses, so a test reads like a script)::

    proxy.add(Respond.slow_down(), method="PUT", times=2)          # 503 SlowDown XML, twice
    proxy.add(Respond(500, code="InternalError"), path=r"\\?uploadId=")
    proxy.add(Reset(after_request_bytes=64 * 1024), method="PUT")  # RST mid-upload
    proxy.add(Reset(after_response_bytes=100), method="GET")       # RST mid-download
    proxy.add(Stall(), method="PUT")                  # read the request, never answer
    proxy.add(Trickle(bytes_per_second=1))            # relay the whole answer at 1 byte/s

Stalls and trickles wait on an Event that :meth:`FaultProxy.close` sets, so they end when the test
ends. Each rule keeps ``hits`` and a ``fired`` Event a test can wait on; ``proxy.seen`` lists every
request with the action applied. An injected answer closes its connection (``Connection: close``);
a request with ``Expect: 100-continue`` gets it before the body, as a real server answers.

Fixtures (import them into a test module): ``fault_proxy_factory`` makes proxies in front of any
loopback URL and closes them after the test; ``s3_fault_proxy`` is one in front of each server of
the conftest's ``s3_server`` in turn (pair it with ``s3_bucket``, which follows the same server).
"""

from __future__ import annotations

import re
import socket
import socketserver
import threading
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Callable, Iterator
from urllib.parse import urlsplit

import _http_wire as wire
import pytest

__all__ = [
    "FaultProxy",
    "PassThrough",
    "Reset",
    "Respond",
    "Rule",
    "Seen",
    "Stall",
    "Trickle",
    "fault_proxy_factory",
    "s3_fault_proxy",
]

_SOCKET_TIMEOUT = 60.0  # a vanished peer cannot keep a proxy thread for longer


@dataclass(frozen=True)
class PassThrough:
    """Forward the request and the answer untouched (what unmatched requests get)."""


@dataclass(frozen=True)
class Respond:
    """Answer with ``status`` and an S3 error document instead of forwarding."""

    status: int
    code: str = "InternalError"
    message: str = "injected by the fault proxy"
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def slow_down(cls) -> Respond:
        """S3's throttling answer: 503 SlowDown."""
        return cls(503, "SlowDown", "Please reduce your request rate.")

    @classmethod
    def unavailable(cls) -> Respond:
        """503 ServiceUnavailable."""
        return cls(503, "ServiceUnavailable", "Please reduce your request rate.")

    @classmethod
    def internal_error(cls) -> Respond:
        """500 InternalError."""
        return cls(500, "InternalError", "We encountered an internal error. Please try again.")


@dataclass(frozen=True)
class Reset:
    """Forward, then reset both connections (TCP RST) after that many body bytes one way.

    ``after_request_bytes`` counts request body bytes sent upstream; ``after_response_bytes`` counts
    answer bytes (head included) relayed to the client. Give one of the two.
    """

    after_request_bytes: int | None = None
    after_response_bytes: int | None = None


@dataclass(frozen=True)
class Stall:
    """Read the request (its body too unless ``read_body=False``), then answer nothing.

    The connection closes after ``seconds`` (None: when the proxy closes).
    """

    seconds: float | None = None
    read_body: bool = True


@dataclass(frozen=True)
class Trickle:
    """Forward the request, then relay the whole answer, head included, ``bytes_per_second`` at a time."""

    bytes_per_second: float = 1.0


Action = PassThrough | Respond | Reset | Stall | Trickle


@dataclass
class Rule:
    """Which requests get ``action``: by method and a regex searched in the request target."""

    action: Action
    method: str | None = None
    path: str | None = None
    times: int | None = 1
    hits: int = 0
    fired: threading.Event = field(default_factory=threading.Event)

    def matches(self, method: str, target: str) -> bool:
        """Whether this rule still fires and applies to ``method target``."""
        if self.times is not None and self.hits >= self.times:
            return False
        if self.method is not None and self.method.upper() != method:
            return False
        return self.path is None or re.search(self.path, target) is not None


@dataclass(frozen=True)
class Seen:
    """One request the proxy received (its headers with lower-cased names), and the action applied."""

    method: str
    target: str
    headers: dict[str, str]
    action: Action


class _Connection:
    """One client connection, and the upstream connection that serves it (kept alive alike)."""

    def __init__(self, proxy: FaultProxy, client: socket.socket) -> None:
        self.proxy = proxy
        self.client = client
        self.client_in = client.makefile("rb")
        self.upstream: socket.socket | None = None
        self.upstream_in: BinaryIO | None = None

    def serve(self) -> None:
        try:
            while not self.proxy.stopped.is_set():
                head = wire.read_head(self.client_in)
                if head is None:
                    return
                request = wire.parse_request(head)
                action = self.proxy._choose(request)
                if not self._handle(request, action):
                    return
        except (wire.Aborted, OSError, ValueError):
            return
        finally:
            self._drop_upstream()
            self.client_in.close()
            self.client.close()

    def _drop_upstream(self, reset: bool = False) -> None:
        if self.upstream is not None and self.upstream_in is not None:
            if reset:
                wire.reset(self.upstream, self.upstream_in)
            else:
                self.upstream_in.close()
                self.upstream.close()
        self.upstream = self.upstream_in = None

    def _handle(self, request: wire.Request, action: Action) -> bool:
        """Apply ``action``; True if the connection may serve another request."""
        if isinstance(action, Respond):
            if not request.expects_continue:
                wire.copy_body(self.client_in, request.headers, lambda data: None, until_eof=False)
            self._respond(request, action)
            return False
        if isinstance(action, Stall):
            if action.read_body and not request.expects_continue:
                wire.copy_body(self.client_in, request.headers, lambda data: None, until_eof=False)
            self.proxy.stopped.wait(action.seconds)
            return False
        if isinstance(action, Reset):
            try:
                return self._forward(request, action.after_request_bytes, action.after_response_bytes, None)
            except wire.Aborted:
                wire.reset(self.client, self.client_in)
                raise
        return self._forward(request, None, None, action.bytes_per_second if isinstance(action, Trickle) else None)

    def _respond(self, request: wire.Request, action: Respond) -> None:
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{action.code}</Code><Message>{action.message}</Message>"
            "<RequestId>fault-proxy</RequestId></Error>"
        ).encode()
        reason = {500: "Internal Server Error", 503: "Service Unavailable"}.get(action.status, "Injected")
        lines = [f"HTTP/1.1 {action.status} {reason}", "Content-Type: application/xml",
                 f"Content-Length: {len(body)}", "Connection: close"]
        lines += [f"{name}: {value}" for name, value in action.headers]
        head = "\r\n".join(lines).encode("latin-1") + b"\r\n\r\n"
        self.client.sendall(head + (b"" if request.method == "HEAD" else body))

    def _connect(self) -> tuple[socket.socket, BinaryIO]:
        if self.upstream is None:
            self.upstream = socket.create_connection(self.proxy.upstream, timeout=_SOCKET_TIMEOUT)
            self.proxy._track(self.upstream)
            self.upstream_in = self.upstream.makefile("rb")
        assert self.upstream_in is not None
        return self.upstream, self.upstream_in

    def _forward(
        self, request: wire.Request, reset_request: int | None, reset_answer: int | None, rate: float | None
    ) -> bool:
        upstream, upstream_in = self._connect()
        upstream.sendall(request.head)
        if request.expects_continue:
            interim = wire.read_head(upstream_in)
            if interim is None:
                raise wire.Aborted("upstream closed before answering")
            if wire.status(interim) != 100:
                self._relay(request, interim, upstream_in, reset_answer, rate)
                return False  # the client may still send the body we did not ask for: start afresh
            self.client.sendall(interim)
        sent = 0

        def to_upstream(data: bytes) -> None:
            nonlocal sent
            if reset_request is not None and sent + len(data) >= reset_request:
                upstream.sendall(data[: max(0, reset_request - sent)])
                self._drop_upstream(reset=True)
                raise wire.Aborted("reset mid-request on purpose")
            upstream.sendall(data)
            sent += len(data)

        wire.copy_body(self.client_in, request.headers, to_upstream, until_eof=False)
        if reset_request is not None:  # the body was shorter: reset before the answer
            self._drop_upstream(reset=True)
            raise wire.Aborted("reset after the request on purpose")
        while True:
            head = wire.read_head(upstream_in)
            if head is None:
                raise wire.Aborted("upstream closed before answering")
            if wire.status(head) != 100:
                break
            self.client.sendall(head)
        return self._relay(request, head, upstream_in, reset_answer, rate)

    def _relay(
        self, request: wire.Request, head: bytes, upstream_in: BinaryIO, reset_answer: int | None, rate: float | None
    ) -> bool:
        """Relay one answer to the client; True if both sides may keep the connection."""
        _, headers = wire.parse_head(head)
        status = wire.status(head)
        relayed = 0

        def to_client(data: bytes) -> None:
            nonlocal relayed
            if reset_answer is not None and relayed + len(data) >= reset_answer:
                self.client.sendall(data[: max(0, reset_answer - relayed)])
                raise wire.Aborted("reset mid-answer on purpose")
            if rate is None:
                self.client.sendall(data)
            else:
                for i in range(len(data)):
                    if self.proxy.stopped.wait(1.0 / rate):
                        raise wire.Aborted("the proxy closed during a trickle")
                    self.client.sendall(data[i : i + 1])
            relayed += len(data)

        to_client(head)
        no_body = request.method == "HEAD" or status in (204, 304) or 100 <= status < 200
        close_delimited = not no_body and "content-length" not in headers and "chunked" not in headers.get(
            "transfer-encoding", ""
        ).lower()
        if not no_body:
            wire.copy_body(upstream_in, headers, to_client, until_eof=close_delimited)
        if reset_answer is not None:  # the answer was shorter: reset at its end all the same
            raise wire.Aborted("reset after the answer on purpose")
        closes = "close" in (headers.get("connection", "") + request.headers.get("connection", "")).lower()
        return not (close_delimited or closes)


class _Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


class FaultProxy:
    """A threaded HTTP proxy on 127.0.0.1 in front of ``upstream_url``, with fault rules.

    Example:
        >>> proxy = FaultProxy("http://127.0.0.1:9000").start()  # doctest: +SKIP
        >>> rule = proxy.add(Respond.slow_down(), method="PUT")  # doctest: +SKIP
        >>> boto3.client("s3", endpoint_url=proxy.endpoint_url, ...)  # doctest: +SKIP
        >>> proxy.close()  # doctest: +SKIP
    """

    def __init__(self, upstream_url: str) -> None:
        parts = urlsplit(upstream_url)
        if parts.scheme != "http" or parts.hostname not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError(f"'upstream_url' must be an http:// URL on the loopback (got {upstream_url!r})")
        self.upstream = (parts.hostname, parts.port or 80)
        self.rules: list[Rule] = []
        self.seen: list[Seen] = []
        self.stopped = threading.Event()
        self._lock = threading.Lock()
        self._sockets: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()
        self._server: _Server | None = None

    @property
    def endpoint_url(self) -> str:
        """The URL a client uses instead of the upstream's."""
        assert self._server is not None, "start() the proxy first"
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self, port: int = 0) -> FaultProxy:
        """Listen on ``port`` of the loopback (0: a free one) and serve in a daemon thread.

        A given port lets a test stop a proxy and start another where it was: to the client, a
        server that died and came back.
        """
        proxy = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                proxy._track(self.request)
                with proxy._lock:
                    proxy._threads.add(threading.current_thread())
                self.request.settimeout(_SOCKET_TIMEOUT)
                _Connection(proxy, self.request).serve()

        self._server = _Server(("127.0.0.1", port), Handler)
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def add(
        self, action: Action, *, method: str | None = None, path: str | None = None, times: int | None = 1
    ) -> Rule:
        """Apply ``action`` to the next ``times`` requests matching ``method`` and ``path`` (a regex)."""
        rule = Rule(action, method, path, times)
        with self._lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        """Drop every rule: from now on, everything passes through."""
        with self._lock:
            self.rules.clear()

    def requests(self, method: str | None = None, path: str | None = None) -> list[Seen]:
        """The requests seen so far, filtered like rules are."""
        with self._lock:
            return [s for s in self.seen if Rule(PassThrough(), method, path, None).matches(s.method, s.target)]

    def _choose(self, request: wire.Request) -> Action:
        with self._lock:
            rule = next((r for r in self.rules if r.matches(request.method, request.target)), None)
            action: Action = PassThrough() if rule is None else rule.action
            if rule is not None:
                rule.hits += 1
            self.seen.append(Seen(request.method, request.target, request.headers, action))
        if rule is not None:
            rule.fired.set()
        return action

    def _track(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.add(sock)

    def close(self) -> None:
        """Stop listening, end stalls and trickles, close every connection, join the threads (bounded)."""
        self.stopped.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        with self._lock:
            sockets, threads = list(self._sockets), list(self._threads)
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in threads:
            thread.join(timeout=5.0)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@pytest.fixture
def fault_proxy_factory() -> Iterator[Callable[[str], FaultProxy]]:
    """Make fault proxies in front of upstream URLs; all are closed when the test ends."""
    proxies: list[FaultProxy] = []

    def make(upstream_url: str) -> FaultProxy:
        proxy = FaultProxy(upstream_url).start()
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        proxy.close()


@pytest.fixture
def s3_fault_proxy(s3_server: Any, fault_proxy_factory: Callable[[str], FaultProxy]) -> FaultProxy:
    """A fault proxy in front of each S3 server in turn (``s3_server`` of the conftest's servers)."""
    return fault_proxy_factory(s3_server.endpoint_url)
