"""Prometheus metrics: hot-path counters and histograms, budget gauges read from the ledger at scrape time.

Each app has its own :class:`prometheus_client.CollectorRegistry` (no global default
registry, so two apps in one process, as in the tests, never share a series).

Integration API (all hooks O(1), no I/O, safe to call on the hot path):

* :meth:`Metrics.observe_call` once per proxied request (requests, overhead, upstream latency);
* :class:`ObservedStore` wraps the ledger ``Store``: it times every store round trip and
  derives spend, reservation outcomes, upstream errors, bookings and the ledger-driven
  alerts (thresholds, denials, overages, expiries, store outages) from what passes through;
* :func:`build_metrics_router` serves ``GET /metrics`` (admin token or metrics token, never an org key).

Metrics (paste into the README):

| metric | type | labels | meaning |
|---|---|---|---|
| `resgov_requests_total` | counter | route, model, provider, outcome | Proxied requests by final outcome: `completed`, `estimated` (charged a bound: no usage reported, stream cut, client gone), `upstream_error`, `denied` (403/429 policy refusals), `rejected` (400/422/503…), `unauthorized` (401), `client_gone` (left before its request was read). Refusals before routing have an empty `provider`. |
| `resgov_bookings_total` | counter | org, agent, resource_type | Non-LLM bookings (`POST /api/v1/book`) that reached the ledger, allowed or denied. |
| `resgov_bookings_denied_total` | counter | org, agent, reason | Bookings refused (`daily_budget_exceeded`, `tool_not_allowed`…). |
| `resgov_spend_total` | counter | org, agent, model | Money charged by this instance's settlements, in currency units (exact: summed in nano-units, converted at scrape). Sum over instances with `sum()`. Empty labels: a settlement whose reservation another instance made (a two-phase booking committed elsewhere). Expired reservations are not attributed here (see `resgov_reservations_total{outcome="expired"}` and the budget gauges). |
| `resgov_reservations_total` | counter | outcome | How reservations ended, exactly one outcome each: `finalized` (real cost within the reservation), `overage` (real cost above it: flagged, alerted), `estimated` (charged a bound), `released` (nothing charged), `expired` (lease ran out: a process died; settled by the sweeper). |
| `resgov_proxy_overhead_seconds` | histogram | route | Time ResGov added to a proxied call: total time minus the upstream exchange (auth, policy, reserve, settle). Buckets from 50 µs. |
| `resgov_upstream_latency_seconds` | histogram | provider | Upstream exchange, from sending the request to the end of its response (streams: to the last chunk). |
| `resgov_store_latency_seconds` | histogram | op | Ledger round trips by operation (`reserve`, `settle`, `record`, `renew`, `sweep`, `line_states`, …), queueing included. |
| `resgov_store_errors_total` | counter | op | Ledger operations that failed because the store was unreachable. |
| `resgov_store_up` | gauge | | 1 when the last ledger operation (or this scrape's budget read) succeeded, else 0. |
| `resgov_upstream_errors_total` | counter | provider, status | Upstream failures: `status` is the provider's HTTP status when it answered with an error, else the failure (`upstream_unreachable`, `upstream_timeout`, `upstream_failed`, `idle_timeout`, `upstream_cut`). |
| `resgov_budget_limit` | gauge | org, agent, level, period | Limit of each budget in its current window (currency units). `agent` is empty for org budgets. |
| `resgov_budget_spent` | gauge | org, agent, level, period | Committed spend in the current window. |
| `resgov_budget_reserved` | gauge | org, agent, level, period | Reserved by calls in flight. |
| `resgov_budget_remaining` | gauge | org, agent, level, period | `max(0, limit − spent − reserved)`: what a new call can still reserve. |
| `resgov_alert_deliveries_total` | counter | type, outcome | Alert delivery attempts by destination type (`generic`, `slack`, `discord`): `delivered`, `retried`, `refused` (address refused at send time), `dead_lettered`. |
| `resgov_info` | gauge | version | Always 1; the ResGov version. |

The four `resgov_budget_*` gauges are read from the ledger when Prometheus scrapes (one
``line_states`` read per org), not kept in memory: every instance sharing a Redis ledger
reports the same values, and a restart loses nothing. Counters and histograms are per
instance (aggregate with ``sum by (...)``). Counters also expose the client library's
``*_created`` series; the three histograms, kept by :class:`LoopHistogram` for speed, do not.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Header, Request
from fastapi.responses import Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.utils import floatToGoString

from resgov import __version__
from resgov.alerts.events import (
    DEFAULT_THRESHOLDS,
    budget_exceeded,
    reservation_overage,
    reservations_expired,
    store_down,
)
from resgov.config.settings import MIN_ADMIN_TOKEN
from resgov.core.budget import BudgetLine, LineState, lines_for
from resgov.core.errors import Unauthorized
from resgov.core.money import to_units
from resgov.core.policy import Policy
from resgov.ledger.store import (
    ApiKeyRecord,
    AuditEntry,
    AuditQuery,
    LedgerTotals,
    ReserveOutcome,
    ReserveRequest,
    SettleOutcome,
    SettleRequest,
    Store,
    StoreError,
)
from resgov.server.auth import admin_token_matches

log = logging.getLogger("resgov.metrics")

#: Proxy overhead is sub-millisecond when all is well: fine buckets there, coarse above.
OVERHEAD_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
)  # fmt: skip
UPSTREAM_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
STORE_BUCKETS = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    1.0,
    5.0,
)
#: A label fed by clients (model names) keeps at most this many values; the rest become ``__other__``.
MAX_LABEL_VALUES = 1000
OTHER = "__other__"
#: A scrape waits this long for the ledger before reporting ``resgov_store_up 0`` without budget gauges.
SCRAPE_STORE_TIMEOUT = 5.0

ReservationOutcome = Literal["finalized", "released", "expired", "overage", "estimated"]
#: ``(org, agent or "", line)`` for every budget to report; the default reads every agent of the policy.
BudgetLinesSource = Callable[[datetime], Awaitable[Sequence[tuple[str, BudgetLine]]]]

#: Settlement reasons that are upstream failures even when the audit status is not ``upstream_error``.
_UPSTREAM_FAILURES = frozenset(
    {"upstream_unreachable", "upstream_timeout", "upstream_failed", "idle_timeout", "upstream_cut"}
)


class _Capped:
    """Bounds a label's distinct values (a client choosing model names must not explode the series)."""

    __slots__ = ("cap", "seen")

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.seen: set[str] = set()

    def __call__(self, value: str) -> str:
        if value in self.seen:
            return value
        if len(self.seen) >= self.cap:
            return OTHER
        self.seen.add(value)
        return value


