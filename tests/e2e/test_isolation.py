"""Organisations never see each other: every endpoint, tried with another org's key and ids.

Org ``alpha`` owns agents, a booking, keys and audit records, all marked ``SECRET-A``. Org ``beta``'s
key (every scope) then tries every control-plane route and the proxy with alpha's ids: each attempt
gets 401/403/404 (or, for a list, only beta's own rows), no answer contains ``SECRET-A``, and alpha's
ledger lines, governance records, audit trail and keys are byte-for-byte unchanged afterwards.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from resgov.simulator.upstream import SimUpstreamThread
from tests.governance.support import ADMIN, GovProxy, integrated
from tests.helpers import policy_for

__all__ = ["integrated"]

AGENTS = """
[orgs.alpha]
daily_budget = 10

[orgs.alpha.agents.file-agent]
daily_budget = 5

[orgs.beta]
daily_budget = 10

[orgs.beta.agents.beta-agent]
daily_budget = 5
"""
SECRET = "SECRET-A"


def alpha_state(db: str) -> dict[str, Any]:
    conn = sqlite3.connect(db)
    try:
        return {
            table: conn.execute(f"SELECT * FROM {table} WHERE org = 'alpha' ORDER BY 1, 2").fetchall()
            for table in ("budget_line", "governance", "audit", "api_key", "reservation")
        }
    finally:
        conn.close()


@pytest.fixture
def world(tmp_path: Path, sim: SimUpstreamThread, integrated: None) -> Iterator[dict[str, Any]]:
    with GovProxy(tmp_path, policy_for(sim.base_url, AGENTS)) as proxy:
        a = proxy.bearer("alpha")
        r = proxy.post(
            "/api/v1/agents", a, {"agent_id": "api-agent", "description": SECRET, "daily_limit": 2}
        )
        assert r.status_code == 201
        booked = proxy.post("/api/v1/book", a, {"agent_id": "api-agent", "resource_type": "t", "action": "x",
                                                "cost": 0.1, "phase": "reserve", "metadata": {"m": SECRET}})  # fmt: skip
        assert booked.status_code == 200
        keys = proxy.get("/api/v1/keys", a).json()["items"]
        adj = proxy.post("/api/v1/admin/budget-adjustments", ADMIN, {"org_id": "alpha", "period": "daily",
                         "mode": "topup", "amount": 1, "reason": SECRET})  # fmt: skip
        assert adj.status_code == 201
        yield {"proxy": proxy, "alpha": a, "beta": proxy.bearer("beta"), "booking": booked.json()["booking_id"],
               "key_id": keys[0]["key_id"], "adjustment": adj.json()["id"]}  # fmt: skip


def attempts(w: dict[str, Any]) -> list[tuple[str, str, Any, set[int]]]:
    """(method, path, json body, allowed statuses) for every route, aimed at alpha's objects."""
    b, k, adj = w["booking"], w["key_id"], w["adjustment"]
    deny = {401, 403, 404}
    out: list[tuple[str, str, Any, set[int]]] = []
    for agent in ("api-agent", "file-agent"):
        for q in ("", "?org_id=alpha"):
            out += [
                ("GET", f"/api/v1/agents/{agent}{q}", None, {404}),
                ("GET", f"/api/v1/usage/{agent}{q}", None, {404}),
                ("PUT", f"/api/v1/agents/{agent}/budget{q}", {"period": "daily", "limit_amount": 9}, {404}),
                ("DELETE", f"/api/v1/agents/{agent}{q}", None, {404}),
                ("GET", f"/api/v1/agents/{agent}/prediction{q}", None, {404}),
                ("POST", f"/api/v1/admin/agents/{agent}/resume{q}", None, {401}),
            ]
        out.append(
            (
                "POST",
                "/api/v1/book",
                {"agent_id": agent, "resource_type": "t", "action": "x", "cost": 1},
                {403},
            )
        )
    for q in ("", "?org_id=alpha"):
        out += [
            ("GET", f"/api/v1/bookings/{b}{q}", None, {404}),
            ("POST", f"/api/v1/bookings/{b}/commit{q}", {"cost": 0.1}, {404}),
            ("POST", f"/api/v1/bookings/{b}/release{q}", {}, {404}),
            ("POST", f"/api/v1/bookings/{b}/renew{q}", {}, {404}),
            ("DELETE", f"/api/v1/keys/{k}{q}", None, {404}),
            # Lists answer with the caller's own org, whatever ?org_id says.
            ("GET", f"/api/v1/agents{q}", None, {200}),
            ("GET", f"/api/v1/keys{q}", None, {200}),
            ("GET", f"/api/v1/audit{q}", None, {200}),
        ]
    out += [
        ("GET", "/api/v1/audit?agent_id=api-agent&format=csv&org_id=alpha", None, {200}),
        ("GET", "/api/v1/audit?agent_id=api-agent&format=jsonl&org_id=alpha", None, {200}),
        ("GET", "/api/v1/audit?order=desc&org_id=alpha", None, {200}),
        ("GET", "/api/v1/dashboard/summary", None, {200}),
        ("GET", "/api/v1/dashboard/summary?org_id=alpha", None, {200, 404}),
        # Admin routes: an org key is not the admin token.
        ("POST", "/api/v1/admin/reset-daily", {"org_id": "alpha"}, deny),
        ("POST", "/api/v1/admin/generate-key", {"org_id": "alpha"}, deny),
        ("GET", "/api/v1/admin/keys?org_id=alpha", None, deny),
        ("DELETE", f"/api/v1/admin/keys/{k}", None, deny),
        ("GET", "/api/v1/admin/orgs", None, deny),
        ("GET", "/api/v1/admin/orgs/alpha", None, deny),
        ("POST", "/api/v1/admin/orgs", {"org_id": "alpha2"}, deny),
        (
            "POST",
            "/api/v1/admin/budget-adjustments",
            {"org_id": "alpha", "period": "daily", "mode": "topup", "amount": 100, "reason": "x"},
            deny,
        ),
        ("GET", "/api/v1/admin/budget-adjustments?org_id=alpha", None, deny),
        ("DELETE", f"/api/v1/admin/budget-adjustments/{adj}?org_id=alpha", None, deny),
        ("POST", "/api/v1/admin/price-cache/refresh", {}, deny),
        ("GET", "/api/v1/admin/price-cache", None, deny),
        ("POST", "/api/v1/admin/audit/purge", {"older_than_days": 0.0001, "org_id": "alpha"}, deny),
        ("POST", "/api/v1/admin/webhooks", {"url": "https://93.184.216.34/x", "org_id": "alpha"}, deny),
        ("GET", "/api/v1/admin/webhooks?org_id=alpha", None, deny),
        ("GET", "/api/v1/admin/webhooks/wh_alpha", None, deny),
        ("PATCH", "/api/v1/admin/webhooks/wh_alpha", {"enabled": False}, deny),
        ("PUT", "/api/v1/admin/webhooks/wh_alpha", {"url": "https://93.184.216.34/x"}, deny),
        ("DELETE", "/api/v1/admin/webhooks/wh_alpha", None, deny),
        ("POST", "/api/v1/admin/webhooks/wh_alpha/test", None, deny),
        ("GET", "/api/v1/admin/alerts/status", None, deny),
        ("GET", "/api/v1/admin/alerts/dead-letters", None, deny),
    ]
    return out


