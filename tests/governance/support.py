"""Shared by the governance suites: a governed in-thread server and a Redis for the Redis half."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from resgov.core.policy import Policy
from resgov.server.governance import install
from resgov.server.governance_service import GovernanceService
from resgov.server.runtime import Runtime
from tests.helpers import ADMIN_TOKEN, Proxy
from tests.redis_support import TestRedis

#: The governance suites' Redis database (the ledger contract suite uses 15).
REDIS = TestRedis("RESGOV_TEST_GOV_REDIS_URL", "redis://127.0.0.1:6379/11", "the Redis backend was")
REDIS_URL = REDIS.url
require_redis = REDIS.require
delete_prefix = REDIS.delete_prefix
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


def new_prefix() -> str:
    return REDIS.new_prefix("rggov")
