"""Guard fixtures: every state contract test runs against the in-process and the Redis state.

Redis is the real server on 127.0.0.1:6379, database 14 (``RESGOV_TEST_GUARD_REDIS_URL``
overrides). Each test gets its own random key prefix and every key under it is deleted
afterwards. When Redis is unreachable the Redis half is skipped with a loud reason, except
under ``CI=true``, where it fails: CI must never pass with the shared state unchecked.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import pytest
import pytest_asyncio

from resgov.guard.memory import MemoryGuardState
from resgov.guard.redis import RedisGuardState
from resgov.guard.state import GuardState
from tests.redis_support import TestRedis

REDIS = TestRedis("RESGOV_TEST_GUARD_REDIS_URL", "redis://127.0.0.1:6379/14", "the shared guard state was")
REDIS_URL = REDIS.url
require_redis = REDIS.require
delete_prefix = REDIS.delete_prefix


def new_prefix() -> str:
    """A key prefix no other test (or test run) uses."""
    return REDIS.new_prefix("rgguard")


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
