"""The governance half of the Store contract, on SQLite and Redis alike."""

from __future__ import annotations

import asyncio
import time

from resgov.core.budget import BudgetLine
from resgov.ledger.store import AuditEntry, AuditQuery, GovRecord, ReserveRequest, SettleRequest, Store


async def drain(store: Store) -> None:
    flush = getattr(store, "flush", None)
    if flush is not None:
        await flush()


async def test_governance_records_versions_and_conditional_writes(store: Store) -> None:
    v0, records = await store.gov_load()
    assert records == [] and await store.gov_version() == v0
    assert await store.gov_put(GovRecord("acme", "agent", "bot", {"gen": "a", "n": [1, 2]}))
    v1 = await store.gov_version()
    assert v1 > v0
    assert not await store.gov_put(GovRecord("acme", "agent", "bot", {"gen": "b"}), if_absent=True)
    assert await store.gov_version() == v1  # nothing written, nothing announced
    assert await store.gov_put(GovRecord("beta", "agent", "bot", {"gen": "c"}), if_absent=True)
    assert await store.gov_put(GovRecord("acme", "agent", "bot", {"gen": "d"}))  # replace
    version, records = await store.gov_load()
    assert version > v1
    got = {(r.org, r.kind, r.key): dict(r.data) for r in records}
    assert got == {("acme", "agent", "bot"): {"gen": "d"}, ("beta", "agent", "bot"): {"gen": "c"}}
    assert await store.gov_delete("acme", "agent", "bot")
    assert not await store.gov_delete("acme", "agent", "bot")
    assert not await store.gov_delete("gamma", "agent", "bot")
    _, records = await store.gov_load()
    assert [(r.org, r.key) for r in records] == [("beta", "bot")]


async def test_concurrent_creations_of_one_agent_have_one_winner(store: Store) -> None:
    results = await asyncio.gather(
        *(
            store.gov_put(GovRecord("acme", "agent", "dup", {"gen": str(i)}), if_absent=True)
            for i in range(20)
        )
    )
    assert sum(results) == 1


async def test_idempotency_claims(store: Store) -> None:
    claim = await store.idem_claim("acme", "k1", "fp", "owner-1", 30, 60)
    assert claim.state == "claimed" and claim.previous_owner is None
    assert (await store.idem_claim("acme", "k1", "fp", "owner-2", 30, 60)).state == "in_flight"
    assert (await store.idem_claim("acme", "k1", "other", "owner-2", 30, 60)).state == "mismatch"
    # Keys are per org: another org's identical key is unrelated.
    assert (await store.idem_claim("beta", "k1", "other", "owner-3", 30, 60)).state == "claimed"
    assert not await store.idem_complete("acme", "k1", "owner-2", 200, '{"x":1}', 60)  # not the owner
    assert await store.idem_complete("acme", "k1", "owner-1", 200, '{"x":1}', 60)
    done = await store.idem_claim("acme", "k1", "fp", "owner-4", 30, 60)
    assert (done.state, done.status, done.body) == ("done", 200, '{"x":1}')
    assert (await store.idem_claim("acme", "k1", "nope", "owner-4", 30, 60)).state == "mismatch"
    # Released claims free the key; a done one cannot be released.
    assert (await store.idem_claim("acme", "k2", "fp", "o1", 30, 60)).state == "claimed"
    assert not await store.idem_release("acme", "k2", "o2")
    assert await store.idem_release("acme", "k2", "o1")
    assert (await store.idem_claim("acme", "k2", "fp", "o3", 30, 60)).state == "claimed"
    assert not await store.idem_release("acme", "k1", "owner-1")


async def test_a_dead_claim_is_taken_over_naming_its_owner_and_keys_expire(store: Store) -> None:
    assert (await store.idem_claim("acme", "k", "fp", "dead", 0.05, 60)).state == "claimed"
    await asyncio.sleep(0.1)
    claim = await store.idem_claim("acme", "k", "fp", "alive", 30, 60)
    assert (claim.state, claim.previous_owner) == ("claimed", "dead")
    assert not await store.idem_complete("acme", "k", "dead", 200, "{}", 60)  # the old owner lost it
    assert await store.idem_complete("acme", "k", "alive", 200, "{}", 0.05)
    await asyncio.sleep(0.1)
    assert (await store.idem_claim("acme", "k", "other-body", "new", 30, 60)).state == "claimed"


