"""Agents, budgets, orgs, adjustments, resets, prices, audit and keys over HTTP (one governed server)."""

from __future__ import annotations

import asyncio
import csv
import io
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from aiohttp import web

from resgov.simulator.upstream import SimUpstreamThread
from tests.governance.support import ADMIN, GovProxy
from tests.helpers import free_port, policy_for

AGENTS = """
[orgs.acme]
daily_budget = 10

[orgs.acme.agents.hermes]
daily_budget = 3
total_budget = 1000

[orgs.beta]
"""


@pytest.fixture
def proxy(tmp_path: Path, sim: SimUpstreamThread, integrated: None) -> Iterator[GovProxy]:
    with GovProxy(tmp_path, policy_for(sim.base_url, AGENTS)) as p:
        yield p


def book(p: GovProxy, h: dict[str, str], agent: str, cost: object) -> httpx.Response:
    return p.post("/api/v1/book", h, {"agent_id": agent, "resource_type": "t", "action": "a", "cost": cost})


def chat(p: GovProxy, h: dict[str, str], agent: str, max_tokens: int = 20) -> httpx.Response:
    return httpx.post(f"{p.url}/v1/chat/completions", headers={**h, "x-resgov-agent-id": agent}, timeout=30,
                      json={"model": "gpt-sim", "max_tokens": max_tokens, "messages": [{"role": "user", "content": "hi"}]})  # fmt: skip


def test_agents_lifecycle_ceiling_and_mass_assignment(proxy: GovProxy) -> None:
    h = proxy.bearer("acme")
    r = proxy.post("/api/v1/agents", h, {"agent_id": "scraper", "name": "Scraper", "description": "pages",
                                          "daily_limit": "2.50", "allowed_tools": ["web"]})  # fmt: skip
    assert r.status_code == 201, r.text
    info = r.json()
    assert (info["source"], info["org_id"], info["limits"], info["name"]) == (
        "api",
        "acme",
        {"daily": 2.5},
        "Scraper",
    )
    assert info["ceilings"]["daily"] == 10  # the org's own daily budget
    assert {(b["level"], b["period"]) for b in info["budgets"]} == {("agent", "daily"), ("org", "daily")}
    for body, reason in (({"agent_id": "scraper", "daily_limit": 1}, "agent_exists"),
                         ({"agent_id": "hermes", "daily_limit": 1}, "agent_exists"),
                         ({"agent_id": "big", "daily_limit": 11}, "ceiling_exceeded")):  # fmt: skip
        r = proxy.post("/api/v1/agents", h, body)
        assert r.json()["error"]["reason"] == reason, body
        assert r.status_code == (403 if reason == "ceiling_exceeded" else 409)
    for extra in ({"spent": 0}, {"org": "beta"}, {"org_id": "beta"}, {"limit": 5}, {"reserved": 0}):
        r = proxy.post("/api/v1/agents", h, {"agent_id": "sneaky", "daily_limit": 1, **extra})
        assert r.status_code == 422, extra
    r = proxy.put("/api/v1/agents/scraper/budget", h, {"period": "daily", "limit_amount": 1, "spent": 0})
    assert r.status_code == 422
    listed = proxy.get("/api/v1/agents", h).json()["items"]
    assert {(a["agent_id"], a["source"]) for a in listed} == {("hermes", "rgf"), ("scraper", "api")}
    # The same id in another org is another agent; beta has no budget, so one is required.
    hb = proxy.bearer("beta")
    r = proxy.post("/api/v1/agents", hb, {"agent_id": "scraper"})
    assert r.status_code == 422 and r.json()["error"]["reason"] == "unbounded_budget"
    assert proxy.post("/api/v1/agents", hb, {"agent_id": "scraper", "monthly_limit": 50}).status_code == 201
    assert proxy.get("/api/v1/agents/scraper", h).json()["limits"] == {"daily": 2.5}
    assert proxy.get("/api/v1/agents/scraper", hb).json()["limits"] == {"monthly": 50}
    # Deleting: API agents only.
    r = proxy.delete("/api/v1/agents/hermes", h)
    assert r.status_code == 409 and r.json()["error"]["reason"] == "agent_defined_in_policy_file"
    assert proxy.delete("/api/v1/agents/scraper", h).status_code == 200
    assert proxy.delete("/api/v1/agents/scraper", h).status_code == 404
    assert proxy.get("/api/v1/agents/scraper", h).status_code == 404
    assert book(proxy, h, "scraper", 0.01).json()["error"]["reason"] == "agent_not_found"
    assert proxy.get("/api/v1/agents/scraper", hb).status_code == 200  # beta's is untouched
    kinds = [(a["org"], a["model"]) for a in proxy.ledger.audit() if a["kind"] == "governance"]
    assert ("acme", "agent_created") in kinds and ("acme", "agent_deleted") in kinds


