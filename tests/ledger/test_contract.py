"""The ledger contract: every backend (the ``store`` fixture: SQLite and Redis) gives the same answers.

reserve / settle / renew / sweep / windows / hierarchy / idempotency / concurrency / audit / keys.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Sequence

import pytest

from resgov.core.budget import BudgetLine, LineState, SettleKind, first_misfit, settle
from resgov.core.windows import Period
from resgov.ledger.store import (
    ApiKeyRecord,
    AuditEntry,
    AuditQuery,
    AuditStatus,
    ReserveOutcome,
    SettleOutcome,
    SettleRequest,
    Store,
    StoreError,
)
from resgov.ledger.store import ReserveRequest as _ReserveRequest

ORG = "acme"
DAY = 1_700_000_000


def agent_line(agent: str = "hermes", period: Period = "daily", limit: int = 1_000, start: int = DAY,
               org: str = ORG) -> BudgetLine:  # fmt: skip
    end = None if period == "total" else start + 86_400
    return BudgetLine(org, "agent", agent, period, limit, 0 if period == "total" else start, end)


def org_line(period: Period = "daily", limit: int = 1_000, start: int = DAY, org: str = ORG) -> BudgetLine:
    end = None if period == "total" else start + 86_400
    return BudgetLine(org, "org", None, period, limit, 0 if period == "total" else start, end)


async def reserve(
    store: Store, rid: str, amount: int, lines: Sequence[BudgetLine], *, org: str = ORG,
    agent: str = "hermes", ttl: float = 60.0,
) -> ReserveOutcome:  # fmt: skip
    entry = AuditEntry(request_id=rid, org=org, agent=agent, route="/v1/chat/completions", model="gpt-sim",
                       provider="sim", started_at=time.time())  # fmt: skip
    return await store.reserve(_ReserveRequest(rid, org, agent, amount, list(lines), ttl, entry))


async def finish(
    store: Store, rid: str, kind: SettleKind, amount: int, status: AuditStatus = "completed", **extra: object
) -> SettleOutcome:
    return await store.settle(SettleRequest(rid, kind, amount, status, **extra))  # type: ignore[arg-type]


async def drain(store: Store) -> None:
    """Wait for writes a backend queues without waiting (SQLite's record and renew)."""
    flush = getattr(store, "flush", None)
    if flush is not None:
        await flush()


async def states(store: Store, lines: Sequence[BudgetLine], org: str = ORG) -> dict[str, LineState]:
    return await store.line_states(org, [line.key for line in lines])


async def entry_of(store: Store, rid: str, org: str = ORG) -> AuditEntry:
    await drain(store)
    rows = await store.audit(AuditQuery(org=org, limit=10_000))
    found = [e for _, e in rows if e.request_id == rid]
    assert len(found) == 1, (rid, [e.request_id for _, e in rows])
    return found[0]


# -- reserve ---------------------------------------------------------------------------------------


async def test_ping(store: Store) -> None:
    assert await store.ping()


async def test_reserve_is_all_or_nothing_across_lines(store: Store) -> None:
    lines = [agent_line(limit=100), agent_line(period="total", limit=1_000), org_line(limit=50)]
    ok = await reserve(store, "r1", 40, lines)
    assert ok.ok and ok.refused is None
    assert ok.states == {line.key: LineState(0, 40) for line in lines}

    # 20 more fits the agent lines but not the org's daily line: nothing may be reserved anywhere.
    refused = await reserve(store, "r2", 20, lines)
    assert not refused.ok
    assert refused.refused == lines[2]
    assert refused.states == {line.key: LineState(0, 40) for line in lines}
    assert await states(store, lines) == {line.key: LineState(0, 40) for line in lines}
    assert not (await finish(store, "r2", "actual", 1)).settled
    totals = await store.totals()
    assert (totals.open_reservations, totals.reserved_total) == (1, 40)
    await drain(store)
    assert [e.request_id for _, e in await store.audit(AuditQuery(org=ORG))] == ["r1"]


async def test_refusal_names_the_first_misfit_and_returns_states(store: Store) -> None:
    lines = [agent_line(limit=30), agent_line(period="monthly", limit=20), org_line(limit=10)]
    out = await reserve(store, "r1", 25, lines)
    assert not out.ok
    assert out.refused == lines[1]  # the daily line fits 25; monthly is the first that does not
    assert out.refused == first_misfit(lines, out.states, 25)
    assert set(out.states) == {line.key for line in lines}
    assert all(s == LineState() for s in out.states.values())


async def test_reserve_exactly_at_the_limit_fits(store: Store) -> None:
    lines = [agent_line(limit=100)]
    assert (await reserve(store, "r1", 100, lines)).ok
    assert not (await reserve(store, "r2", 1, lines)).ok
    assert (await reserve(store, "r3", 0, lines)).ok


async def test_reserve_writes_the_in_flight_audit_record(store: Store) -> None:
    await reserve(store, "r1", 70, [agent_line()])
    entry = await entry_of(store, "r1")
    assert (entry.status, entry.reserved, entry.actual, entry.agent, entry.org) == (
        "in_flight",
        70,
        0,
        "hermes",
        ORG,
    )
    assert (entry.model, entry.provider, entry.route) == ("gpt-sim", "sim", "/v1/chat/completions")
    assert entry.finished_at is None


async def test_amounts_are_exact_across_the_int64_range(store: Store) -> None:
    # Above 2**53 a float ledger would round; the ledger must not.
    big = 2**62
    lines = [agent_line(period="total", limit=big + 5), org_line(period="total", limit=2**63 - 1)]
    assert (await reserve(store, "r1", big, lines)).ok
    assert not (await reserve(store, "r2", 6, lines)).ok
    assert (await reserve(store, "r3", 5, lines)).ok
    out = await finish(store, "r1", "actual", big + 3)
    assert (out.charged, out.refund, out.overage, out.reserved) == (big + 3, 0, 3, big)
    assert (await states(store, lines))[lines[0].key] == LineState(big + 3, 5)


async def test_limits_beyond_int64_are_budgets_like_any_other(store: Store) -> None:
    # A .rgf budget may be far above what a line can hold ($20 billion is 2e19 nano-units, past
    # int64): it must admit calls like any other budget, not fail every call.
    lines = [agent_line(limit=2 * 10**19), org_line(limit=10**27)]
    out = await reserve(store, "r1", 2**62, lines)
    assert out.ok and out.states[lines[0].key] == LineState(0, 2**62)
    settled = await finish(store, "r1", "actual", 7)
    assert settled.settled and settled.charged == 7
    assert (await states(store, lines))[lines[1].key] == LineState(7, 0)


async def test_reservation_without_lines(store: Store) -> None:
    out = await reserve(store, "r1", 10, [])
    assert out.ok and out.states == {}
    settled = await finish(store, "r1", "actual", 4)
    assert settled.settled and settled.charged == 4


# -- settle ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["actual", "estimated", "release", "expire_charge", "expire_release"])
async def test_settle_matches_the_budget_math(store: Store, kind: SettleKind) -> None:
    lines = [agent_line(limit=10_000), org_line(limit=10_000)]
    for i, amount in enumerate((0, 1, 99, 100, 107)):
        rid = f"r{i}"
        assert (await reserve(store, rid, 100, lines)).ok
        out = await finish(store, rid, kind, amount)
        want = settle(100, kind, amount)
        assert out.settled
        assert (out.charged, out.refund, out.overage, out.reserved) == (
            want.charged,
            want.refund,
            want.overage,
            100,
        )
    spent = sum(settle(100, kind, a).charged for a in (0, 1, 99, 100, 107))
    assert await states(store, lines) == {line.key: LineState(spent, 0) for line in lines}


async def test_settle_actual_refunds_the_rest_and_updates_the_audit(store: Store) -> None:
    lines = [agent_line(limit=1_000), org_line(limit=1_000)]
    await reserve(store, "r1", 100, lines)
    out = await finish(store, "r1", "actual", 30, input_tokens=12, output_tokens=3, upstream_request_id="up-1",
                       http_status=200, detail={"k": [1, 2]})  # fmt: skip
    assert (out.settled, out.charged, out.refund, out.overage, out.reserved) == (True, 30, 70, 0, 100)
    assert out.states == {line.key: LineState(30, 0) for line in lines}
    entry = await entry_of(store, "r1")
    assert (entry.status, entry.actual, entry.reserved) == ("completed", 30, 100)
    assert (entry.overage, entry.estimated, entry.expired) == (False, False, False)
    assert (entry.input_tokens, entry.output_tokens, entry.upstream_request_id) == (12, 3, "up-1")
    assert entry.http_status == 200 and entry.detail == {"k": [1, 2]}
    assert entry.finished_at is not None and entry.finished_at >= entry.started_at - 1


async def test_settle_estimated_never_charges_more_than_reserved(store: Store) -> None:
    lines = [agent_line()]
    await reserve(store, "r1", 100, lines)
    out = await finish(store, "r1", "estimated", 500, "estimated", reason="interrupted")
    assert (out.charged, out.refund, out.overage) == (100, 0, 0)
    entry = await entry_of(store, "r1")
    assert (entry.status, entry.estimated, entry.overage, entry.reason) == (
        "estimated",
        True,
        False,
        "interrupted",
    )
    await reserve(store, "r2", 100, lines)
    assert (await finish(store, "r2", "estimated", 40, "estimated")).charged == 40
    assert (await states(store, lines))[lines[0].key] == LineState(140, 0)


async def test_release_charges_nothing(store: Store) -> None:
    lines = [agent_line(), org_line()]
    await reserve(store, "r1", 100, lines)
    out = await finish(store, "r1", "release", 0, "upstream_error", reason="upstream_500", http_status=502)
    assert (out.charged, out.refund) == (0, 100)
    assert await states(store, lines) == {line.key: LineState(0, 0) for line in lines}
    entry = await entry_of(store, "r1")
    assert (entry.status, entry.actual, entry.reason, entry.http_status) == (
        "upstream_error",
        0,
        "upstream_500",
        502,
    )


async def test_overage_is_charged_and_flagged(store: Store) -> None:
    lines = [agent_line(limit=1_000), org_line(limit=1_000)]
    await reserve(store, "r1", 100, lines)
    out = await finish(store, "r1", "actual", 150)
    assert (out.charged, out.refund, out.overage) == (150, 0, 50)
    assert out.states == {line.key: LineState(150, 0) for line in lines}
    entry = await entry_of(store, "r1")
    assert entry.overage and entry.actual == 150


async def test_settle_is_idempotent(store: Store) -> None:
    lines = [agent_line(), org_line()]
    await reserve(store, "r1", 100, lines)
    first = await finish(store, "r1", "actual", 60)
    assert first.settled
    before = await states(store, lines)
    entry_before = await entry_of(store, "r1")
    for kind in ("actual", "release", "estimated", "expire_charge"):
        replay = await finish(store, "r1", kind, 999, "completed")
        assert replay == SettleOutcome(settled=False)
    assert await states(store, lines) == before
    assert await entry_of(store, "r1") == entry_before
    assert not (await finish(store, "never-reserved", "actual", 5)).settled


async def test_concurrent_settles_settle_once(store: Store) -> None:
    lines = [agent_line()]
    await reserve(store, "r1", 100, lines)
    outs = await asyncio.gather(*(finish(store, "r1", "actual", 10 + i) for i in range(10)))
    winners = [o for o in outs if o.settled]
    assert len(winners) == 1
    assert (await states(store, lines))[lines[0].key] == LineState(winners[0].charged, 0)


async def test_settled_budget_is_available_again(store: Store) -> None:
    lines = [agent_line(limit=100)]
    await reserve(store, "r1", 100, lines)
    assert not (await reserve(store, "r2", 50, lines)).ok
    await finish(store, "r1", "actual", 40)
    assert (await reserve(store, "r2", 60, lines)).ok
    assert not (await reserve(store, "r3", 1, lines)).ok


# -- leases ----------------------------------------------------------------------------------------


async def test_renew_extends_the_lease(store: Store) -> None:
    lines = [agent_line()]
    await reserve(store, "kept", 10, lines, ttl=0.3)
    await reserve(store, "lost", 20, lines, ttl=0.3)
    await store.renew(["kept", "unknown-id"], 30.0)
    await drain(store)
    await asyncio.sleep(0.45)
    assert await store.sweep("charge") == 1
    assert await states(store, lines) == {lines[0].key: LineState(20, 10)}
    assert (await finish(store, "kept", "actual", 7)).settled
    assert not (await finish(store, "lost", "actual", 7)).settled


@pytest.mark.parametrize("mode", ["charge", "release"])
async def test_sweep_settles_expired_leases(store: Store, mode: str) -> None:
    lines = [agent_line(), org_line()]
    await reserve(store, "live", 30, lines, ttl=60)
    assert await store.sweep(mode) == 0  # type: ignore[arg-type]
    await reserve(store, "old", 100, lines, ttl=0.2)
    await asyncio.sleep(0.35)
    assert await store.sweep(mode) == 1  # type: ignore[arg-type]
    assert await store.sweep(mode) == 0  # type: ignore[arg-type]
    charged = 100 if mode == "charge" else 0
    assert await states(store, lines) == {line.key: LineState(charged, 30) for line in lines}
    entry = await entry_of(store, "old")
    assert (entry.status, entry.expired, entry.actual, entry.reason) == ("expired", True, charged,
                                                                          "reservation_expired")  # fmt: skip
    assert not (await finish(store, "old", "actual", 5)).settled
    assert (await store.totals()).open_reservations == 1


async def test_concurrent_sweeps_settle_each_reservation_once(store: Store) -> None:
    lines = [agent_line(limit=10**9), org_line(limit=10**9)]
    amounts = [7 * i + 1 for i in range(25)]
    for i, amount in enumerate(amounts):
        assert (await reserve(store, f"r{i}", amount, lines, ttl=0.2)).ok
    await asyncio.sleep(0.35)
    counts = await asyncio.gather(*(store.sweep("charge") for _ in range(6)))
    assert sum(counts) == len(amounts)
    assert await states(store, lines) == {line.key: LineState(sum(amounts), 0) for line in lines}
    totals = await store.totals()
    assert (totals.open_reservations, totals.reserved_total) == (0, 0)
    assert totals.audit_actual_by_agent == {(ORG, "hermes"): sum(amounts)}


# -- hierarchy and windows -------------------------------------------------------------------------


async def test_two_agents_share_the_org_line(store: Store) -> None:
    org_daily = org_line(limit=100)
    a_lines = [agent_line("alpha", limit=80), org_daily]
    b_lines = [agent_line("beta", limit=80), org_daily]
    assert (await reserve(store, "a1", 60, a_lines, agent="alpha")).ok
    refused = await reserve(store, "b1", 50, b_lines, agent="beta")
    assert not refused.ok and refused.refused == org_daily
    assert (await reserve(store, "b2", 40, b_lines, agent="beta")).ok
    assert (await states(store, [org_daily]))[org_daily.key] == LineState(0, 100)
    await finish(store, "a1", "actual", 25)
    await finish(store, "b2", "actual", 35)
    got = await states(store, [a_lines[0], b_lines[0], org_daily])
    assert got == {
        a_lines[0].key: LineState(25, 0),
        b_lines[0].key: LineState(35, 0),
        org_daily.key: LineState(60, 0),
    }
    totals = await store.totals()
    assert totals.audit_actual_by_agent == {(ORG, "alpha"): 25, (ORG, "beta"): 35}


async def test_orgs_are_separate_ledgers(store: Store) -> None:
    a = org_line(limit=100, org="org-a")
    b = org_line(limit=100, org="org-b")
    assert (await reserve(store, "a1", 100, [a], org="org-a")).ok
    assert (await reserve(store, "b1", 100, [b], org="org-b")).ok
    assert (await store.line_states("org-a", [a.key]))[a.key] == LineState(0, 100)
    assert (await store.line_states("org-b", [b.key]))[b.key] == LineState(0, 100)
    assert (await store.line_states("org-c", [a.key]))[a.key] == LineState()


async def test_windows_are_separate_lines(store: Store) -> None:
    today = agent_line(limit=100, start=DAY)
    tomorrow = agent_line(limit=100, start=DAY + 86_400)
    hourly = agent_line(period="hourly", limit=100, start=DAY)
    assert today.key != tomorrow.key
    assert (await reserve(store, "r1", 100, [today, hourly])).ok
    assert not (await reserve(store, "r2", 1, [today])).ok
    assert (await reserve(store, "r3", 100, [tomorrow])).ok
    got = await states(store, [today, tomorrow, hourly])
    assert got == {
        today.key: LineState(0, 100),
        tomorrow.key: LineState(0, 100),
        hourly.key: LineState(0, 100),
    }


# -- concurrency -----------------------------------------------------------------------------------


async def test_concurrent_reserves_are_serializable(store: Store) -> None:
    """200 concurrent reserves of random amounts: the outcome equals some sequential run."""
    rng = random.Random(4)
    limit = 10_000
    line = org_line(limit=limit)
    amounts = [rng.randint(1, 300) for _ in range(200)]
    outs = await asyncio.gather(*(reserve(store, f"r{i}", a, [line]) for i, a in enumerate(amounts)))
    events: list[tuple[int, int, int, bool]] = []  # (used before, refusal first, amount, ok)
    for amount, out in zip(amounts, outs, strict=True):
        used = out.states[line.key].used
        if out.ok:
            events.append((used - amount, 1, amount, True))
        else:
            assert out.refused == line
            events.append((used, 0, amount, False))
    events.sort()
    # Replay the order the store's states reveal through a sequential model: same decisions, exactly.
    used = 0
    for before, _, amount, ok in events:
        assert before == used, "states do not form one serial history"
        fits = used + amount <= limit
        assert fits == ok
        used += amount if ok else 0
    assert used <= limit
    assert (await states(store, [line]))[line.key] == LineState(0, used)
    assert sum(o.ok for o in outs) == sum(1 for e in events if e[3])
    totals = await store.totals()
    assert totals.reserved_total == used and totals.open_reservations == sum(o.ok for o in outs)


async def test_concurrent_equal_reserves_admit_exactly_the_limit(store: Store) -> None:
    lines = [agent_line(limit=10_000), org_line(limit=10**9)]
    outs = await asyncio.gather(*(reserve(store, f"r{i}", 70, lines) for i in range(200)))
    assert sum(o.ok for o in outs) == 10_000 // 70
    await asyncio.gather(*(finish(store, f"r{i}", "actual", 70) for i, o in enumerate(outs) if o.ok))
    assert (await states(store, lines))[lines[0].key] == LineState(70 * (10_000 // 70), 0)


# -- audit -----------------------------------------------------------------------------------------


async def test_audit_trail_matches_the_ledger(store: Store) -> None:
    rng = random.Random(9)
    total = org_line(period="total", limit=10**12)
    agents = ["alpha", "beta", "gamma"]
    lines = {
        a: [agent_line(a, period="total", limit=10**12), agent_line(a, limit=3_000), total] for a in agents
    }
    kinds: list[SettleKind] = ["actual", "estimated", "release"]
    expiring = []
    for i in range(60):
        agent = agents[i % 3]
        rid = f"r{i}"
        amount = rng.randint(100, 400)
        out = await reserve(store, rid, amount, lines[agent], agent=agent, ttl=0.2 if i % 10 == 0 else 60)
        if not out.ok:
            await store.record(AuditEntry(request_id=rid, org=ORG, agent=agent, status="denied",
                                          reason=out.refused.reason if out.refused else None, http_status=403,
                                          started_at=time.time(), finished_at=time.time()))  # fmt: skip
        elif i % 10 == 0:
            expiring.append(rid)
        else:
            await finish(store, rid, kinds[i % 3], rng.randint(0, 500))
    await asyncio.sleep(0.35)
    assert await store.sweep("charge") == len(expiring)
    await drain(store)

    totals = await store.totals()
    assert (totals.reserved_total, totals.open_reservations, totals.audit_count) == (0, 0, 60)
    by_agent = totals.audit_actual_by_agent
    got = await states(store, [total, *(lines[a][0] for a in agents)])
    assert got[total.key] == LineState(sum(by_agent.values()), 0)
    for a in agents:
        assert got[lines[a][0].key] == LineState(by_agent.get((ORG, a), 0), 0)
    rows = await store.audit(AuditQuery(org=ORG, limit=1_000))
    assert len(rows) == 60
    assert sum(e.actual for _, e in rows) == got[total.key].spent
    assert all(e.status != "in_flight" for _, e in rows)
    assert any(e.status == "denied" for _, e in rows)
    assert {e.request_id for _, e in rows if e.expired} == set(expiring)


async def test_audit_queries_are_scoped_filtered_and_paged(store: Store) -> None:
    line_a = org_line(org="org-a", limit=10**9)
    line_b = org_line(org="org-b", limit=10**9)
    for i in range(6):
        await reserve(store, f"a{i}", 10, [line_a], org="org-a", agent="alpha" if i % 2 else "beta")
        await reserve(store, f"b{i}", 10, [line_b], org="org-b", agent="alpha")
    await finish(store, "a1", "actual", 3)
    await store.record(AuditEntry(request_id="a-denied", org="org-a", agent="alpha", status="denied",
                                  reason="daily_budget_exceeded", http_status=403, started_at=time.time()))  # fmt: skip
    await drain(store)

    rows = await store.audit(AuditQuery(org="org-a", limit=100))
    assert [e.request_id for _, e in rows] == [*(f"a{i}" for i in range(6)), "a-denied"]
    seqs = [s for s, _ in rows]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    assert all(e.org == "org-a" for _, e in rows)

    alpha = await store.audit(AuditQuery(org="org-a", agent="alpha"))
    assert [e.request_id for _, e in alpha] == ["a1", "a3", "a5", "a-denied"]
    done = await store.audit(AuditQuery(org="org-a", status="completed"))
    assert [e.request_id for _, e in done] == ["a1"]
    denied = await store.audit(AuditQuery(org="org-a", status="denied"))
    assert [(e.reason, e.http_status) for _, e in denied] == [("daily_budget_exceeded", 403)]

    # Paging on the cursor returns every entry exactly once, in order.
    page, cursor, seen = 0, 0, []
    while page < 20:
        chunk = await store.audit(AuditQuery(org="org-a", after_seq=cursor, limit=2))
        if not chunk:
            break
        seen += [e.request_id for _, e in chunk]
        cursor = chunk[-1][0]
        page += 1
    assert seen == [e.request_id for _, e in rows]

    # The admin (org None) sees every org; its cursor pages the merged trail without loss.
    everything = await store.audit(AuditQuery(org=None, limit=100))
    assert {e.request_id for _, e in everything} == {*(f"a{i}" for i in range(6)), "a-denied",
                                                     *(f"b{i}" for i in range(6))}  # fmt: skip
    admin_seen: list[str] = []
    cursor = 0
    for _ in range(30):
        chunk = await store.audit(AuditQuery(org=None, after_seq=cursor, limit=3))
        if not chunk:
            break
        admin_seen += [e.request_id for _, e in chunk]
        cursor = chunk[-1][0]
    assert sorted(admin_seen) == sorted(e.request_id for _, e in everything)
    assert await store.audit(AuditQuery(org="org-b", status="denied")) == []
    assert await store.audit(AuditQuery(org="nobody")) == []


async def test_audit_time_filters(store: Store) -> None:
    for i, started in enumerate((100.0, 200.0, 300.0)):
        await store.record(AuditEntry(request_id=f"x{i}", org=ORG, agent="hermes", status="denied",
                                      started_at=started))  # fmt: skip
    await drain(store)
    rows = await store.audit(AuditQuery(org=ORG, since=150.0, until=300.0))
    assert [e.request_id for _, e in rows] == ["x1"]


# -- keys ------------------------------------------------------------------------------------------


def key(key_id: str, org: str, **extra: object) -> ApiKeyRecord:
    return ApiKeyRecord(key_id=key_id, key_hash="h-" + key_id, org=org, name=f"{key_id} name",
                        scopes=("proxy", "read"), created_at=1000.0 + len(key_id), prefix="rgf_" + key_id[:4],
                        **extra)  # type: ignore[arg-type]  # fmt: skip


async def test_api_keys_are_scoped_by_org(store: Store) -> None:
    k1 = key("k1", "org-a", agent_id="hermes", expires_at=5000.5)
    k2 = key("k2", "org-b")
    k3 = key("k3", "org-a")
    for record in (k1, k2, k3):
        await store.put_api_key(record)
    assert await store.get_api_key("h-k1") == k1
    assert await store.get_api_key("h-nope") is None
    assert [r.key_id for r in await store.list_api_keys("org-a")] == ["k1", "k3"]
    assert [r.key_id for r in await store.list_api_keys("org-b")] == ["k2"]
    assert sorted(r.key_id for r in await store.list_api_keys(None)) == ["k1", "k2", "k3"]
    assert await store.list_api_keys("org-c") == []

    assert not await store.revoke_api_key("org-b", "k1")  # not org-b's key
    assert (await store.get_api_key("h-k1")) == k1
    assert await store.revoke_api_key("org-a", "k1")
    assert not await store.revoke_api_key("org-a", "k1")  # already revoked
    revoked = await store.get_api_key("h-k1")
    assert revoked is not None and revoked.revoked_at is not None
    assert await store.revoke_api_key(None, "k2")  # the admin revokes any org's key
    assert not await store.revoke_api_key(None, "missing")
    assert (await store.get_api_key("h-k3")) == k3

    with pytest.raises(StoreError):
        await store.put_api_key(key("k1", "org-b"))
    with pytest.raises(StoreError):
        await store.put_api_key(ApiKeyRecord("k9", "h-k2", "org-a", "dup hash", ()))
    assert [r.key_id for r in await store.list_api_keys("org-b")] == ["k2"]
