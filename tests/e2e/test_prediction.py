"""The prediction API and the dashboard's JSON over real HTTP, on seeded spend histories.

The ledger is seeded through the Store API (reserve + settle, so budget lines and the
audit trail agree), then the audit rows are back-dated to draw a known history. The
router's clock is pinned to a bucket boundary ``T0`` so every number has an exact
expected value, and the policy's timezone is chosen so that the daily window resets
about 22 h after ``T0``: which budgets run out before their reset is then the same
whatever the hour the suite runs at.
"""

from __future__ import annotations

import asyncio
import math
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest

from resgov.config.rgf import parse_policy
from resgov.core.policy import Policy
from resgov.core.windows import window_bounds
from resgov.ledger.sqlite import SQLiteStore
from resgov.ledger.store import AuditEntry, ReserveRequest, SettleRequest
from resgov.server.dashboard import exhaustion_events
from tests.helpers import ADMIN_TOKEN, Proxy, policy_for

NANO = 1_000_000_000
B = 300  # the bucket size of a 6 h lookback

AGENTS = """
[orgs.acme.agents.steady]
daily_budget = 10.00
total_budget = 100.00

[orgs.acme.agents.slow]
daily_budget = 10.00

[orgs.acme.agents.idle]
daily_budget = 1.00

[orgs.acme.agents.broke]
daily_budget = 0.50

[orgs.acme.agents.free]
max_tokens_per_request = 100

[orgs.capped]
daily_budget = 2.00

[orgs.capped.agents.worker]
daily_budget = 50.00

[orgs.other.agents.steady]
daily_budget = 2.00
"""

ADMIN = {"X-Admin-Token": ADMIN_TOKEN}


def tz_resetting_late(t0: float) -> str:
    """A fixed-offset zone in which ``t0`` falls at about 02:00 local (the day resets ~22 h later)."""
    offset = (2 - datetime.fromtimestamp(t0, UTC).hour) % 24
    if offset > 14:
        offset -= 24
    # POSIX-style names: Etc/GMT-5 is UTC+5.
    return "UTC" if offset == 0 else f"Etc/GMT{-offset:+d}"


@dataclass(frozen=True)
class Spend:
    org: str
    agent: str
    at: float
    amount: int


async def _seed_async(db: str, policy: Policy, spends: list[Spend], window_at: float) -> None:
    store = SQLiteStore(db)
    await store.open()
    try:
        wall = datetime.fromtimestamp(window_at, UTC)
        for i, s in enumerate(spends):
            agent = policy.agents[(s.org, s.agent)]
            rid = f"seed-{i:05d}"
            entry = AuditEntry(
                request_id=rid,
                org=s.org,
                agent=s.agent,
                route="/v1/chat/completions",
                model="gpt-sim",
                provider="sim",
                started_at=s.at - 1,
            )
            lines = policy.budget_lines(agent, wall)
            out = await store.reserve(ReserveRequest(rid, s.org, s.agent, s.amount, lines, 300.0, entry))
            assert out.ok, (s, out.refused)
            await store.settle(
                SettleRequest(
                    rid, "actual", s.amount, "completed", http_status=200, input_tokens=100, output_tokens=50
                )
            )
    finally:
        await store.close()


def seed_spend(db: str, policy: Policy, spends: list[Spend], window_at: float) -> None:
    """Charge each spend through the store (lines and audit agree), then back-date its audit row.

    ``window_at`` picks the budget windows the spend is charged to (the pinned clock), so
    the seeded lines are exactly the ones the server reads at that time.
    """
    asyncio.run(_seed_async(db, policy, spends, window_at))
    conn = sqlite3.connect(db, timeout=30)
    try:
        conn.executemany(
            "UPDATE audit SET started_at = ?, finished_at = ? WHERE request_id = ?",
            [(s.at - 1, s.at, f"seed-{i:05d}") for i, s in enumerate(spends)],
        )
        conn.commit()
    finally:
        conn.close()


