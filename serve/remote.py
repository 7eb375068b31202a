"""Fetching ``{"url": ...}`` images without becoming a proxy into the server's network (SSRF).

The host is resolved once, every resolved address must be public (or inside a CIDR the operator
opened with ``--remote-allow-cidr``), and the connection goes to that checked address, so a
second DNS answer cannot swap in another one. Redirects are followed by hand, each hop checked
the same way. Loopback, private, link-local, multicast, reserved and unspecified addresses are
refused, including IPv4-mapped, NAT64, 6to4 and Teredo IPv6 forms that embed one. Decimal, octal
and hex spellings of IPv4 need no special case: the check is on the resolved address.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urljoin, urlsplit

from imgpipe.bundle import SERVING
from imgpipe.deadline import Deadline, deadline
from serve.errors import ApiError

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
NAT64 = ipaddress.ip_network("64:ff9b::/96")


@dataclass(frozen=True)
class RemotePolicy:
    enabled: bool = False
    allow: tuple[Network, ...] = field(default_factory=tuple)  # opened explicitly, e.g. 127.0.0.1/32 in tests
    max_bytes: int = SERVING.max_body_bytes
    timeout: float = SERVING.remote_timeout  # seconds for the whole fetch, DNS and redirects included
    max_redirects: int = 3

    @classmethod
    def from_cidrs(cls, enabled: bool, cidrs: list[str], **kwargs) -> RemotePolicy:  # type: ignore[no-untyped-def]
        try:
            networks = tuple(ipaddress.ip_network(cidr, strict=False) for cidr in cidrs)
        except ValueError as exc:
            raise ValueError(f"--remote-allow-cidr: {exc}") from None
        return cls(enabled, networks, **kwargs)


def embedded_ipv4(address: Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one carries (mapped ::ffff:a.b.c.d, NAT64, 6to4, Teredo client)."""
    if address.version != 6:
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address in NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    return None


def is_public(address: Address) -> bool:
    inner = embedded_ipv4(address)
    if inner is not None and not is_public(inner):
        return False
    return address.is_global and not (address.is_multicast or address.is_reserved or address.is_loopback
                                      or address.is_link_local or address.is_private or address.is_unspecified)


def allowed(address: Address, policy: RemotePolicy) -> bool:
    inner = embedded_ipv4(address)
    candidates = [address] if inner is None else [address, inner]
    if any(candidate in network for candidate in candidates for network in policy.allow
           if candidate.version == network.version):
        return True
    return is_public(address)


class _Expired(Exception):
    """The fetch's deadline passed (its sockets were cut, or a lookup was left behind)."""


# getaddrinfo cannot be interrupted (no socket to shut down): it runs in this small pool and the
# fetch stops waiting for it at the deadline. A lookup a slow DNS server holds up occupies one of
# these threads until the system resolver gives up (its own timeout, seconds), not a request worker.
_RESOLVER = ThreadPoolExecutor(max_workers=8, thread_name_prefix="remote-resolve")


def _lookup(host: str, port: int, guard: Deadline | None) -> list[tuple[Any, ...]]:
    if guard is None:
        return socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    lookup = _RESOLVER.submit(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM)
    try:
        return lookup.result(timeout=guard.remaining())
    except TimeoutError:
        lookup.cancel()
        raise _Expired from None


def resolve(host: str, port: int, policy: RemotePolicy, guard: Deadline | None = None) -> str:
    """The address to connect to; refused unless every address the name resolves to is allowed.
    With ``guard``, the lookup ends at its deadline (``_Expired``)."""
    try:
        infos = _lookup(host, port, guard)
    except (socket.gaierror, UnicodeError) as exc:
        raise ApiError(422, "remote_unreachable", f"cannot resolve host {host!r} ({exc})") from None
    addresses = []
    for *_, sockaddr in infos:
        address = ipaddress.ip_address(sockaddr[0].split("%")[0])
        if not allowed(address, policy):
            raise ApiError(403, "url_refused", f"host {host!r} resolves to {address}, which is not a public "
                                               "address (open a range with --remote-allow-cidr)")
        addresses.append(str(address))
    if not addresses:
        raise ApiError(422, "remote_unreachable", f"host {host!r} has no address")
    return addresses[0]


def _open(address: str, port: int, guard: Deadline) -> socket.socket:
    """A TCP connection to the checked address, attached to the fetch's deadline."""
    remaining = guard.remaining()
    if remaining <= 0:
        raise _Expired
    sock = socket.create_connection((address, port), remaining)  # connecting ends at the deadline too
    guard.attach(sock)
    return sock


