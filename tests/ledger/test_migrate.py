"""``resgov store migrate`` / ``check``: a real ledger moved both ways, verified, and nothing lost.

The data is made through the Store API (reservations, every kind of settlement, overage,
refusals, open reservations with time left on their lease, API keys), never written by hand.
"""

from __future__ import annotations

import asyncio
import random
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from resgov.core.budget import BudgetLine, LineState, SettleKind
from resgov.ledger import migrate as migrate_mod
from resgov.ledger.migrate import (
    MigrationError,
    check,
    check_snapshot,
    compare,
    migrate,
    open_store,
    read_snapshot,
    sums,
)
from resgov.ledger.redis import RedisStore
from resgov.ledger.sqlite import SQLiteStore
from resgov.ledger.store import (
    ApiKeyRecord,
    AuditEntry,
    AuditQuery,
    GovRecord,
    ReserveRequest,
    SettleRequest,
    Store,
)
from tests.ledger.conftest import REDIS_URL, delete_prefix, new_prefix, require_redis

DAY = 1_700_000_000
ORGS = ("acme", "beta.org")
AGENTS = ("hermes", "iris:bot")
LONG_TTL = 120.0


def lines_of(org: str, agent: str) -> list[BudgetLine]:
    return [
        BudgetLine(org, "agent", agent, "daily", 60_000, DAY, DAY + 86_400),
        BudgetLine(org, "agent", agent, "total", 10**12, 0, None),
        BudgetLine(org, "org", None, "daily", 90_000, DAY, DAY + 86_400),
        BudgetLine(org, "org", None, "total", 10**12, 0, None),
    ]


def redis_url(prefix: str) -> str:
    return f"{REDIS_URL}{'&' if '?' in REDIS_URL else '?'}prefix={prefix}"


async def populate(store: Store, seed: int, *, short_lease: bool = False) -> dict[str, Any]:
    """Real traffic through the Store API; returns what was left open."""
    rng = random.Random(seed)
    kinds: list[SettleKind] = ["actual", "actual", "estimated", "release", "actual"]
    open_ids: list[str] = []
    n = 0
    for org in ORGS:
        for agent in AGENTS:
            lines = lines_of(org, agent)
            for i in range(14):
                n += 1
                rid = f"{org}-{agent}-{i}"
                amount = rng.randint(500, 9_000)
                entry = AuditEntry(request_id=rid, org=org, agent=agent, route="/v1/chat/completions",
                                   model="gpt-sim", provider="sim", started_at=time.time())  # fmt: skip
                outcome = await store.reserve(ReserveRequest(rid, org, agent, amount, lines, LONG_TTL, entry))
                if not outcome.ok:
                    await store.record(AuditEntry(request_id=rid, org=org, agent=agent, status="denied",
                                                  reason="daily_budget_exceeded", http_status=403,
                                                  started_at=time.time(), finished_at=time.time()))  # fmt: skip
                    continue
                if i % 5 == 4:
                    open_ids.append(rid)  # left in flight, lease running
                    continue
                kind = kinds[i % len(kinds)]
                # Some actual costs above the reservation: overage, charged and flagged.
                cost = rng.randint(0, amount * 2) if kind == "actual" else rng.randint(0, amount)
                detail = {"note": f"call {n}"} if i % 3 == 0 else None
                await store.settle(SettleRequest(rid, kind, cost, "completed" if kind != "release" else
                                                 "upstream_error", http_status=200, input_tokens=rng.randint(1, 99),
                                                 output_tokens=rng.randint(1, 99),
                                                 upstream_request_id=f"up-{n}", detail=detail))  # fmt: skip
    if short_lease:
        entry = AuditEntry(request_id="short", org="acme", agent="hermes", started_at=time.time())
        lines = lines_of("acme", "hermes")
        assert (await store.reserve(ReserveRequest("short", "acme", "hermes", 700, lines, 1.0, entry))).ok
        open_ids.append("short")
    now = time.time()
    keys = [
        ApiKeyRecord("key_a1", "hash-a1", "acme", "ci", ("proxy",), created_at=now - 10, prefix="rgf_aaaaaa"),
        ApiKeyRecord("key_a2", "hash-a2", "acme", "bot", ("proxy", "read"), agent_id="hermes",
                     created_at=now - 5, expires_at=now + 3600, prefix="rgf_bbbbbb"),
        ApiKeyRecord("key_b1", "hash-b1", "beta.org", "ops", ("proxy", "read", "write"), created_at=now - 1,
                     prefix="rgf_cccccc"),
    ]  # fmt: skip
    for key in keys:
        await store.put_api_key(key)
    assert await store.revoke_api_key("beta.org", "key_b1")
    # Orgs, agents and budget settings registered through the API (governance records).
    for record in (
        GovRecord(
            "acme", "agent", "newbot", {"daily_budget": "1.50", "allowed_models": ["gpt-sim"]}, now - 3
        ),
        GovRecord("acme", "budget", "o:daily", {"limit": "12.00"}, now - 2),
        GovRecord("beta.org", "org", "beta.org", {"name": "Beta"}, now - 1),
    ):
        assert await store.gov_put(record)
    flush = getattr(store, "flush", None)
    if flush is not None:
        await flush()
    return {"open": open_ids}