def test_api_agents_are_enforced_on_the_proxy_hot_path(proxy: GovProxy) -> None:
    h = proxy.bearer("acme")
    assert chat(proxy, h, "worker").status_code == 403  # not registered yet
    assert proxy.post("/api/v1/agents", h, {"agent_id": "worker", "daily_limit": "0.001"}).status_code == 201
    r = chat(proxy, h, "worker")
    assert r.status_code == 200, r.text
    assert book(proxy, h, "worker", "0.001").json()["error"]["reason"] == "daily_budget_exceeded"
    # Raising the limit (within the ceiling) takes effect at once.
    r = proxy.put("/api/v1/agents/worker/budget", h, {"period": "daily", "limit_amount": "5"})
    assert r.status_code == 200 and r.json()["limits"] == {"daily": 5}
    assert book(proxy, h, "worker", "0.5").status_code == 200
    r = proxy.put("/api/v1/agents/worker/budget", h, {"period": "daily", "limit_amount": "0.0001"})
    assert chat(proxy, h, "worker").json()["error"]["reason"] == "daily_budget_exceeded"
    proxy.ledger.check_invariants()


def test_budget_settings_stay_under_the_file_except_for_the_admin(proxy: GovProxy) -> None:
    h = proxy.bearer("acme")
    r = proxy.put("/api/v1/agents/hermes/budget", h, {"period": "daily", "limit_amount": 4})
    assert r.status_code == 403 and r.json()["error"]["reason"] == "ceiling_exceeded"
    r = proxy.put("/api/v1/agents/hermes/budget", h, {"period": "daily", "limit_amount": "1.5"})
    assert r.json()["limits"]["daily"] == 1.5
    assert (
        proxy.put("/api/v1/agents/hermes/budget", h, {"period": "hourly", "limit_amount": 1}).status_code
        == 200
    )
    r = proxy.put("/api/v1/agents/hermes/budget", h, {"period": "daily", "limit_amount": None})
    assert r.json()["limits"] == {"daily": 3, "total": 1000, "hourly": 1}  # back to the file's daily
    r = proxy.put("/api/v1/agents/hermes/budget", ADMIN, {"period": "daily", "limit_amount": 7})
    assert r.status_code == 422 and r.json()["error"]["reason"] == "org_id_required"
    r = proxy.put("/api/v1/agents/hermes/budget?org_id=acme", ADMIN, {"period": "daily", "limit_amount": 7})
    assert r.status_code == 200 and r.json()["limits"]["daily"] == 7
    assert proxy.get("/api/v1/agents/hermes", ADMIN).json()["org_id"] == "acme"  # unambiguous read
    bound = proxy.bearer("acme", agent_id="hermes")
    r = proxy.put("/api/v1/agents/hermes/budget", bound, {"period": "daily", "limit_amount": 1})
    assert r.status_code == 403 and r.json()["error"]["reason"] == "agent_bound_key"
    assert (
        proxy.put("/api/v1/agents/ghost/budget", h, {"period": "daily", "limit_amount": 1}).status_code == 404
    )
    readonly = proxy.bearer("acme", scopes=["read"])
    r = proxy.put("/api/v1/agents/hermes/budget", readonly, {"period": "daily", "limit_amount": 1})
    assert r.status_code == 403 and r.json()["error"]["reason"] == "insufficient_scope"