@dataclass(frozen=True, slots=True)
class _BudgetSample:
    org: str
    agent: str
    level: str
    period: str
    limit: int
    spent: int
    reserved: int


class LoopHistogram:
    """A labelled Prometheus histogram whose observations come from the event loop thread only.

    prometheus_client's ``Histogram.observe`` takes a lock for the sum and another for the
    bucket, 2–4 µs here, and the hot path observes four times per call (overhead, upstream,
    reserve, settle). Here an observation is a bisect and two additions on plain lists; the
    client library formats them (cumulative buckets, ``+Inf``, ``_count``, ``_sum``) only when
    scraped, which also happens on the loop. The metrics hooks of one proxied call went from
    5.15 to 1.73 µs (bench/README.md, "Third look").
    """

    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str], buckets: Sequence[float]
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = list(labelnames)
        self._bounds = tuple(sorted(buckets))
        self._le = [floatToGoString(b) for b in self._bounds] + ["+Inf"]  # type: ignore[no-untyped-call]
        #: Per label-value tuple: one count per bucket (the last one ``+Inf``), then the sum.
        self._series: dict[tuple[str, ...], list[float]] = {}

    def observe(self, labels: tuple[str, ...], value: float) -> None:
        """Count ``value`` (seconds, clamped at 0) in the series named by ``labels``."""
        series = self._series.get(labels)
        if series is None:
            series = self._series[labels] = [0] * (len(self._bounds) + 2)
        if value < 0.0:
            value = 0.0
        # The first bound >= value is the bucket ``le`` it falls in; past the last, +Inf.
        series[bisect_left(self._bounds, value)] += 1
        series[-1] += value

    def describe(self) -> Iterable[Metric]:
        """Name only."""
        return [HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)]

    def collect(self) -> Iterable[Metric]:
        """Every series, with cumulative bucket counts."""
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for labels, series in list(self._series.items()):
            total = 0.0
            buckets: list[tuple[str, float]] = []
            for le, count in zip(self._le, series[:-1], strict=True):
                total += count
                buckets.append((le, total))
            family.add_metric(list(labels), buckets, series[-1])
        return [family]


