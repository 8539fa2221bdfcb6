"""Refuse every non-loopback connection and DNS lookup, in this process or a child process.

The suite's autouse fixture (conftest.py) installs it around each test; a test that starts a
child Python process (a server, a CLI run) installs it there with :data:`CHILD_PREAMBLE`, so
"offline, loopback only" holds in the child too. Attempts are recorded, since libraries often
swallow the error (telemetry, update checks), and a child prints each one at once.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any

LOOPBACK = ("127.", "::1", "localhost")
ATTEMPT_MARK = "NETWORK ATTEMPT:"

# Python source a child runs first: `python -c CHILD_PREAMBLE + "..."` (cwd: the repo root).
CHILD_PREAMBLE = "import tests.netguard as _guard; _guard.install_in_child()\n"


def guarded(attempts: list[str]) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """(connect, getaddrinfo) replacements that allow loopback only and record the rest."""
    real_connect = socket.socket.connect
    real_getaddrinfo = socket.getaddrinfo

    def connect(self: socket.socket, address: object) -> object:
        host = address[0] if isinstance(address, tuple) else str(address)
        if self.family == socket.AF_UNIX or (isinstance(host, str) and host.startswith(LOOPBACK)):
            return real_connect(self, address)
        attempts.append(f"connect {address!r}")
        raise RuntimeError(f"network access attempted in a test: {address!r}")

    def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if host is None or str(host).startswith(LOOPBACK):
            return real_getaddrinfo(host, *args, **kwargs)
        attempts.append(f"DNS {host!r}")
        raise RuntimeError(f"DNS lookup attempted in a test: {host!r}")

    return connect, getaddrinfo


class _Printed(list):  # type: ignore[type-arg]
    """Attempts printed the moment they happen: a child may be killed before it could report."""

    def append(self, attempt: str) -> None:
        import sys

        print(f"{ATTEMPT_MARK} {attempt}", file=sys.stderr, flush=True)
        super().append(attempt)


def install_in_child() -> None:
    """Guard this whole process; every attempt is printed to stderr for the parent test."""
    socket.socket.connect, socket.getaddrinfo = guarded(_Printed())  # type: ignore[method-assign]
