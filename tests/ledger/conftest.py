"""Ledger fixtures: the ``store`` fixture runs every contract test against SQLite and Redis.

Redis is the real server on 127.0.0.1:6379, database 15 (``RESGOV_TEST_REDIS_URL`` overrides).
Each test gets its own random key prefix and every key under it is deleted afterwards (SCAN).
When Redis is unreachable the Redis half is skipped with a loud reason, except under ``CI=true``,
where it fails: a CI run must never pass with half of the contract unchecked.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from resgov.ledger.redis import RedisStore
from resgov.ledger.store import Store
from tests.redis_support import TestRedis

REDIS = TestRedis("RESGOV_TEST_REDIS_URL", "redis://127.0.0.1:6379/15", "the Redis ledger backend was")
REDIS_URL = REDIS.url
require_redis = REDIS.require
delete_prefix = REDIS.delete_prefix


def new_prefix() -> str:
    """A key prefix no other test (or test run) uses."""
    return REDIS.new_prefix("rgtest")


@pytest_asyncio.fixture
async def redis_stores() -> AsyncIterator[Callable[..., Awaitable[RedisStore]]]:
    """Factory of opened RedisStores sharing one fresh prefix (several "instances"); cleaned up after."""
    require_redis()
    prefix = new_prefix()
    opened: list[RedisStore] = []

    async def make(*, prefix_override: str | None = None) -> RedisStore:
        store = RedisStore(REDIS_URL, prefix=prefix_override or prefix)
        await store.open()
        opened.append(store)
        return store

    make.prefix = prefix  # type: ignore[attr-defined]
    try:
        yield make
    finally:
        for store in opened:
            await store.close()
        await delete_prefix(prefix)


@pytest.fixture
def redis_url() -> Iterator[str]:
    """The test Redis URL (skips or fails like the store fixture when Redis is down)."""
    require_redis()
    yield REDIS_URL


@pytest_asyncio.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    """An opened, empty store of each backend."""
    async with REDIS.ledger(request.param, tmp_path / "ledger.db", "rgtest") as opened:
        yield opened
