"""The test suites' one way to use the machine's Redis.

Each suite has its own database number (and env override) and random key prefixes, so suites
never see each other's keys. When Redis does not answer, its tests skip with a loud reason,
except under ``CI=true``, where they fail: a CI run must never pass with a backend unchecked.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis

from resgov.ledger.redis import RedisStore
from resgov.ledger.sqlite import SQLiteStore
from resgov.ledger.store import Store


def in_ci() -> bool:
    """True in the CI run (``CI=true``), where a missing service is a failure, not a skip."""
    return os.environ.get("CI", "").lower() in ("true", "1", "yes")


class TestRedis:
    """One suite's Redis database: reachability (probed once), fresh prefixes, cleanup."""

    __test__ = False  # not a test class, whatever pytest thinks of the name

    def __init__(self, env: str, default_url: str, untested: str) -> None:
        self.url = os.environ.get(env, default_url)
        self.untested = untested
        self._probe: list[str | None] = []

    def problem(self) -> str | None:
        """Why Redis cannot be used, or None (memoised: one probe per test session)."""
        if not self._probe:
            try:
                client = redis.Redis.from_url(self.url, socket_connect_timeout=1, socket_timeout=2)
                try:
                    client.ping()
                finally:
                    client.close()
                self._probe.append(None)
            except redis.RedisError as exc:
                self._probe.append(f"{type(exc).__name__}: {exc}")
        return self._probe[0]

    def require(self) -> None:
        """Skip (or, under CI=true, fail) when the test Redis does not answer."""
        problem = self.problem()
        if problem is None:
            return
        if in_ci():
            pytest.fail(
                f"CI=true but Redis at {self.url} is unreachable ({problem}); {self.untested} untested"
            )
        pytest.skip(
            f"!!! REDIS UNAVAILABLE at {self.url} ({problem}): {self.untested} NOT tested. "
            "Start redis-server on 127.0.0.1:6379 to run it."
        )

    @staticmethod
    def new_prefix(tag: str) -> str:
        """A key prefix no other test (or test run) uses."""
        return f"{tag}-{uuid.uuid4().hex[:12]}"

    async def delete_prefix(self, prefix: str) -> int:
        """Delete every key a store with ``prefix`` may have created (hash-tagged and global)."""
        client = aioredis.Redis.from_url(self.url, decode_responses=True)
        deleted = 0
        try:
            for pattern in (f"{{{prefix}:*", f"{prefix}:*"):
                keys = [key async for key in client.scan_iter(match=pattern, count=500)]
                for i in range(0, len(keys), 500):
                    deleted += await client.delete(*keys[i : i + 500])
        finally:
            await client.aclose()
        return deleted

    @contextlib.asynccontextmanager
    async def ledger(self, backend: str, sqlite_path: Path, tag: str) -> AsyncIterator[Store]:
        """An opened, empty ledger of ``backend``: a SQLite file, or a fresh prefix in this Redis.

        The Redis prefix's keys are deleted afterwards; without Redis it skips (or fails in CI).
        """
        if backend == "sqlite":
            sqlite_store = SQLiteStore(str(sqlite_path))
            await sqlite_store.open()
            try:
                yield sqlite_store
            finally:
                await sqlite_store.close()
            return
        self.require()
        prefix = self.new_prefix(tag)
        redis_store = RedisStore(self.url, prefix=prefix)
        await redis_store.open()
        try:
            yield redis_store
        finally:
            await redis_store.close()
            await self.delete_prefix(prefix)