class LoopCounter:
    """A labelled Prometheus counter incremented from the event loop thread only.

    The hot-path twin of :class:`LoopHistogram`: ``prometheus_client``'s ``Counter.inc`` runs
    two checks and takes a lock, and a proxied call counts twice (the request, the
    reservation). Here an increment is one dict lookup and one addition; the exposition is the
    client library's, ``*_created`` series included (the time a label set was first counted).
    """

    def __init__(self, name: str, documentation: str, labelnames: Sequence[str]) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = list(labelnames)
        #: Per label-value tuple: [value, created (Unix seconds)].
        self._series: dict[tuple[str, ...], list[float]] = {}

    def inc(self, labels: tuple[str, ...], amount: float = 1.0) -> None:
        """Add ``amount`` (>= 0) to the series named by ``labels``."""
        series = self._series.get(labels)
        if series is None:
            series = self._series[labels] = [0.0, time.time()]
        series[0] += amount

    def describe(self) -> Iterable[Metric]:
        """Name only."""
        return [CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)]

    def collect(self) -> Iterable[Metric]:
        """Every series."""
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for labels, (value, created) in list(self._series.items()):
            family.add_metric(list(labels), value, created=created)
        return [family]


class _BudgetCollector:
    """Yields the budget gauges from the snapshot the last scrape read from the store."""

    def __init__(self) -> None:
        self.samples: list[_BudgetSample] = []

    def describe(self) -> Iterable[Metric]:
        """Names only (so registering does not call ``collect``)."""
        return list(self._families([]))

    def collect(self) -> Iterable[Metric]:
        """The snapshot as four gauge families."""
        return list(self._families(self.samples))

    @staticmethod
    def _families(samples: Sequence[_BudgetSample]) -> Iterator[Metric]:
        labels = ["org", "agent", "level", "period"]
        limit = GaugeMetricFamily(
            "resgov_budget_limit", "Budget limit in the current window (currency units).", labels=labels
        )
        spent = GaugeMetricFamily(
            "resgov_budget_spent", "Committed spend in the current window (currency units).", labels=labels
        )
        reserved = GaugeMetricFamily(
            "resgov_budget_reserved", "Reserved by calls in flight (currency units).", labels=labels
        )
        remaining = GaugeMetricFamily(
            "resgov_budget_remaining", "max(0, limit - spent - reserved) (currency units).", labels=labels
        )
        for s in samples:
            values = [s.org, s.agent, s.level, s.period]
            limit.add_metric(values, to_units(s.limit))
            spent.add_metric(values, to_units(s.spent))
            reserved.add_metric(values, to_units(s.reserved))
            remaining.add_metric(values, to_units(max(0, s.limit - s.spent - s.reserved)))
        yield from (limit, spent, reserved, remaining)


class _SpendCollector:
    """``resgov_spend_total`` summed exactly in integer nano-units, converted only when scraped."""

    def __init__(self) -> None:
        self.nano: dict[tuple[str, str, str], int] = {}

    def describe(self) -> Iterable[Metric]:
        """Name only."""
        return [self._family()]

    def collect(self) -> Iterable[Metric]:
        """Current totals."""
        family = self._family()
        for labels, nano in list(self.nano.items()):
            family.add_metric(list(labels), to_units(nano))
        return [family]

    @staticmethod
    def _family() -> CounterMetricFamily:
        return CounterMetricFamily(
            "resgov_spend",
            "Money charged by this instance's settlements (currency units).",
            labels=["org", "agent", "model"],
        )


