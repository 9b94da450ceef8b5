"""The ``Alerts`` facade: emit without blocking, claim once, persist, deliver with retries.

Path of an event::

    emit(event)            hot path: an O(1) local-dedupe check and put_nowait on an in-memory queue
      → dispatcher task    matching destinations; claim + enqueue in ONE atomic store step
      → outbox (persisted) SQLite table / Redis sorted set; survives restarts
      → delivery worker    lease due items, send (signed), ack / reschedule with backoff / dead-letter

Only the hop from ``emit`` to the outbox lives in memory (a few ms normally); ``stop()``
drains it before returning, so a graceful restart loses nothing. A crash in that
window can lose events not yet persisted: the price of never making a proxied call
wait for an alert write.

At-least-once: an item is deleted only after a 2xx; a worker that dies mid-send
leaves its item leased, and the lease runs out so another worker (or the restarted
one) sends it again, with the same ``X-ResGov-Event-ID`` and body.

``store.down`` is special: when the alert store itself is unreachable (the same
Redis as the ledger, typically), those events are delivered straight from memory
with the same retry policy rather than waiting for a store that is down.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import os
import random
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from resgov import __version__
from resgov.alerts.events import (
    AlertEvent,
    breaker_tripped,
    budget_threshold,
    highest_per_line,
    test_event,
    threshold_crossings,
)
from resgov.alerts.render import DESTINATION_TYPES, render
from resgov.alerts.signing import EVENT_ID_HEADER, SIGNATURE_HEADER, new_secret, signature_header
from resgov.alerts.store import (
    AlertStore,
    DeadLetter,
    Destination,
    OutboxItem,
    SQLiteAlertStore,
    alerts_path_for,
    make_items,
    normalize_events,
    with_attempt,
)
from resgov.alerts.urls import (
    RefusedAddress,
    Resolve,
    UnsafeURL,
    allow_private_from_env,
    check_literal,
    check_url,
    redact_url,
    system_resolve,
)
from resgov.config.settings import Settings
from resgov.core.budget import BudgetLine, LineState

log = logging.getLogger("resgov.alerts")

#: Called after every delivery attempt with ``(destination type, outcome)``; outcome is one of
#: ``delivered``, ``retried``, ``dead_lettered``, ``refused`` (a refused address; also retried/dead-lettered).
DeliveryHook = Callable[[str, str], None]

if TYPE_CHECKING:  # aiohttp is imported when the first webhook is sent, redis for a Redis store
    import aiohttp


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff: ``base × factor^(attempt-1)``, capped, ± ``jitter``; then dead-lettered.

    Defaults: 10 attempts over about 45 minutes (5 s, 10 s, 20 s … 21 min).
    """

    max_attempts: int = 10
    base_seconds: float = 5.0
    factor: float = 2.0
    max_delay_seconds: float = 3600.0
    jitter: float = 0.1

    def delay(self, attempt: int, rand: Callable[[], float] = random.random) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        raw = min(self.max_delay_seconds, self.base_seconds * self.factor ** max(0, attempt - 1))
        if self.jitter:
            # Jitter spreads retries of many instances/destinations so they do not stampede a receiver.
            raw *= 1 + self.jitter * (2 * rand() - 1)
        return max(0.0, raw)


@dataclass(frozen=True, slots=True)
class DeliveryResult:
    """One send: ``ok`` on a 2xx. ``refused``: the address check refused it (nothing was sent)."""

    ok: bool
    status: int | None
    error: str | None
    latency_ms: float
    refused: bool = False


class WebhookNotFound(KeyError):
    """No webhook with that id."""


class WebhookReadOnly(Exception):
    """A webhook from the ``.rgf`` file: edit the file, not the API."""


def _scrub(text: str, url: str) -> str:
    """Error text without the URL's path or query (Slack/Discord tokens live there)."""
    return text.replace(url, redact_url(url)) if url else text


