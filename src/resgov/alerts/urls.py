"""Webhook URL safety: no alerts to private, loopback, link-local or metadata addresses (SSRF).

A webhook URL is operator-supplied but its *host* may resolve anywhere: an
attacker-controlled name can point at ``169.254.169.254`` (cloud metadata) or at an
internal service, or answer with a public address at creation and a private one
later (DNS rebinding). So the address is checked twice: when the webhook is created
(:func:`check_url`) and at every send, by :class:`~resgov.alerts.resolver.GuardedResolver`, the resolver of
the delivery session: aiohttp connects to exactly the addresses it returned, which
are the ones that were checked (no second lookup in between). IP-literal hosts never
reach a resolver, so :func:`check_literal` runs before each send too.

Refused unless ``RESGOV_ALLOW_PRIVATE_WEBHOOKS=1``: every address Python does not
consider globally routable (private, loopback, link-local incl. 169.254.169.254,
unique-local ``fc00::/7``, unspecified, CGNAT ``100.64/10``, documentation and
reserved ranges), multicast, and IPv6 forms embedding such an IPv4 address
(IPv4-mapped ``::ffff:…``, 6to4, Teredo, NAT64 ``64:ff9b::/96``).
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

ALLOW_PRIVATE_ENV = "RESGOV_ALLOW_PRIVATE_WEBHOOKS"
MAX_URL_LENGTH = 2048
_NAT64 = ipaddress.ip_network("64:ff9b::/96")

#: ``(host, port) -> [(family, address), ...]``; injectable so tests can simulate DNS rebinding.
Resolve = Callable[[str, int], Awaitable[list[tuple[int, str]]]]


class UnsafeURL(ValueError):
    """A webhook URL that is malformed or points at an address ResGov refuses to call."""


def allow_private_from_env(env: dict[str, str] | None = None) -> bool:
    """``RESGOV_ALLOW_PRIVATE_WEBHOOKS`` set to 1/true/yes."""
    value = (env if env is not None else os.environ).get(ALLOW_PRIVATE_ENV, "")
    return value.strip().lower() in ("1", "true", "yes", "on")


def refused_reason(address: str) -> str | None:
    """Why ``address`` (an IP literal) may not be called, or None when it is globally routable."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return "not an IP address"
    embedded: list[ipaddress.IPv4Address] = []
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            embedded.append(ip.ipv4_mapped)
        if ip.sixtofour is not None:
            embedded.append(ip.sixtofour)
        if ip.teredo is not None:
            embedded.extend(ip.teredo)
        if ip in _NAT64:
            embedded.append(ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF))
    for candidate in (ip, *embedded):
        if candidate.is_unspecified:
            return f"{address} is unspecified"
        if candidate.is_loopback:
            return f"{address} is a loopback address"
        if candidate.is_link_local:
            return f"{address} is link-local (cloud metadata lives there)"
        if candidate.is_multicast:
            return f"{address} is multicast"
        if not candidate.is_global:
            return f"{address} is a private or reserved address"
    return None


def parse_url(url: str) -> tuple[str, str, int]:
    """Syntax check: ``(scheme, host, port)`` of an http(s) URL without credentials, or UnsafeURL."""
    if not isinstance(url, str) or not url or len(url) > MAX_URL_LENGTH:
        raise UnsafeURL(f"a webhook URL must be 1 to {MAX_URL_LENGTH} characters")
    if any(c.isspace() for c in url) or any(ord(c) < 0x20 for c in url):
        raise UnsafeURL("a webhook URL must not contain whitespace or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise UnsafeURL(f"invalid URL: {exc}") from exc
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise UnsafeURL("a webhook URL must be http:// or https://")
    if parts.username is not None or parts.password is not None:
        raise UnsafeURL(
            "a webhook URL must not carry credentials (user:password@); receivers verify the signature"
        )
    host = parts.hostname
    if not host:
        raise UnsafeURL("a webhook URL needs a host")
    return scheme, host, port or (443 if scheme == "https" else 80)


def _is_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return True


def check_literal(url: str, allow_private: bool) -> None:
    """Syntax, and the address itself when the host is an IP literal (no DNS). Raises UnsafeURL."""
    _, host, _ = parse_url(url)
    if not allow_private and _is_literal(host):
        reason = refused_reason(host)
        if reason:
            raise UnsafeURL(f"webhook address refused: {reason} (set {ALLOW_PRIVATE_ENV}=1 to allow)")


async def system_resolve(host: str, port: int) -> list[tuple[int, str]]:
    """The system resolver (getaddrinfo in a thread), as ``[(family, address)]``."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [(family, str(sockaddr[0])) for family, _, _, _, sockaddr in infos]


async def check_url(url: str, allow_private: bool, resolve: Resolve = system_resolve) -> None:
    """Creation-time check: syntax, then every address the host resolves to. Raises UnsafeURL."""
    check_literal(url, allow_private)
    _, host, port = parse_url(url)
    if allow_private or _is_literal(host):
        return
    try:
        addresses = await resolve(host, port)
    except OSError as exc:
        raise UnsafeURL(f"cannot resolve webhook host {host!r}: {exc}") from exc
    if not addresses:
        raise UnsafeURL(f"webhook host {host!r} resolves to no address")
    for _, address in addresses:
        reason = refused_reason(address)
        if reason:
            raise UnsafeURL(
                f"webhook host {host!r} resolves to a refused address: {reason} (set {ALLOW_PRIVATE_ENV}=1 to allow)"
            )


class RefusedAddress(OSError):
    """Raised inside the connector when a host resolves to a refused address (the send fails)."""


def redact_url(url: str) -> str:
    """``scheme://host[:port]/…`` for logs: Slack and Discord URLs carry their token in the path."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or "?"
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "<invalid url>"
    return f"{parts.scheme}://{host}{port}/…"