@pytest_asyncio.fixture
async def urls(tmp_path: Path) -> AsyncIterator[Callable[[str], str]]:
    """``urls("sqlite")`` / ``urls("redis")``: fresh ledgers (Redis prefixes cleaned up afterwards)."""
    prefixes: list[str] = []
    count = [0]

    def make(kind: str) -> str:
        count[0] += 1
        if kind == "sqlite":
            return f"sqlite:///{tmp_path / f'ledger-{count[0]}.db'}"
        require_redis()
        prefix = new_prefix()
        prefixes.append(prefix)
        return redis_url(prefix)

    try:
        yield make
    finally:
        for prefix in prefixes:
            await delete_prefix(prefix)


async def opened(url: str) -> Store:
    store = await open_store(url)
    return store


async def snapshot_of(url: str) -> migrate_mod.Snapshot:
    store = await opened(url)
    try:
        return await read_snapshot(store)
    finally:
        await store.close()


async def assert_same_through_api(a_url: str, b_url: str) -> None:
    a, b = await opened(a_url), await opened(b_url)
    try:
        ta, tb = await a.totals(), await b.totals()
        assert (ta.reserved_total, ta.open_reservations, ta.audit_count) == (
            tb.reserved_total, tb.open_reservations, tb.audit_count,
        )  # fmt: skip
        assert dict(ta.audit_actual_by_agent) == dict(tb.audit_actual_by_agent)
        for org in ORGS:
            keys = [line.key for agent in AGENTS for line in lines_of(org, agent)]
            assert await a.line_states(org, keys) == await b.line_states(org, keys)
            ea = [e.public() for _, e in await a.audit(AuditQuery(org=org, limit=10_000))]
            eb = [e.public() for _, e in await b.audit(AuditQuery(org=org, limit=10_000))]
            for e in ea + eb:
                e["detail"] = e["detail"] or None
            assert ea == eb  # same records, same order
        assert sorted(await a.list_api_keys(None), key=repr) == sorted(await b.list_api_keys(None), key=repr)
        gov_a, gov_b = (await a.gov_load())[1], (await b.gov_load())[1]
        assert len(gov_a) == 3 and sorted(gov_a, key=repr) == sorted(gov_b, key=repr)
        key = await b.get_api_key("hash-b1")
        assert key is not None and key.revoked_at is not None
    finally:
        await a.close()
        await b.close()


@pytest.mark.redis
@pytest.mark.parametrize(("src_kind", "dst_kind"), [("sqlite", "redis"), ("redis", "sqlite")])
async def test_migration_moves_everything_and_verifies(
    urls: Callable[[str], str], src_kind: str, dst_kind: str
) -> None:
    src_url, dst_url = urls(src_kind), urls(dst_kind)
    src = await opened(src_url)
    try:
        made = await populate(src, seed=11)
    finally:
        await src.close()
    before = await snapshot_of(src_url)
    assert len(before.audit) > 40 and len(before.reservations) == len(made["open"]) > 0
    assert any(e.overage for _, e in before.audit) and any(e.status == "denied" for _, e in before.audit)

    report = await migrate(src_url, dst_url)

    assert report.ok, report.problems
    assert report.source == report.destination == sums(before)
    total = sum(s.audit_actual for s in report.source.values())
    assert total > 0 and sum(s.keys for s in report.destination.values()) == 3
    assert sum(s.governance for s in report.destination.values()) == 3
    after = await snapshot_of(dst_url)
    assert compare(before, after) == []
    await assert_same_through_api(src_url, dst_url)
    assert check_snapshot(after).ok, check_snapshot(after).errors