def _line(org: str) -> BudgetLine:
    return BudgetLine(org, "agent", "bot", "total", 10**12, 0, None)


async def _reserve(store: Store, org: str, rid: str, started: float) -> None:
    entry = AuditEntry(request_id=rid, org=org, agent="bot", kind="booking", started_at=started)
    outcome = await store.reserve(ReserveRequest(rid, org, "bot", 5, [_line(org)], 60, entry))
    assert outcome.ok


async def test_get_audit_is_scoped_to_the_org(store: Store) -> None:
    await _reserve(store, "acme", "r1", time.time())
    entry = await store.get_audit("acme", "r1")
    assert entry is not None and entry.status == "in_flight" and entry.reserved == 5
    assert await store.get_audit("beta", "r1") is None
    assert await store.get_audit("acme", "nope") is None
    await store.settle(SettleRequest("r1", "actual", 3, "completed"))
    entry = await store.get_audit("acme", "r1")
    assert entry is not None and (entry.status, entry.actual) == ("completed", 3)


async def test_audit_newest_first_with_cursor_and_filters(store: Store) -> None:
    for i in range(7):
        await store.record(AuditEntry(request_id=f"a{i}", org="acme", agent="bot" if i % 2 else "other",
                                      status="denied", started_at=1000.0 + i))  # fmt: skip
    await store.record(AuditEntry(request_id="b0", org="beta", agent="bot", status="denied", started_at=1.0))
    await drain(store)
    rows = await store.audit_desc(AuditQuery(org="acme", limit=3), None)
    assert [e.request_id for _, e in rows] == ["a6", "a5", "a4"]
    rows2 = await store.audit_desc(AuditQuery(org="acme", limit=10), rows[-1][0])
    assert [e.request_id for _, e in rows2] == ["a3", "a2", "a1", "a0"]
    bot = await store.audit_desc(AuditQuery(org="acme", agent="bot", limit=10), None)
    assert [e.request_id for _, e in bot] == ["a5", "a3", "a1"]
    window = await store.audit_desc(AuditQuery(org="acme", since=1002, until=1005, limit=10), None)
    assert [e.request_id for _, e in window] == ["a4", "a3", "a2"]
    everyone = await store.audit_desc(AuditQuery(org=None, limit=100), None)
    assert {e.request_id for _, e in everyone} >= {"a0", "b0"}


async def test_purge_deletes_old_finished_records_only(store: Store) -> None:
    # Real timestamps: Redis finds candidates by their sequence, which is the write time.
    await _reserve(store, "acme", "old-open", time.time())  # in flight: must survive any purge
    await _reserve(store, "acme", "old-done", time.time())
    await store.settle(SettleRequest("old-done", "actual", 1, "completed"))
    for rid, org in (("old-denied", "acme"), ("beta-old", "beta")):
        await store.record(
            AuditEntry(request_id=rid, org=org, agent="bot", status="denied", started_at=time.time())
        )
    await drain(store)
    await asyncio.sleep(0.05)
    cutoff = time.time()
    await asyncio.sleep(0.05)
    await store.record(
        AuditEntry(request_id="new", org="acme", agent="bot", status="denied", started_at=time.time())
    )
    await drain(store)
    assert await store.purge_audit("acme", cutoff) == 2
    await drain(store)
    left = {e.request_id for _, e in await store.audit(AuditQuery(org=None, limit=100))}
    assert left == {"old-open", "new", "beta-old"}
    by_agent = {e.request_id for _, e in await store.audit(AuditQuery(org="acme", agent="bot", limit=100))}
    assert by_agent == {"old-open", "new"}
    assert await store.purge_audit(None, cutoff) == 1  # beta's
    assert await store.purge_audit(None, cutoff) == 0
    await store.settle(SettleRequest("old-open", "release", 0, "released"))
