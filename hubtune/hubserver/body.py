"""Request bodies for the local hub: strict framing (``Content-Length`` or ``chunked``) and a
streaming reader that never holds more than it must.

A request whose framing is ambiguous or malformed is refused with a 400 *before* anything is
read: a server and a proxy that disagree on where a body ends can be made to read one
request's body as the next request (request smuggling), and an unparsable length is a client
bug worth a clear message, not a dropped connection or a 500.
"""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import Message

from hubtune.hubserver.storage import HubError

__all__ = ["BodyReader", "Framing", "parse_framing"]

COPY_CHUNK = 1 << 20  # the most bytes read from the socket at once
# Larger lengths are refused as malformed rather than trusted: no legitimate upload to a local
# hub approaches 1 TiB, and a 30-digit number is not a length anybody means.
MAX_CONTENT_LENGTH = 1 << 40
_DIGITS_RE = re.compile(r"^[0-9]{1,13}$")
_CHUNK_SIZE_RE = re.compile(rb"^([0-9A-Fa-f]{1,16})[ \t]*(;[^\r\n]*)?\r?\n$")
_SIZE_LINE_MAX = 1024


@dataclass(frozen=True)
class Framing:
    """How a request's body is delimited."""

    length: int  # declared Content-Length (0 when absent or chunked)
    chunked: bool

    @property
    def has_body(self) -> bool:
        """Whether the request declares any body bytes."""
        return self.chunked or self.length > 0


def parse_framing(headers: Message) -> Framing:
    """Read ``Content-Length`` / ``Transfer-Encoding`` strictly.

    Args:
        headers: The request headers.

    Returns:
        The framing.

    Raises:
        HubError: 400 for a length that is not plain digits, lengths that disagree, a length
            above 1 TiB, a transfer coding other than ``chunked``, or both headers at once.
    """
    encodings = headers.get_all("Transfer-Encoding") or []
    lengths = headers.get_all("Content-Length") or []
    if encodings:
        if [e.strip().lower() for e in encodings] != ["chunked"]:
            raise HubError(400, f"Unsupported Transfer-Encoding {', '.join(encodings)!r}")
        if lengths:
            raise HubError(400, "Both Content-Length and Transfer-Encoding: refused as ambiguous")
        return Framing(length=0, chunked=True)
    if not lengths:
        return Framing(length=0, chunked=False)
    values = {v.strip() for v in lengths}
    if len(values) != 1:
        raise HubError(400, f"Conflicting Content-Length headers: {sorted(values)}")
    value = values.pop()
    if not _DIGITS_RE.match(value):
        raise HubError(400, f"Invalid Content-Length {value[:40]!r}: expected a byte count")
    length = int(value)
    if length > MAX_CONTENT_LENGTH:
        raise HubError(400, f"Invalid Content-Length {length}: more than 1 TiB")
    return Framing(length=length, chunked=False)


