"""Move a ledger between backends, and check one: ``resgov store migrate`` and ``resgov store check``.

The Store protocol has no "list everything" operation (the hot path never needs one), so this
module reads and writes each backend's own layout: SQLite's tables, Redis's keys (see the key
layout in ledger/redis.py). Everything goes through a backend-neutral :class:`Snapshot`:

* budget lines (org, key, spent, reserved);
* open reservations, with the lease time they have left (each backend judges leases by its own
  clock, so the remaining time is what moves, not the timestamp);
* the audit trail, in order (SQLite's global sequence is kept in Redis as each org's sequence;
  Redis's per-org sequences become SQLite's, nudged up by one where two orgs tie);
* API keys (hashes only, as stored);
* governance records (orgs, agents and budget settings registered through the API), through the
  Store protocol's ``gov_load`` / ``gov_put``. Idempotency keys of ``POST /api/v1/book`` are
  short-lived and are not moved: a retry across the migration is not deduplicated.

**Migrate offline.** Stop every ResGov instance on the source first: a reservation made during
the copy would be missed. The copy is verified twice: record by record against the source, and
through the Store API (``totals()``, ``line_states()``, ``list_api_keys()``) on both sides; the
source is read again at the end to prove nothing wrote to it meanwhile. Any difference is a
non-zero exit.
"""

from __future__ import annotations

import asyncio
import math
import os
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import orjson

from resgov.ledger import store_from_url
from resgov.ledger.redis import (
    RedisStore,
    _audit_from_hash,
    _audit_json,
    _key_fields,
    _key_from_hash,
    _score_pairs,
)
from resgov.ledger.sqlite import AUDIT_COLUMNS, SCHEMA, SQLiteStore, _audit_from_row, _audit_row
from resgov.ledger.store import ApiKeyRecord, AuditEntry, GovRecord, Store, StoreError

_SEP = "\x1f"
_CHUNK = 1_000
#: Redis's settle index outlives a lease by this much (ledger/redis.py, _INDEX_GRACE_SECONDS).
_INDEX_GRACE_SECONDS = 86_400
#: How far a reservation's remaining lease may drift during the copy and still verify.
_LEASE_SLACK_SECONDS = 30.0


class MigrationError(Exception):
    """The migration cannot start or did not verify."""


# -- the neutral form -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LineRow:
    """One budget line."""

    org: str
    key: str
    spent: int
    reserved: int


@dataclass(frozen=True, slots=True)
class ReservationRow:
    """One open reservation; ``lease_left`` is seconds until its lease expires (negative: expired)."""

    id: str
    org: str
    agent: str
    amount: int
    keys: tuple[str, ...]
    lease_left: float
    created_at: float


@dataclass(slots=True)
class Snapshot:
    """A whole ledger, backend-neutral."""

    backend: str
    lines: list[LineRow] = field(default_factory=list)
    reservations: list[ReservationRow] = field(default_factory=list)
    #: ``(seq, entry)`` in sequence order (ties broken by org).
    audit: list[tuple[int, AuditEntry]] = field(default_factory=list)
    keys: list[ApiKeyRecord] = field(default_factory=list)
    governance: list[GovRecord] = field(default_factory=list)
    persistence_warning: str | None = None

    @property
    def orgs(self) -> list[str]:
        """Every org with any data."""
        found = {r.org for r in self.lines} | {r.org for r in self.reservations}
        found |= (
            {e.org for _, e in self.audit} | {k.org for k in self.keys} | {g.org for g in self.governance}
        )
        return sorted(found)

    def is_empty(self) -> bool:
        """No line, reservation, audit record, key or governance record."""
        return not (self.lines or self.reservations or self.audit or self.keys or self.governance)


@dataclass(frozen=True, slots=True)
class OrgSums:
    """The counts and sums a migration is verified on, for one org."""

    lines: int = 0
    spent: int = 0
    reserved: int = 0
    reservations: int = 0
    reservation_amount: int = 0
    audit: int = 0
    audit_actual: int = 0
    keys: int = 0
    governance: int = 0


