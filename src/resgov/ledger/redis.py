"""The Redis ledger: several ResGov instances, one budget.

Every money operation is one Lua script (ledger/redis_scripts.py): all checks, then all writes,
on keys that share one hash tag, so it is a single atomic step on Redis, on one Redis Cluster
shard, on Valkey and on Dragonfly (every key is declared in ``KEYS``).

Key layout (``P`` is the prefix, ``resgov`` unless the URL says ``?prefix=NAME``)::

    {P:org}:line:<BudgetLine.key>      hash  spent, reserved            (one per budget line)
    {P:org}:res:<reservation id>       hash  agent, amount, keys, created_ms
    {P:org}:leases                     zset  reservation id -> lease expiry (ms, Redis TIME)
    {P:org}:seq                        string  last audit sequence of the org
    {P:org}:audit:<request id>         hash  one AuditEntry (+ seq)
    {P:org}:auditlog                   zset  request id -> seq (the org's audit order)
    {P:org}:auditlog:agent:<agent>     zset  request id -> seq (the same, one agent)
    {P:org}:keys                       set   SHA-256 hashes of the org's API keys
    P:orgs                             set   every org with data (the sweeper's and admin's list)
    P:resorg:<reservation id>          string  JSON [org, [line keys]]: the settle index
    P:key:<key hash>                   hash  one ApiKeyRecord
    P:keyid:<key id>                   string  key hash (revocation by id)

The ``P:*`` keys are the only ones outside an org's hash tag; no script touches them.

**Settling is two steps.** A settle request carries only the reservation id, but a script must
declare its keys up front and every org key lives under ``{P:org}``. So the store first finds
the org and the reservation's line keys, then runs the settle script with those keys declared:

1. the org and line keys come from this process's memory of its own reservations (the proxy
   settles on the instance that reserved, so this is the normal case and costs no round trip),
   or else from ``GET P:resorg:<id>``, written just before the reserve script ran;
2. the settle script re-reads the reservation hash: if it is gone (already settled, by a replay
   or by a sweeper) nothing is written and ``settled=False``; if the declared line keys differ
   from the stored ones nothing is written and the script answers the stored keys, which the
   store retries with once. The first settlement deletes the hash, so each reservation is
   settled exactly once however many callers race.

The index is deleted with the settlement, expires ``TTL + 1 day`` after the last renewal, and
is only ever a pointer: losing it can never lose spend, because the reservation stays in the
org's lease set and the sweeper (which needs no index) charges it when its lease runs out.

**Audit sequence.** Cluster rules forbid a script from touching a global counter, so each org
has its own: ``seq = max(last + 1, Redis TIME in µs)``. Per org it is strictly increasing; across
orgs on one Redis server it follows the server clock, so the admin view (``org=None``) merges
the orgs' logs by ``(seq, org)`` on one ``after_seq`` cursor, and a page never ends in the middle
of a run of equal sequences (so a tie across orgs is never skipped). On a Cluster, cross-org
order follows each shard's clock; per-org order stays exact.

**Round trips.** A reserve is one round trip (index SET + reserve script, pipelined), a settle is
one (settle script + index DEL) when this process made the reservation. Concurrent callers share
pipelines (auto-pipelining, see :meth:`RedisStore._send`), the way SQLite's writer shares a
transaction, so a burst of N requests costs far fewer than N round trips. Those hot commands
travel on a lean pipelined connection (:mod:`resgov.ledger.resp`) where the URL allows it;
everything else on redis-py.

**Durability** is Redis's: reserve returns after Redis applied the script, and survives a Redis
restart only with AOF. :meth:`RedisStore.open` checks ``appendonly yes`` with ``appendfsync
everysec`` (loses at most ~1 s on power loss) or ``always`` (loses nothing) and warns otherwise.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import heapq
import logging
import math
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal, get_args

import orjson
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import AuthenticationError, NoScriptError, RedisError, ResponseError

from resgov.config.redis_url import InvalidRedisPrefix, split_redis_url
from resgov.core.budget import LineState, SettleKind
from resgov.ledger import redis_scripts
from resgov.ledger.resp import LEAN_COMMANDS, RespPipe, lean_options
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
    StoreError,
)

log = logging.getLogger("resgov.ledger.redis")

_SEP = "\x1f"
_INT64_MAX = 2**63 - 1
#: The settle index outlives its lease by this much (it is refreshed by every renewal).
_INDEX_GRACE_SECONDS = 86_400
#: Reservation ids this process remembers (org + line keys) so its settlements skip the index.
_ROUTE_CACHE_SIZE = 100_000
_SWEEP_BATCH = 500
#: A sweep settles at most rounds × batch reservations per org; the next sweep takes the rest.
_SWEEP_ROUNDS = 40
_AUDIT_CHUNK = 500
_AUDIT_MAX_PAGES = 20_000
_SCRIPT_ATTEMPTS = 3
_POOL_SIZE = 64
#: Pipelines in flight at once (auto-pipelining); callers beyond that wait for the next batch.
_FLUSHERS = 2
_BATCH_COMMANDS = 2_000
_FLUSH_ROUNDS = 10_000
#: Callers' command lists queued for the lean connection before they are sent without waiting for
#: the end of the loop iteration (overlaps Redis's work with the client's; see bench/README.md).
_LEAN_CHUNK = 16
#: Fail fast when Redis is down (fail_safe_action answers at once), but ride out a dropped
#: connection: a few quick retries, on redis-py's pool and on the lean connection alike.
#: Retrying a script is safe: reserve, settle and renew are idempotent by reservation id,
#: record by request id.
_RETRIES = 3
_BACKOFF = ExponentialWithJitterBackoff(base=0.01, cap=0.25)
_CONNECT_TIMEOUT = 2.0
_REPLY_TIMEOUT = 10.0
_SETTLE_KINDS: frozenset[str] = frozenset(get_args(SettleKind))

#: Audit fields a settlement may change; stored as hash fields over the record's creation JSON.
_OVERRIDE_INT = frozenset({"actual", "http_status", "input_tokens", "output_tokens"})
_OVERRIDE_BOOL = frozenset({"overage", "estimated", "expired"})
_OVERRIDE_FLOAT = frozenset({"finished_at"})
_OVERRIDE_STR = frozenset({"status", "reason", "upstream_request_id"})

_AUDIT_FIELDS = tuple(f.name for f in fields(AuditEntry))

Command = tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class _Script:
    name: str
    source: str
    sha: str


def _script(name: str, source: str) -> _Script:
    return _Script(name, source, hashlib.sha1(source.encode()).hexdigest())  # Redis names scripts by SHA-1


_RESERVE = _script("reserve", redis_scripts.RESERVE)
_SETTLE = _script("settle", redis_scripts.SETTLE)
_RENEW = _script("renew", redis_scripts.RENEW)
_EXPIRED = _script("expired", redis_scripts.EXPIRED)
_RECORD = _script("record", redis_scripts.RECORD)
_BOOK = _script("book", redis_scripts.BOOK)
_SCRIPTS = (_RESERVE, _SETTLE, _RENEW, _EXPIRED, _RECORD, _BOOK)


def split_url(url: str, prefix: str | None = None) -> tuple[str, str]:
    """``(connection URL, key prefix)`` (see :func:`~resgov.config.redis_url.split_redis_url`)."""
    try:
        return split_redis_url(url, prefix)
    except InvalidRedisPrefix as exc:
        raise StoreError(str(exc)) from None


def persistence_warning(config: Mapping[str, str | None]) -> str | None:
    """Why ``CONFIG GET append*`` is too weak for "no spend lost", or None when it is enough."""
    appendonly = (config.get("appendonly") or "").lower()
    fsync = (config.get("appendfsync") or "").lower()
    if appendonly != "yes":
        return (
            "Redis persistence is too weak for a budget ledger: AOF is off (appendonly="
            f"{appendonly or 'unknown'}), so a Redis restart loses every reservation and spend since the "
            "last RDB snapshot. Set `appendonly yes` and `appendfsync everysec` (at most ~1 s lost on power "
            "loss) or `appendfsync always` (nothing lost)."
        )
    if fsync not in ("always", "everysec"):
        return (
            f"Redis persistence is too weak for a budget ledger: appendfsync={fsync or 'unknown'} leaves "
            "fsync to the OS (up to ~30 s of spend lost on power loss). Set `appendfsync everysec` or `always`."
        )
    return None


def _int64(value: int, what: str, *, signed: bool = False) -> str:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{what} must be an integer of nano-units, got {value!r}")
    if (value < 0 and not signed) or abs(value) > _INT64_MAX:
        raise ValueError(f"{what} out of range: {value}")
    return str(value)


def _held(limit: int) -> int:
    """A limit as the scripts compare it: a budget beyond what a line can hold (int64, ~$9.2
    billion) is the largest one. Only a line already past int64 - amount could tell the two apart,
    and it is refused (the safe side) where the true limit would admit it."""
    return max(-_INT64_MAX, min(limit, _INT64_MAX))


def _audit_json(entry: AuditEntry) -> str:
    """The record as written when the request starts: one opaque JSON value (one script argument)."""
    return orjson.dumps(entry.public()).decode()


def _audit_from_hash(h: Mapping[str, str]) -> AuditEntry:
    """The creation JSON with the settlement's fields laid over it ("" in an override means None)."""
    created: dict[str, Any] = orjson.loads(h["entry"])
    # Only known fields: a record written by a newer ResGov must still load here.
    record = {name: created[name] for name in _AUDIT_FIELDS if name in created}
    for name, value in h.items():
        if name in _OVERRIDE_INT:
            record[name] = int(value) if value != "" else None
        elif name in _OVERRIDE_BOOL:
            record[name] = value == "1"
        elif name in _OVERRIDE_FLOAT:
            record[name] = float(value) if value != "" else None
        elif name in _OVERRIDE_STR:
            record[name] = value if value != "" or name == "status" else None
        elif name == "detail":
            record[name] = orjson.loads(value) if value else None
    return AuditEntry(**record)


