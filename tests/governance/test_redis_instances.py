"""Several instances on one Redis agree on governance changes within the documented delay."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

import pytest

from resgov.config.rgf import parse_policy
from resgov.ledger.redis import RedisStore
from resgov.ledger.store import GovRecord
from resgov.server.governance_service import GovernanceService
from tests.governance.support import REDIS_URL, delete_prefix, new_prefix, require_redis

pytestmark = pytest.mark.redis

FILE = "[orgs.acme]\ndaily_budget = 10\n"


async def test_two_instances_agree_within_the_refresh_interval() -> None:
    require_redis()
    prefix = new_prefix()
    policy = parse_policy(FILE, library_prices=False)
    stores = [RedisStore(REDIS_URL, prefix=prefix) for _ in range(2)]
    services = [GovernanceService(s, lambda: policy, refresh_seconds=0.2) for s in stores]
    try:
        for store, svc in zip(stores, services, strict=True):
            await store.open()
            await svc.start()
        a, b = services
        written = time.monotonic()
        await a.put(GovRecord("acme", "agent", "bot", {"gen": "g", "budgets": {"daily": 10**9}}))
        assert ("acme", "bot") in a.policy.agents  # read-your-writes on the writing instance
        while ("acme", "bot") not in b.policy.agents:
            assert time.monotonic() - written < 2.0, "instance B never saw the agent"
            await asyncio.sleep(0.02)
        assert time.monotonic() - written < 1.0  # refresh_seconds (0.2) + one load, with margin
        # A reset written on A moves B's window too.
        at = int(time.time())
        await a.put(GovRecord("_system", "reset", "*:daily", {"at": at}))
        deadline = time.monotonic() + 2.0
        while True:
            line = b.policy.budget_lines(b.policy.agent("acme", "bot"), datetime.now(UTC))[0]
            if line.window_start == at:
                break
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        # A store outage keeps the last snapshot in force.
        await stores[1].close()
        await asyncio.sleep(0.3)
        assert ("acme", "bot") in b.policy.agents and b.last_error is not None
    finally:
        for svc in services:
            await svc.stop()
        for store in stores:
            await store.close()
        await delete_prefix(prefix)
