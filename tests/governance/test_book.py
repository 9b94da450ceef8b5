"""POST /api/v1/book and the two-phase booking endpoints, black-box over HTTP (plus the ledger file)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from resgov.core.budget import BudgetLine
from resgov.core.money import NANO
from resgov.ledger.sqlite import SQLiteStore
from resgov.ledger.store import AuditEntry, ReserveRequest
from resgov.server.governance import BookBody, _book_fingerprint
from tests.governance.support import ADMIN, GovProxy

POLICY = """
[global]
reservation_ttl_seconds = 60

[orgs.acme]
daily_budget = 100

[orgs.acme.agents.research-bot]
daily_budget = 1.00
allowed_tools = ["web-scraper", "pexels_search"]

[orgs.acme.agents.free]
daily_budget = 5
"""


@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[GovProxy]:
    with GovProxy(tmp_path, POLICY, sweep_interval=0.2) as p:
        yield p


def book(p: GovProxy, h: dict[str, str], cost: object = 0.05, *, action: str = "pexels_search",
         agent: str = "research-bot", key: str | None = None, raw: str | None = None, **extra: object) -> httpx.Response:  # fmt: skip
    headers = {**h, **({"Idempotency-Key": key} if key else {})}
    if raw is not None:
        return p.post("/api/v1/book", headers, raw)
    body = {"agent_id": agent, "resource_type": "api_call", "action": action, "cost": cost, **extra}
    return p.post("/api/v1/book", headers, body)


def spent(p: GovProxy, agent: str = "research-bot") -> int:
    return p.ledger.spent("acme", f"a:{agent}:daily")


def test_book_charges_exact_decimals_once_on_every_line(proxy: GovProxy) -> None:
    h = proxy.bearer("acme")
    # A raw JSON body: 0.1 and 0.2 as the client wrote them (no float may ever touch them).
    for cost in ("0.1", "0.2", '"0.000000001"', "1e-9", "0.0000000001"):
        r = book(proxy, h, raw=f'{{"agent_id":"research-bot","resource_type":"api_call","action":"web-scraper",'
                               f'"cost":{cost},"metadata":{{"query":"infrastructure","n":2.5}}}}')  # fmt: skip
        assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "booked" and body["booking_id"].startswith("bk_")
    assert body["currency"] == "USD" and body["agent_id"] == "research-bot" and body["org_id"] == "acme"
    # 0.1 + 0.2 + 1e-9 + 1e-9 + (1e-10 rounded up to 1e-9) = 0.300000003, exactly.
    assert spent(proxy) == 300_000_003
    assert proxy.ledger.spent("acme", "o:daily") == 300_000_003
    windows = {(w["level"], w["period"]): w for w in body["budgets"]}
    assert windows[("agent", "daily")]["remaining"] == pytest.approx(0.699999997)
    assert body["remaining"] == pytest.approx(0.699999997)
    audit = [a for a in proxy.ledger.audit() if a["kind"] == "booking"]
    assert len(audit) == 5 and {a["status"] for a in audit} == {"completed"}
    assert '"query": "infrastructure"' in audit[0]["detail"]
    proxy.ledger.check_invariants()


def test_refusals_have_the_briefs_shape_and_charge_nothing(proxy: GovProxy) -> None:
    h = proxy.bearer("acme")
    assert book(proxy, h, "0.95").status_code == 200
    r = book(proxy, h, "0.10")
    assert r.status_code == 403
    assert r.json() == {"error": {
        "type": "budget_exceeded", "agent_id": "research-bot", "reason": "daily_budget_exceeded",
        "message": "Daily budget exceeded. Limit: $1.00, Spent: $0.95, Required: $0.10",
    }}  # fmt: skip
    r = book(proxy, h, "0.01", action="shell")
    assert r.status_code == 403 and r.json()["error"]["reason"] == "tool_not_allowed"
    assert book(proxy, h, "0.01", action="anything", agent="free").status_code == 200  # no list: any action
    r = book(proxy, h, "0.01", agent="ghost")
    assert r.status_code == 403 and r.json()["error"]["reason"] == "agent_not_found"
    assert spent(proxy) == 950_000_000
    statuses = sorted(a["status"] for a in proxy.ledger.audit() if a["kind"] == "booking")
    assert statuses == ["completed", "completed", "denied", "denied", "denied"]
    proxy.ledger.check_invariants()


def test_bad_bodies_and_callers(proxy: GovProxy) -> None:
    h = proxy.bearer("acme")
    base = '{"agent_id":"research-bot","resource_type":"x","action":"web-scraper"'
    cases = {
        base + ',"cost":NaN}': 400, base + ',"cost":1}x': 400, "[1]": 422, base + "}": 422,
        base + ',"cost":-1}': 422, base + ',"cost":"abc"}': 422, base + ',"cost":true}': 422,
        base + ',"cost":1,"spent":0}': 422, base + ',"cost":1,"org":"beta"}': 422,
        base + ',"cost":1,"limit":9}': 422, base + ',"cost":1e400}': 422, "": 400,
    }  # fmt: skip
    for raw, status in cases.items():
        r = book(proxy, h, raw=raw)
        assert r.status_code == status, (raw, r.text)
        assert r.json()["error"]["type"] in ("invalid_request_error", "invalid_value"), raw
    r = book(proxy, ADMIN)
    assert r.status_code == 403 and r.json()["error"]["reason"] == "admin_cannot_spend"
    r = book(proxy, proxy.bearer("acme", scopes=["read", "write"]))
    assert r.status_code == 403 and r.json()["error"]["reason"] == "insufficient_scope"
    assert book(proxy, {}).status_code == 401
    bound = proxy.bearer("acme", agent_id="free")
    assert book(proxy, bound, agent="research-bot").json()["error"]["reason"] == "agent_mismatch"
    r = proxy.post("/api/v1/book", bound, {"resource_type": "x", "action": "y", "cost": 0.01})
    assert r.status_code == 200 and r.json()["agent_id"] == "free"
    assert spent(proxy) == 0


def test_idempotent_retries_charge_once(proxy: GovProxy) -> None:
    h = proxy.bearer("acme")
    first = book(proxy, h, 0.05, key="job-1")
    again = book(proxy, h, "0.050", key="job-1")  # the same amount, written differently
    assert first.status_code == again.status_code == 200
    assert again.json() == first.json() and again.headers["idempotent-replayed"] == "true"
    assert spent(proxy) == 50_000_000
    other = book(proxy, h, 0.06, key="job-1")
    assert other.status_code == 422 and other.json()["error"]["reason"] == "idempotency_key_reused"
    # The same key in another org is another key.
    assert book(proxy, proxy.bearer("acme"), 0.05, key="job-2").status_code == 200
    # A refusal is an answer too: replayed, not re-evaluated.
    refused = book(proxy, h, 5, key="big")
    assert refused.status_code == 403 and book(proxy, h, 5, key="big").json() == refused.json()
    # Ten concurrent retries of one new key: one charge, every answer the same booking or a 409.
    with ThreadPoolExecutor(10) as pool:
        answers = list(pool.map(lambda _: book(proxy, h, 0.01, key="burst"), range(10)))
    ok = [a for a in answers if a.status_code == 200]
    assert ok and all(a.status_code in (200, 409) for a in answers)
    assert len({a.json()["booking_id"] for a in ok}) == 1
    assert spent(proxy) == 110_000_000
    proxy.ledger.check_invariants()


def test_retry_while_in_flight_is_409_and_a_dead_attempt_is_finished_not_repeated(proxy: GovProxy) -> None:
    h = proxy.bearer("acme")
    body = BookBody(agent_id="research-bot", resource_type="api_call", action="pexels_search", cost=0.05)  # type: ignore[arg-type]
    fingerprint = _book_fingerprint("research-bot", body)

    async def setup() -> None:
        side = SQLiteStore(proxy.db)  # a second process on the same file, like the CLI
        await side.open()
        try:
            # 1. Another attempt holds the key right now.
            await side.idem_claim("acme", "busy", fingerprint, "bk_other", 60, 3600)
            # 2. An attempt that reserved, then died before settling or answering.
            line = BudgetLine("acme", "agent", "research-bot", "total", 10**15, 0, None)
            entry = AuditEntry(request_id="bk_dead", org="acme", agent="research-bot", kind="booking",
                               route="/api/v1/book", model="pexels_search", provider="api_call",
                               started_at=time.time(), detail={"phase": "book"})  # fmt: skip
            assert (await side.reserve(ReserveRequest("bk_dead", "acme", "research-bot", 50_000_000, [line], 600,
                                                      entry))).ok  # fmt: skip
            await side.idem_claim("acme", "crashed", fingerprint, "bk_dead", 0.01, 3600)
        finally:
            await side.close()

    asyncio.run(setup())
    r = book(proxy, h, 0.05, key="busy")
    assert r.status_code == 409 and r.json()["error"]["reason"] == "idempotency_in_flight"
    assert r.headers["retry-after"] == "1"
    time.sleep(0.05)
    r = book(proxy, h, 0.05, key="crashed")
    assert r.status_code == 200, r.text
    assert r.json()["booking_id"] == "bk_dead"  # the dead attempt's booking, settled now
    assert book(proxy, h, 0.05, key="crashed").json()["booking_id"] == "bk_dead"
    lines = proxy.ledger.lines()
    assert lines[("acme", "a:research-bot:total:0")] == (50_000_000, 0)
    assert proxy.ledger.open_reservations() == 0
    assert spent(proxy) == 0  # nothing else was booked


def test_two_phase_reserve_commit_release_renew(proxy: GovProxy) -> None:
    h = proxy.bearer("acme")
    r = book(proxy, h, "0.5", phase="reserve", ttl_seconds=60)
    assert r.status_code == 200 and r.json()["status"] == "reserved" and r.json()["expires_at"]
    bid = r.json()["booking_id"]
    usage = proxy.get("/api/v1/usage/research-bot", h).json()
    assert usage["reserved"] == 0.5 and usage["remaining"] == 0.5
    assert proxy.get(f"/api/v1/bookings/{bid}", h).json()["status"] == "reserved"
    r = proxy.post(f"/api/v1/bookings/{bid}/commit", h, {"cost": "0.7"})
    assert r.status_code == 409 and r.json()["error"]["reason"] == "commit_above_reservation"
    r = proxy.post(f"/api/v1/bookings/{bid}/commit", h, {"cost": 0.3})
    assert r.status_code == 200 and r.json()["status"] == "committed"
    assert (r.json()["cost"], r.json()["refund"], r.json()["overage"]) == (0.3, 0.2, False)
    assert spent(proxy) == 300_000_000
    for action in ("commit", "release", "renew"):
        again = proxy.post(f"/api/v1/bookings/{bid}/{action}", h, {"cost": 0.1} if action == "commit" else {})
        assert again.status_code == 409 and again.json()["error"]["reason"] == "booking_not_open", action
    # Reserve, then release: nothing charged.
    bid2 = book(proxy, h, "0.4", phase="reserve").json()["booking_id"]
    r = proxy.post(f"/api/v1/bookings/{bid2}/release", h, None)
    assert r.status_code == 200 and r.json()["status"] == "released" and r.json()["refund"] == 0.4
    assert spent(proxy) == 300_000_000
    # allow_overage: the excess is charged and flagged.
    bid3 = book(proxy, h, "0.1", phase="reserve", allow_overage=True).json()["booking_id"]
    r = proxy.post(f"/api/v1/bookings/{bid3}/commit", h, {"cost": "0.25", "metadata": {"pages": 3}})
    assert r.status_code == 200 and r.json()["overage"] is True and r.json()["cost"] == 0.25
    assert spent(proxy) == 550_000_000
    row = next(a for a in proxy.ledger.audit() if a["request_id"] == bid3)
    assert row["overage"] == 1 and row["actual"] == 250_000_000 and row["reason"] == "overage"
    # Renewal keeps a short lease alive past its first expiry.
    bid4 = book(proxy, h, "0.1", phase="reserve", ttl_seconds=1).json()["booking_id"]
    assert proxy.post(f"/api/v1/bookings/{bid4}/renew", h, {"ttl_seconds": 30}).status_code == 200
    time.sleep(1.5)
    assert proxy.post(f"/api/v1/bookings/{bid4}/commit", h, {"cost": 0.1}).status_code == 200
    assert proxy.get("/api/v1/bookings/bk_nope", h).status_code == 404
    proxy.ledger.check_invariants()


def test_an_abandoned_reservation_expires_by_its_own_ttl(proxy: GovProxy) -> None:
    h = proxy.bearer("acme")
    bid = book(proxy, h, "0.2", phase="reserve", ttl_seconds=1).json()["booking_id"]
    deadline = time.time() + 10
    while proxy.get(f"/api/v1/bookings/{bid}", h).json()["status"] == "reserved":
        assert time.time() < deadline, "the sweeper never settled the booking"
        time.sleep(0.2)
    info = proxy.get(f"/api/v1/bookings/{bid}", h).json()
    assert info["status"] == "expired" and info["cost"] == 0.2  # charge mode: the crash guard's bound
    r = proxy.post(f"/api/v1/bookings/{bid}/commit", h, {"cost": 0.1})
    assert r.status_code == 409
    proxy.ledger.check_invariants()


def test_usage_shows_windows_reserved_and_recent_calls(proxy: GovProxy) -> None:
    h = proxy.bearer("acme")
    for cost in ("0.01", "0.02", "0.03"):
        book(proxy, h, cost)
    usage = proxy.get("/api/v1/usage/research-bot?recent=2", h).json()
    assert [c["actual"] for c in usage["recent_calls"]] == [0.03, 0.02]  # newest first
    windows = {(w["level"], w["period"]): w for w in usage["windows"]}
    assert windows[("agent", "daily")]["spent"] == 0.06 and usage["remaining"] == pytest.approx(0.94)
    assert usage["reserved"] == 0 and usage["currency"] == "USD"
    assert proxy.get("/api/v1/usage/ghost", h).status_code == 404
    assert NANO == 10**9