class Metrics:
    """Every ResGov metric, in a registry of its own.

    ``store`` and ``policy`` (a getter: reloads apply) feed the budget gauges at scrape
    time; ``budget_lines`` replaces the policy walk (e.g. to include agents created
    through the API).
    """

    def __init__(
        self,
        *,
        store: Store | None = None,
        policy: Callable[[], Policy] | None = None,
        budget_lines: BudgetLinesSource | None = None,
        registry: CollectorRegistry | None = None,
        max_label_values: int = MAX_LABEL_VALUES,
    ) -> None:
        self.store = store
        self.policy = policy
        self.budget_lines = budget_lines
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self._model = _Capped(max_label_values)
        self._resource = _Capped(max_label_values)
        self.requests = LoopCounter(
            "resgov_requests_total",
            "Proxied requests by route, model, provider and outcome.",
            ["route", "model", "provider", "outcome"],
        )
        self.bookings = Counter(
            "resgov_bookings_total",
            "Non-LLM bookings that reached the ledger (allowed or denied).",
            ["org", "agent", "resource_type"],
            registry=r,
        )
        self.bookings_denied = Counter(
            "resgov_bookings_denied_total",
            "Bookings refused, by reason.",
            ["org", "agent", "reason"],
            registry=r,
        )
        self.reservations = LoopCounter(
            "resgov_reservations_total",
            "Reservations by outcome: finalized, overage, estimated, released, expired.",
            ["outcome"],
        )
        self.overhead = LoopHistogram(
            "resgov_proxy_overhead_seconds",
            "Time ResGov added to a proxied call (total minus the upstream exchange).",
            ["route"],
            OVERHEAD_BUCKETS,
        )
        self.upstream = LoopHistogram(
            "resgov_upstream_latency_seconds",
            "Upstream exchange from request sent to the end of the response.",
            ["provider"],
            UPSTREAM_BUCKETS,
        )
        self.store_latency = LoopHistogram(
            "resgov_store_latency_seconds", "Ledger round trips by operation.", ["op"], STORE_BUCKETS
        )
        for collector in (self.requests, self.reservations, self.overhead, self.upstream, self.store_latency):
            r.register(collector)
        self.store_errors = Counter(
            "resgov_store_errors_total",
            "Ledger operations that failed (store unreachable).",
            ["op"],
            registry=r,
        )
        self.store_up = Gauge(
            "resgov_store_up", "1 when the last ledger operation succeeded, else 0.", registry=r
        )
        self._store_ok = False
        self._store_reachable(True)
        self.upstream_errors = Counter(
            "resgov_upstream_errors_total",
            "Upstream failures by provider and HTTP status (or failure name).",
            ["provider", "status"],
            registry=r,
        )
        self.alert_deliveries = Counter(
            "resgov_alert_deliveries_total",
            "Alert delivery attempts by destination type and outcome.",
            ["type", "outcome"],
            registry=r,
        )
        info = Gauge("resgov_info", "ResGov version (always 1).", ["version"], registry=r)
        info.labels(__version__).set(1)
        self._spend = _SpendCollector()
        self._budgets = _BudgetCollector()
        r.register(self._spend)
        r.register(self._budgets)
        self._render_lock = asyncio.Lock()

    # -- hot-path hooks (O(1)) -------------------------------------------------------------------

    def observe_call(
        self,
        route: str,
        model: str,
        provider: str,
        outcome: str,
        overhead_s: float,
        upstream_s: float | None = None,
    ) -> None:
        """One proxied request ended: count it; record ResGov's overhead and the upstream's latency."""
        self.requests.inc((route, self._model(model), provider, outcome))
        self.overhead.observe((route,), overhead_s)
        if upstream_s is not None:
            self.upstream.observe((provider,), upstream_s)

    def observe_settlement(
        self, org: str, agent: str, model: str, outcome: ReservationOutcome | str, charged_nano: int
    ) -> None:
        """A reservation settled: its outcome, and the money charged (nano-units) to spend."""
        self.reservations.inc((outcome,))
        if charged_nano:
            key = (org, agent, self._model(model))
            self._spend.nano[key] = self._spend.nano.get(key, 0) + charged_nano

    def observe_expired(self, count: int) -> None:
        """The sweeper settled ``count`` expired reservations."""
        if count > 0:
            self.reservations.inc(("expired",), count)

    def observe_store(self, op: str, seconds: float, ok: bool = True) -> None:
        """One ledger round trip."""
        self.store_latency.observe((op,), seconds)
        if not ok:
            self.store_errors.labels(op).inc()
        self._store_reachable(ok)

    def _store_reachable(self, ok: bool) -> None:
        """``resgov_store_up``: the gauge (and its lock) is touched only when the state flips."""
        if ok != self._store_ok:
            self._store_ok = ok
            self.store_up.set(1 if ok else 0)

    def observe_upstream_error(self, provider: str, status: int | str) -> None:
        """The upstream failed or answered an error."""
        self.upstream_errors.labels(provider, str(status)).inc()

    def observe_booking(
        self, org: str, agent: str, resource_type: str, allowed: bool, reason: str | None = None
    ) -> None:
        """A booking reached the ledger (``allowed`` or refused for ``reason``)."""
        self.bookings.labels(org, agent, self._resource(resource_type or "")).inc()
        if not allowed:
            self.bookings_denied.labels(org, agent, reason or "denied").inc()

    def observe_alert_delivery(self, dest_type: str, outcome: str) -> None:
        """An alert delivery attempt (plug into ``Alerts(on_delivery=...)``)."""
        self.alert_deliveries.labels(dest_type, outcome).inc()

    # -- scrape ----------------------------------------------------------------------------------

    async def _policy_lines(self, now: datetime) -> list[tuple[str, BudgetLine]]:
        if self.policy is None:
            return []
        policy = self.policy()
        out: list[tuple[str, BudgetLine]] = []
        seen: set[tuple[str, str]] = set()
        for agent in policy.agents.values():
            for line in policy.budget_lines(agent, now):
                if (line.org, line.key) not in seen:
                    seen.add((line.org, line.key))
                    out.append((line.agent or "", line))
        # Orgs with budgets but no agent yet still show their (empty) budget.
        for org in policy.orgs.values():
            for line in lines_for(org.org_id, "", {}, org.budgets, now, policy.tz):
                if (line.org, line.key) not in seen:
                    seen.add((line.org, line.key))
                    out.append(("", line))
        return out

    async def refresh_budgets(self) -> bool:
        """Read every budget line's state from the store (one read per org); False if the store failed."""
        if self.store is None:
            return True
        now = datetime.now(UTC)
        source = self.budget_lines or self._policy_lines
        lines = await source(now)
        by_org: dict[str, list[tuple[str, BudgetLine]]] = {}
        for agent, line in lines:
            by_org.setdefault(line.org, []).append((agent, line))
        store = self.store

        async def read(org: str, entries: list[tuple[str, BudgetLine]]) -> Mapping[str, LineState]:
            return await store.line_states(org, [line.key for _, line in entries])

        orgs = sorted(by_org)
        started = time.perf_counter()
        try:
            async with asyncio.timeout(SCRAPE_STORE_TIMEOUT):
                results = await asyncio.gather(*(read(org, by_org[org]) for org in orgs))
        except (StoreError, TimeoutError, OSError) as exc:
            log.warning("metrics: budget gauges unavailable, the store did not answer: %s", exc)
            self._budgets.samples = []
            self.observe_store("line_states", time.perf_counter() - started, ok=False)
            return False
        samples: list[_BudgetSample] = []
        for org, states in zip(orgs, results, strict=True):
            for agent, line in by_org[org]:
                state = states.get(line.key, LineState())
                samples.append(
                    _BudgetSample(
                        org, agent, line.level, line.period, line.limit, state.spent, state.reserved
                    )
                )
        self._budgets.samples = samples
        self._store_reachable(True)
        return True

    async def render(self) -> bytes:
        """The Prometheus text exposition, budget gauges freshly read."""
        async with self._render_lock:
            await self.refresh_budgets()
            # Synchronous from here on: no other coroutine can swap the snapshot mid-render.
            return generate_latest(self.registry)


