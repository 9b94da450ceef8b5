"""Guard fixtures: every state contract test runs against the in-process and the Redis state.

Redis is the real server on 127.0.0.1:6379, database 14 (``RESGOV_TEST_GUARD_REDIS_URL``
overrides). Each test gets its own random key prefix and every key under it is deleted
afterwards. When Redis is unreachable the Redis half is skipped with a loud reason, except
under ``CI=true``, where it fails: CI must never pass with the shared state unchecked.
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest
import pytest_asyncio
import redis
import redis.asyncio as aioredis

from resgov.guard.memory import MemoryGuardState
from resgov.guard.redis import RedisGuardState
from resgov.guard.state import GuardState

REDIS_URL = os.environ.get("RESGOV_TEST_GUARD_REDIS_URL", "redis://127.0.0.1:6379/14")
_probe: list[str | None] = []


def _redis_problem() -> str | None:
    if not _probe:
        try:
            client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1, socket_timeout=2)
            try:
                client.ping()
            finally:
                client.close()
            _probe.append(None)
        except redis.RedisError as exc:
            _probe.append(f"{type(exc).__name__}: {exc}")
    return _probe[0]


def require_redis() -> None:
    """Skip (or, under CI=true, fail) when the test Redis does not answer."""
    problem = _redis_problem()
    if problem is None:
        return
    if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
        pytest.fail(
            f"CI=true but Redis at {REDIS_URL} is unreachable ({problem}); the Redis guard is untested"
        )
    pytest.skip(
        f"!!! REDIS UNAVAILABLE at {REDIS_URL} ({problem}): the shared guard state was NOT tested. "
        "Start redis-server on 127.0.0.1:6379 to run it."
    )


def new_prefix() -> str:
    """A key prefix no other test (or test run) uses."""
    return "rgguard-" + uuid.uuid4().hex[:12]


async def delete_prefix(prefix: str) -> int:
    """Delete every key under ``prefix`` (the guard's keys all sit under ``{prefix:org}``)."""
    client = aioredis.Redis.from_url(REDIS_URL, decode_responses=True)
    deleted = 0
    try:
        for pattern in (f"{{{prefix}:*", f"{prefix}:*"):
            keys = [key async for key in client.scan_iter(match=pattern, count=500)]
            for i in range(0, len(keys), 500):
                deleted += await client.delete(*keys[i : i + 500])
    finally:
        await client.aclose()
    return deleted


class FakeClock:
    """A wall clock the test moves by hand (anchored at real time so Redis TTLs stay sane)."""

    def __init__(self) -> None:
        # Start just after a minute boundary so tests can reason about calendar minutes.
        self.now = (time.time() // 60 + 1) * 60 + 0.5

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest_asyncio.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def state(request: pytest.FixtureRequest, clock: FakeClock) -> AsyncIterator[GuardState]:
    """An opened, empty guard state of each backend, on the fake clock."""
    if request.param == "memory":
        yield MemoryGuardState(clock)
        return
    require_redis()
    prefix = new_prefix()
    shared = RedisGuardState(REDIS_URL, prefix=prefix, clock=clock)
    await shared.open()
    try:
        yield shared
    finally:
        await shared.close()
        await delete_prefix(prefix)


@pytest_asyncio.fixture
async def redis_states() -> AsyncIterator[Callable[..., Awaitable[RedisGuardState]]]:
    """Factory of Redis guard states sharing one fresh prefix and Redis time ("instances")."""
    require_redis()
    prefix = new_prefix()
    opened: list[RedisGuardState] = []

    async def make(clock: Callable[[], float] | None = None) -> RedisGuardState:
        shared = RedisGuardState(REDIS_URL, prefix=prefix, clock=clock)
        await shared.open()
        opened.append(shared)
        return shared

    make.prefix = prefix  # type: ignore[attr-defined]
    try:
        yield make
    finally:
        for shared in opened:
            await shared.close()
        await delete_prefix(prefix)


@pytest.fixture
def redis_url() -> Iterator[str]:
    """The guard's test Redis URL (skips or fails like the fixtures above when Redis is down)."""
    require_redis()
    yield REDIS_URL
