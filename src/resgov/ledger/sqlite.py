"""The embedded SQLite ledger: schema and operations (WAL, one writer with group commit, readers).

Writes go through :class:`~resgov.ledger.sqlite_writer.GroupCommitWriter` (batches, one
fsync per durable batch, where each step runs) and move budget lines through its
:class:`~resgov.ledger.sqlite_lines.LineCache`. Reads run on a small pool of reader
connections (WAL readers never block the writer).

Durability per batch: a batch holding a reservation (or a settlement in release mode)
is fsync'd before anyone is told; a batch of only settlements is committed without an
fsync: visible to readers at once, surviving a crash of the process, its fsync riding
the next durable batch. Only a power loss in between can lose a settlement, which leaves
the reservation to be charged at its bound by the sweeper: an over-count, never a loss.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, TypeVar

from resgov.core.budget import NO_SPEND, LineState, first_misfit, settle
from resgov.ledger.sqlite_writer import GroupCommitWriter, connect
from resgov.ledger.store import (
    ApiKeyRecord,
    AuditEntry,
    AuditQuery,
    GovRecord,
    IdemClaim,
    LedgerTotals,
    ReserveOutcome,
    ReserveRequest,
    SettleOutcome,
    SettleRequest,
)

log = logging.getLogger("resgov.ledger.sqlite")
T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS budget_line (
    org TEXT NOT NULL, key TEXT NOT NULL,
    spent INTEGER NOT NULL DEFAULT 0, reserved INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (org, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS reservation (
    id TEXT PRIMARY KEY, org TEXT NOT NULL, agent TEXT NOT NULL,
    amount INTEGER NOT NULL, keys TEXT NOT NULL,
    lease_expires REAL NOT NULL, created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS reservation_lease ON reservation (lease_expires);
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id TEXT NOT NULL UNIQUE, org TEXT NOT NULL, agent TEXT NOT NULL,
    kind TEXT NOT NULL, route TEXT NOT NULL, model TEXT NOT NULL, provider TEXT NOT NULL,
    status TEXT NOT NULL, reason TEXT, http_status INTEGER,
    reserved INTEGER NOT NULL, actual INTEGER NOT NULL,
    overage INTEGER NOT NULL, estimated INTEGER NOT NULL, expired INTEGER NOT NULL,
    input_tokens INTEGER, output_tokens INTEGER, upstream_request_id TEXT,
    started_at REAL NOT NULL, finished_at REAL, detail TEXT
);
CREATE INDEX IF NOT EXISTS audit_org_seq ON audit (org, seq);
CREATE INDEX IF NOT EXISTS audit_org_agent_seq ON audit (org, agent, seq);
CREATE TABLE IF NOT EXISTS api_key (
    key_hash TEXT PRIMARY KEY, key_id TEXT NOT NULL UNIQUE, org TEXT NOT NULL, name TEXT NOT NULL,
    scopes TEXT NOT NULL, agent_id TEXT, created_at REAL NOT NULL, expires_at REAL,
    revoked_at REAL, prefix TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS api_key_org ON api_key (org);
CREATE TABLE IF NOT EXISTS meta (k TEXT PRIMARY KEY, v TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS governance (
    org TEXT NOT NULL, kind TEXT NOT NULL, key TEXT NOT NULL, data TEXT NOT NULL, updated_at REAL NOT NULL,
    PRIMARY KEY (org, kind, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS idempotency (
    org TEXT NOT NULL, key TEXT NOT NULL, fingerprint TEXT NOT NULL, owner TEXT NOT NULL, state TEXT NOT NULL,
    status INTEGER, body TEXT, lease_until REAL NOT NULL, expires_at REAL NOT NULL,
    PRIMARY KEY (org, key)
);
CREATE INDEX IF NOT EXISTS idempotency_expiry ON idempotency (expires_at);
CREATE INDEX IF NOT EXISTS audit_started ON audit (started_at);
"""

AUDIT_COLUMNS = (
    "request_id, org, agent, kind, route, model, provider, status, reason, http_status, reserved, actual, "
    "overage, estimated, expired, input_tokens, output_tokens, upstream_request_id, started_at, finished_at, detail"
)
_INSERT_AUDIT = f"INSERT INTO audit ({AUDIT_COLUMNS}) VALUES ({','.join('?' * 21)})"


