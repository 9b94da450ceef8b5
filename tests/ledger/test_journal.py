"""The fail-open journal: calls let through while the store is down are booked later, exactly once.

Runs against both backends (the ``store`` fixture): booking goes through ``Store.book_unreserved``
and, for a reserve that was in fact applied, ``Store.settle``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Any

import orjson
import pytest

from resgov.core.budget import BudgetLine, LineState
from resgov.core.pricing import Usage
from resgov.ledger.journal import Journal, JournalCall, JournalError
from resgov.ledger.store import (
    AuditEntry,
    AuditQuery,
    ReserveRequest,
    SettleRequest,
    Store,
    StoreError,
)

ORG = "acme"
AGENT = "hermes"
LIMIT = 10_000


def lines(agent: str = AGENT) -> list[BudgetLine]:
    return [
        BudgetLine(ORG, "agent", agent, "daily", LIMIT, 1_700_000_000, 1_700_086_400),
        BudgetLine(ORG, "agent", agent, "total", 10 * LIMIT, 0, None),
        BudgetLine(ORG, "org", None, "daily", 2 * LIMIT, 1_700_000_000, 1_700_086_400),
    ]


KEYS = [line.key for line in lines()]


async def open_call(journal: Journal, rid: str, bound: int = 5_000, agent: str = AGENT) -> JournalCall:
    return await journal.open_call(
        request_id=rid, org=ORG, agent=agent, model="gpt-sim", provider="sim", route="/v1/chat/completions",
        bound=bound, lines=lines(agent), reason="redis: connection refused",
    )  # fmt: skip


async def spent(store: Store) -> dict[str, LineState]:
    return await store.line_states(ORG, KEYS)


async def entries(store: Store) -> dict[str, AuditEntry]:
    flush = getattr(store, "flush", None)
    if flush is not None:
        await flush()
    return {e.request_id: e for _, e in await store.audit(AuditQuery(org=ORG, limit=10_000))}


def records(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines() if line.strip()]


def rotated(path: Path) -> list[Path]:
    return sorted(path.parent.glob(path.name + ".*.reconciled"))


class DownStore:
    """A store whose every call fails like an unreachable Redis."""

    name = "down"

    def __getattr__(self, name: str) -> Any:
        async def fail(*_: object, **__: object) -> Any:
            raise StoreError("redis: connection refused")

        return fail


async def test_calls_are_booked_once_on_every_line_even_above_the_limit(
    store: Store, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "journal.jsonl"
    # The agent's daily line is nearly full already.
    entry = AuditEntry(request_id="before", org=ORG, agent=AGENT, started_at=time.time())
    assert (await store.reserve(ReserveRequest("before", ORG, AGENT, 9_000, lines(), 60, entry))).ok
    await store.settle(SettleRequest("before", "actual", 9_000, "completed"))
    start = await spent(store)

    journal = Journal(str(path))
    await journal.open()
    assert not path.exists()  # nothing is created until a call fails open
    with caplog.at_level(logging.WARNING, logger="resgov.journal"):
        calls = [await open_call(journal, f"fo-{i}") for i in range(3)]
    assert sum("FAIL-OPEN" in r.getMessage() and "WITHOUT a reservation" in r.getMessage()
               for r in caplog.records) == 3  # fmt: skip
    assert journal.stats.fail_open_calls == 3 and journal.pending == 3 and journal.due == 0
    usage = Usage(input_tokens=10, output_tokens=20)
    await journal.close_call(calls[0], 1_500, usage=usage, http_status=200, upstream_request_id="up-0")
    await journal.close_call(
        calls[1], 700, status="estimated", estimated=True, reason="no_usage", http_status=200
    )
    await journal.close_call(calls[2], 0, status="upstream_error", reason="upstream_500", http_status=500)
    await journal.close_call(calls[2], 999)  # a second close is ignored
    assert [r["t"] for r in records(path)] == ["open"] * 3 + ["close"] * 3
    assert journal.due == 3

    report = await journal.reconcile(store)

    assert (report.booked, report.settled, report.already, report.remaining, report.error) == (
        3,
        0,
        0,
        0,
        None,
    )
    after = await spent(store)
    assert after == {k: LineState(s.spent + 2_200, s.reserved) for k, s in start.items()}
    assert (KEYS[0], ORG) in {(key, org) for org, key, _, _ in report.over_limit}  # 11 200 > 10 000
    rows = await entries(store)
    first = rows["fo-0"]
    assert (first.status, first.actual, first.reserved, first.http_status) == ("completed", 1_500, 0, 200)
    assert (first.input_tokens, first.output_tokens, first.upstream_request_id) == (10, 20, "up-0")
    assert (
        first.detail is not None and first.detail["fail_open"] is True and first.detail["reconciled"] is True
    )
    assert first.detail["bound"] == 5_000
    assert (rows["fo-1"].status, rows["fo-1"].estimated, rows["fo-1"].reason) == (
        "estimated",
        True,
        "no_usage",
    )
    assert (rows["fo-2"].status, rows["fo-2"].actual) == ("upstream_error", 0)
    totals = await store.totals()
    assert totals.audit_actual_by_agent[(ORG, AGENT)] == 9_000 + 2_200

    # Everything booked, nothing in flight: the file is set aside, a second pass books nothing.
    assert journal.pending == 0 and not path.exists()
    (kept,) = rotated(path)
    assert [r["t"] for r in records(kept)][-3:] == ["booked"] * 3
    again = await journal.reconcile(store)
    assert (again.booked, again.already) == (0, 0) and await spent(store) == after
    assert journal.stats.reconciled == 3 and journal.stats.reconciled_nano == 2_200
    # The next outage starts a new file.
    await journal.close_call(await open_call(journal, "fo-next"), 10)
    assert path.exists() and [r["id"] for r in records(path)] == ["fo-next", "fo-next"]
    await journal.close()


async def test_a_restart_replays_the_journal_and_charges_nothing_twice(store: Store, tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    journal = Journal(str(path))
    await journal.open()
    a, b = await open_call(journal, "fo-a"), await open_call(journal, "fo-b")
    await journal.close_call(a, 1_000)
    await journal.close_call(b, 2_000)
    # "fo-a" reaches the ledger, then the process dies before writing its "booked" marker.
    entry = AuditEntry(request_id="fo-a", org=ORG, agent=AGENT, status="completed", actual=1_000)
    assert await store.book_unreserved(entry, KEYS)
    assert not await store.book_unreserved(entry, KEYS)  # idempotent by request id
    await journal.close()

    reborn = Journal(str(path))
    await reborn.open()
    assert reborn.pending == 2 and reborn.due == 2
    report = await reborn.reconcile(store)
    assert (report.booked, report.already) == (1, 1)
    assert await spent(store) == {k: LineState(3_000, 0) for k in KEYS}
    assert (await store.totals()).audit_count == 2
    await reborn.close()
    # And once more from the rotated file's point of view: nothing left.
    third = Journal(str(path))
    await third.open()
    assert third.pending == 0
    await third.close()


@pytest.mark.parametrize(("mode", "charged"), [("charge", 4_000), ("release", 0)])
async def test_calls_left_open_by_a_dead_process_are_settled_like_expired_leases(
    store: Store, tmp_path: Path, mode: str, charged: int
) -> None:
    path = tmp_path / "journal.jsonl"
    journal = Journal(str(path))
    await journal.open()
    await open_call(journal, "orphan", bound=4_000)
    done = await open_call(journal, "done", bound=4_000)
    await journal.close_call(done, 100)
    await journal.close()  # the process dies mid-call

    reborn = Journal(str(path))
    await reborn.open()
    assert reborn.due == 2
    report = await reborn.reconcile(store, on_orphan=mode)  # type: ignore[arg-type]
    assert report.booked == 2 and report.remaining == 0
    row = (await entries(store))["orphan"]
    assert (row.status, row.expired, row.actual, row.reserved) == ("expired", True, charged, 0)
    assert row.detail is not None and row.detail["fail_open"] is True
    assert await spent(store) == {k: LineState(charged + 100, 0) for k in KEYS}
    assert reborn.stats.orphans == 1
    await reborn.close()


async def test_a_call_in_flight_waits_until_it_closes(store: Store, tmp_path: Path) -> None:
    journal = Journal(str(tmp_path / "journal.jsonl"))
    await journal.open()
    live = await open_call(journal, "live")
    finished = await open_call(journal, "finished")
    await journal.close_call(finished, 300)
    report = await journal.reconcile(store)
    assert (report.booked, report.in_flight) == (1, 1)
    assert "live" not in await entries(store)
    assert (tmp_path / "journal.jsonl").exists()  # not rotated while a call is open
    await journal.close_call(live, 400)
    assert (await journal.reconcile(store)).booked == 1
    assert await spent(store) == {k: LineState(700, 0) for k in KEYS}
    await journal.close()


async def test_a_close_still_being_written_is_not_booked_half_way(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal = Journal(str(tmp_path / "journal.jsonl"))
    await journal.open()
    call = await open_call(journal, "slow-close")
    real_write = journal._write

    def slow_write(data: bytes) -> None:
        time.sleep(0.3)  # a slow disk: the close record takes a while to become durable
        real_write(data)

    monkeypatch.setattr(journal, "_write", slow_write)
    closing = asyncio.create_task(journal.close_call(call, 4_321))
    await asyncio.sleep(0.05)
    assert (await journal.reconcile(store)).booked == 0  # not due until its cost is complete
    await closing
    assert (await journal.reconcile(store)).booked == 1
    assert await spent(store) == {k: LineState(4_321, 0) for k in KEYS}
    await journal.close()


async def test_reconciliation_waits_for_the_store(store: Store, tmp_path: Path) -> None:
    journal = Journal(str(tmp_path / "journal.jsonl"))
    await journal.open()
    for i in range(70):  # more than one booking chunk
        await journal.close_call(await open_call(journal, f"c{i}"), 10)
    down = await journal.reconcile(DownStore())  # type: ignore[arg-type]
    assert down.error is not None and "connection refused" in down.error
    assert (down.booked, journal.pending) == (0, 70)
    assert journal.stats.reconcile_errors == 1
    up = await journal.reconcile(store)
    assert (up.booked, up.error, journal.pending) == (70, None, 0)
    assert await spent(store) == {k: LineState(700, 0) for k in KEYS}
    await journal.close()


async def test_a_reserve_that_was_applied_after_all_is_settled_not_charged_twice(
    store: Store, tmp_path: Path
) -> None:
    """The reserve raised (a timeout) but the store had applied it: one charge, the real cost."""
    entry = AuditEntry(request_id="ambiguous", org=ORG, agent=AGENT, started_at=time.time())
    assert (await store.reserve(ReserveRequest("ambiguous", ORG, AGENT, 5_000, lines(), 60, entry))).ok
    journal = Journal(str(tmp_path / "journal.jsonl"))
    await journal.open()
    call = await open_call(journal, "ambiguous", bound=5_000)
    await journal.close_call(call, 1_234, http_status=200)
    report = await journal.reconcile(store)
    assert (report.settled, report.booked) == (1, 0)
    assert await spent(store) == {k: LineState(1_234, 0) for k in KEYS}
    row = (await entries(store))["ambiguous"]
    assert (row.status, row.actual, row.reserved) == ("completed", 1_234, 5_000)
    assert row.detail is not None and row.detail["reconciled"] is True
    assert (await store.totals()).open_reservations == 0
    await journal.close()


async def test_a_settlement_the_store_refused_is_journaled_and_applied_with_the_real_cost(
    store: Store, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The store went away mid-call: the reservation stands; its real cost waits in the journal."""
    entry = AuditEntry(request_id="mid", org=ORG, agent=AGENT, started_at=time.time())
    assert (await store.reserve(ReserveRequest("mid", ORG, AGENT, 5_000, lines(), 60, entry))).ok
    journal = Journal(str(tmp_path / "journal.jsonl"))
    await journal.open()
    with caplog.at_level(logging.WARNING, logger="resgov.journal"):
        call = await journal.open_call(
            request_id="mid", org=ORG, agent=AGENT, model="gpt-sim", provider="sim", route="", bound=5_000,
            lines=lines(), reason="redis: connection refused", reserved=True,
        )  # fmt: skip
    assert "settlement of call mid" in caplog.text and "FAIL-OPEN" not in caplog.text
    assert journal.stats.fail_open_calls == 0  # it did reserve: not a fail-open call
    await journal.close_call(call, 2_345, usage=Usage(input_tokens=3, output_tokens=4), http_status=200)
    report = await journal.reconcile(store)
    assert (report.settled, report.booked) == (1, 0)
    assert await spent(store) == {k: LineState(2_345, 0) for k in KEYS}
    row = (await entries(store))["mid"]
    assert (row.status, row.actual, row.input_tokens, row.expired) == ("completed", 2_345, 3, False)
    await journal.close()


