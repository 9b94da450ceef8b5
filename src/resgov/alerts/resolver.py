"""The webhook sender's aiohttp resolver: connects only to addresses the SSRF guard accepted.

Its own module so that aiohttp is imported only when a webhook is first sent.
"""

from __future__ import annotations

import socket

from aiohttp.abc import AbstractResolver, ResolveResult

from resgov.alerts.urls import RefusedAddress, Resolve, refused_reason, system_resolve


class GuardedResolver(AbstractResolver):
    """aiohttp resolver that returns only checked addresses, and refuses a host with any refused one.

    One refused address refuses the whole host: an attacker answering with a public and a
    private address must not get a connection attempt to the private one.
    """

    def __init__(self, allow_private: bool, resolve: Resolve = system_resolve) -> None:
        self.allow_private = allow_private
        self._resolve = resolve

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        """Resolve ``host`` and check every address (``family`` is ignored: both families are checked)."""
        addresses = await self._resolve(host, port)
        if not addresses:
            raise RefusedAddress(f"{host} resolves to no address")
        out: list[ResolveResult] = []
        for fam, address in addresses:
            if not self.allow_private:
                reason = refused_reason(address)
                if reason:
                    raise RefusedAddress(f"refused at send time: {host} resolves to {reason}")
            out.append(
                ResolveResult(
                    hostname=host,
                    host=address,
                    port=port,
                    family=fam,
                    proto=0,
                    flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV,
                )
            )
        return out

    async def close(self) -> None:
        """Nothing to release."""
