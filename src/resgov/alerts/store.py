"""Where alerts persist: the dedupe claims, the outbox, dead letters and API-created webhooks.

Two backends behind one protocol, chosen like the ledger (``RESGOV_STORE``):

* :class:`SQLiteAlertStore`: a file of its own beside the ledger (``resgov.db`` →
  ``resgov.alerts.db``). Its own file, not the ledger's, because the ledger's single
  writer and its group commits are the hot path's critical resource: an alert write
  must never hold the ledger's write lock, not even for a millisecond. One process
  serves the file (like the ledger), so claims here de-duplicate within that process.
  The file holds signing secrets: it is created ``0600``.
* :class:`~resgov.alerts.redis_store.RedisAlertStore`: shared by every instance, so a
  claim is won by exactly one instance (``SET NX PX``) and any instance's worker can
  deliver any pending item (a restarted or dead instance's alerts are still sent).

The claim and the enqueue are one atomic step (one transaction / one Lua script):
an instance that wins a claim has persisted its deliveries, so a crash right after
the claim cannot lose the alert to the other instances' "already claimed".

The outbox is a set of items ``(event, destination)`` each with a due time: leasing
an item moves its due time ``lease`` seconds ahead (a crashed worker's items come
back by themselves: at-least-once), success deletes it, failure reschedules it with
backoff, and too many failures move it to the dead letters.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from fnmatch import fnmatchcase
from typing import Any, Protocol, TypeVar

import orjson

from resgov.alerts.events import EVENT_TYPES, AlertEvent

T = TypeVar("T")
#: Dead letters kept (oldest dropped first).
MAX_DEAD_LETTERS = 1000


@dataclass(frozen=True, slots=True)
class Destination:
    """Where alerts go. ``events`` None = all types; ``org_id`` None = every org's events and system events."""

    id: str
    url: str
    type: str = "generic"
    events: tuple[str, ...] | None = None
    org_id: str | None = None
    secret: str | None = None
    enabled: bool = True
    source: str = "api"  # "api" (stored, editable) or "rgf" (from the policy file, read-only)
    description: str = ""
    created_at: float = 0.0
    updated_at: float = 0.0

    def wants(self, event: AlertEvent) -> bool:
        """True when this destination subscribes to ``event`` (type filter and org scope)."""
        if not self.enabled:
            return False
        if self.org_id is not None and event.org != self.org_id:
            return False
        if self.events is None:
            return True
        return any(event.type == name or fnmatchcase(event.type, name) for name in self.events)

    def to_record(self) -> dict[str, Any]:
        """Persisted form (includes the secret: the store is the only place it lives)."""
        return {
            "id": self.id,
            "url": self.url,
            "type": self.type,
            "events": list(self.events) if self.events is not None else None,
            "org_id": self.org_id,
            "secret": self.secret,
            "enabled": self.enabled,
            "source": self.source,
            "description": self.description,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }

    @classmethod
    def from_record(cls, r: dict[str, Any]) -> Destination:
        """Inverse of :meth:`to_record`."""
        events = r.get("events")
        return cls(
            id=str(r["id"]),
            url=str(r["url"]),
            type=str(r.get("type", "generic")),
            events=tuple(events) if events is not None else None,
            org_id=r.get("org_id"),
            secret=r.get("secret"),
            enabled=bool(r.get("enabled", True)),
            source=str(r.get("source", "api")),
            description=str(r.get("description", "")),
            created_at=float(r.get("created_at", 0.0)),
            updated_at=float(r.get("updated_at", 0.0)),
        )

    def __repr__(self) -> str:
        # Never let a secret (or a Slack/Discord token in the URL path) reach a log through repr().
        from resgov.alerts.urls import redact_url

        return f"Destination(id={self.id!r}, type={self.type!r}, url={redact_url(self.url)!r}, source={self.source!r})"


def normalize_events(events: Sequence[str] | None) -> tuple[str, ...] | None:
    """``None`` / ``[]`` absent… ``["*"]`` → None (all); otherwise validated names or glob patterns.

    An unknown name is refused (a typo like ``budget.treshold`` would otherwise silence alerts).
    """
    if events is None:
        return None
    names = tuple(dict.fromkeys(e.strip() for e in events))
    if not names or "*" in names:
        return None
    for name in names:
        if not any(fnmatchcase(t, name) for t in EVENT_TYPES):
            raise ValueError(
                f"unknown event {name!r}; known: {', '.join(EVENT_TYPES)} (or '*', or a glob like 'budget.*')"
            )
    return names