def _key_fields(record: ApiKeyRecord) -> dict[str, str]:
    values = {
        "key_id": record.key_id, "key_hash": record.key_hash, "org": record.org, "name": record.name,
        "scopes": ",".join(record.scopes), "created_at": repr(float(record.created_at)), "prefix": record.prefix,
    }  # fmt: skip
    if record.agent_id is not None:
        values["agent_id"] = record.agent_id
    if record.expires_at is not None:
        values["expires_at"] = repr(float(record.expires_at))
    if record.revoked_at is not None:
        values["revoked_at"] = repr(float(record.revoked_at))
    return values


def _key_from_hash(h: Mapping[str, str]) -> ApiKeyRecord:
    def opt_float(name: str) -> float | None:
        value = h.get(name)
        return float(value) if value is not None else None

    scopes = h.get("scopes", "")
    return ApiKeyRecord(
        key_id=h["key_id"], key_hash=h["key_hash"], org=h["org"], name=h.get("name", ""),
        scopes=tuple(scopes.split(",")) if scopes else (), agent_id=h.get("agent_id"),
        created_at=float(h.get("created_at", "0")), expires_at=opt_float("expires_at"),
        revoked_at=opt_float("revoked_at"), prefix=h.get("prefix", ""),
    )  # fmt: skip


def _score_pairs(raw: Sequence[Any]) -> list[tuple[str, int]]:
    """``(member, score)`` pairs of a WITHSCORES reply, flat (RESP2) or already paired (redis-py)."""
    if raw and isinstance(raw[0], list | tuple):
        return [(str(member), int(float(score))) for member, score in raw]
    return [(str(raw[i]), int(float(raw[i + 1]))) for i in range(0, len(raw), 2)]


def _hand_out(
    batch: list[tuple[list[Command], asyncio.Future[list[Any]]]], done: asyncio.Future[list[Any]]
) -> None:
    """Each caller of a shared round trip gets its own replies, or the round trip's failure."""
    error = done.exception() if not done.cancelled() else StoreError("redis: the pipeline was cancelled")
    if error is not None:
        for _, future in batch:
            if not future.done():
                future.set_exception(error)
        return
    replies = done.result()
    start = 0
    for commands, future in batch:
        if not future.done():
            future.set_result(replies[start : start + len(commands)])
        start += len(commands)


def _states(keys: Sequence[str], flat: Sequence[Any]) -> dict[str, LineState]:
    return {key: LineState(int(flat[2 * i]), int(flat[2 * i + 1])) for i, key in enumerate(keys)}