def test_orgs_and_adjustments(proxy: GovProxy) -> None:
    r = proxy.post("/api/v1/admin/orgs", ADMIN, {"org_id": "gamma", "name": "Gamma", "daily_limit": 1})
    assert r.status_code == 201 and r.json()["limits"] == {"daily": 1} and r.json()["source"] == "api"
    assert proxy.post("/api/v1/admin/orgs", ADMIN, {"org_id": "acme"}).status_code == 409
    assert proxy.post("/api/v1/admin/orgs", proxy.bearer("acme"), {"org_id": "x"}).status_code == 401
    orgs = {o["org_id"]: o for o in proxy.get("/api/v1/admin/orgs", ADMIN).json()["items"]}
    assert {"acme", "beta", "gamma"} <= set(orgs) and orgs["acme"]["agents"] == 1
    assert proxy.get("/api/v1/admin/orgs/nope", ADMIN).status_code == 404
    hg = proxy.bearer("gamma")
    assert (
        proxy.post("/api/v1/agents", hg, {"agent_id": "g1"}).status_code == 201
    )  # the org's budget bounds it
    assert book(proxy, hg, "g1", "0.9").status_code == 200
    assert book(proxy, hg, "g1", "0.2").json()["error"]["reason"] == "org_daily_budget_exceeded"
    # A top-up of the org's daily budget for today.
    r = proxy.post("/api/v1/admin/budget-adjustments", ADMIN, {"org_id": "gamma", "period": "daily", "mode": "topup",
                                                                "amount": "0.5", "reason": "launch day"})  # fmt: skip
    assert r.status_code == 201, r.text
    topup = r.json()
    assert topup["active"] and topup["expires_at"] > time.time()
    assert book(proxy, hg, "g1", "0.2").status_code == 200
    listed = proxy.get("/api/v1/admin/budget-adjustments?org_id=gamma&active=true", ADMIN).json()["items"]
    assert [a["id"] for a in listed] == [topup["id"]]
    assert (
        proxy.delete(f"/api/v1/admin/budget-adjustments/{topup['id']}?org_id=beta", ADMIN).status_code == 404
    )
    assert (
        proxy.delete(f"/api/v1/admin/budget-adjustments/{topup['id']}?org_id=gamma", ADMIN).status_code == 200
    )
    assert book(proxy, hg, "g1", "0.2").json()["error"]["reason"] == "org_daily_budget_exceeded"
    # An override needs an expiry, and ends by itself.
    body: dict[str, Any] = {"org_id": "acme", "agent_id": "hermes", "period": "daily", "mode": "override",
                            "amount": "0.01", "reason": "incident"}  # fmt: skip
    assert proxy.post("/api/v1/admin/budget-adjustments", ADMIN, body).status_code == 422
    r = proxy.post("/api/v1/admin/budget-adjustments", ADMIN, {**body, "expires_in_seconds": 2})
    assert r.status_code == 201
    h = proxy.bearer("acme")
    assert book(proxy, h, "hermes", "0.02").json()["error"]["reason"] == "daily_budget_exceeded"
    time.sleep(2.1)
    assert book(proxy, h, "hermes", "0.02").status_code == 200
    audit = [a for a in proxy.ledger.audit() if a["kind"] == "governance"]
    assert {"topup", "override", "adjustment_deleted", "org_created"} <= {a["model"] for a in audit}
    assert all(a["provider"] == "admin" for a in audit if a["model"] in ("topup", "override"))
    proxy.ledger.check_invariants()


