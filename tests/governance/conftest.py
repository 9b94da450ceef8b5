"""Fixtures of the governance suites: a store of each backend (SQLite, Redis db 11)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from resgov.ledger.store import Store
from tests.governance.support import REDIS, integrated

__all__ = ["integrated"]


@pytest_asyncio.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    """An opened, empty store of each backend."""
    async with REDIS.ledger(request.param, tmp_path / "gov.db", "rggov") as opened:
        yield opened