def _audit_row(e: AuditEntry) -> tuple[Any, ...]:
    return (
        e.request_id,
        e.org,
        e.agent,
        e.kind,
        e.route,
        e.model,
        e.provider,
        e.status,
        e.reason,
        e.http_status,
        e.reserved,
        e.actual,
        int(e.overage),
        int(e.estimated),
        int(e.expired),
        e.input_tokens,
        e.output_tokens,
        e.upstream_request_id,
        e.started_at,
        e.finished_at,
        json.dumps(e.detail) if e.detail else None,
    )


def _audit_from_row(row: Sequence[Any]) -> AuditEntry:
    (
        request_id,
        org,
        agent,
        kind,
        route,
        model,
        provider,
        status,
        reason,
        http_status,
        reserved,
        actual,
        overage,
        estimated,
        expired,
        input_tokens,
        output_tokens,
        upstream_request_id,
        started_at,
        finished_at,
        detail,
    ) = row
    return AuditEntry(
        request_id=request_id,
        org=org,
        agent=agent,
        kind=kind,
        route=route,
        model=model,
        provider=provider,
        status=status,
        reason=reason,
        http_status=http_status,
        reserved=reserved,
        actual=actual,
        overage=bool(overage),
        estimated=bool(estimated),
        expired=bool(expired),
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        upstream_request_id=upstream_request_id,
        started_at=started_at,
        finished_at=finished_at,
        detail=json.loads(detail) if detail else None,
    )


def path_from_url(url: str) -> str:
    """``sqlite:///relative.db``, ``sqlite:////abs/path.db`` or a bare path → a file path."""
    if url.startswith("sqlite://"):
        return url[len("sqlite://") :].removeprefix("/") or "resgov.db"
    return url