def sums(snapshot: Snapshot) -> dict[str, OrgSums]:
    """Per-org counts and sums (the figures ``resgov store migrate`` prints and compares)."""
    out: dict[str, dict[str, int]] = {org: {} for org in snapshot.orgs}

    def add(org: str, name: str, value: int) -> None:
        out[org][name] = out[org].get(name, 0) + value

    for line in snapshot.lines:
        add(line.org, "lines", 1)
        add(line.org, "spent", line.spent)
        add(line.org, "reserved", line.reserved)
    for res in snapshot.reservations:
        add(res.org, "reservations", 1)
        add(res.org, "reservation_amount", res.amount)
    for _, entry in snapshot.audit:
        add(entry.org, "audit", 1)
        add(entry.org, "audit_actual", entry.actual)
    for key in snapshot.keys:
        add(key.org, "keys", 1)
    for record in snapshot.governance:
        add(record.org, "governance", 1)
    return {org: OrgSums(**values) for org, values in out.items()}


def _score_pairs_float(raw: Sequence[Any]) -> list[tuple[str, float]]:
    """``(member, score)`` of a WITHSCORES reply, scores kept as floats (lease times in ms)."""
    if raw and isinstance(raw[0], list | tuple):
        return [(str(member), float(score)) for member, score in raw]
    return [(str(raw[i]), float(raw[i + 1])) for i in range(0, len(raw), 2)]