# -- the ledger wrapper ------------------------------------------------------------------------------


def _resource_type(entry: AuditEntry) -> str:
    """A booking's resource type: ``detail["resource_type"]`` when the booking route sets it, else its model."""
    detail = entry.detail or {}
    value = detail.get("resource_type")
    return str(value) if value else entry.model


@dataclass(slots=True)
class _Pending:
    org: str
    agent: str
    model: str
    provider: str
    kind: str
    lines: Sequence[BudgetLine]
    before: Mapping[str, LineState]
    amount: int
    at: float


@dataclass(frozen=True, slots=True)
class _Refusal:
    line: BudgetLine
    agent: str
    used: int
    amount: int


class ObservedStore:
    """A ``Store`` that reports what passes through it to :class:`Metrics` and ``Alerts``.

    Wrap the ledger once (``ObservedStore(store, metrics=..., alerts=..., policy=...)``) and
    hand the wrapper to the Runtime. It adds a dict operation and a clock read per call.
    Derived from the ledger traffic:

    * store latency and errors per operation; ``store.down`` alerts on ``StoreError``;
    * at ``settle``: ``resgov_reservations_total``, ``resgov_spend_total``,
      ``resgov_upstream_errors_total``, ``reservation.overage`` and ``budget.threshold``
      alerts (states at reservation vs. states after settlement);
    * at ``record`` of a denial: the ``budget.exceeded`` alert (only then: in ``shrink``
      mode a refused first reservation may still be retried smaller and succeed);
    * at ``sweep``: expired reservations (metric and ``reservation.expired`` alert);
    * bookings (``audit.kind == "booking"``).

    Methods it does not know (backend extras) pass through untouched.
    """

    def __init__(
        self,
        inner: Store,
        *,
        metrics: Metrics | None = None,
        alerts: Any | None = None,
        policy: Callable[[], Policy] | None = None,
    ) -> None:
        self.inner = inner
        #: The wrapped backend's name (``sqlite``, ``redis``).
        self.name: str = inner.name
        self.metrics = metrics
        #: An ``resgov.alerts.Alerts`` (typed loosely so the ledger never imports the alerts package).
        self.alerts = alerts
        self.policy = policy
        self._pending: dict[str, _Pending] = {}
        self._refused: dict[str, _Refusal] = {}

    def __getattr__(self, attr: str) -> Any:
        # Only reached for attributes not defined here: backend extras (flush…).
        return getattr(self.inner, attr)

    # -- helpers ---------------------------------------------------------------------------------

    def _settings(self) -> tuple[Sequence[float], str, str]:
        if self.policy is None:
            return DEFAULT_THRESHOLDS, "USD", "charge"
        g = self.policy().global_
        return g.alert_thresholds, g.currency, g.on_expired_reservation

    def _timed(self, op: str, started: float, ok: bool = True) -> None:
        if self.metrics is not None:
            self.metrics.observe_store(op, time.perf_counter() - started, ok)

    def _failed(self, op: str, started: float, exc: BaseException) -> None:
        self._timed(op, started, ok=False)
        if self.alerts is not None:
            self.alerts.emit(store_down(self.name, f"{op}: {exc}"))

    def _gc(self) -> None:
        # Entries whose settlement never passed through here (another instance swept them):
        # drop the old ones so the map stays bounded by the calls in flight.
        if len(self._pending) > 50_000:
            cutoff = time.monotonic() - 3600
            for rid in [r for r, p in self._pending.items() if p.at < cutoff]:
                del self._pending[rid]
        if len(self._refused) > 10_000:
            for rid in list(self._refused)[:5_000]:
                del self._refused[rid]

    # -- money operations ------------------------------------------------------------------------

    async def reserve(self, request: ReserveRequest) -> ReserveOutcome:
        """Reserve, remembering the lines' states for the settlement's threshold check."""
        started = time.perf_counter()
        try:
            outcome = await self.inner.reserve(request)
        except StoreError as exc:
            self._failed("reserve", started, exc)
            raise
        self._timed("reserve", started)
        audit = request.audit
        rid = request.reservation_id
        if outcome.ok:
            self._refused.pop(rid, None)
            self._pending[rid] = _Pending(
                request.org, request.agent, audit.model, audit.provider, audit.kind,
                request.lines, outcome.states, request.amount, time.monotonic(),
            )  # fmt: skip
            if audit.kind == "booking" and self.metrics is not None:
                self.metrics.observe_booking(request.org, request.agent, _resource_type(audit), True)
            self._gc()
        elif outcome.refused is not None:
            used = outcome.states.get(outcome.refused.key, LineState()).used
            self._refused[rid] = _Refusal(outcome.refused, request.agent, used, request.amount)
        return outcome

    async def settle(self, request: SettleRequest) -> SettleOutcome:
        """Settle, then count it and check thresholds and overage."""
        started = time.perf_counter()
        try:
            outcome = await self.inner.settle(request)
        except StoreError as exc:
            self._failed("settle", started, exc)
            raise
        self._timed("settle", started)
        pending = self._pending.pop(request.reservation_id, None)
        if not outcome.settled:
            return outcome
        if request.kind == "actual":
            label = "overage" if outcome.overage > 0 else "finalized"
        elif request.kind == "estimated":
            label = "estimated"
        elif request.kind == "release":
            label = "released"
        else:
            label = "expired"
        org = pending.org if pending else ""
        agent = pending.agent if pending else ""
        model = pending.model if pending else ""
        if self.metrics is not None:
            self.metrics.observe_settlement(org, agent, model, label, outcome.charged)
            reason = request.reason or ""
            if (
                pending is not None
                and pending.kind != "booking"
                and (request.status == "upstream_error" or reason in _UPSTREAM_FAILURES)
                and reason != "client_disconnect"
            ):
                status = request.http_status
                # A real upstream answer keeps its HTTP status; a synthetic one (we never got an answer) its name.
                named = (
                    str(status)
                    if status and reason == f"upstream_{status}"
                    else (reason or str(status or "none"))
                )
                self.metrics.observe_upstream_error(pending.provider, named)
        if self.alerts is not None and pending is not None:
            thresholds, currency, _ = self._settings()
            if outcome.overage > 0:
                self.alerts.emit(
                    reservation_overage(
                        org, agent, request.reservation_id, model, outcome.reserved, outcome.charged, currency
                    )
                )
            if outcome.charged > 0:
                self.alerts.on_settlement(pending.lines, pending.before, outcome.states, thresholds, currency)
        return outcome

    async def record(self, entry: AuditEntry) -> None:
        """Record a refusal; a budget denial becomes a ``budget.exceeded`` alert."""
        started = time.perf_counter()
        try:
            await self.inner.record(entry)
        except StoreError as exc:
            self._failed("record", started, exc)
            raise
        self._timed("record", started)
        refusal = self._refused.pop(entry.request_id, None)
        if entry.kind == "booking" and self.metrics is not None and entry.status in ("denied", "rejected"):
            self.metrics.observe_booking(entry.org, entry.agent, _resource_type(entry), False, entry.reason)
        if (
            self.alerts is not None
            and refusal is not None
            and entry.status == "denied"
            and entry.reason == refusal.line.reason
        ):
            _, currency, _ = self._settings()
            self.alerts.emit(
                budget_exceeded(refusal.line, refusal.agent, refusal.used, refusal.amount, currency)
            )

    async def sweep(self, mode: Literal["charge", "release"]) -> int:
        """Settle expired leases; count them and alert."""
        started = time.perf_counter()
        try:
            count = await self.inner.sweep(mode)
        except StoreError as exc:
            self._failed("sweep", started, exc)
            raise
        self._timed("sweep", started)
        if count:
            if self.metrics is not None:
                self.metrics.observe_expired(count)
            if self.alerts is not None:
                self.alerts.emit(reservations_expired(count, mode, backend=self.name))
        return count

    async def renew(self, reservation_ids: Sequence[str], ttl_seconds: float) -> None:
        """Timed pass-through."""
        started = time.perf_counter()
        try:
            await self.inner.renew(reservation_ids, ttl_seconds)
        except StoreError as exc:
            self._failed("renew", started, exc)
            raise
        self._timed("renew", started)

    async def line_states(self, org: str, keys: Sequence[str]) -> dict[str, LineState]:
        """Timed pass-through."""
        started = time.perf_counter()
        try:
            states = await self.inner.line_states(org, keys)
        except StoreError:
            self._timed("line_states", started, ok=False)
            raise
        self._timed("line_states", started)
        return states

    # -- plain pass-through ----------------------------------------------------------------------

    async def open(self) -> None:
        """Open the wrapped store."""
        await self.inner.open()

    async def close(self) -> None:
        """Close the wrapped store."""
        await self.inner.close()

    async def ping(self) -> bool:
        """Ping the wrapped store."""
        return await self.inner.ping()

    async def audit(self, query: AuditQuery) -> list[tuple[int, AuditEntry]]:
        """Pass-through."""
        return await self.inner.audit(query)

    async def totals(self) -> LedgerTotals:
        """Pass-through."""
        return await self.inner.totals()

    async def put_api_key(self, record: ApiKeyRecord) -> None:
        """Pass-through."""
        await self.inner.put_api_key(record)

    async def get_api_key(self, key_hash: str) -> ApiKeyRecord | None:
        """Timed pass-through (the key cache's misses)."""
        started = time.perf_counter()
        found = await self.inner.get_api_key(key_hash)
        self._timed("get_api_key", started)
        return found

    async def list_api_keys(self, org: str | None) -> list[ApiKeyRecord]:
        """Pass-through."""
        return await self.inner.list_api_keys(org)

    async def revoke_api_key(self, org: str | None, key_id: str) -> bool:
        """Pass-through."""
        return await self.inner.revoke_api_key(org, key_id)