def every_bucket(org: str, agent: str, t0: float, amount: int, buckets: int = 72) -> list[Spend]:
    """One call in the middle of each of the ``buckets`` full buckets before ``t0``."""
    return [Spend(org, agent, t0 - (k + 0.5) * B, amount) for k in range(buckets)]


@dataclass
class World:
    proxy: Proxy
    t0: float
    tz: str
    policy: Policy
    acme: str
    other: str
    bound: str
    proxy_only: str

    def get(self, path: str, key: str | None = None, **params: Any) -> httpx.Response:
        """GET with an org key, or with the admin token when no key is given."""
        headers = {"Authorization": f"Bearer {key}"} if key else ADMIN
        return httpx.get(f"{self.proxy.url}{path}", headers=headers, params=params, timeout=10)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("prediction")
    t0 = float(math.floor(time.time() / B) * B)
    tz = tz_resetting_late(t0)
    text = policy_for("http://127.0.0.1:9", AGENTS, global_extra=f'timezone = "{tz}"')
    policy = parse_policy(text, "test.rgf")
    spends = (
        every_bucket("acme", "steady", t0, 50_000_000)  # $0.05 / 5 min = $0.60/h, $3.60 spent
        + every_bucket("acme", "slow", t0, 1_000_000)  # $0.012/h
        + [Spend("acme", "broke", t0 - 2 * 3600, 500_000_000)]  # the whole $0.50
        + every_bucket("acme", "free", t0, 2_000_000, buckets=12)  # no budget, $0.024/h lately
        + every_bucket("capped", "worker", t0, 10_000_000)  # $0.12/h against an org $2.00 day
        + [Spend("other", "steady", t0 - 600, 100_000_000)]
    )
    seed_spend(str(tmp / "resgov.db"), policy, spends, t0)
    proxy = Proxy(tmp, text)
    _pin_clock(proxy, t0)
    with proxy:
        yield World(
            proxy=proxy,
            t0=t0,
            tz=tz,
            policy=policy,
            acme=proxy.key("acme"),
            other=proxy.key("other"),
            bound=proxy.key("acme", agent_id="steady"),
            proxy_only=proxy.key("acme", scopes=["proxy"]),
        )


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def daily_reset(w: World) -> float:
    _, end = window_bounds("daily", datetime.fromtimestamp(w.t0, UTC), ZoneInfo(w.tz))
    assert end is not None
    return float(end)


def test_constant_rate_has_the_exact_answer_in_the_briefs_shape(world: World) -> None:
    r = world.get("/api/v1/agents/steady/prediction", world.acme, period="daily", lookback_hours=6)
    assert r.status_code == 200, r.text
    body = r.json()
    # The brief's contract first: these six fields, these names, these types.
    assert body["status"] == "ok"
    assert body["message"] == "Prediction successful."
    assert body["remaining_budget"] == pytest.approx(6.40)
    assert body["rate_usd_per_hour"] == pytest.approx(0.60)
    assert body["remaining_time_seconds"] == pytest.approx(6.40 / 0.60 * 3600)
    assert isinstance(body["remaining_time_seconds"], float)
    assert body["prediction_timestamp"] == iso(world.t0 + 38_400)
    # And what this implementation adds.
    assert body["trend"] == "steady"
    assert body["trend_slope_per_hour"] == pytest.approx(0.0, abs=1e-9)
    assert body["confidence"] == pytest.approx(72 / 76, abs=1e-4)
    assert body["period"] == "daily"
    assert body["budget_level"] == "agent"
    assert body["budget_limit"] == 10.0
    assert body["window_resets_at"] == iso(daily_reset(world))
    assert body["exhausts_before_reset"] is True
    assert body["currency"] == "USD"
    assert body["org_id"] == "acme" and body["agent_id"] == "steady"
    assert body["bucket_seconds"] == 300 and body["lookback_hours"] == 6


def test_defaults_are_daily_over_six_hours(world: World) -> None:
    body = world.get("/api/v1/agents/steady/prediction", world.acme).json()
    assert body["period"] == "daily" and body["lookback_hours"] == 6


