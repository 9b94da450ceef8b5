"""The reconciliation journal: what ``fail_safe_action = "allow"`` lets through, booked later, once.

When the store cannot be reached and the policy says ``allow``, the proxy forwards the call with
no reservation. Nothing limits that spend any more, so it must at least never be *lost*: every
such call is written here, on local disk, before it goes upstream, and again when its cost is
known. When the store answers again, :meth:`Journal.reconcile` books each journaled call into the
ledger as a settled charge on the budget lines it would have reserved on (above their limits if
need be: the operator chose to fail open), with an audit record flagged ``fail_open`` and
``reconciled``, exactly once.

The same file carries the settlements the store refused because it went away *during* a call
that did reserve (``open_call(..., reserved=True)``): the reservation is durable and would be
swept at its bound, but the call's real cost is known, so reconciliation settles it with that.

**File.** Append-only JSON lines, one file per ResGov process (an exclusive ``flock`` refuses a
second process on the same path). Three record types, all carrying the request id ``id``::

    {"v": 1, "t": "open", "id": …, "org", "agent", "model", "provider", "route", "bound",
     "lines": [[key, limit], …], "at": unix time, "pid", "reserved"}
    {"v": 1, "t": "close", "id": …, "actual", "status", "reason", "http_status", "estimated",
     "input_tokens", "output_tokens", "upstream_request_id", "at"}
    {"v": 1, "t": "booked", "id": …, "how": "booked" | "settled" | "already", "at"}

Writes are group-committed: everything appended while one ``write + fsync`` runs goes out in the
next one, and every caller returns only once its record is on disk. A call is let through only
after its ``open`` record is durable; if the journal cannot be written the call must be refused.

**Exactly once.** Booking is idempotent in the store (``Store.book_unreserved`` writes nothing if
the request id already has an audit record), so a crash between booking and writing the
``booked`` marker only makes the next pass find the call already booked. If the reserve that
failed had in fact been applied (a timeout after Redis ran the script), the reservation exists:
the journal settles it with the real cost instead of booking a second charge.

**Crashes.** A call ``open`` with no ``close`` from a previous life of the process is an orphan:
its outcome is unknown, so it is booked like an expired lease: its bound under
``on_expired_reservation = "charge"``, nothing under ``"release"`` (flagged ``expired``). A torn
last line (a crash mid-write, never acknowledged) is cut off when the journal is opened.

**Rotation.** When a pass leaves nothing to book and no call open, the file is renamed to
``<path>.<UTC time>.reconciled`` (kept for the operator) and a new one is created on the next
fail-open call.

**Limits.** A journaled settlement of a call that did reserve loses the race to a sweeper if the
store stays away longer than the reservation's lease (no renewal can reach it meanwhile): the
reservation is then expired first, at its bound under ``charge`` (an over-count) or at nothing
under ``release`` (the call's cost is lost: prefer ``charge`` with ``allow``). The journal is
local: a machine that dies for good takes its unbooked calls with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import orjson

from resgov.core.budget import BudgetLine
from resgov.core.pricing import Usage
from resgov.ledger.store import AuditEntry, AuditStatus, SettleRequest, Store, StoreError

log = logging.getLogger("resgov.journal")

VERSION = 1
#: Calls booked concurrently per step of a reconcile pass (their markers share one fsync).
_BOOK_CHUNK = 64
ExpiredMode = Literal["charge", "release"]


class JournalError(Exception):
    """The journal cannot be written (disk, permissions, or another process holds the file)."""


@dataclass(slots=True)
class JournalCall:
    """One call let through unreserved: the token the proxy holds from open to close."""

    request_id: str
    org: str
    agent: str
    model: str
    provider: str
    route: str
    bound: int
    lines: tuple[tuple[str, int], ...]
    opened_at: float
    #: False for calls of a previous life of the process found open in the file (orphans).
    live: bool = True
    #: The cost is known (set only once every field below is): the call is due for booking.
    closed: bool = False
    #: A close is being written (a second, concurrent close is ignored).
    closing: bool = False
    actual: int = 0
    status: AuditStatus = "completed"
    reason: str | None = None
    http_status: int | None = None
    estimated: bool = False
    input_tokens: int | None = None
    output_tokens: int | None = None
    upstream_request_id: str | None = None
    closed_at: float | None = None


@dataclass(slots=True)
class JournalStats:
    """Counters for logs and metrics (``resgov_fail_open_calls_total`` and friends)."""

    #: Calls this process let through with no reservation.
    fail_open_calls: int = 0
    #: Of those, how many have finished (cost known).
    closed: int = 0
    #: Calls booked into the ledger by this process (as new charges or by settling a reservation).
    reconciled: int = 0
    #: Calls found already booked (a replay after a crash): nothing charged twice.
    already_booked: int = 0
    #: Open calls of a previous process life, booked as expired.
    orphans: int = 0
    #: Spend booked by reconciliation, nano-units.
    reconciled_nano: int = 0
    write_errors: int = 0
    reconcile_errors: int = 0
    corrupt_lines: int = 0
    last_error: str | None = None


@dataclass(frozen=True, slots=True)
class ReconcileReport:
    """What one reconcile pass did."""

    booked: int = 0
    settled: int = 0
    already: int = 0
    #: Calls still in flight in this process (booked when they close).
    in_flight: int = 0
    #: Calls left to book because the pass stopped (the store failed again).
    remaining: int = 0
    error: str | None = None
    #: Lines the booked spend put over their limit: ``(org, key, spent, limit)``.
    over_limit: tuple[tuple[str, str, int, int], ...] = ()


@dataclass(slots=True)
class _Write:
    data: bytes
    future: asyncio.Future[None]


@dataclass
class Journal:
    """The fail-open journal of one process. Create, ``await open()``, then use from one event loop."""

    path: str
    stats: JournalStats = field(default_factory=JournalStats)
    _calls: dict[str, JournalCall] = field(default_factory=dict, init=False, repr=False)
    _fd: int | None = field(default=None, init=False, repr=False)
    _queue: list[_Write] = field(default_factory=list, init=False, repr=False)
    _flusher: asyncio.Task[None] | None = field(default=None, init=False, repr=False)
    _reconciling: asyncio.Lock = field(default_factory=asyncio.Lock, init=False, repr=False)
    _poisoned: set[str] = field(default_factory=set, init=False, repr=False)
    _failing: bool = field(default=False, init=False, repr=False)
    _closed: bool = field(default=False, init=False, repr=False)

    # -- lifecycle -------------------------------------------------------------------------------

    async def open(self) -> None:
        """Load a journal left by a previous run (its unbooked calls become due); create none yet.

        Raises :class:`JournalError` when an existing file cannot be read or locked: the runtime
        should log it and keep going (``deny`` needs no journal; ``allow`` then refuses calls,
        since :meth:`open_call` fails the same way).
        """
        try:
            found = await asyncio.to_thread(self._load)
        except OSError as exc:
            self.stats.last_error = f"journal unreadable: {exc}"
            raise JournalError(f"fail-open journal {self.path}: {exc}") from exc
        if found:
            due = sum(1 for c in self._calls.values() if not c.live)
            if self._calls:
                log.warning(
                    "fail-open journal %s holds %d call(s) not yet booked into the ledger (%d from a process "
                    "that stopped mid-call); they are reconciled when the store answers",
                    self.path,
                    len(self._calls),
                    due,
                )
            else:
                self._rotate_if_idle()

    async def close(self) -> None:
        """Wait for queued writes, then release the file."""
        self._closed = True
        if self._flusher is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(self._flusher)
        self._release()

    def _release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    @property
    def pending(self) -> int:
        """Journaled calls not yet booked into the ledger (in flight included)."""
        return len(self._calls)

    @property
    def due(self) -> int:
        """Calls ready to book: finished ones and orphans."""
        return sum(
            1 for c in self._calls.values() if (c.closed or not c.live) and c.request_id not in self._poisoned
        )

    # -- the file --------------------------------------------------------------------------------

    def _open_fd(self) -> int:
        """Open (creating) and lock the file; runs in a worker thread."""
        directory = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(directory, exist_ok=True)
        created = not os.path.exists(self.path)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise JournalError(
                f"fail-open journal {self.path} is in use by another ResGov process; give every "
                "instance its own journal path (RESGOV_JOURNAL)"
            ) from None
        except OSError:
            os.close(fd)
            raise
        if created:
            dir_fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)  # the new file's name survives a crash too
            finally:
                os.close(dir_fd)
        return fd

    def _load(self) -> bool:
        """Replay an existing file (locking it); False when there is none."""
        if not os.path.exists(self.path):
            return False
        fd = self._open_fd()
        self._fd = fd
        with open(self.path, "rb") as f:
            data = f.read()
        end = data.rfind(b"\n") + 1
        if end < len(data):
            # A torn last record: its write never completed, so it was never acknowledged.
            log.warning(
                "fail-open journal %s: dropping a torn last record (%d bytes)", self.path, len(data) - end
            )
            os.ftruncate(fd, end)
            os.fsync(fd)
        for raw in data[:end].splitlines():
            if not raw.strip():
                continue
            try:
                record = orjson.loads(raw)
                self._apply(record)
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                self.stats.corrupt_lines += 1
                log.error(
                    "fail-open journal %s: skipping an unreadable record (%s): %.200r", self.path, exc, raw
                )
        return True

    def _apply(self, record: dict[str, Any]) -> None:
        """Replay one record of a previous run."""
        kind, rid = record["t"], str(record["id"])
        if kind == "open":
            self._calls[rid] = JournalCall(
                request_id=rid, org=str(record["org"]), agent=str(record["agent"]),
                model=str(record.get("model", "")), provider=str(record.get("provider", "")),
                route=str(record.get("route", "")), bound=int(record["bound"]),
                lines=tuple((str(k), int(limit)) for k, limit in record["lines"]),
                opened_at=float(record["at"]), live=False,
            )  # fmt: skip
        elif kind == "close":
            call = self._calls.get(rid)
            if call is not None:
                call.closed = True
                call.actual = int(record["actual"])
                call.status = record.get("status") or "completed"
                call.reason = record.get("reason")
                call.http_status = record.get("http_status")
                call.estimated = bool(record.get("estimated"))
                call.input_tokens = record.get("input_tokens")
                call.output_tokens = record.get("output_tokens")
                call.upstream_request_id = record.get("upstream_request_id")
                call.closed_at = float(record["at"])
        elif kind == "booked":
            self._calls.pop(rid, None)
        else:
            raise ValueError(f"unknown record type {kind!r}")

    def _write(self, data: bytes) -> None:
        """Append and fsync; runs in a worker thread."""
        if self._fd is None:
            self._fd = self._open_fd()
        view = memoryview(data)
        while view:
            written = os.write(self._fd, view)
            view = view[written:]
        os.fsync(self._fd)

    async def _append(self, *records: dict[str, Any]) -> None:
        """Append records; returns once they are on disk (group commit with concurrent callers)."""
        if self._closed:
            raise JournalError("the fail-open journal is closed")
        loop = asyncio.get_running_loop()
        data = b"".join(orjson.dumps({"v": VERSION, **r}) + b"\n" for r in records)
        write = _Write(data, loop.create_future())
        self._queue.append(write)
        if self._flusher is None or self._flusher.done():
            self._flusher = loop.create_task(self._flush(), name="resgov-journal-flush")
        await asyncio.shield(write.future)  # a cancelled caller must not unqueue a written record

    async def _flush(self) -> None:
        while self._queue:
            batch, self._queue = self._queue, []
            try:
                await asyncio.to_thread(self._write, b"".join(w.data for w in batch))
            except (OSError, JournalError) as exc:
                self.stats.write_errors += 1
                self.stats.last_error = f"journal write failed: {exc}"
                error = exc if isinstance(exc, JournalError) else JournalError(f"{self.path}: {exc}")
                log.error("fail-open journal %s: write failed: %s", self.path, exc)
                for w in batch:
                    if not w.future.done():
                        w.future.set_exception(error)
                continue
            for w in batch:
                if not w.future.done():
                    w.future.set_result(None)

    # -- the proxy's side ------------------------------------------------------------------------

    async def open_call(
        self,
        *,
        request_id: str,
        org: str,
        agent: str,
        model: str,
        provider: str,
        route: str,
        bound: int,
        lines: Sequence[BudgetLine],
        reason: str = "",
        reserved: bool = False,
    ) -> JournalCall:
        """Journal a call about to go upstream with no reservation; durable when this returns.

        Raises :class:`JournalError` when the record cannot be written: the call must then be
        refused, since nothing would ever account for it.

        ``reserved=True`` journals instead the *settlement* of a call that did reserve but whose
        settlement the store refused (it went away mid-call): reconciliation then settles that
        reservation with the real cost, unless a sweeper expired it first.
        """
        call = JournalCall(
            request_id=request_id, org=org, agent=agent, model=model, provider=provider, route=route,
            bound=bound, lines=tuple((line.key, line.limit) for line in lines), opened_at=time.time(),
        )  # fmt: skip
        # Known before it is written: the file cannot be rotated away under a record being added.
        self._calls[request_id] = call
        try:
            await self._append({
                "t": "open", "id": request_id, "org": org, "agent": agent, "model": model, "provider": provider,
                "route": route, "bound": bound, "lines": [list(pair) for pair in call.lines],
                "at": call.opened_at, "pid": os.getpid(), "reserved": reserved,
            })  # fmt: skip
        except JournalError:
            self._calls.pop(request_id, None)
            raise
        except BaseException:
            # Cancelled while its record was being written (it may still land): the call never
            # goes upstream, so it is booked as a release, at nothing.
            call.status, call.reason, call.closed_at, call.closed = "released", "cancelled", time.time(), True
            raise
        if reserved:
            log.warning(
                "the budget ledger is unreachable%s: the settlement of call %s (org %s, agent %s) is journaled "
                "to %s and applied when the store is back",
                f" ({reason})" if reason else "",
                request_id,
                org,
                agent,
                self.path,
            )
            return call
        self.stats.fail_open_calls += 1
        log.warning(
            "FAIL-OPEN: the budget ledger is unreachable%s and fail_safe_action = allow: call %s "
            "(org %s, agent %s, model %s, bound %d nano) goes upstream WITHOUT a reservation; journaled "
            "to %s for reconciliation",
            f" ({reason})" if reason else "",
            request_id,
            org,
            agent,
            model,
            bound,
            self.path,
        )
        return call

    async def close_call(
        self,
        call: JournalCall,
        actual: int,
        *,
        status: AuditStatus = "completed",
        usage: Usage | None = None,
        reason: str | None = None,
        http_status: int | None = None,
        upstream_request_id: str | None = None,
        estimated: bool = False,
    ) -> None:
        """Record the call's cost (what a settlement would have charged); once, later calls are ignored.

        Raises :class:`JournalError` if the record cannot be written; the cost is still kept in
        memory and booked by this process (a later process life would book the call's open record
        like an expired lease: its bound, or nothing, per ``on_expired_reservation``).
        """
        if call.closed or call.closing:
            return
        if actual < 0:
            raise ValueError("actual must be non-negative")
        closed_at = time.time()
        fields: dict[str, Any] = {
            "actual": actual, "status": status, "reason": reason, "http_status": http_status,
            "estimated": estimated, "input_tokens": usage.total_input if usage else None,
            "output_tokens": usage.total_output if usage else None,
            "upstream_request_id": upstream_request_id,
        }  # fmt: skip
        call.closing = True
        try:
            await self._append({"t": "close", "id": call.request_id, **fields, "at": closed_at})
        finally:
            # Every field before ``closed``: a reconcile pass never sees half a close.
            call.actual = actual
            call.status = status
            call.reason = reason
            call.http_status = http_status
            call.estimated = estimated
            call.input_tokens = fields["input_tokens"]
            call.output_tokens = fields["output_tokens"]
            call.upstream_request_id = upstream_request_id
            call.closed_at = closed_at
            call.closed = True
            self.stats.closed += 1

    # -- reconciliation --------------------------------------------------------------------------

    def _entry(self, call: JournalCall, amount: int, orphan: bool, now: float) -> AuditEntry:
        return AuditEntry(
            request_id=call.request_id, org=call.org, agent=call.agent, route=call.route, model=call.model,
            provider=call.provider, status="expired" if orphan else call.status,
            reason=("process_died_fail_open" if orphan else call.reason) or "fail_open",
            http_status=None if orphan else call.http_status, reserved=0, actual=amount,
            estimated=call.estimated and not orphan, expired=orphan,
            input_tokens=None if orphan else call.input_tokens,
            output_tokens=None if orphan else call.output_tokens,
            upstream_request_id=call.upstream_request_id, started_at=call.opened_at,
            finished_at=call.closed_at or now, detail=self._detail(call, now),
        )  # fmt: skip

    def _detail(self, call: JournalCall, now: float) -> dict[str, Any]:
        return {
            "fail_open": True, "reconciled": True, "bound": call.bound, "journal": self.path,
            "reconciled_at": now,
        }  # fmt: skip

    async def _book(self, store: Store, call: JournalCall, mode: ExpiredMode) -> str:
        """Book one call; returns how ("booked", "settled", "already")."""
        orphan = not call.closed
        amount = call.actual if not orphan else (call.bound if mode == "charge" else 0)
        now = time.time()
        # A reserve that failed on the client side may still have been applied (a timeout after
        # the store ran it): then the reservation exists and settling it is the one right charge.
        outcome = await store.settle(
            SettleRequest(
                reservation_id=call.request_id,
                kind=("expire_charge" if mode == "charge" else "expire_release") if orphan else "actual",
                amount=amount,
                status="expired" if orphan else call.status,
                reason="process_died_fail_open" if orphan else (call.reason or "fail_open"),
                http_status=None if orphan else call.http_status,
                input_tokens=None if orphan else call.input_tokens,
                output_tokens=None if orphan else call.output_tokens,
                upstream_request_id=call.upstream_request_id,
                durable=True,
                detail=self._detail(call, now),
            )
        )
        if outcome.settled:
            self.stats.reconciled_nano += outcome.charged
            return "settled"
        if await store.book_unreserved(self._entry(call, amount, orphan, now), [k for k, _ in call.lines]):
            self.stats.reconciled_nano += amount
            return "booked"
        return "already"

    async def reconcile(self, store: Store, *, on_orphan: ExpiredMode = "charge") -> ReconcileReport:
        """Book every finished (and orphaned) journaled call into ``store``, each exactly once.

        Stops at the first store failure (the rest stays due for the next pass). ``on_orphan`` is
        the policy's ``on_expired_reservation``: what an open call of a dead process is charged.
        """
        async with self._reconciling:
            due = [
                c
                for c in self._calls.values()
                if (c.closed or not c.live) and c.request_id not in self._poisoned
            ]
            counts = {"booked": 0, "settled": 0, "already": 0}
            error: str | None = None
            touched: dict[tuple[str, str], int] = {}
            done = 0
            for start in range(0, len(due), _BOOK_CHUNK):
                chunk = due[start : start + _BOOK_CHUNK]
                results = await asyncio.gather(
                    *(self._book(store, c, on_orphan) for c in chunk), return_exceptions=True
                )
                markers: list[dict[str, Any]] = []
                now = time.time()
                for call, result in zip(chunk, results, strict=True):
                    if isinstance(result, StoreError):
                        error = str(result)
                        continue
                    if isinstance(result, BaseException):
                        self._poisoned.add(call.request_id)
                        self.stats.reconcile_errors += 1
                        log.error(
                            "fail-open journal: cannot book call %s, skipping it: %r", call.request_id, result
                        )
                        continue
                    counts[result] += 1
                    markers.append({"t": "booked", "id": call.request_id, "how": result, "at": now})
                    if not call.closed:
                        self.stats.orphans += 1
                    for key, limit in call.lines:
                        touched[(call.org, key)] = limit
                if markers:
                    try:
                        await self._append(*markers)
                    except JournalError as exc:
                        # Booked in the store but not marked: the next pass finds them "already" booked.
                        error = str(exc)
                    else:
                        for marker in markers:
                            self._calls.pop(marker["id"], None)
                        done += len(markers)
                if error is not None:
                    break
            self.stats.reconciled += counts["booked"] + counts["settled"]
            self.stats.already_booked += counts["already"]
            if error is not None:
                self.stats.reconcile_errors += 1
                self.stats.last_error = error
                if not self._failing:
                    log.error("fail-open journal: reconciliation paused, store still failing: %s", error)
                self._failing = True
            else:
                self._failing = False
            over = await self._over_limit(store, touched) if counts["booked"] + counts["settled"] else ()
            if done:
                log.warning(
                    "fail-open journal %s: reconciled %d call(s) into the ledger (%d booked, %d settled, %d "
                    "already booked); %d still pending",
                    self.path,
                    done,
                    counts["booked"],
                    counts["settled"],
                    counts["already"],
                    len(self._calls),
                )
            for org, key, spent, limit in over:
                log.warning(
                    "fail-open spend put budget line %s/%s over its limit: spent %d > limit %d nano",
                    *(org, key, spent, limit),
                )
            if error is None:
                self._rotate_if_idle()
            live = sum(1 for c in self._calls.values() if c.live and not c.closed)
            return ReconcileReport(
                booked=counts["booked"], settled=counts["settled"], already=counts["already"], in_flight=live,
                remaining=len(self._calls) - live, error=error, over_limit=tuple(over),
            )  # fmt: skip

    async def _over_limit(
        self, store: Store, touched: dict[tuple[str, str], int]
    ) -> list[tuple[str, str, int, int]]:
        by_org: dict[str, list[str]] = {}
        for org, key in touched:
            by_org.setdefault(org, []).append(key)
        over: list[tuple[str, str, int, int]] = []
        try:
            for org, keys in by_org.items():
                for key, state in (await store.line_states(org, keys)).items():
                    limit = touched[(org, key)]
                    if state.used > limit:
                        over.append((org, key, state.spent, limit))
        except StoreError:
            return over
        return over

    def _rotate_if_idle(self) -> None:
        """Nothing left to book and nothing in flight: set the file aside (synchronous, no await)."""
        if self._calls or self._fd is None or self._queue or (self._flusher and not self._flusher.done()):
            return
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        target = f"{self.path}.{stamp}.reconciled"
        try:
            os.rename(self.path, target)
        except OSError as exc:
            log.error("fail-open journal %s: cannot set the reconciled file aside: %s", self.path, exc)
            return
        self._release()
        log.warning("fail-open journal fully reconciled; kept as %s", target)

    async def run(self, store: Store, on_orphan: Callable[[], ExpiredMode], interval: float = 1.0) -> None:
        """Reconcile forever, every ``interval`` seconds while something is due (the runtime's task)."""
        while True:
            await asyncio.sleep(interval)
            if not self.due:
                continue
            try:
                await self.reconcile(store, on_orphan=on_orphan())
            except Exception as exc:  # the loop must outlive anything a pass can raise
                self.stats.reconcile_errors += 1
                self.stats.last_error = repr(exc)
                log.exception("fail-open journal: reconcile pass failed")