def test_every_endpoint_with_another_orgs_key_and_ids(world: dict[str, Any]) -> None:
    proxy: GovProxy = world["proxy"]
    before = alpha_state(proxy.db)
    tried: set[tuple[str, str]] = set()
    for method, path, body, allowed in attempts(world):
        r = httpx.request(method, f"{proxy.url}{path}", headers=world["beta"], json=body, timeout=30)
        if r.status_code == 404 and "/prediction" in path and "error" not in r.text:
            continue  # a route another issue has not mounted yet
        assert r.status_code in allowed, (method, path, r.status_code, r.text)
        assert SECRET not in r.text, (method, path)
        if r.status_code == 200 and r.headers["content-type"].startswith("application/json"):
            assert '"alpha"' not in r.text, (method, path, r.text)
        tried.add((method, path.split("?")[0]))
    # The proxy routes: beta's key cannot act as alpha's agents either.
    for agent in ("api-agent", "file-agent"):
        r = httpx.post(f"{proxy.url}/v1/chat/completions", headers={**world["beta"], "x-resgov-agent-id": agent},
                       json={"model": "gpt-sim", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]})  # fmt: skip
        assert r.status_code == 403 and r.json()["error"]["reason"] == "agent_not_found"
        r = httpx.get(f"{proxy.url}/v1/models", headers={**world["beta"], "x-resgov-agent-id": agent})
        assert r.status_code == 403
    # A write naming alpha's org is refused, not redirected into beta's.
    r = proxy.post("/api/v1/agents?org_id=alpha", world["beta"], {"agent_id": "x", "daily_limit": 1})
    assert r.status_code == 404
    tried.add(("POST", "/api/v1/agents"))
    # beta may create its own agent with alpha's id: agent ids are unique per org, not globally.
    assert (
        proxy.post("/api/v1/agents", world["beta"], {"agent_id": "api-agent", "daily_limit": 1}).status_code
        == 201
    )
    assert proxy.get("/api/v1/agents/api-agent", world["beta"]).json()["description"] == ""
    assert alpha_state(proxy.db) == before, "another org's key changed alpha's data"
    # Every governance route of the app was tried.
    spec = httpx.get(f"{proxy.url}/openapi.json").json()
    routes = {(m.upper(), p) for p, ops in spec["paths"].items() for m in ops if p.startswith("/api/v1/")}
    concrete = {(m, p.replace(world["booking"], "{booking_id}").replace(world["key_id"], "{key_id}")
                 .replace(world["adjustment"], "{adjustment_id}").replace("api-agent", "{agent_id}")
                 .replace("file-agent", "{agent_id}").replace("/orgs/alpha", "/orgs/{org_id}").replace("wh_alpha", "{webhook_id}")) for m, p in tried}  # fmt: skip
    missing = {r for r in routes if r not in concrete}
    assert not missing, f"routes the matrix does not try: {sorted(missing)}"