def test_reset_daily_starts_a_fresh_window_without_touching_calls_in_flight(proxy: GovProxy) -> None:
    h = proxy.bearer("acme")
    assert book(proxy, h, "hermes", "2.9").status_code == 200
    held = proxy.post("/api/v1/book", h, {"agent_id": "hermes", "resource_type": "t", "action": "a", "cost": "0.1",
                                          "phase": "reserve"}).json()["booking_id"]  # fmt: skip
    assert book(proxy, h, "hermes", "0.1").status_code == 403
    assert proxy.post("/api/v1/admin/reset-daily", ADMIN, {"agent_id": "hermes"}).status_code == 422
    assert proxy.post("/api/v1/admin/reset-daily", ADMIN, {"org_id": "nope"}).status_code == 404
    r = proxy.post("/api/v1/admin/reset-daily", ADMIN, {"org_id": "acme", "agent_id": "hermes"})
    assert r.status_code == 200 and r.json()["periods"] == ["daily"]
    at = r.json()["at"]
    while time.time() < at:  # a reset applies once the clock reaches it (at most 1 s)
        time.sleep(0.05)
    assert book(proxy, h, "hermes", "2.5").status_code == 200
    # The call reserved before the reset settles on its own (old) window.
    assert proxy.post(f"/api/v1/bookings/{held}/commit", h, {"cost": "0.1"}).status_code == 200
    lines = proxy.ledger.lines()
    daily = {k: v for (o, k), v in lines.items() if o == "acme" and k.startswith("a:hermes:daily:")}
    assert sorted(daily.values()) == [(2_500_000_000, 0), (3_000_000_000, 0)]
    assert f"a:hermes:daily:{at}" in daily
    org_daily = [v for (o, k), v in lines.items() if o == "acme" and k.startswith("o:daily:")]
    assert org_daily == [(5_500_000_000, 0)]  # the agent's reset left the org's window alone
    # Resetting everything (no org) restarts the org's window too.
    r = proxy.post("/api/v1/admin/reset-daily", ADMIN, None)
    assert r.status_code == 200
    while time.time() < r.json()["at"]:
        time.sleep(0.05)
    usage = proxy.get("/api/v1/usage/hermes", h).json()
    assert {(w["level"], w["period"]): w["spent"] for w in usage["windows"]} == {
        ("agent", "daily"): 0, ("org", "daily"): 0, ("agent", "total"): 5.5}  # fmt: skip
    proxy.ledger.check_invariants()


class PriceServer:
    """A local stand-in for OpenRouter's /models (aiohttp, own thread)."""

    def __init__(self) -> None:
        self.port = free_port()
        self.mode = "ok"
        self.ready = threading.Event()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, daemon=True)

    async def handle(self, _: web.Request) -> web.Response:
        if self.mode == "500":
            return web.Response(status=500, text="boom")
        if self.mode == "html":
            return web.Response(text="<html>", content_type="text/html")
        if self.mode == "empty":
            return web.json_response({"data": []})
        return web.Response(body=orjson.dumps({"data": [
            {"id": "vendor/model-x", "context_length": 8000,
             "pricing": {"prompt": "0.000001", "completion": "0.000002"}},
            {"id": "openrouter/auto", "pricing": {"prompt": "-1", "completion": "-1"}},
        ]}), content_type="application/json")  # fmt: skip

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        app = web.Application()
        app.router.add_get("/api/v1/models", self.handle)
        self.runner = web.AppRunner(app)
        self.loop.run_until_complete(self.runner.setup())
        self.loop.run_until_complete(web.TCPSite(self.runner, "127.0.0.1", self.port).start())
        self.ready.set()
        self.loop.run_forever()

    def __enter__(self) -> PriceServer:
        self.thread.start()
        assert self.ready.wait(10)
        return self

    def __exit__(self, *_: object) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/v1/models"


def test_price_refresh_from_a_source_and_failures_keep_the_old_prices(proxy: GovProxy) -> None:
    with PriceServer() as source:
        r = proxy.post("/api/v1/admin/price-cache/refresh", ADMIN, {"url": source.url})
        assert r.status_code == 200, r.text
        assert r.json()["models"] == 1 and r.json()["source"] == source.url
        price = proxy.gov.policy.prices.lookup("openrouter/vendor/model-x", "openrouter", "vendor/model-x",
                                               "https://openrouter.ai/api/v1")  # fmt: skip
        assert price is not None and price.input.base == 1_000_000_000 and price.context_window == 8000
        for mode, words in (("500", "HTTP 500"), ("html", "not JSON"), ("empty", "no model")):
            source.mode = mode
            r = proxy.post("/api/v1/admin/price-cache/refresh", ADMIN, {"url": source.url})
            assert r.status_code == 502 and words in r.json()["error"]["message"], r.text
            assert r.json()["error"]["reason"] == "price_refresh_failed"
            status = proxy.get("/api/v1/admin/price-cache", ADMIN).json()
            assert status["models"] == 1 and status["ok"] is False and words in status["error"]
        r = proxy.post(
            "/api/v1/admin/price-cache/refresh", ADMIN, {"url": f"http://127.0.0.1:{free_port()}/x"}
        )
        assert r.status_code == 502 and "cannot fetch" in r.json()["error"]["message"]
        assert proxy.post("/api/v1/admin/price-cache/refresh", ADMIN, {"url": "ftp://x/y"}).status_code == 422
    assert proxy.gov.policy.prices.refreshed.get("vendor/model-x") is not None  # still the good ones