# -- GET /metrics -------------------------------------------------------------------------------------


def metrics_token_ok(settings: Any) -> bool:
    """True when ``RESGOV_METRICS_TOKEN`` is set and long enough to be used (>= 32 characters)."""
    token = getattr(settings, "metrics_token", None)
    return isinstance(token, str) and len(token) >= MIN_ADMIN_TOKEN


def scrape_allowed(settings: Any, x_admin_token: str | None, authorization: str | None) -> bool:
    """The admin token (``X-Admin-Token``) or the metrics token (``Authorization: Bearer``); nothing else.

    An org's API key never matches: /metrics carries every org's series.
    """
    if getattr(settings, "admin_enabled", False) and admin_token_matches(settings.admin_token, x_admin_token):
        return True
    if metrics_token_ok(settings) and authorization:
        scheme, _, value = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return hmac.compare_digest(value.strip().encode(), str(settings.metrics_token).encode())
    return False


def _default_metrics(request: Request) -> Metrics:
    state = request.app.state
    found = getattr(state, "metrics", None)
    if found is None:
        found = getattr(getattr(state, "runtime", None), "metrics", None)
    if not isinstance(found, Metrics):
        raise RuntimeError("no Metrics on app.state.metrics or app.state.runtime.metrics")
    return found


def _default_settings(request: Request) -> Any:
    return request.app.state.runtime.settings


