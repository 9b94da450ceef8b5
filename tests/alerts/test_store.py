"""The alert store contract, on SQLite and on Redis: claims, outbox, dead letters, webhooks."""

from __future__ import annotations

import asyncio
import os
import stat
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import pytest_asyncio

from resgov.alerts import store_down
from resgov.alerts.redis_store import RedisAlertStore
from resgov.alerts.store import (
    AlertStore,
    Destination,
    SQLiteAlertStore,
    alerts_path_for,
    make_items,
    normalize_events,
    with_attempt,
)
from tests.alerts.conftest import REDIS_URL, delete_prefix, require_redis

Factory = Callable[[], Awaitable[AlertStore]]


@pytest_asyncio.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
async def stores(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Factory]:
    """Factory of opened stores sharing one backend (several "instances")."""
    opened: list[AlertStore] = []
    prefix = ""
    if request.param == "redis":
        require_redis()
        prefix = "rgtest-alerts-" + uuid.uuid4().hex[:12]

    async def make() -> AlertStore:
        s: AlertStore
        if request.param == "sqlite":
            s = SQLiteAlertStore(str(tmp_path / "resgov.alerts.db"))
        else:
            s = RedisAlertStore(f"{REDIS_URL}?prefix={prefix}")
        await s.open()
        opened.append(s)
        return s

    try:
        yield make
    finally:
        for s in opened:
            await s.close()
        if prefix:
            await delete_prefix(prefix)


def _dest(i: int = 1, **kw: object) -> Destination:
    base: dict[str, object] = {
        "id": f"wh_{i}",
        "url": f"https://x{i}.example/hook",
        "secret": "whsec_x",
        "created_at": float(i),
    }
    base.update(kw)
    return Destination(**base)  # type: ignore[arg-type]


async def test_claim_once_across_instances(stores: Factory) -> None:
    a, b = await stores(), await stores()
    results = await asyncio.gather(*(s.claim("evt_same", 60) for s in (a, b, a, b)))
    assert sorted(results) == [False, False, False, True]
    assert await a.claim("evt_other", 60)


async def test_claim_expires(stores: Factory) -> None:
    s = await stores()
    assert await s.claim("evt_ttl", 0.05)
    assert not await s.claim("evt_ttl", 0.05)
    await asyncio.sleep(0.12)
    assert await s.claim("evt_ttl", 60)


async def test_claim_and_enqueue_is_atomic(stores: Factory) -> None:
    a, b = await stores(), await stores()
    event = store_down("sqlite", "boom")
    items = make_items(event, [_dest(1), _dest(2)])
    won = await asyncio.gather(
        a.claim_and_enqueue(event.id, 60, items), b.claim_and_enqueue(event.id, 60, items)
    )
    assert sorted(won) == [False, True]
    assert (await a.counts())[0] == 2  # the loser enqueued nothing


async def test_lease_ack_reschedule_dead(stores: Factory) -> None:
    a, b = await stores(), await stores()
    event = store_down("sqlite", "boom")
    items = make_items(event, [_dest(i) for i in range(5)])
    assert await a.claim_and_enqueue(event.id, 60, items)
    now = items[0].created_at + 0.001
    first, second = await asyncio.gather(a.lease(now, 30, 3), b.lease(now, 30, 3))
    got = [i.item_id for i in first + second]
    assert sorted(got) == sorted(i.item_id for i in items)  # disjoint leases covering everything
    assert await a.lease(now, 30, 10) == []  # all leased
    due = await a.next_due()
    assert due is not None and due >= now + 29
    x, y, z = first[0], first[1], second[0]
    await a.ack(x.item_id)
    failed = with_attempt(y, "HTTP 500")
    await a.reschedule(failed, now + 1)
    await a.dead_letter(with_attempt(z, "HTTP 500"), "HTTP 500", now)
    assert await a.counts() == (3, 1)
    again = await a.lease(now + 1.5, 30, 10)
    assert [i.item_id for i in again] == [y.item_id]
    assert again[0].attempts == 1 and again[0].last_error == "HTTP 500" and again[0].event == event
    dead = await a.dead_letters(10)
    assert len(dead) == 1 and dead[0].item.item_id == z.item_id and dead[0].error == "HTTP 500"
    # A leased item of a deleted destination is not resurrected by a late reschedule.
    assert await a.drop_destination(y.dest_id) == 1
    await a.reschedule(with_attempt(again[0], "late"), now)
    assert (await a.counts())[0] == 2


async def test_webhooks_crud(stores: Factory) -> None:
    s = await stores()
    assert await s.list_webhooks() == []
    d1, d2 = _dest(1, events=("budget.threshold",), org_id="acme"), _dest(2)
    await s.put_webhook(d2)
    await s.put_webhook(d1)
    assert [d.id for d in await s.list_webhooks()] == ["wh_1", "wh_2"]
    assert await s.get_webhook("wh_1") == d1
    await s.put_webhook(Destination(**{**d1.to_record(), "events": None, "enabled": False}))  # type: ignore[arg-type]
    got = await s.get_webhook("wh_1")
    assert got is not None and got.events is None and not got.enabled
    assert await s.delete_webhook("wh_1")
    assert not await s.delete_webhook("wh_1")
    assert await s.get_webhook("wh_1") is None


def test_sqlite_file_is_private_and_beside_the_ledger(tmp_path: Path) -> None:
    assert alerts_path_for("/data/resgov.db") == "/data/resgov.alerts.db"
    assert alerts_path_for("ledger") == "ledger.alerts.db"

    async def run() -> None:
        s = SQLiteAlertStore(str(tmp_path / "x.alerts.db"))
        await s.open()
        await s.close()

    asyncio.run(run())
    mode = stat.S_IMODE(os.stat(tmp_path / "x.alerts.db").st_mode)
    assert mode == 0o600  # it holds signing secrets


def test_destination_filters() -> None:
    e = store_down("redis", "x")
    assert _dest().wants(e)
    assert not _dest(org_id="acme").wants(e)  # org-scoped: no system events
    assert _dest(events=("store.*",)).wants(e)
    assert not _dest(events=("budget.threshold",)).wants(e)
    assert not _dest(enabled=False).wants(e)
    assert normalize_events(["*"]) is None and normalize_events(None) is None and normalize_events([]) is None
    with pytest.raises(ValueError):
        normalize_events(["nope"])
