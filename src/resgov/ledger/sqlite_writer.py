"""Group commit for the SQLite ledger: one writer connection, batches formed on the event loop.

Every write is queued here. While a commit is in flight, new writes wait; when it ends,
all of them are applied together in one transaction and committed once, so one fsync
covers a whole batch: that is what makes durable reservations cheap.

Where each step runs, and why (measured with bench/, see bench/README.md):

* A batch of small, hot operations (reserve, settle, renew, refusal audit: ``inline``)
  executes its statements on the loop thread, a few microseconds each. Handing every
  operation to a writer thread cost more in thread switches and GIL hand-offs than the
  statements themselves.
* The fsync is never on the loop. The connection runs with ``synchronous=NORMAL`` (a
  commit writes the WAL without syncing it) and a batch that must be durable (it holds a
  reservation, or a settlement in release mode) is committed on the commit thread, which
  then fsyncs the WAL file itself before anyone is told: an explicit fsync per group
  commit, the same guarantee as ``synchronous=FULL`` without switching the setting per batch.
  A batch that need not be durable commits on the loop (a WAL write, no fsync; it survives
  a crash of the process, and its fsync rides on the next durable batch).
* A batch holding anything else, or one that meets another process's write lock, runs
  whole on the commit thread (waiting for the lock there), so the loop never blocks on a
  lock or a long scan.
* Automatic checkpoints are off on the writer (one could fsync the database file on the
  loop); the commit thread checkpoints every few hundred commits instead.

Operations must not be partly applied: on the loop a batch runs without a savepoint per
operation, so if any operation raises, the whole transaction is rolled back and the batch
runs again on the commit thread, where each operation gets its own savepoint and one
failing is undone alone.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from resgov.ledger.sqlite_lines import LineCache
from resgov.ledger.store import StoreError

T = TypeVar("T")

# Python 3.11's sqlite3 binds only exact int, float and str without "adapting" them; a None
# or a bool parameter goes through the adapter lookup, which probes two attributes that do
# not exist and formats an AttributeError for each (about 2,500 CPU instructions per
# parameter, ~12 per proxied call: 3 % of its CPU, counted with callgrind, bench/README.md).
# An adapter registered for the type is found at once. Both bind exactly as before: None as
# NULL, a bool as the integer it is.


def _null(value: None) -> None:
    return value


sqlite3.register_adapter(type(None), _null)
sqlite3.register_adapter(bool, int)

#: Commits between two WAL checkpoints; also how many commits in a row may skip the commit thread.
CHECKPOINT_EVERY = 256
#: How long a batch on the commit thread waits for another process's write lock.
LOCK_WAIT_SECONDS = 30.0


@dataclass(slots=True)
class Op:
    """One queued write: ``fn(conn, now)`` inside the batch's transaction."""

    fn: Callable[[sqlite3.Connection, float], Any]
    durable: bool
    #: Small enough to run on the event loop (the hot path); everything else runs on the commit thread.
    inline: bool
    future: asyncio.Future[Any] | None
    result: Any = None
    error: BaseException | None = None


def _deliver(ops: list[Op]) -> None:
    for op in ops:
        fut = op.future
        if fut is None or fut.done():
            continue
        if op.error is not None:
            fut.set_exception(op.error)
        else:
            fut.set_result(op.result)


def _fail(batch: list[Op], message: str) -> None:
    for op in batch:
        op.result = None
        op.error = StoreError(message)


def connect(path: str, *, busy_timeout_ms: int = 30_000) -> sqlite3.Connection:
    """A WAL connection to the ledger file (readers and CLI tools; the writer opens its own)."""
    conn = sqlite3.connect(
        path, isolation_level=None, check_same_thread=False, timeout=busy_timeout_ms / 1000
    )
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA busy_timeout={busy_timeout_ms}")
    conn.execute("PRAGMA foreign_keys=OFF")
    return conn