def _refused_cause(exc: BaseException) -> RefusedAddress | None:
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, RefusedAddress):
            return cur
        seen.add(id(cur))
        nested = getattr(cur, "os_error", None)
        if isinstance(nested, RefusedAddress):
            return nested
        cur = cur.__cause__ or cur.__context__
    return None


class Sender:
    """Signs and POSTs one rendered event; connects only to addresses the guard checked."""

    def __init__(self, allow_private: bool, resolve: Resolve = system_resolve, timeout: float = 10.0) -> None:
        self.allow_private = allow_private
        self._resolve = resolve
        self.timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            import aiohttp

            from resgov.alerts.resolver import GuardedResolver

            connector = aiohttp.TCPConnector(
                resolver=GuardedResolver(self.allow_private, self._resolve),
                # Resolve (and check) on every new connection: a cached answer would let a
                # rebinding attacker's second answer go unchecked only if it were reused blindly.
                use_dns_cache=False,
                limit=32,
            )
            self._session = aiohttp.ClientSession(
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=self.timeout),
                trust_env=False,  # never route alerts through an environment proxy
                skip_auto_headers=("User-Agent",),
            )
        return self._session

    async def close(self) -> None:
        """Close the connection pool."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    def build(self, dest: Destination, event: AlertEvent, attempt: int) -> tuple[bytes, dict[str, str]]:
        """Body and headers for one attempt (the signature's ``t`` is now)."""
        body = render(dest.type, event)
        headers = {
            "Content-Type": "application/json",
            "User-Agent": f"ResGov-Webhooks/{__version__}",
            EVENT_ID_HEADER: event.id,
            "X-ResGov-Event-Type": event.type,
            "X-ResGov-Delivery-Attempt": str(attempt),
        }
        if dest.secret:
            headers[SIGNATURE_HEADER] = signature_header(dest.secret, body)
        return body, headers

    async def send(self, dest: Destination, event: AlertEvent, attempt: int = 1) -> DeliveryResult:
        """POST once; never raises for network problems (they are a failed result)."""
        started = time.perf_counter()

        def elapsed() -> float:
            return round((time.perf_counter() - started) * 1000, 3)

        try:
            # IP-literal hosts never reach the resolver: check them here, at send time.
            check_literal(dest.url, self.allow_private)
        except UnsafeURL as exc:
            return DeliveryResult(False, None, str(exc), elapsed(), refused=True)
        body, headers = self.build(dest, event, attempt)
        session = self._open()
        import aiohttp  # already loaded by _open

        try:
            async with session.post(dest.url, data=body, headers=headers, allow_redirects=False) as resp:
                # Drain a little of the answer so the connection can be reused; its content is not needed.
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    await resp.content.read(4096)
                status = resp.status
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            refused = _refused_cause(exc)
            if refused is not None:
                return DeliveryResult(False, None, str(refused), elapsed(), refused=True)
            text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            return DeliveryResult(False, None, _scrub(text, dest.url)[:500], elapsed())
        if 200 <= status < 300:
            return DeliveryResult(True, status, None, elapsed())
        return DeliveryResult(False, status, f"receiver answered HTTP {status}", elapsed())


class Alerts:
    """Alert events in, signed deliveries out. Create with :meth:`from_settings`, then ``start()``.

    ``emit`` is the only method the hot path calls; it must be called on the event loop
    thread (the one ``start`` ran on). ``rgf_destinations`` is called whenever the
    destinations are needed, so a policy reload changes them without a restart.
    """

    def __init__(
        self,
        store: AlertStore,
        *,
        allow_private: bool = False,
        rgf_destinations: Callable[[], Sequence[Destination]] | None = None,
        retry: RetryPolicy | None = None,
        resolve: Resolve = system_resolve,
        send_timeout: float = 10.0,
        lease_seconds: float = 60.0,
        poll_seconds: float = 2.0,
        max_parallel: int = 8,
        queue_size: int = 10_000,
        local_dedupe: int = 10_000,
        cache_seconds: float = 2.0,
        drain_seconds: float = 5.0,
        on_delivery: DeliveryHook | None = None,
    ) -> None:
        self.store = store
        self.allow_private = allow_private
        self.retry = retry or RetryPolicy()
        self.sender = Sender(allow_private, resolve, send_timeout)
        self._resolve = resolve
        self._rgf = rgf_destinations or (lambda: ())
        self.lease_seconds = lease_seconds
        self.poll_seconds = poll_seconds
        self.max_parallel = max_parallel
        self.drain_seconds = drain_seconds
        self.cache_seconds = cache_seconds
        self.on_delivery = on_delivery
        self._queue: asyncio.Queue[AlertEvent] = asyncio.Queue(maxsize=queue_size)
        self._recent: collections.OrderedDict[str, None] = collections.OrderedDict()
        self._recent_cap = local_dedupe
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._inflight: dict[str, tuple[asyncio.Task[None], OutboxItem]] = {}
        self._direct: set[asyncio.Task[None]] = set()
        self._api_cache: list[Destination] | None = None
        self._api_cache_at = 0.0
        self._started = False
        self._stopping = False
        #: Events dropped because the in-memory queue was full (the hot path never waits).
        self.dropped = 0

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        env: Mapping[str, str] | None = None,
        **kwargs: Any,
    ) -> Alerts:
        """Alerts beside the ledger named by ``settings.store_url``: Redis → shared; SQLite → ``*.alerts.db``.

        ``RESGOV_ALLOW_PRIVATE_WEBHOOKS=1`` allows private addresses; ``RESGOV_ALERTS_DB``
        overrides the SQLite file's path.
        """
        environ = env if env is not None else os.environ
        url: str = settings.store_url
        store: AlertStore
        if url.startswith(("redis://", "rediss://", "unix://")):
            from resgov.alerts.redis_store import RedisAlertStore

            store = RedisAlertStore(url)
        else:
            # Imported here: the policy loader imports this package, and needs no ledger code.
            from resgov.ledger.sqlite import path_from_url

            ledger = path_from_url(url)
            default = ":memory:" if ledger == ":memory:" else alerts_path_for(ledger)
            store = SQLiteAlertStore(environ.get("RESGOV_ALERTS_DB") or default)
        kwargs.setdefault("allow_private", allow_private_from_env(dict(environ)))
        return cls(store, **kwargs)

    # -- the hot path ----------------------------------------------------------------------------

    def emit(self, event: AlertEvent) -> bool:
        """Queue ``event`` for delivery; never blocks, never raises. False if deduplicated locally or dropped."""
        if event.id in self._recent:
            return False
        self._recent[event.id] = None
        if len(self._recent) > self._recent_cap:
            self._recent.popitem(last=False)
        try:
            self._queue.put_nowait(event)
        except asyncio.QueueFull:
            self.dropped += 1
            log.warning("alert queue full: dropped %s event %s", event.type, event.id)
            return False
        return True

    def on_settlement(
        self,
        lines: Sequence[BudgetLine],
        before: Mapping[str, LineState],
        after: Mapping[str, LineState],
        thresholds: Sequence[float],
        currency: str,
    ) -> int:
        """Emit ``budget.threshold`` for the highest threshold each line crossed; returns how many."""
        if not thresholds or not after:
            return 0
        crossings = highest_per_line(threshold_crossings(lines, before, after, thresholds))
        for c in crossings:
            state = after.get(c.line.key, LineState())
            self.emit(budget_threshold(c, currency, reserved=state.reserved))
        return len(crossings)

    def on_breaker_trip(self, trip: Any) -> None:
        """A guard trip hook (``guard.on_trip.append(alerts.on_breaker_trip)``): emit ``breaker.tripped``.

        Duck-typed on the guard's ``TripEvent`` (org, agent_id, scope, reason, evidence,
        paused_until, at). The trip is identified by its pause end when it has one (shared
        state: every instance sees the same value), else by its second.
        """
        evidence = getattr(trip, "evidence", None) or {}
        detail = ", ".join(f"{k}={v}" for k, v in sorted(evidence.items()))[:500]
        until = getattr(trip, "paused_until", None)
        at = float(getattr(trip, "at", time.time()))
        scope = str(getattr(trip, "scope", "agent"))
        self.emit(
            breaker_tripped(
                str(trip.org),
                str(trip.agent_id),
                str(trip.reason),
                f"{scope}:{round(until, 3) if until else int(at)}",
                detail=f"Scope: {scope}. {detail}".strip(),
                until=until,
                now=at,
            )
        )

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the store and start the dispatcher and the delivery worker."""
        if self._started:
            return
        await self.store.open()
        self._started = True
        self._stopping = False
        self._tasks = [
            asyncio.create_task(self._dispatch_loop(), name="resgov-alerts-dispatch"),
            asyncio.create_task(self._deliver_loop(), name="resgov-alerts-deliver"),
        ]

    async def flush(self, wait_seconds: float = 5.0) -> None:
        """Wait until every emitted event reached the outbox (or was found already claimed)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait_seconds):
                await self._queue.join()

    async def stop(self) -> None:
        """Persist what was emitted, stop the workers, hand in-flight items back to the outbox, close."""
        if not self._started:
            return
        await self.flush(self.drain_seconds)
        # The delivery loop is asked to stop, not cancelled: a cancel landing while a lease is being
        # written would leave items leased (invisible) for a whole lease period after a restart.
        self._stopping = True
        self._wake.set()
        dispatch, deliver = self._tasks
        await asyncio.wait([deliver], timeout=self.drain_seconds)
        for task in (dispatch, deliver):
            task.cancel()
        for task in (dispatch, deliver):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        inflight = list(self._inflight.values())
        if inflight:
            # Let sends already on the wire finish briefly, then give the rest back undelivered.
            await asyncio.wait([t for t, _ in inflight], timeout=min(self.drain_seconds, 2.0))
            for task, item in inflight:
                if not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                    with contextlib.suppress(Exception):
                        await self.store.reschedule(item, time.time())
        for task in list(self._direct):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.sender.close()
        await self.store.close()
        self._started = False

    # -- destinations ----------------------------------------------------------------------------

    async def destinations(self) -> list[Destination]:
        """``.rgf`` destinations and API webhooks (the latter cached ``cache_seconds``)."""
        now = time.monotonic()
        if self._api_cache is None or now - self._api_cache_at > self.cache_seconds:
            try:
                self._api_cache = await self.store.list_webhooks()
                self._api_cache_at = now
            except Exception as exc:
                log.warning("cannot read webhooks from the alert store (%s); using the last known list", exc)
                if self._api_cache is None:
                    self._api_cache = []
        return [*self._rgf(), *self._api_cache]

    async def destinations_fresh(self) -> list[Destination]:
        """Like :meth:`destinations`, bypassing the cache (admin listings)."""
        self._invalidate()
        return await self.destinations()

    async def find(self, dest_id: str) -> Destination | None:
        """One destination by id (API webhooks read fresh, so an edit applies to pending items)."""
        for d in self._rgf():
            if d.id == dest_id:
                return d
        try:
            return await self.store.get_webhook(dest_id)
        except Exception:
            return next((d for d in self._api_cache or () if d.id == dest_id), None)

    def _invalidate(self) -> None:
        self._api_cache = None

    # -- dispatch: claim + persist ---------------------------------------------------------------

    async def _dispatch_loop(self) -> None:
        while True:
            event = await self._queue.get()
            try:
                await self._dispatch(event)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("alert %s (%s) could not be dispatched", event.id, event.type)
            finally:
                self._queue.task_done()

    async def _dispatch(self, event: AlertEvent) -> None:
        dests = [d for d in await self.destinations() if d.wants(event)]
        if not dests:
            return  # nobody subscribes: no claim, no store write
        items = make_items(event, dests)
        delay = 0.5
        for attempt in range(8):
            try:
                won = await self.store.claim_and_enqueue(event.id, event.dedupe_ttl, items)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if event.type == "store.down":
                    self._deliver_from_memory(event, dests)
                    return
                log.warning(
                    "alert store unavailable (%s); holding alert %s (attempt %d)",
                    type(exc).__name__,
                    event.id,
                    attempt + 1,
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
                continue
            if won:
                self._wake.set()
            return
        log.error("alert %s (%s) dropped: the alert store stayed unreachable", event.id, event.type)

    def _deliver_from_memory(self, event: AlertEvent, dests: Sequence[Destination]) -> None:
        async def run(dest: Destination) -> None:
            for attempt in range(1, self.retry.max_attempts + 1):
                result = await self.sender.send(dest, event, attempt)
                if result.ok:
                    self._count(dest.type, "delivered")
                    return
                await asyncio.sleep(self.retry.delay(attempt))
            log.warning(
                "alert %s to %r dropped after %d attempts (from memory)",
                event.id,
                dest,
                self.retry.max_attempts,
            )

        for dest in dests:
            task = asyncio.create_task(run(dest))
            self._direct.add(task)
            task.add_done_callback(self._direct.discard)

    # -- delivery worker -------------------------------------------------------------------------

    async def _deliver_loop(self) -> None:
        while not self._stopping:
            self._wake.clear()
            free = self.max_parallel - len(self._inflight)
            leased: list[OutboxItem] = []
            if free > 0:
                try:
                    leased = await self.store.lease(time.time(), self.lease_seconds, free)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.warning("alert outbox unavailable: %s", type(exc).__name__)
                for item in leased:
                    task = asyncio.create_task(self._deliver_one(item))
                    self._inflight[item.item_id] = (task, item)
                    task.add_done_callback(functools.partial(self._done, item.item_id))
                if leased and len(leased) == free:
                    continue
            timeout = self.poll_seconds
            if free > 0:
                with contextlib.suppress(Exception):
                    due = await self.store.next_due()
                    if due is not None:
                        timeout = min(timeout, max(due - time.time(), 0.005))
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel that races with the
            # wake-up, and stop() would then wait forever for this loop to end.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._wake.wait()

    def _done(self, item_id: str, _task: asyncio.Task[None]) -> None:
        self._inflight.pop(item_id, None)
        self._wake.set()

    def _count(self, dest_type: str, outcome: str) -> None:
        if self.on_delivery is not None:
            with contextlib.suppress(Exception):
                self.on_delivery(dest_type, outcome)

    async def _deliver_one(self, item: OutboxItem) -> None:
        try:
            dest = await self.find(item.dest_id)
            if dest is None or not dest.enabled:
                log.info(
                    "alert %s: destination %s was deleted or disabled; delivery dropped",
                    item.event.id,
                    item.dest_id,
                )
                await self.store.ack(item.item_id)
                return
            result = await self.sender.send(dest, item.event, item.attempts + 1)
            if result.ok:
                await self.store.ack(item.item_id)
                self._count(dest.type, "delivered")
                return
            if result.refused:
                self._count(dest.type, "refused")
            failed = with_attempt(item, result.error)
            now = time.time()
            if failed.attempts >= self.retry.max_attempts:
                await self.store.dead_letter(failed, result.error or "failed", now)
                self._count(dest.type, "dead_lettered")
                log.warning(
                    "alert %s (%s) to %r dead-lettered after %d attempts: %s",
                    item.event.id, item.event.type, dest, failed.attempts, result.error,
                )  # fmt: skip
                return
            delay = self.retry.delay(failed.attempts)
            await self.store.reschedule(failed, now + delay)
            self._count(dest.type, "retried")
            log.info(
                "alert %s to %r failed (attempt %d/%d: %s); retrying in %.1fs",
                item.event.id, dest, failed.attempts, self.retry.max_attempts, result.error, delay,
            )  # fmt: skip
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # The store failed mid-way: the item stays leased and comes back when the lease ends.
            log.warning("alert %s delivery bookkeeping failed: %s", item.event.id, type(exc).__name__)

    # -- admin operations ------------------------------------------------------------------------

    async def create_webhook(
        self,
        url: str,
        type: str = "generic",
        events: Sequence[str] | None = None,
        org_id: str | None = None,
        description: str = "",
        enabled: bool = True,
    ) -> Destination:
        """Validate (URL checked against private addresses now; again at every send) and store.

        The returned destination carries its ``secret``: show it once, it is never returned again.
        Raises UnsafeURL or ValueError.
        """
        if type not in DESTINATION_TYPES:
            raise ValueError(f"type must be one of {', '.join(DESTINATION_TYPES)}")
        await check_url(url, self.allow_private, self._resolve)
        now = time.time()
        dest = Destination(
            id="wh_" + secrets.token_hex(12),
            url=url,
            type=type,
            events=normalize_events(events),
            org_id=org_id,
            secret=new_secret(),
            enabled=enabled,
            source="api",
            description=description,
            created_at=now,
            updated_at=now,
        )
        await self.store.put_webhook(dest)
        self._invalidate()
        log.info("webhook %s created: %r", dest.id, dest)
        return dest

    async def _editable(self, webhook_id: str) -> Destination:
        if any(d.id == webhook_id for d in self._rgf()):
            raise WebhookReadOnly(webhook_id)
        dest = await self.store.get_webhook(webhook_id)
        if dest is None:
            raise WebhookNotFound(webhook_id)
        return dest

    async def update_webhook(
        self, webhook_id: str, changes: Mapping[str, Any], *, rotate_secret: bool = False
    ) -> Destination:
        """Apply ``changes`` (url, type, events, org_id, description, enabled). Raises like create."""
        dest = await self._editable(webhook_id)
        allowed = {"url", "type", "events", "org_id", "description", "enabled"}
        unknown = set(changes) - allowed
        if unknown:
            raise ValueError(f"cannot change {', '.join(sorted(unknown))}")
        values = dict(changes)
        if "type" in values and values["type"] not in DESTINATION_TYPES:
            raise ValueError(f"type must be one of {', '.join(DESTINATION_TYPES)}")
        if "url" in values:
            await check_url(values["url"], self.allow_private, self._resolve)
        if "events" in values:
            values["events"] = normalize_events(values["events"])
        if rotate_secret:
            values["secret"] = new_secret()
        updated = replace(dest, **values, updated_at=time.time())
        await self.store.put_webhook(updated)
        self._invalidate()
        return updated

    async def delete_webhook(self, webhook_id: str) -> int:
        """Delete a webhook and its pending deliveries; returns how many were dropped."""
        await self._editable(webhook_id)
        await self.store.delete_webhook(webhook_id)
        dropped = await self.store.drop_destination(webhook_id)
        self._invalidate()
        return dropped

    async def test_webhook(self, webhook_id: str) -> tuple[AlertEvent, DeliveryResult]:
        """Send a ``webhook.test`` event now (not through the outbox) and report what the receiver said."""
        dest = await self.find(webhook_id)
        if dest is None:
            raise WebhookNotFound(webhook_id)
        event = test_event(webhook_id)
        return event, await self.sender.send(dest, event, 1)

    async def status(self) -> dict[str, Any]:
        """Counts for the admin API and health checks."""
        pending, dead = await self.store.counts()
        return {
            "backend": self.store.name,
            "pending": pending,
            "dead_letters": dead,
            "queued_in_memory": self._queue.qsize(),
            "in_flight": len(self._inflight),
            "dropped": self.dropped,
            "allow_private_webhooks": self.allow_private,
        }

    async def dead_letters(self, limit: int = 50) -> list[DeadLetter]:
        """Most recent dead letters."""
        return await self.store.dead_letters(limit)