def build_metrics_router(
    metrics_of: Callable[[Request], Metrics] = _default_metrics,
    settings_of: Callable[[Request], Any] = _default_settings,
) -> APIRouter:
    """``GET /metrics``; by default the Metrics at ``app.state.metrics`` (or ``runtime.metrics``)."""
    router = APIRouter()

    @router.get(
        "/metrics",
        tags=["metrics"],
        response_class=Response,
        responses={
            200: {
                "content": {CONTENT_TYPE_LATEST.split(";")[0]: {}},
                "description": "Prometheus text format",
            },
            401: {"description": "Missing or wrong admin/metrics token"},
        },
    )
    async def metrics_endpoint(
        request: Request,
        x_admin_token: Annotated[str | None, Header()] = None,
        authorization: Annotated[str | None, Header()] = None,
    ) -> Response:
        """Prometheus metrics for every org: ``X-Admin-Token`` or ``Authorization: Bearer $RESGOV_METRICS_TOKEN``."""
        if not scrape_allowed(settings_of(request), x_admin_token, authorization):
            raise Unauthorized(
                "GET /metrics needs X-Admin-Token or Authorization: Bearer <RESGOV_METRICS_TOKEN>.",
                reason="invalid_metrics_token",
                headers={"WWW-Authenticate": 'Bearer realm="resgov-metrics"'},
            )
        body = await metrics_of(request).render()
        return Response(body, media_type=CONTENT_TYPE_LATEST, headers={"Cache-Control": "no-store"})

    return router
