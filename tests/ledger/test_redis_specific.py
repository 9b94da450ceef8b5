"""What only the Redis ledger has: scripts, hash tags, persistence checks, several instances."""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis
from hypothesis import example, given, settings
from hypothesis import strategies as st
from redis.crc import key_slot
from redis.exceptions import ResponseError

from resgov.config.redis_url import DEFAULT_PREFIX
from resgov.core.budget import BudgetLine, LineState, SettleKind, first_misfit
from resgov.core.budget import settle as settle_math
from resgov.ledger import store_from_url
from resgov.ledger.redis import RedisStore, persistence_warning, split_url
from resgov.ledger.store import (
    ApiKeyRecord,
    AuditEntry,
    AuditQuery,
    ReserveOutcome,
    ReserveRequest,
    SettleRequest,
    StoreError,
)
from tests.ledger.conftest import REDIS_URL, delete_prefix, new_prefix, require_redis

pytestmark = pytest.mark.redis
ORG = "acme"
Factory = Callable[..., Awaitable[RedisStore]]


def line(limit: int = 10_000, org: str = ORG, agent: str | None = "hermes") -> BudgetLine:
    if agent is None:
        return BudgetLine(org, "org", None, "daily", limit, 1_700_000_000, 1_700_086_400)
    return BudgetLine(org, "agent", agent, "daily", limit, 1_700_000_000, 1_700_086_400)


def request(
    rid: str, amount: int, lines: list[BudgetLine], org: str = ORG, ttl: float = 60.0
) -> ReserveRequest:
    entry = AuditEntry(request_id=rid, org=org, agent="hermes", started_at=time.time())
    return ReserveRequest(rid, org, "hermes", amount, lines, ttl, entry)


async def raw_client(store: RedisStore) -> aioredis.Redis:
    return store._client  # the store's own connection pool: same server, same database


# -- URLs ------------------------------------------------------------------------------------------


def test_url_prefix_and_passthrough_options() -> None:
    assert split_url("redis://127.0.0.1:6379/0") == ("redis://127.0.0.1:6379/0", DEFAULT_PREFIX)
    url, prefix = split_url("rediss://u:p@h:6380/2?prefix=team-a&max_connections=10")
    assert prefix == "team-a" and url == "rediss://u:p@h:6380/2?max_connections=10"
    assert split_url("redis://h/0?prefix=team-a", "override")[1] == "override"
    for bad in ("", "a{b", "x}", "star*"):
        with pytest.raises(StoreError):
            split_url(f"redis://h/0?prefix={bad}")
    store = store_from_url("redis://127.0.0.1:6379/15?prefix=rg-url-test")
    assert isinstance(store, RedisStore) and store.prefix == "rg-url-test" and store.name == "redis"


# -- scripts ---------------------------------------------------------------------------------------


async def test_script_flush_between_calls_fails_no_request(redis_stores: Factory) -> None:
    store = await redis_stores()
    client = await raw_client(store)
    lines = [line(), line(agent=None)]
    assert (await store.reserve(request("r1", 100, lines, ttl=0.2))).ok
    await client.script_flush()
    assert (await store.reserve(request("r2", 50, lines))).ok
    await client.script_flush()
    assert (await store.settle(SettleRequest("r2", "actual", 20, "completed"))).settled
    await client.script_flush()
    await store.renew(["r2", "r1"], 0.2)
    await client.script_flush()
    await store.record(AuditEntry(request_id="d1", org=ORG, agent="hermes", status="denied"))
    await asyncio.sleep(0.35)
    await client.script_flush()
    assert await store.sweep("charge") == 1  # several orgs' scripts pipelined, all NOSCRIPT at once
    await client.script_flush()
    assert len(await store.audit(AuditQuery(org=ORG))) == 3
    assert await store.line_states(ORG, [x.key for x in lines]) == {x.key: LineState(120, 0) for x in lines}


async def test_scripts_are_loaded_at_open(redis_stores: Factory) -> None:
    store = await redis_stores()
    client = await raw_client(store)
    from resgov.ledger.redis import _SCRIPTS

    assert all(await client.script_exists(*(s.sha for s in _SCRIPTS)))


# -- key layout ------------------------------------------------------------------------------------


