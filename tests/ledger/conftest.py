"""Ledger fixtures: the ``store`` fixture runs every contract test against SQLite and Redis.

Redis is the real server on 127.0.0.1:6379, database 15 (``RESGOV_TEST_REDIS_URL`` overrides).
Each test gets its own random key prefix and every key under it is deleted afterwards (SCAN).
When Redis is unreachable the Redis half is skipped with a loud reason, except under ``CI=true``,
where it fails: a CI run must never pass with half of the contract unchecked.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import pytest_asyncio
import redis
import redis.asyncio as aioredis

from resgov.ledger.redis import RedisStore
from resgov.ledger.sqlite import SQLiteStore
from resgov.ledger.store import Store

REDIS_URL = os.environ.get("RESGOV_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
_probe: list[str | None] = []  # memoised reachability (one probe per test session)


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
            f"CI=true but Redis at {REDIS_URL} is unreachable ({problem}); the Redis ledger is untested"
        )
    pytest.skip(
        f"!!! REDIS UNAVAILABLE at {REDIS_URL} ({problem}): the Redis backend was NOT tested. "
        "Start redis-server on 127.0.0.1:6379 to run it."
    )


async def delete_prefix(prefix: str) -> int:
    """Delete every key a RedisStore with ``prefix`` can have created (tagged and global ones)."""
    client = aioredis.Redis.from_url(REDIS_URL, decode_responses=True)
    deleted = 0
    try:
        for pattern in (f"{{{prefix}:*", f"{prefix}:*"):
            batch: list[str] = []
            async for key in client.scan_iter(match=pattern, count=500):
                batch.append(key)
                if len(batch) >= 500:
                    deleted += await client.delete(*batch)
                    batch.clear()
            if batch:
                deleted += await client.delete(*batch)
    finally:
        await client.aclose()
    return deleted


def new_prefix() -> str:
    """A key prefix no other test (or test run) uses."""
    return "rgtest-" + uuid.uuid4().hex[:12]


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
    if request.param == "sqlite":
        sqlite_store = SQLiteStore(str(tmp_path / "ledger.db"))
        await sqlite_store.open()
        try:
            yield sqlite_store
        finally:
            await sqlite_store.close()
        return
    require_redis()
    prefix = new_prefix()
    redis_store = RedisStore(REDIS_URL, prefix=prefix)
    await redis_store.open()
    try:
        yield redis_store
    finally:
        await redis_store.close()
        await delete_prefix(prefix)