class _PinnedHTTP(http.client.HTTPConnection):
    def __init__(self, host: str, port: int, address: str, guard: Deadline) -> None:
        super().__init__(host, port, timeout=guard.remaining())
        self.address, self.guard = address, guard

    def connect(self) -> None:
        self.sock = _open(self.address, self.port, self.guard)


class _PinnedHTTPS(http.client.HTTPSConnection):
    def __init__(self, host: str, port: int, address: str, guard: Deadline) -> None:
        super().__init__(host, port, timeout=guard.remaining(), context=ssl.create_default_context())
        self.address, self.guard = address, guard

    def connect(self) -> None:
        sock = _open(self.address, self.port, self.guard)
        # wrap_socket takes over the socket's descriptor: attach the TLS socket before the
        # handshake, so a server that trickles the handshake is cut as well.
        tls = self._context.wrap_socket(sock, server_hostname=self.host,  # certificate of the name
                                        do_handshake_on_connect=False)
        self.guard.attach(tls)
        self.sock = tls
        tls.do_handshake()


def _split(url: str) -> tuple[str, str, int, str]:
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ApiError(422, "bad_url", f"{url!r} is not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https"):
        raise ApiError(422, "bad_url", f"{url!r}: only http and https URLs are fetched")
    if not parts.hostname:
        raise ApiError(422, "bad_url", f"{url!r} has no host")
    if parts.username or parts.password:
        raise ApiError(422, "bad_url", f"{url!r}: credentials in URLs are not accepted")
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    return parts.scheme, parts.hostname, port or (443 if parts.scheme == "https" else 80), target


def fetch(url: str, policy: RemotePolicy) -> bytes:
    """The body of ``url`` (blocking: call it from a worker thread). Raises ``ApiError``.

    The whole fetch, DNS and redirects included, ends at ``policy.timeout``: its sockets are
    attached to one ``imgpipe.deadline`` that cuts them however slowly the server trickles."""
    if not policy.enabled:
        raise ApiError(403, "remote_disabled", "fetching URLs is off; start the service with --allow-remote")
    with deadline(policy.timeout) as guard:
        try:
            return _follow(url, policy, guard)
        except _Expired:
            raise ApiError(422, "remote_timeout", f"{url} took longer than {policy.timeout:g} s "
                                                  "(--remote-timeout)") from None


def _follow(url: str, policy: RemotePolicy, guard: Deadline) -> bytes:
    for _ in range(policy.max_redirects + 1):
        body, location = _get(url, policy, guard)
        if location is None:
            return body
        url = urljoin(url, location)
    raise ApiError(422, "too_many_redirects", f"more than {policy.max_redirects} redirects")


def _get(url: str, policy: RemotePolicy, guard: Deadline) -> tuple[bytes, str | None]:
    """One hop: the body, or the Location it redirects to."""
    scheme, host, port, target = _split(url)
    address = resolve(host, port, policy, guard)
    kind = _PinnedHTTPS if scheme == "https" else _PinnedHTTP
    connection = kind(host, port, address, guard)
    try:
        connection.request("GET", target, headers={"User-Agent": "image-pipeline-serve", "Accept": "image/*"})
        response = connection.getresponse()
        location = response.getheader("Location")
        if response.status in (301, 302, 303, 307, 308) and location:
            return b"", location
        if response.status != 200:
            raise ApiError(422, "remote_status", f"{url} answered HTTP {response.status}")
        length = response.getheader("Content-Length")
        if length and length.isdigit() and int(length) > policy.max_bytes:
            raise ApiError(413, "too_large", f"{url} sends {length} bytes, more than {policy.max_bytes}")
        chunks, total = [], 0
        while chunk := response.read(65536):
            total += len(chunk)
            if total > policy.max_bytes:
                raise ApiError(413, "too_large", f"{url} sends more than {policy.max_bytes} bytes")
            chunks.append(chunk)
    except (OSError, http.client.HTTPException) as exc:
        # Socket timeouts are at most the time left, so a TimeoutError is the deadline as well.
        if guard.expired or isinstance(exc, TimeoutError):
            raise _Expired from None
        raise ApiError(422, "remote_unreachable", f"{url}: {exc or type(exc).__name__}") from None
    finally:
        connection.close()
    if guard.expired:  # a cut connection can look like a body that ended (no Content-Length)
        raise _Expired
    return b"".join(chunks), None