async def test_writes_are_durable_and_group_committed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "journal.jsonl"
    synced: list[int] = []
    real_fsync = os.fsync

    def counting_fsync(fd: int) -> None:
        synced.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", counting_fsync)
    journal = Journal(str(path))
    await journal.open()
    calls = await asyncio.gather(*(open_call(journal, f"g{i}") for i in range(200)))
    # Every call returned only after its record was fsync'd; 200 records, far fewer fsyncs.
    assert len(records(path)) == 200 and {r["id"] for r in records(path)} == {c.request_id for c in calls}
    assert 1 <= len(synced) < 50, len(synced)
    await journal.close()


async def test_a_torn_last_record_is_dropped_and_appends_continue_cleanly(
    tmp_path: Path, store: Store
) -> None:
    path = tmp_path / "journal.jsonl"
    journal = Journal(str(path))
    await journal.open()
    await journal.close_call(await open_call(journal, "whole"), 50)
    await journal.close()
    with path.open("ab") as f:
        f.write(b'{"v":1,"t":"open","id":"torn","org":"ac')  # the crash hit mid-write
    reborn = Journal(str(path))
    await reborn.open()
    assert reborn.pending == 1 and path.read_bytes().endswith(b"\n")
    await reborn.close_call(await open_call(reborn, "after"), 60)
    assert [r["id"] for r in records(path)] == ["whole", "whole", "after", "after"]
    assert (await reborn.reconcile(store)).booked == 2
    await reborn.close()