def test_key_scopes_are_enforced(world: dict[str, Any]) -> None:
    proxy: GovProxy = world["proxy"]
    only = {scope: proxy.bearer("alpha", scopes=[scope]) for scope in ("proxy", "read", "write")}
    book = {"agent_id": "api-agent", "resource_type": "t", "action": "x", "cost": 0.01}
    cases = [
        ("POST", "/api/v1/book", book, {"proxy"}),
        ("GET", "/api/v1/agents", None, {"read"}),
        ("GET", "/api/v1/agents/api-agent", None, {"read"}),
        ("GET", "/api/v1/usage/api-agent", None, {"read"}),
        ("GET", "/api/v1/audit", None, {"read"}),
        ("GET", f"/api/v1/bookings/{world['booking']}", None, {"read"}),
        ("PUT", "/api/v1/agents/api-agent/budget", {"period": "daily", "limit_amount": 1}, {"write"}),
        ("GET", "/api/v1/keys", None, {"write"}),
    ]
    for method, path, body, allowed in cases:
        for scope, headers in only.items():
            r = httpx.request(method, f"{proxy.url}{path}", headers=headers, json=body, timeout=30)
            if scope in allowed:
                assert r.status_code < 300, (scope, method, path, r.text)
            else:
                assert r.status_code == 403 and r.json()["error"]["reason"] == "insufficient_scope", (
                    scope,
                    path,
                )