class SQLiteStore:
    """The default, embedded store. One server process serves a file; CLI tools may write beside it."""

    name = "sqlite"

    def __init__(self, path: str, *, readers: int = 2) -> None:
        self.path = path_from_url(path)
        self._writer = GroupCommitWriter(self.path, SCHEMA)
        self._lines = self._writer.lines
        self._write = self._writer.write
        self._readers = ThreadPoolExecutor(max_workers=readers, thread_name_prefix="resgov-sqlite-read")
        self._local = threading.local()

    @property
    def batches(self) -> int:
        """Batches committed so far (group commit)."""
        return self._writer.batches

    @property
    def batched_ops(self) -> int:
        """Write operations in those batches."""
        return self._writer.batched_ops

    async def open(self) -> None:
        """Create the schema and open the writer, bound to the running loop."""
        await self._writer.open()

    async def close(self) -> None:
        """Let queued writes commit, then close the writer and the readers."""
        if self._writer.closed:
            return
        await self._writer.close()
        self._readers.shutdown(wait=True)

    async def ping(self) -> bool:
        """True when the file can be read and the writer is open."""
        if not self._writer.is_open:
            return False
        try:
            await self._read(lambda c: c.execute("SELECT 1").fetchone())
        except (sqlite3.Error, RuntimeError):
            return False
        return True

    async def _read(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def run() -> T:
            conn = getattr(self._local, "conn", None)
            if conn is None:
                conn = connect(self.path)
                self._local.conn = conn
            return fn(conn)

        return await asyncio.get_running_loop().run_in_executor(self._readers, run)

    # -- money -----------------------------------------------------------------------------------

    @staticmethod
    def _states(conn: sqlite3.Connection, org: str, keys: Sequence[str]) -> dict[str, LineState]:
        states: dict[str, LineState] = {}
        for key in keys:
            row = conn.execute(
                "SELECT spent, reserved FROM budget_line WHERE org=? AND key=?", (org, key)
            ).fetchone()
            states[key] = LineState(row[0], row[1]) if row else LineState()
        return states

    async def reserve(self, request: ReserveRequest) -> ReserveOutcome:
        """All lines or none, durable (fsync'd with its batch) before returning."""
        org = request.org
        amount = request.amount
        keys = list(dict.fromkeys(line.key for line in request.lines))
        entry = request.audit
        lines = self._lines

        def op(conn: sqlite3.Connection, now: float) -> ReserveOutcome:
            states = {key: lines.get(conn, org, key) or NO_SPEND for key in keys}
            refused = first_misfit(request.lines, states, amount)
            if refused is not None:
                return ReserveOutcome(ok=False, states=states, refused=refused)
            conn.execute(
                "INSERT INTO reservation (id, org, agent, amount, keys, lease_expires, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (request.reservation_id, org, request.agent, amount, "\x1f".join(keys),
                 now + request.ttl_seconds, now),
            )  # fmt: skip
            entry.reserved = amount
            entry.status = "in_flight"
            conn.execute(_INSERT_AUDIT, _audit_row(entry))
            after = {k: LineState(s.spent, s.reserved + amount) for k, s in states.items()}
            for key, state in after.items():
                lines.put(org, key, state)
            return ReserveOutcome(ok=True, states=after)

        return await self._write(op, durable=True, inline=True)

    def _settle_in(self, conn: sqlite3.Connection, now: float, request: SettleRequest) -> SettleOutcome:
        row = conn.execute(
            "DELETE FROM reservation WHERE id = ? RETURNING org, amount, keys", (request.reservation_id,)
        ).fetchone()
        if row is None:
            return SettleOutcome(settled=False)
        org, reserved, keys_text = row
        charge = settle(reserved, request.kind, request.amount)
        lines = self._lines
        states: dict[str, LineState] = {}
        for key in dict.fromkeys(keys_text.split("\x1f")) if keys_text else ():
            state = lines.get(conn, org, key)
            if state is not None:
                states[key] = LineState(state.spent + charge.charged, state.reserved - reserved)
        conn.execute(
            "UPDATE audit SET status=?, reason=COALESCE(?, reason), http_status=COALESCE(?, http_status), "
            "actual=?, overage=?, estimated=?, expired=?, input_tokens=?, output_tokens=?, "
            "upstream_request_id=COALESCE(?, upstream_request_id), finished_at=?, "
            "detail=COALESCE(?, detail) WHERE request_id=?",
            (
                request.status,
                request.reason,
                request.http_status,
                charge.charged,
                int(charge.overage > 0),
                int(request.kind == "estimated"),
                int(request.kind.startswith("expire")),
                request.input_tokens,
                request.output_tokens,
                request.upstream_request_id,
                now,
                json.dumps(request.detail) if request.detail else None,
                request.reservation_id,
            ),
        )
        for key, state in states.items():
            lines.put(org, key, state)
        return SettleOutcome(
            settled=True,
            charged=charge.charged,
            refund=charge.refund,
            overage=charge.overage,
            reserved=reserved,
            states=states,
        )

    async def settle(self, request: SettleRequest) -> SettleOutcome:
        """Idempotent by reservation id: the row is deleted by the first settlement."""
        return await self._write(
            lambda c, now: self._settle_in(c, now, request), durable=request.durable, inline=True
        )

    async def renew(self, reservation_ids: Sequence[str], ttl_seconds: float) -> None:
        """Push leases forward; nobody waits on it (a lost renewal only settles earlier, at the bound)."""
        ids = list(reservation_ids)

        def op(conn: sqlite3.Connection, now: float) -> None:
            conn.executemany(
                "UPDATE reservation SET lease_expires = ? WHERE id = ?", [(now + ttl_seconds, i) for i in ids]
            )

        self._writer.write_nowait(op)

    async def sweep(self, mode: Literal["charge", "release"]) -> int:
        """Settle expired leases by the store's clock (this process's, since it owns the file)."""

        def op(conn: sqlite3.Connection, now: float) -> int:
            ids = [r[0] for r in conn.execute("SELECT id FROM reservation WHERE lease_expires < ?", (now,))]
            kind: Literal["expire_charge", "expire_release"] = (
                "expire_charge" if mode == "charge" else "expire_release"
            )
            count = 0
            for rid in ids:
                outcome = self._settle_in(
                    conn,
                    now,
                    SettleRequest(rid, kind, 0, "expired", reason="reservation_expired"),
                )
                count += int(outcome.settled)
            return count

        return await self._write(op, durable=True)

    async def record(self, entry: AuditEntry) -> None:
        """Write the audit entry of a refusal; it returns once committed (not fsync'd)."""
        row = _audit_row(entry)
        await self._write(
            lambda c, _now: c.execute(_INSERT_AUDIT, row),
            inline=True,
        )

    async def book_unreserved(self, entry: AuditEntry, line_keys: Sequence[str]) -> bool:
        """Charge a call that ran unreserved to its lines (no limit check) with its audit record, once."""
        row = _audit_row(entry)
        keys = list(dict.fromkeys(line_keys))

        def op(conn: sqlite3.Connection, _now: float) -> bool:
            if conn.execute("SELECT 1 FROM audit WHERE request_id = ?", (entry.request_id,)).fetchone():
                return False
            conn.execute(_INSERT_AUDIT, row)
            for key in keys:
                state = self._lines.get(conn, entry.org, key) or NO_SPEND
                self._lines.put(entry.org, key, LineState(state.spent + entry.actual, state.reserved))
            return True

        return await self._write(op, durable=True, inline=True)

    async def line_states(self, org: str, keys: Sequence[str]) -> dict[str, LineState]:
        """Read committed and reserved spend of lines."""
        return await self._read(lambda c: self._states(c, org, keys))

    async def flush(self) -> None:
        """Wait until everything queued so far has committed."""
        await self._write(lambda c, now: None, inline=True)

    async def _audit_rows(
        self, query: AuditQuery, before_seq: int | None, newest_first: bool
    ) -> list[tuple[int, AuditEntry]]:
        """The audit query both orders share: after ``after_seq``, below ``before_seq``, filtered."""
        sql = f"SELECT seq, {AUDIT_COLUMNS} FROM audit WHERE seq > ?"
        args: list[Any] = [query.after_seq]
        if before_seq is not None:
            sql += " AND seq < ?"
            args.append(before_seq)
        for column, value in (("org", query.org), ("agent", query.agent), ("status", query.status)):
            if value is not None:
                sql += f" AND {column} = ?"
                args.append(value)
        if query.since is not None:
            sql += " AND started_at >= ?"
            args.append(query.since)
        if query.until is not None:
            sql += " AND started_at < ?"
            args.append(query.until)
        sql += f" ORDER BY seq {'DESC' if newest_first else 'ASC'} LIMIT ?"
        args.append(query.limit)
        rows = await self._read(lambda c: c.execute(sql, args).fetchall())
        return [(row[0], _audit_from_row(row[1:])) for row in rows]

    async def audit(self, query: AuditQuery) -> list[tuple[int, AuditEntry]]:
        """Audit entries, oldest first, after ``after_seq``, filtered."""
        return await self._audit_rows(query, None, newest_first=False)

    async def totals(self) -> LedgerTotals:
        """Whole-ledger sums (tests and ``resgov store check``)."""

        def run(c: sqlite3.Connection) -> LedgerTotals:
            reserved = c.execute("SELECT COALESCE(SUM(amount), 0), COUNT(*) FROM reservation").fetchone()
            by_agent = {
                (org, agent): total
                for org, agent, total in c.execute(
                    "SELECT org, agent, SUM(actual) FROM audit GROUP BY org, agent"
                )
            }
            count = c.execute("SELECT COUNT(*) FROM audit").fetchone()[0]
            return LedgerTotals(reserved[0], reserved[1], by_agent, count)

        return await self._read(run)

    # -- keys ------------------------------------------------------------------------------------

    @staticmethod
    def _key_from_row(row: Sequence[Any]) -> ApiKeyRecord:
        key_hash, key_id, org, name, scopes, agent_id, created_at, expires_at, revoked_at, prefix = row
        return ApiKeyRecord(
            key_id=key_id,
            key_hash=key_hash,
            org=org,
            name=name,
            scopes=tuple(scopes.split(",")) if scopes else (),
            agent_id=agent_id,
            created_at=created_at,
            expires_at=expires_at,
            revoked_at=revoked_at,
            prefix=prefix,
        )

    @staticmethod
    def insert_key(conn: sqlite3.Connection, record: ApiKeyRecord) -> None:
        """Insert a key row (shared by the async API and the CLI's direct transaction)."""
        conn.execute(
            "INSERT INTO api_key (key_hash, key_id, org, name, scopes, agent_id, created_at, expires_at, "
            "revoked_at, prefix) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                record.key_hash,
                record.key_id,
                record.org,
                record.name,
                ",".join(record.scopes),
                record.agent_id,
                record.created_at,
                record.expires_at,
                record.revoked_at,
                record.prefix,
            ),
        )

    async def put_api_key(self, record: ApiKeyRecord) -> None:
        """Store a key record durably."""
        await self._write(lambda c, _now: self.insert_key(c, record), durable=True)

    _KEY_COLS = "key_hash, key_id, org, name, scopes, agent_id, created_at, expires_at, revoked_at, prefix"

    async def get_api_key(self, key_hash: str) -> ApiKeyRecord | None:
        """Look a key up by its hash."""
        row = await self._read(
            lambda c: c.execute(
                f"SELECT {self._KEY_COLS} FROM api_key WHERE key_hash = ?", (key_hash,)
            ).fetchone()
        )
        return self._key_from_row(row) if row else None

    async def list_api_keys(self, org: str | None) -> list[ApiKeyRecord]:
        """Keys of an org, or of all orgs."""
        if org is None:
            rows = await self._read(lambda c: c.execute(f"SELECT {self._KEY_COLS} FROM api_key").fetchall())
        else:
            rows = await self._read(
                lambda c: c.execute(f"SELECT {self._KEY_COLS} FROM api_key WHERE org = ?", (org,)).fetchall()
            )
        return [self._key_from_row(r) for r in rows]

    async def revoke_api_key(self, org: str | None, key_id: str) -> bool:
        """Mark a key revoked; scoped to ``org`` unless the admin asks (org None)."""

        def op(conn: sqlite3.Connection, now: float) -> bool:
            if org is None:
                cur = conn.execute(
                    "UPDATE api_key SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL", (now, key_id)
                )
            else:
                cur = conn.execute(
                    "UPDATE api_key SET revoked_at = ? WHERE key_id = ? AND org = ? AND revoked_at IS NULL",
                    (now, key_id, org),
                )
            return cur.rowcount > 0

        return await self._write(op, durable=True)

    # -- governance (issue 5) --------------------------------------------------------------------

    @staticmethod
    def _bump_gov(conn: sqlite3.Connection) -> None:
        """Advance the governance version in the same transaction as the change it announces."""
        conn.execute(
            "INSERT INTO meta (k, v) VALUES ('gov_version', '1') "
            "ON CONFLICT (k) DO UPDATE SET v = CAST(CAST(v AS INTEGER) + 1 AS TEXT)"
        )

    @staticmethod
    def _gov_version_in(conn: sqlite3.Connection) -> int:
        row = conn.execute("SELECT v FROM meta WHERE k = 'gov_version'").fetchone()
        return int(row[0]) if row else 0

    async def gov_load(self) -> tuple[int, list[GovRecord]]:
        """Version and records in one read transaction (a consistent snapshot under WAL)."""

        def run(c: sqlite3.Connection) -> tuple[int, list[GovRecord]]:
            c.execute("BEGIN")
            try:
                version = self._gov_version_in(c)
                rows = c.execute("SELECT org, kind, key, data, updated_at FROM governance").fetchall()
            finally:
                c.execute("COMMIT")
            return version, [GovRecord(o, k, key, json.loads(d), u) for o, k, key, d, u in rows]

        return await self._read(run)

    async def gov_version(self) -> int:
        """The governance version (a CLI writing beside the server bumps it too)."""
        return await self._read(self._gov_version_in)

    async def gov_put(self, record: GovRecord, *, if_absent: bool = False) -> bool:
        """Insert or replace a record durably; with ``if_absent`` an existing one wins."""
        data = json.dumps(dict(record.data), separators=(",", ":"), sort_keys=True)

        def op(conn: sqlite3.Connection, now: float) -> bool:
            verb = "INSERT OR IGNORE" if if_absent else "INSERT OR REPLACE"
            cur = conn.execute(
                f"{verb} INTO governance (org, kind, key, data, updated_at) VALUES (?, ?, ?, ?, ?)",
                (record.org, record.kind, record.key, data, record.updated_at or now),
            )
            if cur.rowcount > 0:
                self._bump_gov(conn)
            return cur.rowcount > 0

        return await self._write(op, durable=True)

    async def gov_delete(self, org: str, kind: str, key: str) -> bool:
        """Delete one record durably."""

        def op(conn: sqlite3.Connection, _now: float) -> bool:
            cur = conn.execute(
                "DELETE FROM governance WHERE org = ? AND kind = ? AND key = ?", (org, kind, key)
            )
            if cur.rowcount > 0:
                self._bump_gov(conn)
            return cur.rowcount > 0

        return await self._write(op, durable=True)

    async def idem_claim(
        self, org: str, key: str, fingerprint: str, owner: str, lease_seconds: float, keep_seconds: float
    ) -> IdemClaim:
        """Claim, in the writer's transaction (so two claims of one key are strictly ordered)."""

        def op(conn: sqlite3.Connection, now: float) -> IdemClaim:
            row = conn.execute(
                "SELECT fingerprint, owner, state, status, body, lease_until, expires_at FROM idempotency "
                "WHERE org = ? AND key = ?",
                (org, key),
            ).fetchone()
            if row is not None and row[6] <= now:
                row = None  # kept long enough: the key is free again
            if row is None:
                conn.execute(
                    "INSERT OR REPLACE INTO idempotency (org, key, fingerprint, owner, state, status, body, "
                    "lease_until, expires_at) VALUES (?, ?, ?, ?, 'in_flight', NULL, NULL, ?, ?)",
                    (org, key, fingerprint, owner, now + lease_seconds, now + keep_seconds),
                )
                # Opportunistic clean-up of expired keys, bounded so a claim stays cheap.
                conn.execute(
                    "DELETE FROM idempotency WHERE rowid IN "
                    "(SELECT rowid FROM idempotency WHERE expires_at <= ? LIMIT 100)",
                    (now,),
                )
                return IdemClaim("claimed")
            fp, previous, state, status, body, lease_until, _ = row
            if fp != fingerprint:
                return IdemClaim("mismatch")
            if state == "done":
                return IdemClaim("done", status=status, body=body)
            if lease_until > now:
                return IdemClaim("in_flight")
            conn.execute(
                "UPDATE idempotency SET owner = ?, lease_until = ?, expires_at = ? WHERE org = ? AND key = ?",
                (owner, now + lease_seconds, now + keep_seconds, org, key),
            )
            return IdemClaim("claimed", previous_owner=previous)

        return await self._write(op, durable=True)

    async def idem_complete(
        self, org: str, key: str, owner: str, status: int, body: str, keep_seconds: float
    ) -> bool:
        """Record the answer if ``owner`` still holds the key."""

        def op(conn: sqlite3.Connection, now: float) -> bool:
            cur = conn.execute(
                "UPDATE idempotency SET state = 'done', status = ?, body = ?, expires_at = ? "
                "WHERE org = ? AND key = ? AND owner = ?",
                (status, body, now + keep_seconds, org, key, owner),
            )
            return cur.rowcount > 0

        return await self._write(op, durable=True)

    async def idem_release(self, org: str, key: str, owner: str) -> bool:
        """Drop a claim held by ``owner`` that has no answer."""

        def op(conn: sqlite3.Connection, _now: float) -> bool:
            cur = conn.execute(
                "DELETE FROM idempotency WHERE org = ? AND key = ? AND owner = ? AND state = 'in_flight'",
                (org, key, owner),
            )
            return cur.rowcount > 0

        return await self._write(op, durable=True)

    async def get_audit(self, org: str, request_id: str) -> AuditEntry | None:
        """One record by request id, only within ``org``."""
        row = await self._read(
            lambda c: c.execute(
                f"SELECT {AUDIT_COLUMNS} FROM audit WHERE request_id = ? AND org = ?", (request_id, org)
            ).fetchone()
        )
        return _audit_from_row(row) if row else None

    async def audit_desc(self, query: AuditQuery, before_seq: int | None) -> list[tuple[int, AuditEntry]]:
        """Newest first, below ``before_seq``, filtered like :meth:`audit`."""
        return await self._audit_rows(query, before_seq, newest_first=True)

    async def purge_audit(self, org: str | None, before: float) -> int:
        """Delete old finished records in bounded chunks (one long delete would stall the writer)."""
        total = 0
        while True:

            def op(conn: sqlite3.Connection, _now: float) -> int:
                sql = "SELECT seq FROM audit WHERE started_at < ? AND status != 'in_flight'"
                args: list[Any] = [before]
                if org is not None:
                    sql += " AND org = ?"
                    args.append(org)
                cur = conn.execute(f"DELETE FROM audit WHERE seq IN ({sql} LIMIT 2000)", args)
                return cur.rowcount

            deleted = await self._write(op)
            total += deleted
            if deleted < 2000:
                return total
