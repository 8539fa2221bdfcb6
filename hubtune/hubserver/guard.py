"""Who may talk to the local hub: Host (DNS rebinding), Origin/Referer (cross-site writes) and
the Content-Type of write bodies.

A hub bound to loopback with no token is open to every process on the machine, which is the
point, but also to every web page the machine's browser opens: a page can POST to
``http://127.0.0.1:8765`` without reading the answer (a "simple" request needs no CORS
preflight), and a page on a name the attacker controls can re-point that name at 127.0.0.1
(DNS rebinding) and then read, too. The clients the hub serves (huggingface_hub, transformers,
datasets, git-lfs) are not browsers: they send no ``Origin``, a ``Host`` naming the address they
connected to, and JSON/NDJSON/LFS bodies with their exact media types. So:

- ``Host`` must name this server: a loopback name or address, the bound address, a name given
  in ``allowed_hosts`` (or this machine's host name when bound to every interface), with the
  bound port. An IP literal cannot be rebound, so any is accepted on a wildcard bind.
- A request other than GET/HEAD that carries ``Origin`` (or, without it, ``Referer``) must come
  from this server's own origin. ``Origin: null`` (file:// pages, sandboxed frames) is refused.
- A write body must have the media type the clients send: no browser can send
  ``application/json`` or ``application/x-ndjson`` cross-origin without a preflight, which this
  server never approves.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from urllib.parse import urlsplit

from hubtune.hubserver.storage import HubError

__all__ = ["HostPolicy", "check_media_type", "media_type"]

_LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain"})
_WILDCARDS = frozenset({"", "0.0.0.0", "::"})


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _split_authority(authority: str, *, default_port: int) -> tuple[str, int] | None:
    """``host[:port]`` or ``[v6][:port]`` as (lower-case host, port); None if malformed."""
    authority = authority.strip()
    if authority.startswith("["):
        host, sep, rest = authority[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            return None
        port_text = rest[1:]
    else:
        host, _, port_text = authority.partition(":")
        if ":" in port_text:
            return None
    if not host:
        return None
    if not port_text:
        return host.lower().rstrip("."), default_port
    if not port_text.isdigit() or len(port_text) > 5:
        return None
    return host.lower().rstrip("."), int(port_text)


def media_type(content_type: str | None) -> str | None:
    """The media type of a Content-Type header, lower-case, without parameters."""
    if content_type is None:
        return None
    return content_type.split(";", 1)[0].strip().lower() or None


class HostPolicy:
    """The names and port under which this server may be addressed.

    Args:
        bound_host: The address the socket is bound to.
        port: The bound port.
        allowed_hosts: Extra host names clients use to reach the server (e.g. a LAN name for
            a hub bound to ``0.0.0.0``).
    """

    def __init__(self, *, bound_host: str, port: int, allowed_hosts: Iterable[str] = ()) -> None:
        self.port = port
        self._wildcard = bound_host in _WILDCARDS
        self._bound_ip = _ip(bound_host)
        names = set(_LOOPBACK_NAMES) | {h.lower().rstrip(".") for h in allowed_hosts}
        if self._wildcard:
            # Every interface: clients on the LAN may use this machine's own name.
            names.add(socket.gethostname().lower())
        elif self._bound_ip is None:
            names.add(bound_host.lower().rstrip("."))  # bound by name, e.g. "localhost"
        self._names = frozenset(names)

    def _host_ok(self, host: str) -> bool:
        address = _ip(host)
        if address is None:
            return host in self._names
        # An address literal cannot be re-pointed by DNS, so it is never a rebinding attack.
        return self._wildcard or address.is_loopback or address == self._bound_ip

    def check_host(self, host_header: str | None) -> None:
        """Refuse a request whose ``Host`` is not this server (DNS rebinding).

        Raises:
            HubError: 400 without a Host header, 403 for another host or port.
        """
        if not host_header:
            raise HubError(400, "Missing Host header")
        parsed = _split_authority(host_header, default_port=80)
        if parsed is None or not self._host_ok(parsed[0]) or parsed[1] != self.port:
            raise HubError(
                403,
                f"Host {host_header[:100]!r} is not this server: requests must name it by a "
                f"loopback name or address, its bound address or an allowed host, with port "
                f"{self.port} (a name that resolves here is not enough: DNS rebinding)",
            )

    def is_own_origin(self, url: str) -> bool:
        """Whether an ``Origin``/``Referer`` URL is this server's own origin."""
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.netloc or "@" in parts.netloc:
            return False
        parsed = _split_authority(parts.netloc, default_port=80)
        return parsed is not None and self._host_ok(parsed[0]) and parsed[1] == self.port

    def check_origin(self, origin: str | None, referer: str | None) -> None:
        """Refuse a write a web page on another origin (or a file:// page) sent.

        Raises:
            HubError: 403 if ``Origin``, or without it ``Referer``, is another origin.
        """
        if origin is not None:
            if not self.is_own_origin(origin):
                raise HubError(
                    403,
                    f"Cross-origin request refused: Origin {origin[:100]!r} is not this hub. "
                    "The local hub takes writes only from Hub clients or pages it serves itself.",
                )
        elif referer is not None and not self.is_own_origin(referer):
            raise HubError(
                403,
                f"Cross-origin request refused: Referer {urlsplit(referer).scheme}://"
                f"{urlsplit(referer).netloc[:100]} is not this hub.",
            )


def check_media_type(content_type: str | None, allowed: Iterable[str | None]) -> None:
    """Refuse a write body whose media type is not one the Hub clients send for that route.

    Args:
        content_type: The request's Content-Type header.
        allowed: Accepted media types (``None``: no Content-Type header).

    Raises:
        HubError: 403 naming what was sent and what the route takes.
    """
    allowed = list(allowed)
    if media_type(content_type) in allowed:
        return
    names = ", ".join(a or "none" for a in allowed)
    raise HubError(
        403,
        f"Content-Type {content_type!r:.80} refused for this write: it takes {names} (what the "
        "Hub clients send); other types are what a web page can send cross-site",
    )
