"""Alerts fixtures: real HTTP receivers on loopback, and a Redis database for the shared store.

Receivers are aiohttp servers on 127.0.0.1 started in the test's own event loop. Redis is the
real server on 127.0.0.1:6379, database 13 (``RESGOV_TEST_ALERTS_REDIS_URL`` overrides), under
a fresh key prefix per test, deleted afterwards. When Redis is unreachable its tests are
skipped loudly, except under ``CI=true``, where they fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web

from tests.redis_support import TestRedis

REDIS = TestRedis("RESGOV_TEST_ALERTS_REDIS_URL", "redis://127.0.0.1:6379/13", "the Redis alert store was")
REDIS_URL = REDIS.url
require_redis = REDIS.require
delete_prefix = REDIS.delete_prefix


@pytest_asyncio.fixture
async def redis_prefix() -> AsyncIterator[str]:
    """A fresh key prefix on the test Redis, cleaned up afterwards."""
    require_redis()
    prefix = REDIS.new_prefix("rgtest-alerts")
    try:
        yield prefix
    finally:
        await delete_prefix(prefix)


@dataclass
class Received:
    """One request a receiver got."""

    path: str
    headers: dict[str, str]
    body: bytes
    at: float
    status: int

    def json(self) -> Any:
        import orjson

        return orjson.loads(self.body)


@dataclass
class Receiver:
    """A loopback HTTP receiver answering with ``statuses`` in turn (then ``default``)."""

    statuses: list[int] = field(default_factory=list)
    default: int = 200
    requests: list[Received] = field(default_factory=list)
    url: str = ""
    port: int = 0
    _runner: web.AppRunner | None = None
    _arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        status = self.statuses.pop(0) if self.statuses else self.default
        self.requests.append(Received(request.path, dict(request.headers), body, time.monotonic(), status))
        self._arrived.set()
        return web.Response(status=status, text="ok" if status < 400 else "nope")

    async def start(self) -> Receiver:
        app = web.Application()
        app.router.add_route("POST", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert server is not None and server.sockets
        self.port = int(server.sockets[0].getsockname()[1])
        self.url = f"http://127.0.0.1:{self.port}/hook"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def wait_for(self, count: int, within: float = 10.0) -> list[Received]:
        """Wait (bounded) until at least ``count`` requests arrived."""
        deadline = time.monotonic() + within
        while len(self.requests) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"receiver got {len(self.requests)} request(s), expected {count}")
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(remaining, 0.2)):
                    await self._arrived.wait()
        return self.requests


@pytest_asyncio.fixture
async def receivers() -> AsyncIterator[Callable[..., Awaitable[Receiver]]]:
    """Factory of started receivers, all stopped at the end."""
    started: list[Receiver] = []

    async def make(statuses: list[int] | None = None, default: int = 200) -> Receiver:
        r = await Receiver(statuses=list(statuses or []), default=default).start()
        started.append(r)
        return r

    try:
        yield make
    finally:
        for r in started:
            await r.stop()


@pytest.fixture
def allow_private(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loopback receivers are private addresses: allow them for this test."""
    monkeypatch.setenv("RESGOV_ALLOW_PRIVATE_WEBHOOKS", "1")