class GroupCommitWriter:
    """The single writer of one SQLite file, bound to the event loop that opened it."""

    def __init__(self, path: str, schema: str) -> None:
        self.path = path
        self._schema = schema
        self.lines = LineCache()
        self._conn: sqlite3.Connection | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._committer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="resgov-sqlite-commit")
        self._pending: list[Op] = []
        self._scheduled = False
        self._busy = False
        self._idle: asyncio.Event | None = None
        self._wal_fd: int | None = None
        self._unchecked = 0
        self.closed = False
        #: Batches committed, and operations in them (their ratio is the average batch size).
        self.batches = 0
        self.batched_ops = 0

    # -- lifecycle -------------------------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        """True between open() and close()."""
        return self._conn is not None and not self.closed

    async def open(self) -> None:
        """Create the schema and open the writer connection, bound to the running loop."""
        loop = asyncio.get_running_loop()
        self._conn = await loop.run_in_executor(self._committer, self._open_conn)
        self._loop = loop
        self._loop_thread = threading.get_ident()
        self._idle = asyncio.Event()
        self._idle.set()

    def _open_conn(self) -> sqlite3.Connection:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        conn = connect(self.path)
        conn.executescript(self._schema)
        # The writer never waits for a lock on the loop (see _begin), syncs the WAL itself
        # (see _sync_wal) and checkpoints off the loop (see _after_commit).
        conn.execute("PRAGMA busy_timeout=0")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA wal_autocheckpoint=0")
        return conn

    async def close(self) -> None:
        """Let queued writes commit, then close the connection and stop the commit thread."""
        if self.closed:
            return
        self.closed = True
        if self._loop is not None:
            if asyncio.get_running_loop() is self._loop:
                await self._drain()
            else:
                await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self._drain(), self._loop))
        conn, self._conn = self._conn, None
        if conn is not None:
            await asyncio.get_running_loop().run_in_executor(self._committer, self._close_conn, conn)
        self._committer.shutdown(wait=True)

    async def _drain(self) -> None:
        assert self._idle is not None
        while self._pending or self._busy or self._scheduled:
            self._idle.clear()
            self._kick()
            await self._idle.wait()

    def _close_conn(self, conn: sqlite3.Connection) -> None:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        conn.close()
        if self._wal_fd is not None:
            os.close(self._wal_fd)
            self._wal_fd = None

    # -- queueing --------------------------------------------------------------------------------

    async def write(
        self, fn: Callable[[sqlite3.Connection, float], T], *, durable: bool = False, inline: bool = False
    ) -> T:
        """Queue one write; it returns once its batch has committed (fsync'd when ``durable``)."""
        if self.closed or self._loop is None:
            raise StoreError("sqlite store is closed")
        loop = asyncio.get_running_loop()
        if loop is not self._loop:  # a caller on another loop (a test, a CLI helper): hop over
            return await asyncio.wrap_future(
                asyncio.run_coroutine_threadsafe(self.write(fn, durable=durable, inline=inline), self._loop)
            )
        fut: asyncio.Future[T] = loop.create_future()
        self._pending.append(Op(fn, durable, inline, fut))
        self._kick()
        return await fut

    def write_nowait(self, fn: Callable[[sqlite3.Connection, float], Any]) -> None:
        """Queue a small write nobody waits for (it commits with the next batch)."""
        if self.closed or self._loop is None:
            return
        op = Op(fn, False, True, None)
        if threading.get_ident() == self._loop_thread:
            self._enqueue(op)
        else:
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                self._loop.call_soon_threadsafe(self._enqueue, op)

    def _enqueue(self, op: Op) -> None:
        self._pending.append(op)
        self._kick()

    def _kick(self) -> None:
        if not self._scheduled and not self._busy and self._pending:
            self._scheduled = True
            assert self._loop is not None
            # call_soon, not now: writes queued in the same loop iteration share the batch.
            self._loop.call_soon(self._run_batch)

    # -- one batch -------------------------------------------------------------------------------

    def _run_batch(self) -> None:
        self._scheduled = False
        if self._busy or not self._pending:
            return
        batch, self._pending = self._pending, []
        conn = self._conn
        if conn is None:
            _fail(batch, "sqlite store is closed")
            _deliver(batch)
            return
        self._busy = True
        durable = any(op.durable for op in batch)
        done: concurrent.futures.Future[None]
        try:
            if all(op.inline for op in batch) and self._apply_inline(conn, batch):
                if not durable and self._unchecked < CHECKPOINT_EVERY:
                    self._commit(conn, batch, durable=False)
                    self._finish(batch)
                    return
                done = self._committer.submit(self._commit, conn, batch, durable)
            else:
                done = self._committer.submit(self._apply, conn, batch, durable)
        except Exception as exc:  # never leave the writer busy forever: every later write would hang
            self._abandon(conn, batch, f"sqlite: {type(exc).__name__}: {exc}")
            self._finish(batch)
            return
        done.add_done_callback(lambda f: self._wake(batch, f))

    def _wake(self, batch: list[Op], done: concurrent.futures.Future[None]) -> None:
        """On the commit thread: hand the committed batch back to the loop, then checkpoint if due.

        The batch's callers are answered first: a checkpoint copies hundreds of commits into the
        database file and fsyncs it, and the call whose commit made it due need not wait for
        that. The writer stays busy until it is done (it uses the connection).
        """
        exc = done.exception()
        if exc is not None:  # a bug, not a database error (those are caught where they happen)
            self._abandon(self._conn, batch, f"sqlite: {type(exc).__name__}: {exc}")
        loop = self._loop
        if loop is None:
            return
        conn = self._conn
        # A done-callback runs on the loop thread when the batch finished before it was added:
        # never checkpoint there (the next batch, sent to the commit thread since one is due, will).
        on_loop = threading.get_ident() == self._loop_thread
        if self._unchecked < CHECKPOINT_EVERY or conn is None or on_loop:
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                loop.call_soon_threadsafe(self._finish, batch)
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._answer, batch)
        self._unchecked = 0
        with contextlib.suppress(sqlite3.Error):
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._finish, [])

    def _answer(self, batch: list[Op]) -> None:
        self.batches += 1
        self.batched_ops += len(batch)
        _deliver(batch)

    def _finish(self, batch: list[Op]) -> None:
        self._busy = False
        if batch:
            self._answer(batch)
        if self._pending:
            self._kick()
        elif self._idle is not None:
            self._idle.set()

    def _apply_inline(self, conn: sqlite3.Connection, batch: list[Op]) -> bool:
        """On the loop: take the write lock if free and apply the batch, COMMIT left to do.

        False (nothing applied, no transaction open) sends the batch to the commit thread.
        """
        try:
            conn.execute("BEGIN IMMEDIATE")  # busy_timeout=0: fails at once if another process writes
        except sqlite3.Error:
            return False
        now = time.time()
        try:
            self.lines.begin(conn)
            for op in batch:
                op.result = op.fn(conn, now)
            self.lines.flush(conn)
        except Exception:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
            self.lines.drop()
            for op in batch:
                op.result = None
            return False
        return True

    def _apply(self, conn: sqlite3.Connection, batch: list[Op], durable: bool) -> None:
        """On the commit thread: BEGIN (waiting for the lock), each op in a savepoint, COMMIT."""
        try:
            self._begin_waiting(conn)
            self.lines.begin(conn)
        except sqlite3.Error as exc:
            self._abandon(conn, batch, f"sqlite: cannot begin: {exc}")
            return
        now = time.time()
        for op in batch:
            conn.execute("SAVEPOINT op")
            try:
                # An operation changes the line cache only once all its statements succeeded,
                # so rolling back to its savepoint leaves the cache matching the file.
                op.result = op.fn(conn, now)
                conn.execute("RELEASE op")
            except Exception as exc:  # an op failing must not poison the batch
                conn.execute("ROLLBACK TO op")
                conn.execute("RELEASE op")
                op.error = exc if not isinstance(exc, sqlite3.Error) else StoreError(f"sqlite: {exc}")
        try:
            self.lines.flush(conn)
        except sqlite3.Error as exc:
            self._abandon(conn, batch, f"sqlite: cannot write budget lines: {exc}")
            return
        self._commit(conn, batch, durable)

    def _abandon(self, conn: sqlite3.Connection | None, batch: list[Op], message: str) -> None:
        """Roll the batch back, forget the line cache (it may hold the batch's moves), fail every op."""
        if conn is not None:
            with contextlib.suppress(sqlite3.Error):
                conn.execute("ROLLBACK")
        self.lines.drop()
        _fail(batch, message)

    @staticmethod
    def _begin_waiting(conn: sqlite3.Connection) -> None:
        """BEGIN IMMEDIATE, retrying while another process holds the write lock (up to 30 s)."""
        deadline = time.monotonic() + LOCK_WAIT_SECONDS
        pause = 0.001
        while True:
            try:
                conn.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise
                if time.monotonic() >= deadline:
                    raise
            time.sleep(pause)
            pause = min(pause * 2, 0.05)

    def _commit(self, conn: sqlite3.Connection, batch: list[Op], durable: bool) -> None:
        try:
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            self._abandon(conn, batch, f"sqlite: commit failed: {exc}")
            return
        if durable:
            try:
                self._sync_wal()
            except OSError as exc:
                # Committed but maybe not on disk: nobody may act on it as if it were.
                _fail(batch, f"sqlite: cannot fsync the WAL: {exc}")
        # Counted here; the checkpoint itself runs once the batch is answered (see _wake).
        self._unchecked += 1

    def _sync_wal(self) -> None:
        """fsync the WAL file (commit thread only): the batch just committed is on disk after it."""
        wal = self.path + "-wal"
        fd = self._wal_fd
        if fd is not None and os.fstat(fd).st_ino != _inode(wal):
            os.close(fd)  # the WAL was replaced (never while this connection is open, but be sure)
            fd = self._wal_fd = None
        if fd is None:
            try:
                fd = self._wal_fd = os.open(wal, os.O_RDONLY)
            except FileNotFoundError:
                return  # no WAL: an in-memory database, nothing to make durable
            # The WAL's directory entry must be durable too, once.
            dir_fd = os.open(os.path.dirname(os.path.abspath(wal)), os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        os.fsync(fd)


def _inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None