@pytest.mark.redis
@pytest.mark.parametrize("dst_kind", ["redis", "sqlite"])
async def test_open_reservations_keep_their_lease_and_settle_once_on_the_destination(
    urls: Callable[[str], str], dst_kind: str
) -> None:
    src_kind = "sqlite" if dst_kind == "redis" else "redis"
    src_url, dst_url = urls(src_kind), urls(dst_kind)
    src = await opened(src_url)
    try:
        made = await populate(src, seed=5, short_lease=True)
    finally:
        await src.close()
    assert (await migrate(src_url, dst_url)).ok
    moved = {r.id: r for r in (await snapshot_of(dst_url)).reservations}
    assert set(moved) == set(made["open"])
    assert 0 < moved["short"].lease_left <= 1.0
    assert all(LONG_TTL - 30 < r.lease_left <= LONG_TTL for rid, r in moved.items() if rid != "short")

    dst = await opened(dst_url)
    try:
        # A lease that still has time is not swept; the short one is, once, after its time.
        assert await dst.sweep("charge") == 0
        await asyncio.sleep(1.3)
        assert await dst.sweep("charge") == 1
        assert await dst.sweep("charge") == 0
        # Settling a migrated reservation works from the destination, once, with the same math.
        rid = next(r for r in made["open"] if r != "short")
        res = moved[rid]
        keys = list(res.keys)
        before = await dst.line_states(res.org, keys)
        first = await dst.settle(SettleRequest(rid, "actual", 123, "completed"))
        again = await dst.settle(SettleRequest(rid, "actual", 123, "completed"))
        assert first.settled and not again.settled
        assert first.reserved == res.amount and first.charged == 123
        after = await dst.line_states(res.org, keys)
        assert after == {k: LineState(s.spent + 123, s.reserved - res.amount) for k, s in before.items()}
        entry = next(
            e for _, e in await dst.audit(AuditQuery(org=res.org, limit=10_000)) if e.request_id == rid
        )
        assert (entry.status, entry.actual, entry.reserved) == ("completed", 123, res.amount)
    finally:
        await dst.close()
    assert check_snapshot(await snapshot_of(dst_url)).ok


@pytest.mark.redis
async def test_round_trip_keeps_every_record_and_the_audit_order(urls: Callable[[str], str]) -> None:
    a, b, c = urls("sqlite"), urls("redis"), urls("sqlite")
    store = await opened(a)
    try:
        await populate(store, seed=3)
    finally:
        await store.close()
    assert (await migrate(a, b)).ok
    assert (await migrate(b, c)).ok
    first, last = await snapshot_of(a), await snapshot_of(c)
    assert compare(first, last) == []
    assert [e.request_id for _, e in first.audit] == [e.request_id for _, e in last.audit]
    assert [s for s, _ in first.audit] == [s for s, _ in last.audit]  # SQLite's sequence survives Redis
    # New records on the destination sort after the migrated ones.
    store = await opened(b)
    try:
        await store.record(AuditEntry(request_id="later", org="acme", agent="hermes", status="denied"))
        rows = await store.audit(AuditQuery(org="acme", limit=10_000))
        assert rows[-1][1].request_id == "later"
    finally:
        await store.close()


@pytest.mark.redis
@pytest.mark.parametrize("dst_kind", ["redis", "sqlite"])
async def test_a_non_empty_destination_is_refused_unless_forced(
    urls: Callable[[str], str], dst_kind: str
) -> None:
    src_url, dst_url = urls("sqlite" if dst_kind == "redis" else "redis"), urls(dst_kind)
    for url, seed in ((src_url, 1), (dst_url, 2)):
        store = await opened(url)
        try:
            await populate(store, seed=seed)
        finally:
            await store.close()
    dst_before = await snapshot_of(dst_url)
    with pytest.raises(MigrationError, match="not empty"):
        await migrate(src_url, dst_url)
    assert compare(dst_before, await snapshot_of(dst_url)) == []  # untouched
    report = await migrate(src_url, dst_url, force=True)
    assert report.ok, report.problems
    assert compare(await snapshot_of(src_url), await snapshot_of(dst_url)) == []  # replaced, not merged