async def test_unreadable_lines_are_skipped_and_counted(tmp_path: Path) -> None:
    path = tmp_path / "journal.jsonl"
    path.write_bytes(b'not json\n{"v":1,"t":"mystery","id":"x"}\n')
    journal = Journal(str(path))
    await journal.open()
    assert journal.stats.corrupt_lines == 2 and journal.pending == 0
    await journal.close()


async def test_one_journal_per_process(tmp_path: Path) -> None:
    path = str(tmp_path / "journal.jsonl")
    first, second = Journal(path), Journal(path)
    await first.open()
    await open_call(first, "mine")
    with pytest.raises(JournalError, match="in use by another ResGov process"):
        await open_call(second, "theirs")
    assert second.pending == 0 and second.stats.write_errors == 1
    await first.close()
    await second.close()


async def test_an_unwritable_journal_refuses_the_call(tmp_path: Path) -> None:
    (tmp_path / "dir").mkdir()
    journal = Journal(str(tmp_path / "dir"))  # a directory: every write fails
    with pytest.raises(JournalError):
        await journal.open()
    with pytest.raises(JournalError):
        await open_call(journal, "nope")
    assert journal.pending == 0 and journal.stats.fail_open_calls == 0
    await journal.close()


async def test_the_background_loop_books_finished_calls(store: Store, tmp_path: Path) -> None:
    journal = Journal(str(tmp_path / "journal.jsonl"))
    await journal.open()
    task = asyncio.create_task(journal.run(store, lambda: "charge", interval=0.05))
    try:
        await journal.close_call(await open_call(journal, "bg"), 77)
        for _ in range(100):
            if journal.pending == 0:
                break
            await asyncio.sleep(0.02)
        assert journal.pending == 0
        assert (await entries(store))["bg"].actual == 77
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await journal.close()