def test_total_budget_never_resets(world: World) -> None:
    body = world.get("/api/v1/agents/steady/prediction", world.acme, period="total").json()
    assert body["status"] == "ok"
    assert body["remaining_budget"] == pytest.approx(96.40)
    assert body["remaining_time_seconds"] == pytest.approx(96.40 / 0.60 * 3600)
    assert body["window_resets_at"] is None
    assert body["exhausts_before_reset"] is True


def test_a_slow_spender_lasts_past_the_reset(world: World) -> None:
    body = world.get("/api/v1/agents/slow/prediction", world.acme).json()
    assert body["status"] == "ok"
    assert body["rate_usd_per_hour"] == pytest.approx(0.012)
    assert body["exhausts_before_reset"] is False
    assert body["prediction_timestamp"] == iso(world.t0 + (10 - 0.072) / 0.012 * 3600)


def test_a_short_lookback_sees_only_recent_buckets(world: World) -> None:
    # "free" spent only in the last hour: over 1 h it is a steady $0.024/h with 12 buckets.
    body = world.get("/api/v1/agents/free/prediction", world.acme, lookback_hours=1).json()
    assert body["rate_usd_per_hour"] == pytest.approx(0.024)
    assert body["confidence"] == pytest.approx(12 / 16, abs=1e-4)


def test_statuses_no_data_exhausted_no_budget(world: World) -> None:
    idle = world.get("/api/v1/agents/idle/prediction", world.acme).json()
    assert idle["status"] == "no_data"
    assert idle["remaining_budget"] == 1.0
    assert idle["rate_usd_per_hour"] == 0.0
    assert idle["prediction_timestamp"] is None and idle["remaining_time_seconds"] is None
    assert idle["exhausts_before_reset"] is False
    assert "No spend" in idle["message"]

    broke = world.get("/api/v1/agents/broke/prediction", world.acme).json()
    assert broke["status"] == "exhausted"
    assert broke["remaining_budget"] == 0.0
    assert broke["remaining_time_seconds"] == 0.0
    assert broke["prediction_timestamp"] == iso(world.t0)
    assert broke["exhausts_before_reset"] is True
    assert "exhausted" in broke["message"]

    free = world.get("/api/v1/agents/free/prediction", world.acme).json()
    assert free["status"] == "no_budget"
    assert free["remaining_budget"] is None and free["budget_level"] is None
    assert free["rate_usd_per_hour"] > 0  # the rate is still worth knowing
    weekly = world.get("/api/v1/agents/steady/prediction", world.acme, period="weekly").json()
    assert weekly["status"] == "no_budget"


def test_the_org_budget_binds_when_it_runs_out_first(world: World) -> None:
    body = world.get("/api/v1/agents/worker/prediction", org_id="capped").json()
    # The agent's own $50 would last days; the org's $2.00 has $1.28 left at $0.12/h.
    assert body["budget_level"] == "org"
    assert body["budget_limit"] == 2.0
    assert body["remaining_budget"] == pytest.approx(1.28)
    assert body["rate_usd_per_hour"] == pytest.approx(0.12)
    assert body["remaining_time_seconds"] == pytest.approx(1.28 / 0.12 * 3600)
    assert body["exhausts_before_reset"] is True


def test_validation_is_422(world: World) -> None:
    for params in (
        {"period": "yearly"},
        {"lookback_hours": 0},
        {"lookback_hours": 169},
        {"lookback_hours": "x"},
    ):
        r = world.get("/api/v1/agents/steady/prediction", world.acme, **params)
        assert r.status_code == 422, (params, r.text)
        assert r.json()["error"]["type"] == "invalid_value"
    assert world.get("/api/v1/agents/steady/prediction", world.acme, lookback_hours=168).status_code == 200