def _glob(text: str) -> str:
    """Escape Redis glob characters."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


# -- SQLite ----------------------------------------------------------------------------------------


def _sqlite_read(path: str) -> Snapshot:
    conn = sqlite3.connect(f"file:{quote(os.path.abspath(path))}?mode=ro", uri=True, timeout=30.0)
    try:
        conn.execute("BEGIN")  # one read transaction: a consistent snapshot under WAL
        snap = Snapshot("sqlite")
        snap.lines = [
            LineRow(o, k, s, r)
            for o, k, s, r in conn.execute(
                "SELECT org, key, spent, reserved FROM budget_line ORDER BY org, key"
            )
        ]
        now = time.time()
        snap.reservations = [
            ReservationRow(i, o, a, amount, tuple(keys.split(_SEP)) if keys else (), lease - now, created)
            for i, o, a, amount, keys, lease, created in conn.execute(
                "SELECT id, org, agent, amount, keys, lease_expires, created_at FROM reservation ORDER BY id"
            )
        ]
        snap.audit = [
            (row[0], _audit_from_row(row[1:]))
            for row in conn.execute(f"SELECT seq, {AUDIT_COLUMNS} FROM audit ORDER BY seq")
        ]
        snap.keys = [
            SQLiteStore._key_from_row(row)
            for row in conn.execute(
                f"SELECT {SQLiteStore._KEY_COLS} FROM api_key ORDER BY created_at, key_id"
            )
        ]
        conn.execute("COMMIT")
        return snap
    finally:
        conn.close()


def _sqlite_write(path: str, snap: Snapshot, force: bool) -> None:
    conn = sqlite3.connect(path, isolation_level=None, timeout=30.0)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.executescript(SCHEMA)
        conn.execute("BEGIN IMMEDIATE")
        try:
            tables = ("budget_line", "reservation", "audit", "api_key")
            rows = sum(conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in tables)
            if rows and not force:
                raise MigrationError(
                    f"destination {path} is not empty ({rows} rows); use --force to replace it"
                )
            for table in tables:
                conn.execute(f"DELETE FROM {table}")
            conn.executemany(
                "INSERT INTO budget_line (org, key, spent, reserved) VALUES (?, ?, ?, ?)",
                [(r.org, r.key, r.spent, r.reserved) for r in snap.lines],
            )
            now = time.time()
            conn.executemany(
                "INSERT INTO reservation (id, org, agent, amount, keys, lease_expires, created_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                [(r.id, r.org, r.agent, r.amount, _SEP.join(r.keys), now + r.lease_left, r.created_at)
                 for r in snap.reservations],
            )  # fmt: skip
            last = 0
            audit_rows = []
            for seq, entry in snap.audit:
                last = max(seq, last + 1)  # Redis orgs may share a sequence; SQLite's is global
                audit_rows.append((last, *_audit_row(entry)))
            conn.executemany(
                f"INSERT INTO audit (seq, {AUDIT_COLUMNS}) VALUES ({','.join('?' * 22)})", audit_rows
            )
            for key in snap.keys:
                SQLiteStore.insert_key(conn, key)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
    finally:
        conn.close()


# -- Redis -----------------------------------------------------------------------------------------


async def _scan(store: RedisStore, pattern: str) -> list[str]:
    return sorted({str(k) async for k in store._client.scan_iter(match=pattern, count=1_000)})


async def _chunked(store: RedisStore, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
    out: list[Any] = []
    for start in range(0, len(commands), _CHUNK):
        out += await store._execute(commands[start : start + _CHUNK])
    return out


async def _redis_now_ms(store: RedisStore) -> int:
    (t,) = await store._execute([("TIME",)])
    return int(t[0]) * 1000 + int(t[1]) // 1000


async def _redis_keys(store: RedisStore) -> list[str]:
    p = _glob(store.prefix)
    return sorted(set(await _scan(store, "{" + p + ":*")) | set(await _scan(store, p + ":*")))


async def _redis_read(store: RedisStore) -> Snapshot:
    snap = Snapshot("redis", persistence_warning=store.persistence_warning)
    orgs = await store._orgs_list()
    for org in orgs:
        base = store._line(org, "")
        names = await _scan(store, _glob(base) + "*")
        states = await _chunked(store, [("HMGET", n, "spent", "reserved") for n in names])
        snap.lines += [
            LineRow(org, n[len(base) :], int(s or 0), int(r or 0))
            for n, (s, r) in zip(names, states, strict=True)
        ]
    now_ms = await _redis_now_ms(store)
    leases = await _chunked(store, [("ZRANGE", store._leases(org), 0, -1, "WITHSCORES") for org in orgs])
    held = [
        (org, rid, float(score))
        for org, raw in zip(orgs, leases, strict=True)
        for rid, score in _score_pairs_float(raw)
    ]
    hashes = await _chunked(store, [("HGETALL", store._res(org, rid)) for org, rid, _ in held])
    for (org, rid, score), h in zip(held, hashes, strict=True):
        if not h or "amount" not in h:
            continue  # a lease whose reservation was settled between the two reads
        keys = tuple(h["keys"].split(_SEP)) if h.get("keys") else ()
        snap.reservations.append(
            ReservationRow(rid, org, h.get("agent", ""), int(h["amount"]), keys, (score - now_ms) / 1000.0,
                           int(h.get("created_ms", "0")) / 1000.0)
        )  # fmt: skip
    snap.reservations.sort(key=lambda r: r.id)
    per_org: list[list[tuple[int, str, AuditEntry]]] = []
    for org in orgs:
        (raw,) = await store._execute([("ZRANGE", store._auditlog(org), 0, -1, "WITHSCORES")])
        ids = _score_pairs(raw)
        rows = await _chunked(store, [("HGETALL", store._audit_key(org, rid)) for rid, _ in ids])
        per_org.append(
            [(int(h.get("seq", seq)), org, _audit_from_hash(h)) for (_, seq), h in zip(ids, rows, strict=True)
             if "entry" in h]
        )  # fmt: skip
    merged = sorted((row for rows in per_org for row in rows), key=lambda row: (row[0], row[1]))
    snap.audit = [(seq, entry) for seq, _, entry in merged]
    key_names = await _scan(store, _glob(store.prefix) + ":key:*")
    key_rows = await _chunked(store, [("HGETALL", n) for n in key_names])
    snap.keys = sorted(
        (_key_from_hash(h) for h in key_rows if h and "org" in h), key=lambda k: (k.created_at, k.key_id)
    )
    return snap


async def _redis_write(store: RedisStore, snap: Snapshot, force: bool) -> None:
    existing = await _redis_keys(store)
    if existing and not force:
        raise MigrationError(
            f"destination Redis prefix {store.prefix!r} is not empty ({len(existing)} keys); "
            "use --force to replace it"
        )
    for start in range(0, len(existing), _CHUNK):
        await store._execute([("UNLINK", *existing[start : start + _CHUNK])])
    commands: list[tuple[Any, ...]] = [("SADD", store._orgs, org) for org in snap.orgs]
    for line in snap.lines:
        commands.append(("HSET", store._line(line.org, line.key), "spent", str(line.spent),
                         "reserved", str(line.reserved)))  # fmt: skip
    now_ms = await _redis_now_ms(store)
    for r in snap.reservations:
        commands += [
            ("HSET", store._res(r.org, r.id), "agent", r.agent, "amount", str(r.amount),
             "keys", _SEP.join(r.keys), "created_ms", str(round(r.created_at * 1000))),
            ("ZADD", store._leases(r.org), str(now_ms + math.floor(r.lease_left * 1000)), r.id),
            ("SET", store._index(r.id), orjson.dumps([r.org, list(r.keys)]),
             "EX", max(1, math.ceil(r.lease_left)) + _INDEX_GRACE_SECONDS),
        ]  # fmt: skip
    last: dict[str, int] = {}
    for seq, entry in snap.audit:
        org = entry.org
        commands += [
            ("HSET", store._audit_key(org, entry.request_id), "entry", _audit_json(entry), "seq", str(seq)),
            ("ZADD", store._auditlog(org), str(seq), entry.request_id),
            ("ZADD", store._auditlog(org, entry.agent), str(seq), entry.request_id),
        ]
        last[org] = max(last.get(org, 0), seq)
    commands += [("SET", store._seq(org), str(seq)) for org, seq in last.items()]
    for key in snap.keys:
        pairs = [part for item in _key_fields(key).items() for part in item]
        commands += [
            ("HSET", store._api_key(key.key_hash), *pairs),
            ("SET", store._api_key_id(key.key_id), key.key_hash),
            ("SADD", store._org_keys(key.org), key.key_hash),
        ]
    await _chunked(store, commands)


# -- entry points ----------------------------------------------------------------------------------


async def open_store(url: str, *, must_exist: bool = False) -> Store:
    """Open a store by URL (``must_exist``: refuse to create a missing SQLite file)."""
    store = store_from_url(url)
    if must_exist and isinstance(store, SQLiteStore):
        exists = await asyncio.to_thread(os.path.exists, store.path)
        if not exists:
            raise MigrationError(f"no SQLite ledger at {store.path}")
    await store.open()
    if isinstance(store, RedisStore) and not await store.ping():
        await store.close()
        raise MigrationError(f"Redis at {url} does not answer")
    return store


async def read_snapshot(store: Store) -> Snapshot:
    """The whole ledger of an opened SQLite or Redis store."""
    if isinstance(store, SQLiteStore):
        await store.flush()
        snap = await asyncio.to_thread(_sqlite_read, store.path)
    elif isinstance(store, RedisStore):
        try:
            snap = await _redis_read(store)
        except StoreError:
            raise
        except Exception as exc:  # redis errors outside the store's own wrappers
            raise StoreError(f"redis: reading the ledger: {exc}") from exc
    else:
        raise MigrationError(f"cannot read a {type(store).__name__}")
    _, records = await store.gov_load()
    snap.governance = sorted(records, key=_gov_key)
    return snap


def _gov_key(record: GovRecord) -> tuple[str, str, str]:
    return record.org, record.kind, record.key


def _gov_row(record: GovRecord) -> tuple[str, str, str, bytes, float]:
    data = orjson.dumps(dict(record.data), option=orjson.OPT_SORT_KEYS)
    return record.org, record.kind, record.key, data, record.updated_at


async def write_snapshot(store: Store, snap: Snapshot, *, force: bool) -> None:
    """Write ``snap`` into an opened store; refuses a non-empty one unless ``force`` (which replaces it)."""
    _, existing = await store.gov_load()
    if existing and not force:
        raise MigrationError(f"destination is not empty ({len(existing)} governance records); use --force")
    for record in existing:
        await store.gov_delete(record.org, record.kind, record.key)
    if isinstance(store, SQLiteStore):
        await store.flush()
        await asyncio.to_thread(_sqlite_write, store.path, snap, force)
    elif isinstance(store, RedisStore):
        await _redis_write(store, snap, force)
    else:
        raise MigrationError(f"cannot write a {type(store).__name__}")
    for record in snap.governance:
        await store.gov_put(record)


def _norm_entry(entry: AuditEntry) -> dict[str, Any]:
    record = entry.public()
    record["detail"] = record["detail"] or None  # SQLite stores an empty detail as NULL
    return record


def compare(src: Snapshot, dst: Snapshot) -> list[str]:
    """Every record-level difference between two snapshots (empty when they hold the same ledger)."""
    problems: list[str] = []

    def diff(what: str, a: Iterable[Any], b: Iterable[Any]) -> None:
        left, right = set(a), set(b)
        for item in sorted(left - right, key=repr)[:5]:
            problems.append(f"{what}: missing in destination: {item!r}")
        for item in sorted(right - left, key=repr)[:5]:
            problems.append(f"{what}: unexpected in destination: {item!r}")
        if left != right and len(left ^ right) > 10:
            problems.append(f"{what}: {len(left - right)} missing, {len(right - left)} unexpected in all")

    diff("budget line", src.lines, dst.lines)
    diff(
        "reservation",
        ((r.id, r.org, r.agent, r.amount, r.keys) for r in src.reservations),
        ((r.id, r.org, r.agent, r.amount, r.keys) for r in dst.reservations),
    )
    dst_res = {r.id: r for r in dst.reservations}
    for r in src.reservations:
        other = dst_res.get(r.id)
        if other is None:
            continue
        if abs(other.lease_left - r.lease_left) > _LEASE_SLACK_SECONDS:
            problems.append(
                f"reservation {r.id}: lease left {other.lease_left:.1f}s, source {r.lease_left:.1f}s"
            )
        if abs(other.created_at - r.created_at) > 0.002:
            problems.append(f"reservation {r.id}: created_at {other.created_at}, source {r.created_at}")
    src_audit = {e.request_id: _norm_entry(e) for _, e in src.audit}
    dst_audit = {e.request_id: _norm_entry(e) for _, e in dst.audit}
    diff("audit record", src_audit, dst_audit)
    changed = [rid for rid in src_audit.keys() & dst_audit.keys() if src_audit[rid] != dst_audit[rid]]
    for rid in sorted(changed)[:5]:
        fields = [k for k in src_audit[rid] if src_audit[rid][k] != dst_audit[rid].get(k)]
        problems.append(f"audit record {rid}: fields differ: {', '.join(fields)}")
    if len(changed) > 5:
        problems.append(f"{len(changed)} audit records differ in all")

    def order(snap: Snapshot) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for _, e in snap.audit:
            out.setdefault(e.org, []).append(e.request_id)
        return out

    if not changed and src_audit.keys() == dst_audit.keys() and order(src) != order(dst):
        problems.append("audit order differs within an org")
    diff("API key", src.keys, dst.keys)
    diff("governance record", map(_gov_row, src.governance), map(_gov_row, dst.governance))
    return problems


async def compare_through_api(src: Store, dst: Store, snap: Snapshot) -> list[str]:
    """Differences seen through the Store protocol itself (an independent path from the snapshots)."""
    problems: list[str] = []
    a, b = await src.totals(), await dst.totals()
    for name in ("reserved_total", "open_reservations", "audit_count"):
        if getattr(a, name) != getattr(b, name):
            problems.append(f"totals().{name}: destination {getattr(b, name)}, source {getattr(a, name)}")
    if dict(a.audit_actual_by_agent) != dict(b.audit_actual_by_agent):
        problems.append("totals().audit_actual_by_agent differs")
    by_org: dict[str, list[str]] = {}
    for line in snap.lines:
        by_org.setdefault(line.org, []).append(line.key)
    for org, keys in by_org.items():
        if await src.line_states(org, keys) != await dst.line_states(org, keys):
            problems.append(f"line_states of org {org} differ")
    ka = sorted(await src.list_api_keys(None), key=lambda k: k.key_id)
    kb = sorted(await dst.list_api_keys(None), key=lambda k: k.key_id)
    if ka != kb:
        problems.append(f"list_api_keys: destination {len(kb)} keys, source {len(ka)}")
    ga = sorted(map(_gov_row, (await src.gov_load())[1]))
    gb = sorted(map(_gov_row, (await dst.gov_load())[1]))
    if ga != gb:
        problems.append(f"gov_load: destination {len(gb)} governance records, source {len(ga)}")
    return problems


@dataclass(slots=True)
class MigrationReport:
    """What was moved and how it verified."""

    source: dict[str, OrgSums]
    destination: dict[str, OrgSums]
    problems: list[str]
    warnings: list[str]

    @property
    def ok(self) -> bool:
        """Counts, sums and records all match."""
        return not self.problems


async def migrate(src_url: str, dst_url: str, *, force: bool = False) -> MigrationReport:
    """Copy the ledger at ``src_url`` into ``dst_url`` and verify it (see the module docstring)."""
    if src_url == dst_url:
        raise MigrationError("source and destination are the same ledger")
    src = await open_store(src_url, must_exist=True)
    try:
        dst = await open_store(dst_url)
        try:
            snap = await read_snapshot(src)
            await write_snapshot(dst, snap, force=force)
            copied = await read_snapshot(dst)
            again = await read_snapshot(src)
            problems = compare(snap, copied)
            problems += await compare_through_api(src, dst, snap)
            if compare(snap, again) or sums(snap) != sums(again):
                problems.append(
                    "the source changed during the migration (is a ResGov instance still running on it?)"
                )
            src_sums, dst_sums = sums(snap), sums(copied)
            for org in sorted(src_sums.keys() | dst_sums.keys()):
                if src_sums.get(org) != dst_sums.get(org):
                    problems.append(f"org {org}: counts or sums differ")
            warnings = [
                f"{s.name}: {w}" for s in (src, dst) if (w := getattr(s, "persistence_warning", None))
            ]
            return MigrationReport(src_sums, dst_sums, problems, warnings)
        finally:
            await dst.close()
    finally:
        await src.close()


# -- check -----------------------------------------------------------------------------------------


@dataclass(slots=True)
class CheckReport:
    """``resgov store check``: figures, then invariant findings (errors fail the check)."""

    figures: list[str]
    errors: list[str]
    warnings: list[str]

    @property
    def ok(self) -> bool:
        """No invariant is broken."""
        return not self.errors


def _parse_line_key(key: str) -> tuple[str | None, str]:
    """``(agent, period)`` of ``a:<agent>:<period>:<start>``, ``(None, period)`` of ``o:<period>:<start>``."""
    head, period, _start = key.rsplit(":", 2)
    return (head[2:] if head.startswith("a:") else None), period


def check_snapshot(snap: Snapshot) -> CheckReport:
    """The ledger's invariants, checked on a snapshot."""
    figures: list[str] = []
    errors: list[str] = []
    warnings: list[str] = []
    per_org = sums(snap)
    by_agent: dict[tuple[str, str], int] = {}
    by_org: dict[str, int] = {}
    in_flight: set[str] = set()
    for _, e in snap.audit:
        by_agent[(e.org, e.agent)] = by_agent.get((e.org, e.agent), 0) + e.actual
        by_org[e.org] = by_org.get(e.org, 0) + e.actual
        if e.status == "in_flight":
            in_flight.add(e.request_id)
    figures.append(f"backend {snap.backend}: {len(per_org)} org(s), {len(snap.keys)} API key(s)")
    for org, s in per_org.items():
        figures.append(
            f"org {org}: {s.lines} line(s), spent {s.spent}, reserved {s.reserved} nano; {s.reservations} open "
            f"reservation(s) ({s.reservation_amount} nano); {s.audit} audit record(s), Σ actual {s.audit_actual} "
            f"nano; {s.keys} key(s); {s.governance} governance record(s)"
        )
    # 1. reserved on every line = the open reservations over it.
    held: dict[tuple[str, str], int] = {}
    for r in snap.reservations:
        for key in r.keys:
            held[(r.org, key)] = held.get((r.org, key), 0) + r.amount
    lines = {(line.org, line.key): line for line in snap.lines}
    for (org, key), line in lines.items():
        if line.spent < 0 or line.reserved < 0:
            errors.append(f"line {org}/{key}: negative spent {line.spent} or reserved {line.reserved}")
        if line.reserved != held.get((org, key), 0):
            errors.append(
                f"line {org}/{key}: reserved {line.reserved} but open reservations over it hold "
                f"{held.get((org, key), 0)}"
            )
    for (org, key), amount in held.items():
        if (org, key) not in lines:
            errors.append(f"open reservations hold {amount} on {org}/{key}, a line that does not exist")
    # 2. every open reservation has its in-flight audit record, and the other way round.
    open_ids = {r.id for r in snap.reservations}
    for rid in sorted(open_ids - in_flight)[:20]:
        errors.append(f"reservation {rid} is open but its audit record is not in flight")
    for rid in sorted(in_flight - open_ids)[:20]:
        errors.append(f"audit record {rid} is in flight but has no open reservation (lost?)")
    expired = [r for r in snap.reservations if r.lease_left < 0]
    if expired:
        warnings.append(
            f"{len(expired)} reservation(s) past their lease (oldest {-min(r.lease_left for r in expired):.0f}s): "
            "no ResGov instance is sweeping, or it is behind"
        )
    # 3. lines against the audit trail: a line never holds spend the audit does not explain.
    period_sums: dict[tuple[str, str | None, str], int] = {}
    for (org, key), line in lines.items():
        agent, period = _parse_line_key(key)
        period_sums[(org, agent, period)] = period_sums.get((org, agent, period), 0) + line.spent
    for (org, agent, period), spent in sorted(period_sums.items(), key=repr):
        audit = by_agent.get((org, agent), 0) if agent is not None else by_org.get(org, 0)
        who = f"agent {org}/{agent}" if agent is not None else f"org {org}"
        if spent > audit:
            errors.append(f"{who}: {period} lines hold {spent} nano, more than its audit records ({audit})")
        elif period == "total" and spent < audit:
            warnings.append(
                f"{who}: total line holds {spent} nano, less than its audit records ({audit}): the total "
                "budget was added after some calls (or spend was lost)"
            )
        elif period == "total":
            figures.append(f"{who}: total line = Σ audit actual = {spent} nano")
    if snap.persistence_warning:
        warnings.append(snap.persistence_warning)
    return CheckReport(figures, errors, warnings)