async def test_every_org_key_is_under_the_org_hash_tag(redis_stores: Factory) -> None:
    store = await redis_stores()
    p = store.prefix
    orgs = ["org-a", "org-b"]
    for org in orgs:
        lines = [line(org=org), line(org=org, agent=None)]
        assert (await store.reserve(request(f"{org}-1", 10, lines, org=org))).ok
        assert (await store.reserve(request(f"{org}-2", 10, lines, org=org, ttl=0.1))).ok
        assert not (await store.reserve(request(f"{org}-3", 10**6, lines, org=org))).ok
        await store.record(AuditEntry(request_id=f"{org}-3", org=org, agent="hermes", status="denied"))
        await store.settle(SettleRequest(f"{org}-1", "actual", 5, "completed"))
        await store.put_api_key(ApiKeyRecord(f"id-{org}", f"hash-{org}", org, "k", ("proxy",)))
    await store.reserve(request("open", 10, [line(org="org-a")], org="org-a"))
    await asyncio.sleep(0.2)
    assert await store.sweep("release") == 2

    client = await raw_client(store)
    keys = [k async for k in client.scan_iter(match="*" + p + "*", count=1000)]
    globals_ = re.compile(rf"^{re.escape(p)}:(orgs|resorg:[^{{}}]+|key:[^{{}}]+|keyid:[^{{}}]+)$")
    slots: dict[str, set[int]] = {org: set() for org in orgs}
    seen_global = set()
    for key in keys:
        tagged = next((org for org in orgs if key.startswith("{" + p + ":" + org + "}:")), None)
        if tagged is not None:
            slots[tagged].add(key_slot(key.encode()))
            continue
        assert globals_.match(key), f"key outside its org's hash tag and not a documented global: {key}"
        seen_global.add(key.split(":")[1])
    assert all(len(s) == 1 for s in slots.values()), slots  # one org = one Cluster slot
    assert {"orgs", "resorg", "key", "keyid"} <= seen_global
    # The settle index only outlives reservations that are still open.
    assert [k for k in keys if ":resorg:" in k] == [f"{p}:resorg:open"]


# -- persistence -----------------------------------------------------------------------------------


def test_persistence_rules() -> None:
    assert persistence_warning({"appendonly": "yes", "appendfsync": "everysec"}) is None
    assert persistence_warning({"appendonly": "yes", "appendfsync": "always"}) is None
    off = persistence_warning({"appendonly": "no", "appendfsync": "everysec"})
    assert off is not None and "appendonly" in off and "AOF is off" in off
    lazy = persistence_warning({"appendonly": "yes", "appendfsync": "no"})
    assert lazy is not None and "appendfsync=no" in lazy
    assert persistence_warning({}) is not None


async def test_open_reports_the_servers_persistence(
    redis_stores: Factory, caplog: pytest.LogCaptureFixture
) -> None:
    store = await redis_stores()
    config = await (await raw_client(store)).config_get("append*")
    assert store.persistence_warning == persistence_warning({str(k): v for k, v in config.items()})
    with caplog.at_level("WARNING", logger="resgov.ledger.redis"):
        again = await redis_stores()
    if again.persistence_warning:
        assert again.persistence_warning in caplog.text