def test_scoping_and_auth(world: World) -> None:
    path = "/api/v1/agents/steady/prediction"
    # Each org key sees its own "steady" (same name, different orgs, different answers).
    assert world.get(path, world.acme).json()["remaining_budget"] == pytest.approx(6.40)
    assert world.get(path, world.other).json()["remaining_budget"] == pytest.approx(1.90)
    # Another org's agent, or another org named explicitly: 404, never a hint.
    assert world.get("/api/v1/agents/worker/prediction", world.acme).status_code == 404
    assert world.get(path, world.acme, org_id="other").status_code == 404
    assert world.get("/api/v1/agents/nobody/prediction", world.acme).status_code == 404
    # A key bound to one agent sees only that agent.
    assert world.get(path, world.bound).status_code == 200
    assert world.get("/api/v1/agents/idle/prediction", world.bound).status_code == 404
    # The admin names the org when the agent name is ambiguous.
    r = world.get(path)
    assert r.status_code == 422 and r.json()["error"]["reason"] == "ambiguous_agent"
    assert world.get(path, org_id="other").json()["remaining_budget"] == pytest.approx(1.90)
    assert world.get("/api/v1/agents/worker/prediction").json()["org_id"] == "capped"
    # No key, a bad key, a key without the read scope.
    assert httpx.get(f"{world.proxy.url}{path}").status_code == 401
    assert world.get(path, "rgf_nope").status_code == 401
    assert world.get(path, world.proxy_only).status_code == 403
    assert httpx.get(f"{world.proxy.url}{path}", headers={"X-Admin-Token": "x" * 40}).status_code == 401


def test_summary_shows_only_what_the_key_may_see(world: World) -> None:
    r = world.get("/api/v1/dashboard/summary", world.acme)
    assert r.status_code == 200, r.text
    s = r.json()
    assert s["orgs"] == ["acme"] and s["org_id"] == "acme"
    assert s["caller"] == {"admin": False, "org_id": "acme", "agent_id": None}
    agents = {a["agent_id"]: a for a in s["agents"]}
    assert sorted(agents) == ["broke", "free", "idle", "slow", "steady"]
    steady = agents["steady"]
    daily = next(w for w in steady["budgets"] if w["period"] == "daily")
    assert daily["spent"] == pytest.approx(3.60) and daily["limit"] == 10.0
    assert daily["forecast"]["status"] == "ok"
    assert daily["forecast"]["prediction_timestamp"] == iso(world.t0 + 38_400)
    assert steady["rate_usd_per_hour"] == pytest.approx(0.60)
    assert steady["totals"]["calls"] == 72
    assert sum(steady["spend_series"]) == pytest.approx(3.60)
    assert steady["spend_series"][-1] == 0.0  # the partial bucket (nothing since t0)
    assert len(steady["spend_series"]) == s["series"]["buckets"] == 73
    assert s["series"]["start"] == world.t0 - 72 * B
    assert s["org"]["totals"]["spend"] == pytest.approx(3.60 + 0.072 + 0.50 + 0.024)
    # The audit cursor yields the 50 most recent records through the audit API.
    audit = world.get("/api/v1/audit", world.acme, after=s["audit_after"], limit=1000).json()
    assert len(audit["items"]) == 50
    assert {i["org"] for i in audit["items"]} == {"acme"}
    # Another org, asked by name: 404.
    assert world.get("/api/v1/dashboard/summary", world.acme, org_id="other").status_code == 404
    # Polls after the first read only the lookback (a remembered audit cursor); same answers,
    # also after a longer lookback moved the cursor back.
    assert world.get("/api/v1/dashboard/summary", world.acme).json() == s
    world.get("/api/v1/dashboard/summary", world.acme, lookback_hours=168)
    assert world.get("/api/v1/dashboard/summary", world.acme).json() == s

    bound = world.get("/api/v1/dashboard/summary", world.bound).json()
    assert [a["agent_id"] for a in bound["agents"]] == ["steady"]
    assert bound["org"]["spend_series"] is None  # other agents' spend is not shown
    assert bound["caller"]["agent_id"] == "steady"

    admin = world.get("/api/v1/dashboard/summary", org_id="capped").json()
    assert admin["orgs"] == ["acme", "capped", "other"]
    org_daily = admin["org"]["budgets"][0]
    assert org_daily["level"] == "org" and org_daily["remaining"] == pytest.approx(1.28)
    assert org_daily["forecast"]["rate_usd_per_hour"] == pytest.approx(0.12)
    assert world.get("/api/v1/dashboard/summary").json()["org_id"] == "acme"  # admin default: first org
    assert httpx.get(f"{world.proxy.url}/api/v1/dashboard/summary").status_code == 401
    assert world.get("/api/v1/dashboard/summary", world.proxy_only).status_code == 403