@dataclass(frozen=True, slots=True)
class OutboxItem:
    """One pending delivery of one event to one destination."""

    item_id: str
    event: AlertEvent
    dest_id: str
    attempts: int = 0
    created_at: float = field(default_factory=time.time)
    last_error: str | None = None

    def to_json(self) -> bytes:
        """Persisted form."""
        return orjson.dumps(
            {
                "item_id": self.item_id,
                "event": self.event.to_record(),
                "dest_id": self.dest_id,
                "attempts": self.attempts,
                "created_at": self.created_at,
                "last_error": self.last_error,
            }
        )

    @classmethod
    def from_json(cls, raw: bytes | str) -> OutboxItem:
        """Inverse of :meth:`to_json`."""
        r = orjson.loads(raw)
        return cls(
            item_id=r["item_id"],
            event=AlertEvent.from_record(r["event"]),
            dest_id=r["dest_id"],
            attempts=int(r.get("attempts", 0)),
            created_at=float(r.get("created_at", 0.0)),
            last_error=r.get("last_error"),
        )


def item_id_for(event_id: str, dest_id: str) -> str:
    """Stable delivery id: the same event to the same destination is one item, whoever enqueues it."""
    return "dlv_" + hashlib.sha256(f"{event_id}\x1f{dest_id}".encode()).hexdigest()[:24]


def make_items(
    event: AlertEvent, destinations: Sequence[Destination], now: float | None = None
) -> list[OutboxItem]:
    """The outbox items for ``event`` to each of ``destinations``."""
    created = time.time() if now is None else now
    return [OutboxItem(item_id_for(event.id, d.id), event, d.id, 0, created) for d in destinations]


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """An item that exhausted its attempts."""

    item: OutboxItem
    error: str
    dead_at: float


class AlertStore(Protocol):
    """Claims, outbox, dead letters and webhooks. Every method may raise on an unreachable backend."""

    name: str

    async def open(self) -> None:
        """Connect and create the schema."""

    async def close(self) -> None:
        """Release every resource."""

    async def claim(self, event_id: str, ttl_seconds: float) -> bool:
        """True for the first caller (any instance) within ``ttl_seconds``; False for every later one."""

    async def claim_and_enqueue(self, event_id: str, ttl_seconds: float, items: Sequence[OutboxItem]) -> bool:
        """Claim and persist ``items`` (due now) atomically; False (and nothing enqueued) if already claimed."""

    async def lease(self, now: float, lease_seconds: float, limit: int) -> list[OutboxItem]:
        """Up to ``limit`` due items, each moved ``lease_seconds`` ahead so no other worker takes it."""

    async def ack(self, item_id: str) -> None:
        """Delivered (or to be dropped): delete the item."""

    async def reschedule(self, item: OutboxItem, due: float) -> None:
        """Store ``item`` (with its new attempts and error) to be retried at ``due``."""

    async def dead_letter(self, item: OutboxItem, error: str, now: float) -> None:
        """Move ``item`` from the outbox to the dead letters."""

    async def next_due(self) -> float | None:
        """The earliest due time in the outbox, or None when it is empty."""

    async def counts(self) -> tuple[int, int]:
        """``(pending, dead)``."""

    async def dead_letters(self, limit: int) -> list[DeadLetter]:
        """The most recent dead letters, newest first."""

    async def drop_destination(self, dest_id: str) -> int:
        """Delete the pending items of a deleted destination; returns how many."""

    async def put_webhook(self, dest: Destination) -> None:
        """Create or replace an API webhook."""

    async def get_webhook(self, webhook_id: str) -> Destination | None:
        """One API webhook, or None."""

    async def list_webhooks(self) -> list[Destination]:
        """Every API webhook, oldest first."""

    async def delete_webhook(self, webhook_id: str) -> bool:
        """Delete an API webhook; False if there was none."""