async def test_config_disabled_is_tolerated(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    store = RedisStore(redis_url, prefix="rgtest-config-disabled")
    original = store._execute

    async def no_config(commands: Any) -> list[Any]:
        if commands and commands[0][0] == "CONFIG":
            raise ResponseError("ERR unknown command 'CONFIG'")
        return await original(commands)

    monkeypatch.setattr(store, "_execute", no_config)
    await store.open()
    try:
        assert store.persistence_warning is not None and "not verified" in store.persistence_warning
        assert await store.ping()
    finally:
        await store.close()


async def test_unreachable_redis_is_a_store_error() -> None:
    store = RedisStore("redis://127.0.0.1:1/0", prefix="rgtest-down")
    await store.open()  # logs, does not raise: the server starts and answers per fail_safe_action
    try:
        assert store.persistence_warning is not None
        assert not await store.ping()
        started = time.monotonic()
        with pytest.raises(StoreError):
            await store.reserve(request("r1", 1, [line()]))
        assert time.monotonic() - started < 5
    finally:
        await store.close()
    with pytest.raises(StoreError):
        await store.settle(SettleRequest("r1", "actual", 1, "completed"))


# -- several instances -----------------------------------------------------------------------------


async def test_two_instances_never_exceed_one_budget(redis_stores: Factory) -> None:
    a, b = await redis_stores(), await redis_stores()
    rng = random.Random(7)
    limit = 20_000
    lines = [line(limit=limit), line(limit=limit + 5_000, agent=None)]
    amounts = [rng.randint(1, 400) for _ in range(300)]
    outs = await asyncio.gather(
        *((a if i % 2 else b).reserve(request(f"r{i}", amt, lines)) for i, amt in enumerate(amounts))
    )
    reserved = sum(amt for amt, out in zip(amounts, outs, strict=True) if out.ok)
    assert reserved <= limit
    assert all(amt + reserved > limit for amt, out in zip(amounts, outs, strict=True) if not out.ok)
    states = await a.line_states(ORG, [x.key for x in lines])
    assert states[lines[0].key] == LineState(0, reserved)
    # Each instance settles what the *other* reserved: the org comes from the settle index.
    settled = await asyncio.gather(
        *((b if i % 2 else a).settle(SettleRequest(f"r{i}", "actual", amt // 2, "completed"))
          for i, (amt, out) in enumerate(zip(amounts, outs, strict=True)) if out.ok)
    )  # fmt: skip
    assert all(s.settled for s in settled)
    spent = sum(s.charged for s in settled)
    assert await b.line_states(ORG, [lines[0].key]) == {lines[0].key: LineState(spent, 0)}
    totals = await a.totals()
    assert (totals.reserved_total, totals.open_reservations) == (0, 0)
    assert totals.audit_actual_by_agent == {(ORG, "hermes"): spent}


async def test_instances_sweeping_together_settle_each_lease_once(redis_stores: Factory) -> None:
    instances = [await redis_stores() for _ in range(3)]
    lines = [line(limit=10**9), line(limit=10**9, agent=None)]
    for i in range(30):
        org_lines = lines if i % 2 else [line(limit=10**9, org="other")]
        org = ORG if i % 2 else "other"
        assert (await instances[i % 3].reserve(request(f"r{i}", 10 + i, org_lines, org=org, ttl=0.2))).ok
    await asyncio.sleep(0.35)
    counts = await asyncio.gather(*(s.sweep("charge") for s in instances for _ in range(3)))
    assert sum(counts) == 30
    totals = await instances[0].totals()
    assert totals.open_reservations == 0
    assert sum(totals.audit_actual_by_agent.values()) == sum(10 + i for i in range(30))
    # A settle arriving after the sweep (the crashed instance coming back) changes nothing.
    assert not (await instances[1].settle(SettleRequest("r1", "actual", 1, "completed"))).settled


async def test_lease_expiry_uses_the_redis_clock(redis_stores: Factory) -> None:
    store = await redis_stores()
    client = await raw_client(store)
    assert (await store.reserve(request("r1", 1, [line()], ttl=30))).ok
    server_s, server_us = await client.time()
    score = await client.zscore("{" + store.prefix + ":" + ORG + "}:leases", "r1")
    assert score is not None
    assert abs(score - (server_s * 1000 + server_us // 1000 + 30_000)) < 2_000


# -- idempotency under retries -----------------------------------------------------------------------


async def test_a_retried_reserve_does_not_reserve_twice(redis_stores: Factory) -> None:
    # redis-py re-sends a command whose reply was lost; the script must recognise its own reservation.
    store = await redis_stores()
    lines = [line(limit=100)]
    first = await store.reserve(request("r1", 60, lines))
    again = await store.reserve(request("r1", 60, lines))
    assert first.ok and again.ok and again.states == first.states
    with pytest.raises(StoreError):
        await store.reserve(request("r1", 10, lines))  # a different reservation under a used id
    assert await store.line_states(ORG, [lines[0].key]) == {lines[0].key: LineState(0, 60)}
    assert len(await store.audit(AuditQuery(org=ORG))) == 1


async def test_stale_line_keys_are_corrected_by_the_script(redis_stores: Factory) -> None:
    store = await redis_stores()
    lines = [line(), line(agent=None)]
    assert (await store.reserve(request("r1", 100, lines))).ok
    store._routes["r1"] = (ORG, ("a:someone-else:daily:1",))  # a wrong memory must never be charged
    out = await store.settle(SettleRequest("r1", "actual", 30, "completed"))
    assert out.settled and set(out.states) == {x.key for x in lines}
    got = await store.line_states(ORG, [x.key for x in lines] + ["a:someone-else:daily:1"])
    assert got == {lines[0].key: LineState(30, 0), lines[1].key: LineState(30, 0),
                   "a:someone-else:daily:1": LineState()}  # fmt: skip


@pytest.mark.parametrize(
    ("spent", "reserved", "charge"),
    [("0", "0", 30), ("-5", "40", 30), ("7", "0", 0), ("-1000000000", "-3", 2**62), ("", "", 1)],
)
async def test_settle_writes_exact_signed_line_states(
    redis_stores: Factory, spent: str, reserved: str, charge: int
) -> None:
    # The settle script reads each line once and writes both fields; a line that was changed
    # while the call was in flight (even below zero, or emptied) must end exactly as two
    # HINCRBYs would have left it, and the states it returns must be what it stored.
    store = await redis_stores()
    client = await raw_client(store)
    lines = [line(limit=2**63 - 1), line(limit=2**63 - 1, agent=None)]
    assert (await store.reserve(request("r1", 100, lines))).ok
    first = store._line(ORG, lines[0].key)
    if spent or reserved:
        await client.hset(first, mapping={"spent": spent, "reserved": reserved})
    else:
        await client.delete(first)
    out = await store.settle(SettleRequest("r1", "actual", charge, "completed"))
    assert out.settled
    want = LineState(int(spent or 0) + charge, int(reserved or 0) - 100)
    assert out.states[lines[0].key] == want
    assert out.states[lines[1].key] == LineState(charge, 0)
    assert await store.line_states(ORG, [lines[0].key]) == {lines[0].key: want}
    raw = await client.hmget(first, "spent", "reserved")
    assert list(raw) == [str(want.spent), str(want.reserved)]


def _around(*points: int) -> st.SearchStrategy[int]:
    return st.sampled_from(points).flatmap(lambda p: st.integers(p - 2, p + 2))


# Values on both sides of where the scripts switch between plain Lua numbers and exact
# (high, low) pairs: 15 characters (10^15, or -10^14 with its sign), 2^53, 17 digits.
_SIGNED = st.one_of(
    st.integers(-1000, 1000),
    _around(10**14, -(10**14), 10**15, -(10**15), 2**53, -(2**53), 10**16, 10**17),
    st.integers(-(2**61), 2**61),
)
_AMOUNT = st.one_of(st.integers(0, 1000), _around(10**15, 2**53, 10**16), st.integers(0, 2**61))
_LIMIT = st.one_of(_SIGNED, _around(2**62, 2**63 - 3))
_KINDS: list[SettleKind] = ["actual", "estimated", "release", "expire_charge", "expire_release"]


# A limit is either any value ("at") or the reservation's need plus a small delta ("edge").
_LIMIT_SPEC = st.one_of(st.tuples(st.just("at"), _LIMIT), st.tuples(st.just("edge"), st.integers(-2, 2)))


@settings(max_examples=200, deadline=None)
@given(
    states=st.lists(st.tuples(_SIGNED, _SIGNED), min_size=2, max_size=2),
    limit_specs=st.lists(_LIMIT_SPEC, min_size=2, max_size=2),
    amount=_AMOUNT,
    kind=st.sampled_from(_KINDS),
    actual=_AMOUNT,
)
# Short values (plain numbers) against a 16-digit limit, one unit over it.
@example([(10**15 - 1, 1), (0, 0)], [("edge", -1), ("at", 10)], 1, "actual", 1)
# A line moved below zero while in flight: the states reported must keep the sign.
@example([(-5, -(10**16)), (0, 0)], [("at", 10**18), ("at", 10)], 3, "release", 0)
def test_scripts_do_the_budget_math_exactly(
    states: list[tuple[int, int]],
    limit_specs: list[tuple[str, int]],
    amount: int,
    kind: SettleKind,
    actual: int,
) -> None:
    # Whatever the size of the numbers (the scripts take a plain-number path below 15
    # characters and exact pairs above), reserve and settle must give core.budget's answers
    # and leave the lines exactly where HINCRBY on the true values would.
    limits = [
        value if how == "at" else spent + reserved + amount + value
        for (how, value), (spent, reserved) in zip(limit_specs, states, strict=True)
    ]
    require_redis()
    prefix = new_prefix()

    async def check() -> None:
        store = RedisStore(REDIS_URL, prefix=prefix)
        await store.open()
        try:
            client = await raw_client(store)
            lines = [line(limit=limits[0]), line(limit=limits[1], agent=None)]
            before = {}
            for budget, (spent, reserved) in zip(lines, states, strict=True):
                await client.hset(
                    store._line(ORG, budget.key), mapping={"spent": spent, "reserved": reserved}
                )
                before[budget.key] = LineState(spent, reserved)
            outcome: ReserveOutcome = await store.reserve(request("r1", amount, lines))
            misfit = first_misfit(lines, before, amount)
            assert outcome.ok == (misfit is None)
            if misfit is not None:
                assert outcome.refused == misfit and outcome.states == before
                return
            reserved = {k: LineState(v.spent, v.reserved + amount) for k, v in before.items()}
            assert outcome.states == reserved
            out = await store.settle(SettleRequest("r1", kind, actual, "completed"))
            want = settle_math(amount, kind, actual)
            assert (out.charged, out.refund, out.overage, out.reserved) == (
                want.charged, want.refund, want.overage, amount,
            )  # fmt: skip
            after = {k: LineState(v.spent + want.charged, v.reserved) for k, v in before.items()}
            assert out.states == after
            assert await store.line_states(ORG, list(after)) == after
        finally:
            await store.close()
            await delete_prefix(prefix)

    asyncio.run(check())


async def test_settle_without_the_index_leaves_it_to_the_sweeper(redis_stores: Factory) -> None:
    a, b = await redis_stores(), await redis_stores()
    assert (await a.reserve(request("r1", 100, [line()], ttl=0.2))).ok
    await (await raw_client(a)).delete(f"{a.prefix}:resorg:r1")
    assert not (await b.settle(SettleRequest("r1", "actual", 5, "completed"))).settled
    await asyncio.sleep(0.35)
    assert await b.sweep("charge") == 1  # over-count at the bound, never a loss
    assert await a.line_states(ORG, [line().key]) == {line().key: LineState(100, 0)}


# -- auto-pipelining -------------------------------------------------------------------------------


async def test_a_reserve_cancelled_before_sending_is_never_sent(redis_stores: Factory) -> None:
    store = await redis_stores()
    lines = [line(limit=100)]
    task = asyncio.create_task(store.reserve(request("r1", 60, lines)))
    await asyncio.sleep(0)  # the reserve is queued; the flusher has not run yet
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await store.line_states(ORG, [lines[0].key]) == {lines[0].key: LineState()}
    assert (await store.reserve(request("r2", 100, lines))).ok


async def test_concurrent_callers_share_pipelines(
    redis_stores: Factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = await redis_stores()
    sent: list[int] = []
    pipeline = store._pipeline

    async def counting(commands: list[Any]) -> Any:
        sent.append(len(commands))
        return await pipeline(commands)

    monkeypatch.setattr(store, "_pipeline", counting)
    lean = store._lean
    assert lean is not None  # a plain redis:// URL: the hot commands take the lean connection
    submit = lean.submit

    def counting_lean(commands: list[Any]) -> Any:
        sent.append(len(commands))
        return submit(commands)

    monkeypatch.setattr(lean, "submit", counting_lean)
    lines = [line(limit=10**9), line(limit=10**9, agent=None)]
    outs = await asyncio.gather(*(store.reserve(request(f"r{i}", 5, lines)) for i in range(100)))
    assert all(o.ok for o in outs)
    assert sum(sent) >= 200 and len(sent) < 50, sent  # 100 reserves, far fewer round trips
    assert await store.line_states(ORG, [lines[0].key]) == {lines[0].key: LineState(0, 500)}


async def test_close_sends_and_answers_what_is_queued(redis_stores: Factory) -> None:
    store = await redis_stores()
    lines = [line(limit=10**9)]
    # close() runs while the reserves are queued or in flight: it lets them finish first.
    *outcomes, _ = await asyncio.gather(*(store.reserve(request(f"q{i}", 5, lines)) for i in range(5)),
                                        store.close())  # fmt: skip
    assert all(outcome.ok for outcome in outcomes)
    reopened = await redis_stores()
    assert await reopened.line_states(ORG, [lines[0].key]) == {lines[0].key: LineState(0, 25)}