class RedisStore:
    """The ledger on Redis (or Valkey, Dragonfly, one Redis Cluster hash slot per org).

    ``url`` is ``redis://[user:password@]host:port/db``, ``rediss://…`` for TLS or
    ``unix:///path.sock``; redis-py's query options pass through, plus ``?prefix=NAME``.
    """

    name = "redis"

    def __init__(self, url: str, *, prefix: str | None = None) -> None:
        conn_url, self.prefix = split_url(url, prefix)
        retry = Retry(_BACKOFF, _RETRIES)
        # A bounded pool that queues callers (up to 5 s) instead of failing a burst with "Too many
        # connections"; Redis runs one command at a time, so more sockets would not add throughput.
        # URL options (?max_connections=…, ?socket_timeout=…) override these defaults.
        pool = aioredis.BlockingConnectionPool.from_url(
            conn_url, max_connections=_POOL_SIZE, timeout=5.0, decode_responses=True,
            socket_connect_timeout=_CONNECT_TIMEOUT, socket_timeout=_REPLY_TIMEOUT, retry=retry,
        )  # fmt: skip
        self._client: aioredis.Redis = aioredis.Redis.from_pool(pool)
        # The hot commands (scripts, the settle index) go through a lean pipelined connection
        # when the URL allows it (see ledger/resp.py); everything else through redis-py.
        options = lean_options(conn_url, connect_timeout=_CONNECT_TIMEOUT, reply_timeout=_REPLY_TIMEOUT)
        self._lean = RespPipe(options, retries=_RETRIES, backoff=_BACKOFF) if options is not None else None
        self._routes: dict[str, tuple[str, tuple[str, ...]]] = {}
        #: Orgs this process already added to ``P:orgs`` (saves a command on every reserve).
        self._known_orgs: set[str] = set()
        self._queue: collections.deque[tuple[list[Command], asyncio.Future[list[Any]]]] = collections.deque()
        self._flush_tasks: set[asyncio.Task[None]] = set()
        self._lean_queue: list[tuple[list[Command], asyncio.Future[list[Any]]]] = []
        self._lean_loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        #: Why Redis's persistence settings are too weak for "no spend lost" (None when fine).
        self.persistence_warning: str | None = None

    # -- keys ------------------------------------------------------------------------------------

    def _tag(self, org: str) -> str:
        return "{" + self.prefix + ":" + org + "}"

    def _line(self, org: str, key: str) -> str:
        return f"{self._tag(org)}:line:{key}"

    def _res(self, org: str, rid: str) -> str:
        return f"{self._tag(org)}:res:{rid}"

    def _leases(self, org: str) -> str:
        return f"{self._tag(org)}:leases"

    def _seq(self, org: str) -> str:
        return f"{self._tag(org)}:seq"

    def _audit_key(self, org: str, rid: str) -> str:
        return f"{self._tag(org)}:audit:{rid}"

    def _auditlog(self, org: str, agent: str | None = None) -> str:
        base = f"{self._tag(org)}:auditlog"
        return base if agent is None else f"{base}:agent:{agent}"

    def _org_keys(self, org: str) -> str:
        return f"{self._tag(org)}:keys"

    @property
    def _orgs(self) -> str:
        return f"{self.prefix}:orgs"

    def _index(self, rid: str) -> str:
        return f"{self.prefix}:resorg:{rid}"

    def _api_key(self, key_hash: str) -> str:
        return f"{self.prefix}:key:{key_hash}"

    def _api_key_id(self, key_id: str) -> str:
        return f"{self.prefix}:keyid:{key_id}"

    # -- plumbing --------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        """Turn every Redis failure into a StoreError (the proxy's fail_safe_action handles those)."""
        if self._closed:
            raise StoreError("redis store is closed")
        try:
            yield
        except RedisError as exc:
            raise StoreError(f"redis: {what}: {exc}") from exc

    @staticmethod
    def _eval(script: _Script, keys: Sequence[str], args: Sequence[str]) -> Command:
        return ("EVALSHA", script.sha, len(keys), *keys, *args)

    async def _load_scripts(self) -> None:
        shas = await self._execute([("SCRIPT", "LOAD", script.source) for script in _SCRIPTS])
        for script, sha in zip(_SCRIPTS, shas, strict=True):
            if sha != script.sha:  # pragma: no cover - a server hashing differently
                raise StoreError(f"redis: script {script.name} loaded as {sha}, expected {script.sha}")

    async def _execute(self, commands: Sequence[Command]) -> list[Any]:
        """Run commands in one pipelined round trip (not a transaction), reloading scripts on NOSCRIPT.

        ``SCRIPT FLUSH`` or a restart empties Redis's script cache; EVALSHA then answers NOSCRIPT
        without running anything, so loading the scripts and re-sending only those commands is safe.
        redis-py's own pipeline script support would add a SCRIPT EXISTS round trip to every call.
        """
        results: list[Any] = [None] * len(commands)
        pending = list(range(len(commands)))
        for _ in range(_SCRIPT_ATTEMPTS):
            replies = await self._send([commands[i] for i in pending])
            missing: list[int] = []
            for i, reply in zip(pending, replies, strict=True):
                if isinstance(reply, NoScriptError):
                    missing.append(i)
                elif isinstance(reply, Exception):
                    raise reply
                else:
                    results[i] = reply
            if not missing:
                return results
            log.warning("redis answered NOSCRIPT (restart or SCRIPT FLUSH): reloading the ledger scripts")
            await self._load_scripts()
            pending = missing
        raise StoreError("redis: the ledger scripts keep disappearing (NOSCRIPT after reloading)")

    async def _send(self, commands: list[Command]) -> list[Any]:
        """Send commands with whatever other callers queued meanwhile, in one pipeline (auto-pipelining).

        Concurrent requests share round trips the way SQLite's writer shares a transaction.
        The hot commands (:data:`~resgov.ledger.resp.LEAN_COMMANDS`) go out on the lean
        connection at the end of the loop iteration that queued them, any number of batches
        in flight. Others go through redis-py: the first caller starts a flusher task and
        everything queued by the time it runs goes out in one pipeline; at most ``_FLUSHERS``
        of those are in flight, so under load batches grow instead of connections. Each caller
        gets its own replies (errors as exception objects).
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Any]] = loop.create_future()
        if self._lean is not None and all(command[0] in LEAN_COMMANDS for command in commands):
            # The lean connection needs no flusher task: everything queued in this loop
            # iteration goes out in one write at its end, without waiting for earlier replies.
            queue = self._lean_queue
            queue.append((commands, future))
            if len(queue) >= _LEAN_CHUNK:
                # Redis starts on these while the rest of the burst is still being prepared.
                self._lean_flush()
            elif self._lean_loop is not loop:
                self._lean_loop = loop
                loop.call_soon(self._lean_flush)
            return await future
        self._queue.append((commands, future))
        # Count live flushers of this loop only: a task of a loop that died never finishes.
        live = {t for t in self._flush_tasks if not t.done() and t.get_loop() is loop}
        if len(live) < _FLUSHERS:
            task = loop.create_task(self._flush())
            live.add(task)
        self._flush_tasks = live
        return await future

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(_FLUSH_ROUNDS):  # bounded; the next caller starts a new flusher anyway
            batch: list[tuple[list[Command], asyncio.Future[list[Any]]]] = []
            size = 0
            while self._queue and size < _BATCH_COMMANDS:
                commands, future = self._queue.popleft()
                if future.done() or future.get_loop() is not loop:
                    continue  # its caller was cancelled (or its loop is gone) before it was sent
                batch.append((commands, future))
                size += len(commands)
            if not batch:
                return
            try:
                replies = await self._pipeline([command for commands, _ in batch for command in commands])
            except Exception as exc:  # the connection failed: every caller of the batch learns it
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            except BaseException:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(StoreError("redis: the pipeline was cancelled"))
                raise
            start = 0
            for commands, future in batch:
                if not future.done():
                    future.set_result(replies[start : start + len(commands)])
                start += len(commands)
        # Rounds exhausted with work still queued: hand over to a fresh flusher.
        self._flush_tasks.add(loop.create_task(self._flush()))

    def _lean_flush(self) -> None:
        lean = self._lean
        assert lean is not None
        loop = asyncio.get_running_loop()
        if self._lean_loop is loop:
            self._lean_loop = None
        batch = [(c, f) for c, f in self._lean_queue if not f.done() and f.get_loop() is loop]
        self._lean_queue.clear()
        if batch:
            sent = lean.submit([command for commands, _ in batch for command in commands])
            sent.add_done_callback(lambda done: _hand_out(batch, done))

    async def _pipeline(self, commands: list[Command]) -> list[Any]:
        """One round trip on redis-py's pipeline (not a transaction), errors returned in place."""
        pipe = self._client.pipeline(transaction=False)
        for command in commands:
            pipe.execute_command(*command)
        return await pipe.execute(raise_on_error=False)

    def _remember(self, rid: str, org: str, keys: Sequence[str]) -> None:
        if len(self._routes) >= _ROUTE_CACHE_SIZE:
            # Oldest first (dict order); a forgotten id only costs one GET of the index.
            del self._routes[next(iter(self._routes))]
        self._routes[rid] = (org, tuple(keys))

    async def _routes_for(self, rids: Sequence[str]) -> dict[str, tuple[str, tuple[str, ...]]]:
        """Org and line keys of reservations: from memory, else from the settle index."""
        found = {rid: self._routes[rid] for rid in rids if rid in self._routes}
        unknown = [rid for rid in dict.fromkeys(rids) if rid not in found]
        if unknown:
            values = await self._execute([("GET", self._index(rid)) for rid in unknown])
            for rid, value in zip(unknown, values, strict=True):
                if value:
                    org, keys = orjson.loads(value)
                    found[rid] = (str(org), tuple(str(k) for k in keys))
        return found

    def _org_commands(self, org: str) -> list[Command]:
        """Add ``org`` to the sweeper's list unless this process did so since its last sweep."""
        return [] if org in self._known_orgs else [("SADD", self._orgs, org)]

    async def _orgs_list(self) -> list[str]:
        (members,) = await self._execute([("SMEMBERS", self._orgs)])
        return sorted(str(m) for m in members)

    # -- lifecycle -------------------------------------------------------------------------------

    async def open(self) -> None:
        """Check Redis answers, warn about weak persistence, load the scripts.

        An unreachable Redis is logged, not raised: the server still starts and answers per
        ``fail_safe_action`` until Redis is back (every operation raises StoreError meanwhile).
        """
        try:
            await self._execute([("PING",)])
            self.persistence_warning = await self._check_persistence()
        except AuthenticationError as exc:
            # Wrong credentials will not fix themselves: refuse to start.
            raise StoreError(f"redis: authentication failed: {exc}") from exc
        except RedisError as exc:
            self.persistence_warning = (
                f"Redis persistence not verified: Redis unreachable at start-up ({exc})"
            )
            log.error("redis store unreachable at start-up: %s; calls are refused until it answers", exc)
            return
        if self.persistence_warning:
            log.warning("%s", self.persistence_warning)
        with self._errors("load scripts"):
            await self._load_scripts()

    async def _check_persistence(self) -> str | None:
        try:
            (raw,) = await self._execute([("CONFIG", "GET", "append*")])
        except ResponseError as exc:
            # Managed Redis often renames or forbids CONFIG; that is not an error, but unverified.
            return (
                f"Redis persistence not verified (CONFIG GET is unavailable: {exc}); make sure the server runs "
                "with `appendonly yes` and `appendfsync everysec` or `always`, or spend may be lost on restart."
            )
        config = raw if isinstance(raw, dict) else dict(zip(raw[::2], raw[1::2], strict=True))
        return persistence_warning({str(k): (str(v) if v is not None else None) for k, v in config.items()})

    async def close(self) -> None:
        """Close the connection pool (every write was already applied by Redis)."""
        if self._closed:
            return
        self._closed = True
        if self._flush_tasks:
            await asyncio.wait(set(self._flush_tasks), timeout=10.0)
        if self._lean is not None:
            if self._lean_queue:
                self._lean_flush()  # sent now, answered before the connection closes
            await self._lean.close()
        await self._client.aclose()

    async def ping(self) -> bool:
        """True when Redis answers PING."""
        if self._closed:
            return False
        try:
            return bool((await self._execute([("PING",)]))[0])
        except (RedisError, OSError):
            return False

    async def flush(self) -> None:
        """Nothing is queued client-side: every write is applied when its call returns."""

    # -- money -----------------------------------------------------------------------------------

    async def reserve(self, request: ReserveRequest) -> ReserveOutcome:
        """All lines or none, in one script; the settle index is written just before it."""
        amount = _int64(request.amount, "amount")
        limits = [_int64(_held(line.limit), "limit", signed=True) for line in request.lines]
        org, rid = request.org, request.reservation_id
        short = [line.key for line in request.lines]
        joined = _SEP.join(short)
        entry = request.audit
        entry.reserved = request.amount
        entry.status = "in_flight"
        ttl_ms = max(0, math.ceil(request.ttl_seconds * 1000))
        keys = [self._res(org, rid), self._leases(org), self._audit_key(org, rid), self._auditlog(org),
                self._auditlog(org, entry.agent), self._seq(org), *(self._line(org, k) for k in short)]  # fmt: skip
        args = [rid, amount, str(ttl_ms), request.agent, joined, str(len(short)), *limits, _audit_json(entry)]
        index_ttl = math.ceil(request.ttl_seconds) + _INDEX_GRACE_SECONDS
        with self._errors("reserve"):
            # Index first: once the reservation exists, a settle from any instance can find it.
            results = await self._execute([
                ("SET", self._index(rid), orjson.dumps([org, short]), "EX", index_ttl),
                *self._org_commands(org),
                self._eval(_RESERVE, keys, args),
            ])  # fmt: skip
            self._known_orgs.add(org)
            reply = results[-1]
            code = int(reply[0])
            if code == 0:
                await self._execute([("DEL", self._index(rid))])
                return ReserveOutcome(
                    ok=False, states=_states(short, reply[2:]), refused=request.lines[int(reply[1]) - 1]
                )
        if code < 0:
            raise StoreError(f"redis: reserve {rid}: {reply[1]}")
        self._remember(rid, org, short)
        return ReserveOutcome(ok=True, states=_states(short, reply[1:]))

    def _settle_command(
        self, org: str, rid: str, short: Sequence[str], request: SettleRequest, *, expire: bool
    ) -> Command:
        to_set: list[str] = []
        # COALESCE fields keep what the reservation wrote unless the settlement says otherwise.
        for name, value in (("reason", request.reason), ("http_status", request.http_status),
                            ("upstream_request_id", request.upstream_request_id)):  # fmt: skip
            if value is not None:
                to_set += (name, str(value))
        if request.detail:
            to_set += ("detail", orjson.dumps(request.detail).decode())
        # Token counts are replaced even by None (stored as ""), as SQLite's UPDATE does.
        for name, value in (("input_tokens", request.input_tokens), ("output_tokens", request.output_tokens)):
            to_set += (name, "" if value is None else str(value))
        keys = [self._res(org, rid), self._leases(org), self._audit_key(org, rid),
                *(self._line(org, k) for k in short)]  # fmt: skip
        args = [rid, request.kind, _int64(request.amount, "amount"), "1" if expire else "0", _SEP.join(short),
                request.status, str(len(to_set) // 2), *to_set]  # fmt: skip
        return self._eval(_SETTLE, keys, args)

    @staticmethod
    def _outcome(short: Sequence[str], reply: Sequence[Any]) -> SettleOutcome:
        if int(reply[0]) != 1:
            return SettleOutcome(settled=False)
        return SettleOutcome(
            settled=True, charged=int(reply[1]), refund=int(reply[2]), overage=int(reply[3]),
            reserved=int(reply[4]), states=_states(short, reply[5:]),
        )  # fmt: skip

    async def settle(self, request: SettleRequest) -> SettleOutcome:
        """Find the reservation's org and lines (memory or index), then settle it in one script.

        Idempotent: the first settlement deletes the reservation; a replay finds nothing and
        returns ``settled=False``. ``durable`` changes nothing here: Redis applies every write
        before answering, and its AOF policy decides when that reaches the disk.
        """
        if request.kind not in _SETTLE_KINDS:
            raise ValueError(f"unknown settle kind {request.kind!r}")
        _int64(request.amount, "amount")
        rid = request.reservation_id
        with self._errors("settle"):
            route = (await self._routes_for([rid])).get(rid)
            if route is None:
                return SettleOutcome(settled=False)
            org, short = route
            reply, _ = await self._execute([
                self._settle_command(org, rid, short, request, expire=False),
                ("DEL", self._index(rid)),
            ])  # fmt: skip
            if int(reply[0]) == -2:
                # The caller's idea of the lines was wrong: nothing was written; use the stored ones.
                short = tuple(reply[1].split(_SEP)) if reply[1] else ()
                (reply,) = await self._execute([self._settle_command(org, rid, short, request, expire=False)])
        self._routes.pop(rid, None)
        if int(reply[0]) == -2:  # pragma: no cover - the stored keys cannot change
            raise StoreError(f"redis: settle {rid}: line keys changed under the reservation")
        return self._outcome(short, reply)

    async def renew(self, reservation_ids: Sequence[str], ttl_seconds: float) -> None:
        """Push leases to Redis TIME + ttl; ids already settled are skipped."""
        if not reservation_ids:
            return
        ttl_ms = str(max(0, math.ceil(ttl_seconds * 1000)))
        index_ttl = math.ceil(ttl_seconds) + _INDEX_GRACE_SECONDS
        with self._errors("renew"):
            routes = await self._routes_for(reservation_ids)
            by_org: dict[str, list[str]] = {}
            for rid, (org, _) in routes.items():
                by_org.setdefault(org, []).append(rid)
            commands: list[Command] = [self._eval(_RENEW, [self._leases(org)], [ttl_ms, *rids])
                                       for org, rids in by_org.items()]  # fmt: skip
            commands += [("EXPIRE", self._index(rid), index_ttl) for rid in routes]
            if commands:
                await self._execute(commands)

    async def sweep(self, mode: Literal["charge", "release"]) -> int:
        """Settle every reservation whose lease expired by Redis's clock; safe on every instance at once.

        Per round: one script per org lists expired ids (read-only), one pipeline reads their line
        keys, one pipeline settles each with the lease re-checked inside the script. Concurrent
        sweepers race on the same ids; the reservation hash makes exactly one of them settle each.
        """
        kind: SettleKind = "expire_charge" if mode == "charge" else "expire_release"
        count = 0
        # Re-add orgs on the next write after every sweep: cheap, and it repairs a lost ``P:orgs``.
        self._known_orgs.clear()
        with self._errors("sweep"):
            orgs = await self._orgs_list()
            for _ in range(_SWEEP_ROUNDS):
                if not orgs:
                    break
                lists = await self._execute(
                    [self._eval(_EXPIRED, [self._leases(org)], [str(_SWEEP_BATCH)]) for org in orgs]
                )
                expired = [(org, str(rid)) for org, ids in zip(orgs, lists, strict=True) for rid in ids]
                if not expired:
                    break
                stored = await self._execute([("HGET", self._res(org, rid), "keys") for org, rid in expired])
                commands = []
                for (org, rid), joined in zip(expired, stored, strict=True):
                    # joined is None when another sweeper settled it meanwhile: the script answers {0}.
                    short = tuple(joined.split(_SEP)) if joined else ()
                    request = SettleRequest(rid, kind, 0, "expired", reason="reservation_expired")
                    commands.append(self._settle_command(org, rid, short, request, expire=True))
                replies = await self._execute(commands)
                done = [rid for (_, rid), reply in zip(expired, replies, strict=True) if int(reply[0]) == 1]
                count += len(done)
                if done:
                    await self._execute([("DEL", self._index(rid)) for rid in done])
                    for rid in done:
                        self._routes.pop(rid, None)
                # Only orgs that filled their batch may have more expired leases.
                orgs = [org for org, ids in zip(orgs, lists, strict=True) if len(ids) >= _SWEEP_BATCH]
        return count

    async def record(self, entry: AuditEntry) -> None:
        """Write a refusal's audit record (no-op if the request id already has one, e.g. a retry)."""
        org = entry.org
        keys = [self._audit_key(org, entry.request_id), self._auditlog(org), self._auditlog(org, entry.agent),
                self._seq(org)]  # fmt: skip
        with self._errors("record"):
            await self._execute([
                *self._org_commands(org),
                self._eval(_RECORD, keys, [entry.request_id, _audit_json(entry)]),
            ])  # fmt: skip
            self._known_orgs.add(org)

    async def book_unreserved(self, entry: AuditEntry, line_keys: Sequence[str]) -> bool:
        """Charge a call that ran unreserved to its lines (no limit check) with its audit record, once."""
        org = entry.org
        amount = _int64(entry.actual, "actual")
        short = list(dict.fromkeys(line_keys))
        keys = [self._audit_key(org, entry.request_id), self._auditlog(org), self._auditlog(org, entry.agent),
                self._seq(org), *(self._line(org, k) for k in short)]  # fmt: skip
        with self._errors("book_unreserved"):
            results = await self._execute([
                *self._org_commands(org),
                self._eval(_BOOK, keys, [entry.request_id, amount, _audit_json(entry)]),
            ])  # fmt: skip
            self._known_orgs.add(org)
        return int(results[-1]) == 1

    async def line_states(self, org: str, keys: Sequence[str]) -> dict[str, LineState]:
        """Current committed and reserved spend of lines (missing lines are empty)."""
        with self._errors("line_states"):
            rows = await self._execute([("HMGET", self._line(org, k), "spent", "reserved") for k in keys])
        return {k: LineState(int(row[0] or 0), int(row[1] or 0)) for k, row in zip(keys, rows, strict=True)}

    # -- audit -----------------------------------------------------------------------------------

    async def _log_page(
        self, index: str, low: str, high: str = "+inf", *, newest_first: bool = False
    ) -> list[tuple[str, int]]:
        """One chunk of an audit log zset: ``(request id, seq)`` with ``low < seq < high``, in order."""
        if newest_first:
            command: Command = ("ZREVRANGEBYSCORE", index, high, low, "WITHSCORES", "LIMIT", 0, _AUDIT_CHUNK)
        else:
            command = ("ZRANGEBYSCORE", index, low, high, "WITHSCORES", "LIMIT", 0, _AUDIT_CHUNK)
        (raw,) = await self._execute([command])
        return _score_pairs(raw)

    async def _matching(
        self, org: str, pairs: list[tuple[str, int]], query: AuditQuery
    ) -> list[tuple[int, AuditEntry]]:
        """One page of an org's audit index, read and filtered (status, time range), in page order."""
        hashes = await self._execute([("HGETALL", self._audit_key(org, rid)) for rid, _ in pairs])
        out: list[tuple[int, AuditEntry]] = []
        for (_, seq), h in zip(pairs, hashes, strict=True):
            if "entry" not in h:
                continue
            entry = _audit_from_hash(h)
            if query.status is not None and entry.status != query.status:
                continue
            if query.since is not None and entry.started_at < query.since:
                continue
            if query.until is not None and entry.started_at >= query.until:
                continue
            out.append((seq, entry))
        return out

    async def _audit_org(
        self,
        org: str,
        query: AuditQuery,
        want: int,
        *,
        before_seq: int | None = None,
        newest_first: bool = False,
    ) -> list[tuple[int, str, AuditEntry]]:
        """Up to ``want`` matching entries of one org after ``query.after_seq`` (and below ``before_seq``)."""
        index = self._auditlog(org, query.agent)
        low = f"({query.after_seq}"
        high = f"({before_seq}" if before_seq is not None else "+inf"
        out: list[tuple[int, str, AuditEntry]] = []
        for _ in range(_AUDIT_MAX_PAGES):
            pairs = await self._log_page(index, low, high, newest_first=newest_first)
            if not pairs:
                break
            for seq, entry in await self._matching(org, pairs, query):
                out.append((seq, org, entry))
                if len(out) >= want:
                    return out
            if len(pairs) < _AUDIT_CHUNK:
                break
            # The next page starts past the last seq read, in the direction of the walk.
            if newest_first:
                high = f"({pairs[-1][1]}"
            else:
                low = f"({pairs[-1][1]}"
        return out

    async def audit(self, query: AuditQuery) -> list[tuple[int, AuditEntry]]:
        """Audit entries with their sequence, oldest first; ``org=None`` merges every org by sequence."""
        if query.limit <= 0:
            return []
        with self._errors("audit"):
            orgs = [query.org] if query.org is not None else await self._orgs_list()
            # One more than asked, to see whether the page would end inside a run of equal sequences.
            per_org = await asyncio.gather(*(self._audit_org(org, query, query.limit + 1) for org in orgs))
        merged = list(heapq.merge(*per_org, key=lambda row: (row[0], row[1])))
        page = merged[: query.limit]
        if len(merged) > query.limit and page and merged[query.limit][0] == page[-1][0]:
            # Cross-org tie at the cut: end the page before the tied run so the next cursor
            # (after_seq = last seq shown) cannot skip its other half.
            tied = page[-1][0]
            trimmed = [row for row in page if row[0] != tied]
            page = trimmed or page
        return [(seq, entry) for seq, _, entry in page]

    async def totals(self) -> LedgerTotals:
        """Whole-ledger sums, read from the reservations and the audit records themselves."""
        reserved_total = 0
        open_count = 0
        by_agent: dict[tuple[str, str], int] = {}
        audit_count = 0
        with self._errors("totals"):
            orgs = await self._orgs_list()
            leases = await self._execute([("ZRANGE", self._leases(org), 0, -1) for org in orgs])
            open_ids = [(org, str(rid)) for org, ids in zip(orgs, leases, strict=True) for rid in ids]
            amounts = await self._execute([("HGET", self._res(org, rid), "amount") for org, rid in open_ids])
            for amount in amounts:
                if amount is not None:
                    reserved_total += int(amount)
                    open_count += 1
            for org in orgs:
                low = "-inf"
                for _ in range(_AUDIT_MAX_PAGES):
                    pairs = await self._log_page(self._auditlog(org), low)
                    if not pairs:
                        break
                    rows = await self._execute([("HGETALL", self._audit_key(org, rid)) for rid, _ in pairs])
                    for row in rows:
                        if "entry" not in row:
                            continue
                        entry = _audit_from_hash(row)
                        audit_count += 1
                        key = (entry.org, entry.agent)
                        by_agent[key] = by_agent.get(key, 0) + entry.actual
                    if len(pairs) < _AUDIT_CHUNK:
                        break
                    low = f"({pairs[-1][1]}"
        return LedgerTotals(reserved_total, open_count, by_agent, audit_count)

    # -- API keys --------------------------------------------------------------------------------

    async def put_api_key(self, record: ApiKeyRecord) -> None:
        """Store a key record; its id and hash must both be new."""
        with self._errors("put_api_key"):
            claimed, _ = await self._execute([
                ("SET", self._api_key_id(record.key_id), record.key_hash, "NX"),
                ("HSETNX", self._api_key(record.key_hash), "key_id", record.key_id),
            ])  # fmt: skip
            (owner,) = await self._execute([("HGET", self._api_key(record.key_hash), "key_id")])
            if not claimed or owner != record.key_id:
                if claimed:
                    await self._execute([("DEL", self._api_key_id(record.key_id))])
                raise StoreError(f"api key {record.key_id!r} already exists")
            pairs = [part for item in _key_fields(record).items() for part in item]
            await self._execute([
                ("HSET", self._api_key(record.key_hash), *pairs),
                ("SADD", self._org_keys(record.org), record.key_hash),
                ("SADD", self._orgs, record.org),
            ])  # fmt: skip

    async def get_api_key(self, key_hash: str) -> ApiKeyRecord | None:
        """Look a key up by its hash."""
        with self._errors("get_api_key"):
            (h,) = await self._execute([("HGETALL", self._api_key(key_hash))])
        return _key_from_hash(h) if h and "org" in h else None

    async def list_api_keys(self, org: str | None) -> list[ApiKeyRecord]:
        """Keys of an org, or of all orgs, oldest first."""
        with self._errors("list_api_keys"):
            orgs = [org] if org is not None else await self._orgs_list()
            sets = await self._execute([("SMEMBERS", self._org_keys(o)) for o in orgs])
            hashes = sorted({str(h) for members in sets for h in members})
            rows = await self._execute([("HGETALL", self._api_key(h)) for h in hashes])
        records = [_key_from_hash(r) for r in rows if r and "org" in r]
        records = [r for r in records if org is None or r.org == org]
        return sorted(records, key=lambda r: (r.created_at, r.key_id))

    async def revoke_api_key(self, org: str | None, key_id: str) -> bool:
        """Mark a key revoked, once; scoped to ``org`` unless the admin asks (org None)."""
        with self._errors("revoke_api_key"):
            (key_hash,) = await self._execute([("GET", self._api_key_id(key_id))])
            if key_hash is None:
                return False
            (owner,) = await self._execute([("HGET", self._api_key(key_hash), "org")])
            if owner is None or (org is not None and owner != org):
                return False
            (changed,) = await self._execute(
                [("HSETNX", self._api_key(key_hash), "revoked_at", repr(time.time()))]
            )
        return bool(changed)

    # -- governance (issue 5) --------------------------------------------------------------------
    #
    #   {P:org}:gov              hash    "<kind>\x1f<key>" -> JSON {"data", "updated_at"}
    #   {P:org}:idem:<sha256>    hash    one idempotency key of POST /api/v1/book (PEXPIRE = kept time)
    #   P:govorgs                set     orgs with governance records
    #   P:govver                 string  the governance version, INCR'd after every change
    #
    # The version is bumped after the record is written (same pipeline, same connection, so in
    # that order): an instance that reads the version first and the records second may load a
    # newer record than its version says, never an older one, and reloads at its next poll.

    def _gov(self, org: str) -> str:
        return f"{self._tag(org)}:gov"

    def _idem(self, org: str, key: str) -> str:
        return f"{self._tag(org)}:idem:{hashlib.sha256(key.encode()).hexdigest()}"

    @property
    def _gov_orgs(self) -> str:
        return f"{self.prefix}:govorgs"

    @property
    def _gov_ver(self) -> str:
        return f"{self.prefix}:govver"

    async def gov_load(self) -> tuple[int, list[GovRecord]]:
        """The version, then every org's governance hash."""
        with self._errors("gov_load"):
            version, members = await self._execute([("GET", self._gov_ver), ("SMEMBERS", self._gov_orgs)])
            orgs = sorted(str(m) for m in members)
            hashes = await self._execute([("HGETALL", self._gov(org)) for org in orgs])
        records: list[GovRecord] = []
        for org, h in zip(orgs, hashes, strict=True):
            for name, value in h.items():
                kind, _, key = str(name).partition(_SEP)
                doc = orjson.loads(value)
                records.append(
                    GovRecord(org, kind, key, doc.get("data", {}), float(doc.get("updated_at", 0)))
                )
        return int(version or 0), records

    async def gov_version(self) -> int:
        """One GET: what every instance polls."""
        with self._errors("gov_version"):
            (version,) = await self._execute([("GET", self._gov_ver)])
        return int(version or 0)

    async def gov_put(self, record: GovRecord, *, if_absent: bool = False) -> bool:
        """HSET (or HSETNX) the record, then bump the version."""
        field_name = f"{record.kind}{_SEP}{record.key}"
        value = orjson.dumps({"data": dict(record.data), "updated_at": record.updated_at or time.time()})
        with self._errors("gov_put"):
            verb = "HSETNX" if if_absent else "HSET"
            written, _ = await self._execute(
                [(verb, self._gov(record.org), field_name, value), ("SADD", self._gov_orgs, record.org)]
            )
            if if_absent and not written:
                return False
            await self._execute([("INCR", self._gov_ver)])
        return True

    async def gov_delete(self, org: str, kind: str, key: str) -> bool:
        """HDEL the record, then bump the version."""
        with self._errors("gov_delete"):
            (deleted,) = await self._execute([("HDEL", self._gov(org), f"{kind}{_SEP}{key}")])
            if deleted:
                await self._execute([("INCR", self._gov_ver)])
        return bool(deleted)

    async def idem_claim(
        self, org: str, key: str, fingerprint: str, owner: str, lease_seconds: float, keep_seconds: float
    ) -> IdemClaim:
        """One script: check and claim atomically, judged by Redis TIME."""
        lease_ms, keep_ms = max(1, math.ceil(lease_seconds * 1000)), max(1, math.ceil(keep_seconds * 1000))
        with self._errors("idem_claim"):
            (reply,) = await self._execute([(
                "EVAL", redis_scripts.IDEM_CLAIM, 1, self._idem(org, key), fingerprint, owner, lease_ms, keep_ms,
            )])  # fmt: skip
        state = str(reply[0])
        if state == "claimed":
            return IdemClaim("claimed", previous_owner=str(reply[1]) or None)
        if state == "done":
            return IdemClaim("done", status=int(reply[1]), body=str(reply[2]))
        return IdemClaim("mismatch" if state == "mismatch" else "in_flight")

    async def idem_complete(
        self, org: str, key: str, owner: str, status: int, body: str, keep_seconds: float
    ) -> bool:
        """Store the answer if ``owner`` still holds the key."""
        keep_ms = max(1, math.ceil(keep_seconds * 1000))
        with self._errors("idem_complete"):
            (done,) = await self._execute(
                [("EVAL", redis_scripts.IDEM_COMPLETE, 1, self._idem(org, key), owner, status, body, keep_ms)]
            )
        return bool(done)

    async def idem_release(self, org: str, key: str, owner: str) -> bool:
        """Drop an unanswered claim held by ``owner``."""
        with self._errors("idem_release"):
            (done,) = await self._execute(
                [("EVAL", redis_scripts.IDEM_RELEASE, 1, self._idem(org, key), owner)]
            )
        return bool(done)

    async def get_audit(self, org: str, request_id: str) -> AuditEntry | None:
        """One record of ``org`` (its key is under the org's tag: another org's id finds nothing)."""
        with self._errors("get_audit"):
            (h,) = await self._execute([("HGETALL", self._audit_key(org, request_id))])
        return _audit_from_hash(h) if h and "entry" in h else None

    async def audit_desc(self, query: AuditQuery, before_seq: int | None) -> list[tuple[int, AuditEntry]]:
        """Newest first; ``org=None`` merges every org by sequence, like :meth:`audit`, reversed."""
        if query.limit <= 0:
            return []
        with self._errors("audit_desc"):
            orgs = [query.org] if query.org is not None else await self._orgs_list()
            per_org = await asyncio.gather(
                *(
                    self._audit_org(org, query, query.limit + 1, before_seq=before_seq, newest_first=True)
                    for org in orgs
                )
            )
        merged = list(heapq.merge(*per_org, key=lambda row: (row[0], row[1]), reverse=True))
        page = merged[: query.limit]
        if len(merged) > query.limit and page and merged[query.limit][0] == page[-1][0]:
            # A cross-org tie at the cut: end before it so ``before_seq`` cannot skip its other half.
            tied = page[-1][0]
            page = [row for row in page if row[0] != tied] or page
        return [(seq, entry) for seq, _, entry in page]

    async def purge_audit(self, org: str | None, before: float) -> int:
        """Delete old finished records of one org (or all): the hash and both log entries.

        Sequences are the Redis clock in µs when the record was written (see the module notes),
        so the candidates are the log entries scored below ``before``; each is checked (finished,
        started before ``before``) before it is deleted. A purge is idempotent and may stop anywhere.
        """
        cutoff = f"({math.floor(before * 1_000_000)}"
        total = 0
        with self._errors("purge_audit"):
            orgs = [org] if org is not None else await self._orgs_list()
            for name in orgs:
                low = "-inf"
                for _ in range(_AUDIT_MAX_PAGES):
                    (raw,) = await self._execute(
                        [
                            (
                                "ZRANGEBYSCORE",
                                self._auditlog(name),
                                low,
                                cutoff,
                                "WITHSCORES",
                                "LIMIT",
                                0,
                                _AUDIT_CHUNK,
                            )
                        ]
                    )
                    pairs = _score_pairs(raw)
                    if not pairs:
                        break
                    hashes = await self._execute(
                        [("HGETALL", self._audit_key(name, rid)) for rid, _ in pairs]
                    )
                    commands: list[Command] = []
                    for (rid, _), h in zip(pairs, hashes, strict=True):
                        if "entry" not in h:
                            commands.append(("ZREM", self._auditlog(name), rid))  # a dangling log entry
                            continue
                        entry = _audit_from_hash(h)
                        if entry.status == "in_flight" or entry.started_at >= before:
                            continue
                        commands += [
                            ("DEL", self._audit_key(name, rid)),
                            ("ZREM", self._auditlog(name), rid),
                            ("ZREM", self._auditlog(name, entry.agent), rid),
                        ]
                        total += 1
                    if commands:
                        await self._execute(commands)
                    if len(pairs) < _AUDIT_CHUNK:
                        break
                    low = f"({pairs[-1][1]}"
        return total