# -- SQLite ----------------------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS alert_claim (event_id TEXT PRIMARY KEY, expires_at REAL NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS alert_claim_expiry ON alert_claim (expires_at);
CREATE TABLE IF NOT EXISTS alert_outbox (
    item_id TEXT PRIMARY KEY, dest_id TEXT NOT NULL, due_at REAL NOT NULL, item TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS alert_outbox_due ON alert_outbox (due_at);
CREATE INDEX IF NOT EXISTS alert_outbox_dest ON alert_outbox (dest_id);
CREATE TABLE IF NOT EXISTS alert_dead (
    seq INTEGER PRIMARY KEY AUTOINCREMENT, item_id TEXT NOT NULL, item TEXT NOT NULL,
    error TEXT NOT NULL, dead_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS alert_webhook (id TEXT PRIMARY KEY, record TEXT NOT NULL, created_at REAL NOT NULL);
"""


def alerts_path_for(ledger_path: str) -> str:
    """``/data/resgov.db`` → ``/data/resgov.alerts.db`` (beside the ledger, never the ledger itself)."""
    root, ext = os.path.splitext(ledger_path)
    return f"{root}.alerts{ext or '.db'}"


class SQLiteAlertStore:
    """Alerts state in its own SQLite file; every call runs on one dedicated thread with one connection."""

    name = "sqlite"

    def __init__(self, path: str) -> None:
        self.path = path
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None
        self._claims_since_purge = 0

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        if self._executor is None:
            raise RuntimeError("alert store is not open")

        def call() -> T:
            assert self._conn is not None
            return fn(self._conn)

        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    async def open(self) -> None:
        """Create the file (0600: it holds signing secrets) and the schema."""
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="resgov-alerts-sqlite")

        def init() -> None:
            directory = os.path.dirname(os.path.abspath(self.path))
            os.makedirs(directory, exist_ok=True)
            if not os.path.exists(self.path):
                fd = os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600)
                os.close(fd)
            conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False, timeout=10.0)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA busy_timeout=10000")
            conn.executescript(_SCHEMA)
            conn.execute("DELETE FROM alert_claim WHERE expires_at <= ?", (time.time(),))
            self._conn = conn

        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, init)

    async def close(self) -> None:
        """Close the connection and the thread."""
        if self._executor is None:
            return

        def shut() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        await asyncio.get_running_loop().run_in_executor(self._executor, shut)
        self._executor.shutdown(wait=True)
        self._executor = None

    @staticmethod
    def _claim_in(conn: sqlite3.Connection, event_id: str, ttl: float, now: float) -> bool:
        conn.execute("DELETE FROM alert_claim WHERE event_id = ? AND expires_at <= ?", (event_id, now))
        cur = conn.execute(
            "INSERT OR IGNORE INTO alert_claim (event_id, expires_at) VALUES (?, ?)", (event_id, now + ttl)
        )
        return cur.rowcount == 1

    def _maybe_purge(self, conn: sqlite3.Connection, now: float) -> None:
        # Expired claims are dead weight; sweep them now and then, not on every claim.
        self._claims_since_purge += 1
        if self._claims_since_purge >= 1000:
            self._claims_since_purge = 0
            conn.execute("DELETE FROM alert_claim WHERE expires_at <= ?", (now,))

    async def claim(self, event_id: str, ttl_seconds: float) -> bool:
        """First caller wins until the claim expires."""

        def op(conn: sqlite3.Connection) -> bool:
            now = time.time()
            conn.execute("BEGIN IMMEDIATE")
            try:
                won = self._claim_in(conn, event_id, ttl_seconds, now)
                self._maybe_purge(conn, now)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            return won

        return await self._run(op)

    async def claim_and_enqueue(self, event_id: str, ttl_seconds: float, items: Sequence[OutboxItem]) -> bool:
        """One transaction: the claim and the outbox rows commit together or not at all."""

        def op(conn: sqlite3.Connection) -> bool:
            now = time.time()
            conn.execute("BEGIN IMMEDIATE")
            try:
                won = self._claim_in(conn, event_id, ttl_seconds, now)
                if won:
                    conn.executemany(
                        "INSERT OR REPLACE INTO alert_outbox (item_id, dest_id, due_at, item) VALUES (?, ?, ?, ?)",
                        [(i.item_id, i.dest_id, now, i.to_json().decode()) for i in items],
                    )
                self._maybe_purge(conn, now)
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            return won

        return await self._run(op)

    async def lease(self, now: float, lease_seconds: float, limit: int) -> list[OutboxItem]:
        """Due items, pushed ``lease_seconds`` ahead in the same transaction."""

        def op(conn: sqlite3.Connection) -> list[OutboxItem]:
            conn.execute("BEGIN IMMEDIATE")
            try:
                rows = conn.execute(
                    "SELECT item_id, item FROM alert_outbox WHERE due_at <= ? ORDER BY due_at LIMIT ?",
                    (now, limit),
                ).fetchall()
                conn.executemany(
                    "UPDATE alert_outbox SET due_at = ? WHERE item_id = ?",
                    [(now + lease_seconds, r[0]) for r in rows],
                )
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
            return [OutboxItem.from_json(r[1]) for r in rows]

        return await self._run(op)

    async def ack(self, item_id: str) -> None:
        """Delete a delivered item."""
        await self._run(lambda c: c.execute("DELETE FROM alert_outbox WHERE item_id = ?", (item_id,)))

    async def reschedule(self, item: OutboxItem, due: float) -> None:
        """Persist the new attempt count and error, due at ``due``."""

        def op(conn: sqlite3.Connection) -> None:
            # UPDATE, not upsert: an item deleted meanwhile (its webhook was deleted) stays deleted.
            conn.execute(
                "UPDATE alert_outbox SET due_at = ?, item = ? WHERE item_id = ?",
                (due, item.to_json().decode(), item.item_id),
            )

        await self._run(op)

    async def dead_letter(self, item: OutboxItem, error: str, now: float) -> None:
        """Outbox → dead letters, keeping the last :data:`MAX_DEAD_LETTERS`."""

        def op(conn: sqlite3.Connection) -> None:
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute("DELETE FROM alert_outbox WHERE item_id = ?", (item.item_id,))
                conn.execute(
                    "INSERT INTO alert_dead (item_id, item, error, dead_at) VALUES (?, ?, ?, ?)",
                    (item.item_id, item.to_json().decode(), error, now),
                )
                conn.execute(
                    "DELETE FROM alert_dead WHERE seq <= (SELECT MAX(seq) FROM alert_dead) - ?",
                    (MAX_DEAD_LETTERS,),
                )
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

        await self._run(op)

    async def next_due(self) -> float | None:
        """Earliest due time."""
        row = await self._run(lambda c: c.execute("SELECT MIN(due_at) FROM alert_outbox").fetchone())
        return float(row[0]) if row and row[0] is not None else None

    async def counts(self) -> tuple[int, int]:
        """``(pending, dead)``."""

        def op(conn: sqlite3.Connection) -> tuple[int, int]:
            pending = conn.execute("SELECT COUNT(*) FROM alert_outbox").fetchone()[0]
            dead = conn.execute("SELECT COUNT(*) FROM alert_dead").fetchone()[0]
            return int(pending), int(dead)

        return await self._run(op)

    async def dead_letters(self, limit: int) -> list[DeadLetter]:
        """Newest first."""
        rows = await self._run(
            lambda c: c.execute(
                "SELECT item, error, dead_at FROM alert_dead ORDER BY seq DESC LIMIT ?", (limit,)
            ).fetchall()
        )
        return [DeadLetter(OutboxItem.from_json(r[0]), r[1], r[2]) for r in rows]

    async def drop_destination(self, dest_id: str) -> int:
        """Pending items of a deleted destination."""
        cur = await self._run(lambda c: c.execute("DELETE FROM alert_outbox WHERE dest_id = ?", (dest_id,)))
        return int(cur.rowcount)

    async def put_webhook(self, dest: Destination) -> None:
        """Upsert."""
        record = orjson.dumps(dest.to_record()).decode()
        await self._run(
            lambda c: c.execute(
                "INSERT INTO alert_webhook (id, record, created_at) VALUES (?, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET record = excluded.record",
                (dest.id, record, dest.created_at),
            )
        )

    async def get_webhook(self, webhook_id: str) -> Destination | None:
        """By id."""
        row = await self._run(
            lambda c: c.execute("SELECT record FROM alert_webhook WHERE id = ?", (webhook_id,)).fetchone()
        )
        return Destination.from_record(orjson.loads(row[0])) if row else None

    async def list_webhooks(self) -> list[Destination]:
        """Oldest first."""
        rows = await self._run(
            lambda c: c.execute("SELECT record FROM alert_webhook ORDER BY created_at, id").fetchall()
        )
        return [Destination.from_record(orjson.loads(r[0])) for r in rows]

    async def delete_webhook(self, webhook_id: str) -> bool:
        """By id."""
        cur = await self._run(lambda c: c.execute("DELETE FROM alert_webhook WHERE id = ?", (webhook_id,)))
        return int(cur.rowcount) > 0


def with_attempt(item: OutboxItem, error: str | None) -> OutboxItem:
    """``item`` after one more failed attempt."""
    return replace(item, attempts=item.attempts + 1, last_error=error)
