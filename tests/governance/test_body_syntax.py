"""An optional JSON body may be absent, but what is sent must be JSON (found by the schema fuzzer)."""

from __future__ import annotations

from pathlib import Path

import httpx

from resgov.simulator.upstream import SimUpstreamThread
from tests.helpers import ADMIN_TOKEN, Proxy, policy_for


def test_whitespace_body_is_invalid_json_not_an_empty_body(tmp_path: Path, sim: SimUpstreamThread) -> None:
    with Proxy(tmp_path, policy_for(sim.base_url, "[agents.a]\ndaily_budget = 1\n")) as proxy:
        headers = {"X-Admin-Token": ADMIN_TOKEN, "content-type": "application/json"}
        r = httpx.post(f"{proxy.url}/api/v1/admin/price-cache/refresh", headers=headers, content=b"\n")
        assert r.status_code == 400 and r.json()["error"]["reason"] == "invalid_json"
        r = httpx.post(f"{proxy.url}/api/v1/admin/price-cache/refresh", headers=headers, content=b"{}x")
        assert r.status_code == 400