def test_audit_pages_filters_and_exports(proxy: GovProxy) -> None:
    h = proxy.bearer("acme")
    t0 = time.time()
    for i in range(7):
        book(proxy, h, "hermes", f"0.0{i + 1}")
    book(proxy, h, "hermes", "999")  # denied
    assert chat(proxy, h, "hermes").status_code == 200
    seen: list[str] = []
    cursor = None
    while True:
        q = "/api/v1/audit?limit=3&kind=booking" + (f"&cursor={cursor}" if cursor else "")
        page = proxy.get(q, h).json()
        seen += [i["request_id"] for i in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == 8 and len(set(seen)) == 8
    desc = proxy.get("/api/v1/audit?order=desc&limit=2&kind=booking", h).json()
    assert [i["status"] for i in desc["items"]] == ["denied", "completed"] and desc["next_cursor"].startswith(
        "d."
    )
    assert proxy.get(f"/api/v1/audit?cursor={desc['next_cursor']}", h).status_code == 422  # other order
    denied = proxy.get("/api/v1/audit?status=denied", h).json()["items"]
    assert [i["reason"] for i in denied] == ["daily_budget_exceeded"]
    since = datetime.fromtimestamp(t0 - 1, UTC).isoformat()
    assert len(proxy.get("/api/v1/audit", h, params={"since": since, "kind": "booking"}).json()["items"]) == 8
    assert proxy.get("/api/v1/audit", h, params={"until": str(t0 - 1)}).json()["items"] == []
    assert proxy.get("/api/v1/audit?since=yesterday", h).status_code == 422
    compat = proxy.get("/api/v1/audit?after=0&limit=2", h).json()
    assert compat["next_after"] == compat["items"][-1]["seq"]
    r = proxy.get("/api/v1/audit?format=csv&agent_id=hermes", h)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(r.text)))
    assert len(rows) == 9 and {row["org"] for row in rows} == {"acme"}
    r = proxy.get("/api/v1/audit?format=jsonl&kind=llm", h)
    lines = [orjson.loads(x) for x in r.text.splitlines()]
    assert r.headers["content-type"].startswith("application/x-ndjson") and [x["kind"] for x in lines] == [
        "llm"
    ]
    bound = proxy.bearer("acme", agent_id="nobody")
    assert proxy.get("/api/v1/audit", bound).json()["items"] == []


def test_org_keys_listing_and_revocation_need_write(proxy: GovProxy) -> None:
    writer = proxy.bearer("acme")
    victim = proxy.key("acme", name="victim")
    listed = proxy.get("/api/v1/keys", writer).json()["items"]
    assert {k["org_id"] for k in listed} == {"acme"} and len(listed) == 2
    assert all("api_key" not in k for k in listed)
    assert proxy.get("/api/v1/keys", proxy.bearer("acme", scopes=["read"])).status_code == 403
    victim_id = next(k["key_id"] for k in listed if k["name"] == "victim")
    assert proxy.delete(f"/api/v1/keys/{victim_id}", writer).status_code == 200
    assert book(proxy, {"authorization": f"Bearer {victim}"}, "hermes", 0.01).status_code == 401
    assert proxy.delete(f"/api/v1/keys/{victim_id}", writer).status_code == 404


def test_retention_purges_old_records(proxy: GovProxy) -> None:
    h = proxy.bearer("acme")
    book(proxy, h, "hermes", "0.01")
    time.sleep(0.2)
    before = len(proxy.ledger.audit())
    r = proxy.post("/api/v1/admin/audit/purge", ADMIN, {"older_than_days": 0.000001})
    assert r.status_code == 200 and r.json()["deleted"] == before
    book(proxy, h, "hermes", "0.01")
    proxy.gov.retention_override = 0.000001  # 86 ms, as if [global] audit_retention_days said so
    time.sleep(0.2)
    assert asyncio.run(_purge(proxy)) >= 1
    assert proxy.ledger.audit() == []


async def _purge(proxy: GovProxy) -> int:
    return await proxy.gov.purge_once()