def test_exhaustion_events_for_the_alert(world: World) -> None:
    async def run(horizon: float) -> list[Any]:
        store = SQLiteStore(world.proxy.db)
        await store.open()
        try:
            return await exhaustion_events(store, world.policy, horizon_seconds=horizon, now=world.t0)
        finally:
            await store.close()

    # Within 11 h: acme/steady's daily budget and capped's org budget (both 10 h 40 min away).
    events = asyncio.run(run(11 * 3600))
    found = sorted((e.line.org, e.agent_id, e.line.level, e.line.period) for e in events)
    assert found == [("acme", "steady", "agent", "daily"), ("capped", None, "org", "daily")]
    for e in events:
        assert e.remaining_time_seconds == pytest.approx(38_400)
        assert e.event_id.startswith("evt_fx_")
        payload = e.payload("USD")
        assert payload["event"] == "forecast.exhaustion"
        assert payload["prediction_timestamp"] == iso(world.t0 + 38_400)
    # The id is stable across checks (one alert per line per window), distinct across lines.
    again = asyncio.run(run(11 * 3600))
    assert sorted(e.event_id for e in again) == sorted(e.event_id for e in events)
    assert len({e.event_id for e in events}) == 2
    # A shorter horizon: nothing yet. Exhausted "broke" is budget.exceeded's job, never this one's.
    assert asyncio.run(run(10 * 3600)) == []


