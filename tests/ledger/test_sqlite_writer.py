"""SQLite's writer: batches applied on the loop, the budget line cache, and their slow paths.

The contract tests (test_contract.py) hold SQLite to the Store behaviour; these check what is
particular to its writer: that lines moved in memory always match the file, that another
connection writing the file is noticed, and that a batch with a failing operation, or one
that meets another process's write lock, still commits exactly the operations that succeeded.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from resgov.ledger.sqlite import SQLiteStore
from resgov.ledger.store import AuditQuery, StoreError
from tests.ledger.test_contract import agent_line, finish, org_line, reserve, states

LINES = [agent_line(limit=10_000), org_line(limit=10_000)]


def file_lines(path: str) -> dict[str, tuple[int, int]]:
    """The committed budget lines as another connection sees them."""
    conn = sqlite3.connect(path)
    try:
        return {k: (s, r) for k, s, r in conn.execute("SELECT key, spent, reserved FROM budget_line")}
    finally:
        conn.close()


async def opened(tmp_path: Path) -> SQLiteStore:
    store = SQLiteStore(str(tmp_path / "w.db"))
    await store.open()
    return store


@pytest_asyncio.fixture
async def store(tmp_path: Path) -> AsyncIterator[SQLiteStore]:
    """An opened SQLite store on a fresh file (closed after the test)."""
    opened_store = await opened(tmp_path)
    try:
        yield opened_store
    finally:
        await opened_store.close()


async def test_lines_in_the_file_match_after_every_batch(store: SQLiteStore) -> None:
    results = await asyncio.gather(*(reserve(store, f"r{i}", 100, LINES) for i in range(50)))
    assert all(r.ok for r in results)
    # Everything the callers were told is already committed, line by line.
    assert set(file_lines(store.path).values()) == {(0, 5_000)}
    await asyncio.gather(*(finish(store, f"r{i}", "actual", 40) for i in range(50)))
    assert set(file_lines(store.path).values()) == {(2_000, 0)}
    assert store.batched_ops > store.batches  # they really shared batches


async def test_a_write_by_another_connection_is_seen_by_the_next_reserve(store: SQLiteStore) -> None:
    assert (await reserve(store, "r1", 1_000, LINES)).ok
    # Another process (`resgov store migrate`, an operator) rewrites the agent line's spend.
    conn = sqlite3.connect(store.path, isolation_level=None)
    conn.execute("UPDATE budget_line SET spent = 8500 WHERE key = ?", (LINES[0].key,))
    conn.close()
    refused = await reserve(store, "r2", 1_000, LINES)
    assert not refused.ok and refused.refused == LINES[0]
    assert refused.states[LINES[0].key].used == 9_500
    assert (await reserve(store, "r3", 500, LINES)).ok
    await finish(store, "r1", "actual", 0)
    await finish(store, "r3", "actual", 500)
    assert file_lines(store.path)[LINES[0].key] == (9_000, 0)


async def test_a_failing_operation_is_undone_alone(store: SQLiteStore) -> None:
    assert (await reserve(store, "dup", 100, LINES)).ok
    # In one batch: good reservations around one that reuses an id (its INSERT fails).
    outcomes = await asyncio.gather(
        reserve(store, "a", 100, LINES),
        reserve(store, "dup", 100, LINES),
        reserve(store, "b", 100, LINES),
        return_exceptions=True,
    )
    assert outcomes[0].ok and outcomes[2].ok  # type: ignore[union-attr]
    assert isinstance(outcomes[1], StoreError)
    assert set(file_lines(store.path).values()) == {(0, 300)}
    assert {k: s.reserved for k, s in (await states(store, LINES)).items()} == {
        line.key: 300 for line in LINES
    }
    audit = await store.audit(AuditQuery(org="acme", limit=100))
    assert sorted(e.request_id for _, e in audit) == ["a", "b", "dup"]


async def test_a_batch_waits_for_another_processs_write_lock_off_the_loop(store: SQLiteStore) -> None:
    assert (await reserve(store, "r0", 100, LINES)).ok
    other = sqlite3.connect(store.path, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")  # holds the write lock
    release = threading.Timer(0.3, lambda: other.execute("COMMIT"))
    release.start()
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    t = asyncio.create_task(ticker())
    started = time.monotonic()
    assert (await reserve(store, "r1", 100, LINES)).ok
    waited = time.monotonic() - started
    t.cancel()
    release.join()
    other.close()
    assert waited >= 0.25
    assert ticks >= 10  # the loop kept running while the batch waited for the lock
    assert set(file_lines(store.path).values()) == {(0, 200)}


async def test_callers_on_another_loop_are_served(store: SQLiteStore) -> None:
    result: list[bool] = []

    def elsewhere() -> None:
        result.append(asyncio.run(reserve(store, "x", 100, LINES)).ok)

    await asyncio.get_running_loop().run_in_executor(None, elsewhere)
    assert result == [True]
    assert set(file_lines(store.path).values()) == {(0, 100)}


async def test_close_commits_what_was_queued(tmp_path: Path) -> None:
    store = await opened(tmp_path)
    tasks = [asyncio.create_task(reserve(store, f"r{i}", 10, LINES)) for i in range(20)]
    await asyncio.sleep(0)
    await store.close()
    assert all(t.result().ok for t in tasks)
    assert set(file_lines(store.path).values()) == {(0, 200)}
    with pytest.raises(StoreError):
        await reserve(store, "late", 10, LINES)


async def test_a_reservation_is_fsynced_before_it_returns_and_a_settlement_is_not(
    store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    import resgov.ledger.sqlite_writer as writer

    synced: list[str] = []
    real_fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        real_fsync(fd)
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))

    monkeypatch.setattr(writer.os, "fsync", recording_fsync)
    assert (await reserve(store, "r1", 100, LINES)).ok
    assert synced and synced[-1] == store.path + "-wal"
    count = len(synced)
    await finish(store, "r1", "actual", 50)  # charge mode: visible at once, no fsync of its own
    assert len(synced) == count
    assert set(file_lines(store.path).values()) == {(50, 0)}


async def test_a_bug_on_the_commit_thread_fails_its_batch_and_the_writer_goes_on(
    store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    import resgov.ledger.sqlite_writer as writer

    real_commit = writer.GroupCommitWriter._commit
    calls = 0

    def broken_once(self: writer.GroupCommitWriter, conn: sqlite3.Connection, batch: list[writer.Op],
                    durable: bool) -> None:  # fmt: skip
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("boom")
        real_commit(self, conn, batch, durable)

    monkeypatch.setattr(writer.GroupCommitWriter, "_commit", broken_once)
    with pytest.raises(StoreError, match="boom"):
        await asyncio.wait_for(reserve(store, "r1", 100, LINES), 5)
    assert (await asyncio.wait_for(reserve(store, "r2", 100, LINES), 5)).ok
    assert set(file_lines(store.path).values()) == {(0, 100)}


async def test_a_batch_is_answered_before_the_checkpoint_it_made_due(
    store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The checkpoint copies many commits into the database file and fsyncs it; the reservation
    # whose commit made it due must not wait for that (it is durable once its WAL is fsync'd).
    from resgov.ledger import sqlite_writer

    monkeypatch.setattr(sqlite_writer, "CHECKPOINT_EVERY", 3)
    writer = store._writer
    conn = writer._conn
    assert conn is not None
    started, gate = threading.Event(), threading.Event()

    def trace(sql: str) -> None:  # runs on the thread that executes the statement
        if "wal_checkpoint" in sql:
            started.set()
            gate.wait(10)

    conn.set_trace_callback(trace)
    try:
        for i in range(3):  # durable batches, one at a time: the third makes a checkpoint due
            out = await asyncio.wait_for(reserve(store, f"r{i}", 10, LINES), 5)
            assert out.ok
        # The checkpoint is running (held), and the reservation that made it due was answered.
        assert await asyncio.to_thread(started.wait, 5)
        assert file_lines(store.path)[LINES[0].key] == (0, 30)
        # The writer stays busy until the checkpoint ends; later work waits for it, then goes on.
        later = asyncio.ensure_future(reserve(store, "r3", 10, LINES))
        await asyncio.sleep(0.05)
        assert not later.done()
    finally:
        gate.set()
    assert (await asyncio.wait_for(later, 5)).ok
    conn.set_trace_callback(None)
    assert file_lines(store.path)[LINES[0].key] == (0, 40)


def test_none_and_bool_parameters_bind_as_before() -> None:
    """The writer registers adapters for None and bool (a speed-up): NULL and 0/1, as without them."""
    import resgov.ledger.sqlite_writer  # noqa: F401  (registers the adapters)

    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE t (a, b, c)")
    conn.execute("INSERT INTO t VALUES (?, ?, ?)", (None, True, False))
    assert conn.execute("SELECT a, b, c, typeof(a), typeof(b) FROM t").fetchone() == (
        None,
        1,
        0,
        "null",
        "integer",
    )
    assert conn.execute("SELECT count(*) FROM t WHERE a IS NULL AND b = ?", (True,)).fetchone() == (1,)