@pytest.mark.redis
async def test_a_lossy_copy_is_caught(urls: Callable[[str], str], monkeypatch: pytest.MonkeyPatch) -> None:
    src_url, dst_url = urls("sqlite"), urls("redis")
    store = await opened(src_url)
    try:
        await populate(store, seed=8)
    finally:
        await store.close()
    real = migrate_mod._redis_write

    async def lossy(dst: RedisStore, snap: migrate_mod.Snapshot, force: bool) -> None:
        snap = migrate_mod.Snapshot(snap.backend, snap.lines, snap.reservations, snap.audit[1:], snap.keys)
        await real(dst, snap, force)

    monkeypatch.setattr(migrate_mod, "_redis_write", lossy)
    report = await migrate(src_url, dst_url)
    assert not report.ok
    text = "\n".join(report.problems)
    assert "audit record: missing in destination" in text and "totals().audit_count" in text


async def test_a_missing_source_is_refused(tmp_path: Path) -> None:
    with pytest.raises(MigrationError, match="no SQLite ledger"):
        await migrate(f"sqlite:///{tmp_path / 'nope.db'}", f"sqlite:///{tmp_path / 'dst.db'}")
    with pytest.raises(MigrationError, match="same ledger"):
        await migrate("sqlite:///x.db", "sqlite:///x.db")


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
async def test_check_finds_broken_invariants(urls: Callable[[str], str], kind: str) -> None:
    url = urls(kind)
    store = await opened(url)
    try:
        await populate(store, seed=21)
    finally:
        await store.close()
    report = await check(url)
    assert report.ok, report.errors
    text = "\n".join(report.figures)
    assert "org acme:" in text and "total line = Σ audit actual" in text
    # Tamper: a line holding reserved spend no reservation explains, and spend no audit explains.
    store = await opened(url)
    try:
        if isinstance(store, SQLiteStore):
            path = store.path
            await store.close()
            conn = sqlite3.connect(path)
            conn.execute("UPDATE budget_line SET reserved = reserved + 5, spent = spent + 7 "
                         "WHERE org = 'acme' AND key = 'a:hermes:total:0'")  # fmt: skip
            conn.commit()
            conn.close()
        else:
            assert isinstance(store, RedisStore)
            line = store._line("acme", "a:hermes:total:0")
            await store._execute([("HINCRBY", line, "reserved", 5), ("HINCRBY", line, "spent", 7)])
            await store.close()
    except BaseException:
        await store.close()
        raise
    broken = await check(url)
    assert not broken.ok
    joined = "\n".join(broken.errors)
    assert "a:hermes:total:0: reserved" in joined and "more than its audit records" in joined


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "resgov.cli", "store", *args], capture_output=True, text=True,
                          timeout=60)  # fmt: skip


@pytest.mark.redis
async def test_cli_migrate_prints_the_figures_and_check_passes(urls: Callable[[str], str]) -> None:
    src_url, dst_url = urls("sqlite"), urls("redis")
    store = await opened(src_url)
    try:
        await populate(store, seed=4)
    finally:
        await store.close()
    expected = sums(await snapshot_of(src_url))
    r = await asyncio.to_thread(_cli, "migrate", "--from", src_url, "--to", dst_url)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "migration verified" in r.stdout and "MISMATCH" not in r.stdout
    spent = sum(s.spent for s in expected.values())
    assert any(
        row.startswith("(all)") and " spent " in row and str(spent) in row for row in r.stdout.splitlines()
    )
    again = await asyncio.to_thread(_cli, "migrate", "--from", src_url, "--to", dst_url)
    assert again.returncode == 2 and "not empty" in again.stderr
    ok = await asyncio.to_thread(_cli, "check", "--store", dst_url)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "invariants hold" in ok.stdout
