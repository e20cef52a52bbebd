"""The HTTP/1.1 wire, as much of it as the fault proxy needs to relay messages untouched.

A message is a head (request or status line, headers, blank line) and a body framed by
``Transfer-Encoding: chunked``, by ``Content-Length``, or (answers only) by the end of the
connection. The proxy copies both byte for byte and only parses what it must: the method, the
target, the status and the framing headers.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from typing import BinaryIO, Callable

__all__ = ["Aborted", "Request", "copy_body", "parse_head", "parse_request", "read_head", "reset", "status"]

_COPY_CHUNK = 64 * 1024
_HEAD_MAX = 64 * 1024


class Aborted(Exception):
    """The connection was reset on purpose, or by a peer: stop serving it."""


@dataclass
class Request:
    """A request head: its raw bytes, and the parts the proxy matches rules on."""

    head: bytes
    method: str
    target: str
    headers: dict[str, str]

    @property
    def expects_continue(self) -> bool:
        """Whether the client waits for ``100 Continue`` before it sends the body."""
        return self.headers.get("expect", "").lower() == "100-continue"


def read_head(reader: BinaryIO) -> bytes | None:
    """The bytes of one request or answer head, up to the blank line; None at a clean EOF."""
    lines = []
    while True:
        line = reader.readline(_HEAD_MAX)
        if not line:
            if lines:
                raise Aborted("the peer closed in the middle of a head")
            return None
        lines.append(line)
        if line in (b"\r\n", b"\n") and len(lines) > 1:
            return b"".join(lines)
        if len(lines) == 1 and line in (b"\r\n", b"\n"):
            lines.clear()  # tolerate a stray CRLF between messages, as RFC 9112 allows


def parse_head(head: bytes) -> tuple[str, dict[str, str]]:
    """The first line of a head, and its headers with lower-cased names."""
    first, *rest = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in rest:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return first, headers


def parse_request(head: bytes) -> Request:
    """A request head, parsed."""
    first, headers = parse_head(head)
    method, target, _ = (first.split(" ", 2) + ["", ""])[:3]
    return Request(head, method.upper(), target, headers)


def copy_body(reader: BinaryIO, headers: dict[str, str], emit: Callable[[bytes], None], until_eof: bool) -> None:
    """Copy one message body as framed by its headers (chunked, Content-Length, or up to EOF)."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            size_line = reader.readline(_HEAD_MAX)
            if not size_line:
                raise Aborted("the peer closed in a chunked body")
            emit(size_line)
            size = int(size_line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while (trailer := reader.readline(_HEAD_MAX)) not in (b"\r\n", b"\n", b""):
                    emit(trailer)
                emit(b"\r\n")
                return
            _copy_exact(reader, size + 2, emit)
    elif "content-length" in headers:
        _copy_exact(reader, int(headers["content-length"]), emit)
    elif until_eof:
        while data := reader.read1(_COPY_CHUNK):  # type: ignore[attr-defined]
            emit(data)


def _copy_exact(reader: BinaryIO, size: int, emit: Callable[[bytes], None]) -> None:
    while size > 0:
        data = reader.read1(min(size, _COPY_CHUNK))  # type: ignore[attr-defined]
        if not data:
            raise Aborted("the peer closed in a body")
        emit(data)
        size -= len(data)


def status(head: bytes) -> int:
    """The status code of an answer head."""
    return int(head.split(b" ", 2)[1])


def reset(sock: socket.socket, reader: BinaryIO) -> None:
    """Close with a TCP RST rather than a FIN: what a crashed server or a middlebox does."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    reader.close()  # the socket really closes only once its file object is closed too
    sock.close()