class BodyReader:
    """A request body as a stream: ``Content-Length`` bounded, or ``chunked`` decoded.

    Reading stops at the declared end, so a keep-alive connection stays usable; a body cut short
    (client gone, server shutting down) raises ``ConnectionError`` instead of looking complete.
    Malformed chunked framing raises a 400 and marks the reader ``broken``: the connection
    cannot be resynchronised and must be closed after the answer.
    """

    def __init__(self, rfile: io.BufferedIOBase, framing: Framing) -> None:
        self._rfile = rfile
        self._remaining = framing.length
        self._chunked = framing.chunked
        self._chunk_left = 0  # bytes of the current chunk not read yet
        self._done = not framing.has_body
        self._buffer = bytearray()
        self._scanned = 0  # buffer bytes already searched for a newline
        self.broken = False

    def _bad(self, message: str) -> HubError:
        self.broken = True
        return HubError(400, f"Malformed chunked body: {message}")

    def _next_chunk_size(self) -> int:
        line = self._rfile.readline(_SIZE_LINE_MAX)
        if not line:
            raise ConnectionError("request body ended early")
        match = _CHUNK_SIZE_RE.match(line)
        if match is None:
            raise self._bad(f"invalid chunk size line {line[:40]!r}")
        return int(match.group(1), 16)

    def _end_of_chunk(self) -> None:
        end = self._rfile.readline(3)
        if not end:  # the client went away after the chunk's data: not malformed, cut short
            raise ConnectionError("request body ended early")
        if end not in (b"\r\n", b"\n"):
            raise self._bad("chunk data not followed by CRLF")

    def _read_chunked(self) -> bytes:
        if self._chunk_left == 0:
            size = self._next_chunk_size()
            if size == 0:
                for _ in range(100):  # trailers, then the blank line
                    trailer = self._rfile.readline(_SIZE_LINE_MAX)
                    if trailer in (b"\r\n", b"\n", b""):
                        break
                    if not trailer.endswith(b"\n"):  # one line, not several pieces of it
                        raise self._bad(f"trailer line longer than {_SIZE_LINE_MAX} bytes")
                else:
                    raise self._bad("too many trailer lines")
                self._done = True
                return b""
            self._chunk_left = size
        # Never ask for the whole declared chunk at once: a client may declare 2**64 bytes.
        data = self._rfile.read1(min(self._chunk_left, COPY_CHUNK))
        if not data:
            raise ConnectionError("request body ended early")
        self._chunk_left -= len(data)
        if self._chunk_left == 0:
            self._end_of_chunk()
        return data

    def _read_sized(self) -> bytes:
        # read1: whatever has arrived (up to the limit), so lines are handled as they come
        # instead of after a full megabyte.
        data = self._rfile.read1(min(self._remaining, COPY_CHUNK))
        if not data:
            raise ConnectionError("request body ended early")
        self._remaining -= len(data)
        self._done = self._remaining == 0
        return data

    def read_chunk(self) -> bytes:
        """The next bytes of the body; ``b""`` once it is exhausted."""
        if self._buffer:
            data = bytes(self._buffer)
            self._buffer.clear()
            self._scanned = 0
            return data
        while not self._done:
            data = self._read_chunked() if self._chunked else self._read_sized()
            if data:
                return data
        return b""

    def _fill(self) -> bool:
        """Read more bytes into the buffer; False once the body is exhausted."""
        if self._done:
            return False
        data = self._read_chunked() if self._chunked else self._read_sized()
        self._buffer += data  # bytearray: amortised O(1) appends, not a copy per read
        return True

    @property
    def done(self) -> bool:
        """Whether the whole body has been read from the connection."""
        return self._done

    @property
    def remaining(self) -> int | None:
        """Bytes still unread (``None`` if unknown: chunked)."""
        return None if self._chunked else self._remaining

    def next_line(self, *, limit: int | None = None, what: str = "line") -> bytes | None:
        """The next line (without its newline), or ``None`` at the end of the body.

        Args:
            limit: Refuse (413) a line longer than this many bytes, before reading all of it.
            what: What the line is, for the 413's message.

        Only the part of the buffer not searched yet is searched again after each read, so a
        long line costs linear time, not quadratic.
        """
        while True:
            newline = self._buffer.find(b"\n", self._scanned)
            if newline >= 0:
                with memoryview(self._buffer) as view:
                    line = bytes(view[:newline])  # one copy (a bytearray slice would be two)
                if newline > COPY_CHUNK:
                    # After a long line (an inline file), keep only the rest: the buffer would
                    # otherwise hold its largest size until the request ends.
                    self._buffer = bytearray(self._buffer[newline + 1 :])
                else:
                    del self._buffer[: newline + 1]  # cheap: bytearray drops a prefix in place
                self._scanned = 0
                return line
            self._scanned = len(self._buffer)
            if limit is not None and len(self._buffer) > limit:
                raise HubError(413, f"The {what} is longer than {limit} bytes")
            if not self._fill():
                if not self._buffer:
                    return None
                line = bytes(self._buffer)
                self._buffer.clear()
                self._scanned = 0
                return line

    def lines(self) -> Iterator[bytes]:
        """Yield the body line by line (NDJSON), without holding more than one line."""
        while (line := self.next_line()) is not None:
            yield line

    def read_all(self, *, limit: int = 64 << 20) -> bytes:
        """The whole body (for small JSON/form requests).

        Raises:
            HubError: 413 past ``limit`` bytes.
        """
        while self._fill():
            if len(self._buffer) > limit:
                raise HubError(413, "Request body too large")
        data = bytes(self._buffer)
        self._buffer.clear()
        self._scanned = 0
        return data

    def drain(self) -> None:
        """Discard the rest of the body so the connection can serve the next request."""
        with contextlib.suppress(ConnectionError, HubError, OSError):
            while self._fill():
                self._buffer.clear()
                self._scanned = 0
