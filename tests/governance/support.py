"""Shared by the governance suites: a governed in-thread server and a Redis for the Redis half."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import redis.asyncio as aioredis

from resgov.core.policy import Policy
from resgov.server.governance import install
from resgov.server.governance_service import GovernanceService
from resgov.server.runtime import Runtime
from tests.helpers import ADMIN_TOKEN, Proxy

#: The governance suites' Redis database (the ledger contract suite uses 15).
REDIS_URL = os.environ.get("RESGOV_TEST_GOV_REDIS_URL", "redis://127.0.0.1:6379/11")
ADMIN = {"X-Admin-Token": ADMIN_TOKEN}


def governed_policy(self: Runtime) -> Policy:
    """What ``Runtime.policy`` returns after the integration: the file's policy with the API's changes."""
    base = self.policies.policy
    gov: GovernanceService | None = getattr(self, "governance", None)
    return gov.effective(base) if gov is not None else base


@pytest.fixture
def integrated(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Apply the proposed runtime.py change for one test (the proxy's hot path then sees API agents)."""
    monkeypatch.setattr(Runtime, "policy", property(governed_policy))
    yield


class GovProxy(Proxy):
    """tests.helpers.Proxy with the governance router installed (what app.py will do)."""

    def __init__(self, tmp: Path, policy_text: str, **settings: Any) -> None:
        super().__init__(tmp, policy_text, **settings)
        self.gov = install(self.app.api)

    def __enter__(self) -> GovProxy:
        super().__enter__()
        return self

    def bearer(self, org: str = "default", **extra: Any) -> dict[str, str]:
        return {"authorization": f"Bearer {self.key(org, **extra)}"}

    def get(self, path: str, headers: dict[str, str], **kw: Any) -> httpx.Response:
        return httpx.get(f"{self.url}{path}", headers=headers, timeout=30, **kw)

    def post(self, path: str, headers: dict[str, str], body: Any = None, **kw: Any) -> httpx.Response:
        if isinstance(body, bytes | str):
            return httpx.post(f"{self.url}{path}", headers={**headers, "content-type": "application/json"},
                              content=body, timeout=30, **kw)  # fmt: skip
        return httpx.post(f"{self.url}{path}", headers=headers, json=body, timeout=30, **kw)

    def put(self, path: str, headers: dict[str, str], body: Any) -> httpx.Response:
        return httpx.put(f"{self.url}{path}", headers=headers, json=body, timeout=30)

    def delete(self, path: str, headers: dict[str, str]) -> httpx.Response:
        return httpx.delete(f"{self.url}{path}", headers=headers, timeout=30)


def redis_problem() -> str | None:
    try:
        client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1, socket_timeout=2)
        try:
            client.ping()
        finally:
            client.close()
    except redis.RedisError as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def require_redis() -> None:
    """Skip without Redis; under CI=true a missing Redis fails (half the backends untested)."""
    problem = redis_problem()
    if problem is None:
        return
    if os.environ.get("CI", "").lower() in ("true", "1", "yes"):
        pytest.fail(f"CI=true but Redis at {REDIS_URL} is unreachable ({problem})")
    pytest.skip(f"!!! REDIS UNAVAILABLE at {REDIS_URL} ({problem}): the Redis backend was NOT tested")


def new_prefix() -> str:
    return "rggov-" + uuid.uuid4().hex[:12]


async def delete_prefix(prefix: str) -> None:
    """Delete every key a RedisStore with ``prefix`` can have created."""
    client = aioredis.Redis.from_url(REDIS_URL, decode_responses=True)
    try:
        for pattern in (f"{{{prefix}:*", f"{prefix}:*"):
            keys = [k async for k in client.scan_iter(match=pattern, count=500)]
            for i in range(0, len(keys), 500):
                await client.delete(*keys[i : i + 500])
    finally:
        await client.aclose()
