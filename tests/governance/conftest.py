"""Fixtures of the governance suites: a store of each backend (SQLite, Redis db 11)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from resgov.ledger.redis import RedisStore
from resgov.ledger.sqlite import SQLiteStore
from resgov.ledger.store import Store
from tests.governance.support import REDIS_URL, delete_prefix, integrated, new_prefix, require_redis

__all__ = ["integrated"]


@pytest_asyncio.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    """An opened, empty store of each backend."""
    if request.param == "sqlite":
        sqlite_store = SQLiteStore(str(tmp_path / "gov.db"))
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