def test_exhaustion_events_are_the_same_read_in_tiny_pages(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The alert loop sums the lookback page by page; page boundaries must not change a forecast."""
    import resgov.server.dashboard as dashboard

    async def run() -> list[tuple[Any, ...]]:
        store = SQLiteStore(world.proxy.db)
        await store.open()
        try:
            events = await exhaustion_events(store, world.policy, horizon_seconds=30 * 86_400, now=world.t0)
        finally:
            await store.close()
        return sorted((e.event_id, e.remaining, e.rate_per_hour, e.exhausts_at) for e in events)

    whole = asyncio.run(run())
    assert len(whole) >= 2
    monkeypatch.setattr(dashboard, "_ALERT_PAGE", 3)
    assert asyncio.run(run()) == whole


@pytest.mark.parametrize("lookback_hours", [1, 24])
def test_summary_is_summed_as_read_whatever_the_page_size(
    world: World, monkeypatch: pytest.MonkeyPatch, lookback_hours: int
) -> None:
    """The summary sums the lookback page by page (rows are never all held): its counts must be
    those of the whole list of rows, and must not depend on where the pages break."""
    import resgov.server.dashboard as dashboard
    from resgov.core.forecast import bucket_seconds_for
    from resgov.ledger.store import AuditQuery
    from resgov.server.api import Caller

    admin = Caller(admin=True, org=None)

    async def run() -> tuple[dict[str, Any], list[tuple[int, Any]]]:
        store = SQLiteStore(world.proxy.db)
        await store.open()
        try:
            summary = await dashboard._summary(
                store, world.policy, admin, "acme", lookback_hours, world.t0, None
            )
            rows = await store.audit(AuditQuery(org="acme", limit=100_000))
        finally:
            await store.close()
        return summary, rows

    whole, rows = asyncio.run(run())
    monkeypatch.setattr(dashboard, "_PAGE", 7)
    paged, _ = asyncio.run(run())
    assert paged == whole
    # The reference: the same counts over the whole list, computed plainly.
    since = whole["series"]["start"]
    recent = [e for _, e in rows if e.started_at >= since]
    assert len(recent) > 20  # more rows than one small page
    assert len(rows) > len(recent) or lookback_hours == 24  # 1 h: rows read (slack) but not counted

    def totals(entries: list[Any]) -> dict[str, Any]:
        return {
            "calls": len(entries),
            "denied": sum(e.status in ("denied", "rejected") for e in entries),
            "errors": sum(e.status == "upstream_error" for e in entries),
            "in_flight": sum(e.status == "in_flight" for e in entries),
            "spend": pytest.approx(sum(e.actual for e in entries if e.status != "in_flight") / 1e9),
            "last_call_at": iso(max(e.started_at for e in entries)) if entries else None,
        }

    assert whole["org"]["totals"] == totals(recent)
    for agent in whole["agents"]:
        assert agent["totals"] == totals([e for e in recent if e.agent == agent["agent_id"]]), agent[
            "agent_id"
        ]
    # The cursor: the 51st newest of the rows the lookback reads (it reads back past ``since``,
    # by one bucket and the slack for long calls).
    read_from = world.t0 - lookback_hours * 3600 - bucket_seconds_for(lookback_hours * 3600) - 3 * 3600
    seqs = sorted(seq for seq, e in rows if e.started_at >= read_from)
    assert whole["audit_after"] == seqs[-51]


def test_dashboard_page_is_served_with_a_strict_csp(world: World) -> None:
    r = httpx.get(f"{world.proxy.url}/dash")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    csp = r.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert '<script src="/dash/dash.js"' in r.text
    js = httpx.get(f"{world.proxy.url}/dash/dash.js")
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    assert "sessionStorage" in js.text
    assert httpx.get(f"{world.proxy.url}/dash/dash.css").headers["content-type"].startswith("text/css")
    assert httpx.get(f"{world.proxy.url}/dash/", follow_redirects=False).status_code == 308


def test_live_calls_through_the_proxy_feed_the_forecast(tmp_path: Path, sim: Any) -> None:
    """With the real clock: a proxied call's cost shows up in the rate and the remaining budget."""
    agents = "[agents.hermes]\ndaily_budget = 3.00\n"
    proxy = Proxy(tmp_path, policy_for(sim.base_url, agents))
    with proxy:
        key = proxy.key()
        before = httpx.get(
            f"{proxy.url}/api/v1/agents/hermes/prediction", headers={"Authorization": f"Bearer {key}"}
        ).json()
        assert before["status"] == "no_data" and before["remaining_budget"] == 3.0
        for _ in range(3):
            r = httpx.post(
                f"{proxy.url}/v1/chat/completions",
                headers={"Authorization": f"Bearer {key}", "X-ResGov-Agent-ID": "hermes"},
                json={"model": "gpt-sim", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 20},
                timeout=10,
            )
            assert r.status_code == 200, r.text
        body = httpx.get(
            f"{proxy.url}/api/v1/agents/hermes/prediction", headers={"Authorization": f"Bearer {key}"}
        ).json()
        agent = httpx.get(
            f"{proxy.url}/api/v1/agents/hermes", headers={"Authorization": f"Bearer {key}"}
        ).json()
    assert body["status"] == "ok"
    assert body["rate_usd_per_hour"] > 0
    assert body["remaining_budget"] == agent["budgets"][0]["remaining"] < 3.0
    assert body["remaining_time_seconds"] == pytest.approx(
        body["remaining_budget"] / body["rate_usd_per_hour"] * 3600, rel=1e-6
    )
    assert datetime.fromisoformat(body["prediction_timestamp"].replace("Z", "+00:00")) > datetime.now(UTC)
    proxy.ledger.check_invariants()


def _pin_clock(proxy: Proxy, t0: float) -> None:
    """Pin the dashboard routes' clock to ``t0``."""
    proxy.app.api.state.clock = lambda: t0