async def check(url: str) -> CheckReport:
    """Read the ledger at ``url`` and check its invariants (and the Store API's own totals)."""
    store = await open_store(url, must_exist=True)
    try:
        snap = await read_snapshot(store)
        report = check_snapshot(snap)
        totals = await store.totals()
        report.figures.append(
            f"totals(): {totals.open_reservations} open reservation(s), {totals.reserved_total} nano reserved, "
            f"{totals.audit_count} audit record(s)"
        )
        if totals.audit_count != len(snap.audit) or totals.open_reservations != len(snap.reservations):
            report.warnings.append("the ledger changed while it was being read (a server is running)")
        return report
    finally:
        await store.close()


def format_sums(report: MigrationReport) -> list[str]:
    """The migration's verification table, one row per org and a total."""
    names = ("lines", "spent", "reserved", "reservations", "reservation_amount", "audit", "audit_actual", "keys",
             "governance")  # fmt: skip
    rows = [f"{'org':<24} {'figure':<19} {'source':>22} {'destination':>22}  check"]
    orgs = sorted(report.source.keys() | report.destination.keys())
    totals_src: dict[str, int] = {}
    totals_dst: dict[str, int] = {}
    for org in orgs:
        a, b = report.source.get(org, OrgSums()), report.destination.get(org, OrgSums())
        for name in names:
            x, y = getattr(a, name), getattr(b, name)
            totals_src[name] = totals_src.get(name, 0) + x
            totals_dst[name] = totals_dst.get(name, 0) + y
            rows.append(f"{org:<24} {name:<19} {x:>22} {y:>22}  {'ok' if x == y else 'MISMATCH'}")
    for name in names:
        x, y = totals_src.get(name, 0), totals_dst.get(name, 0)
        rows.append(f"{'(all)':<24} {name:<19} {x:>22} {y:>22}  {'ok' if x == y else 'MISMATCH'}")
    return rows


__all__ = [
    "CheckReport",
    "LineRow",
    "MigrationError",
    "MigrationReport",
    "ReservationRow",
    "Snapshot",
    "check",
    "check_snapshot",
    "compare",
    "format_sums",
    "migrate",
    "read_snapshot",
    "sums",
    "write_snapshot",
]
