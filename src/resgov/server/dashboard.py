"""Forecasts and the operator dashboard: the prediction API, ``/dash`` and the JSON it polls.

Routes (one router, included by ``create_app``):

- ``GET /api/v1/agents/{agent_id}/prediction`` — the brief's prediction body plus trend,
  confidence and the window it applies to.
- ``GET /api/v1/dashboard/summary`` — everything the dashboard shows for one org in one
  round trip: budget windows with their forecasts, spend per bucket, call counts.
- ``GET /dash`` (+ ``/dash/dash.js``, ``/dash/dash.css``) — the page itself, served from
  ``server/static`` with a strict Content-Security-Policy (no inline script, no CDN).

Auth is the control plane's: an org key with the ``read`` scope sees its own org (and
only its agent when the key is bound to one); the admin token sees every org and picks
one with ``?org_id=``. Anything else is a 404, never a hint that it exists.

``exhaustion_events`` is the hook for the ``forecast.exhaustion`` alert.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import resources
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import RedirectResponse, Response

from resgov.core.budget import BudgetLine, LineState, lines_for
from resgov.core.errors import InvalidValue, NotFound, StoreUnavailable
from resgov.core.forecast import (
    Buckets,
    BucketSums,
    Forecast,
    bucket_seconds_for,
    estimate_rate,
    forecast,
)
from resgov.core.money import NANO, to_units
from resgov.core.policy import Policy
from resgov.core.windows import PERIODS
from resgov.ledger.store import AuditEntry, AuditQuery, Store, StoreError
from resgov.server.api import READ_CALLER, Caller, runtime

#: Audit rows read per store round trip while gathering a lookback's spend.
_PAGE = 5000
#: A lookback never reads more rows than this (a forecast of a firehose needs no more).
_MAX_ROWS = 500_000
#: The alert loop's page: small, since it runs unattended beside the proxy under load.
_ALERT_PAGE = 1000
#: Records are filtered by ``started_at`` in the store but bucketed by ``finished_at``; a call
#: that started up to this long before the lookback and finished inside it still counts.
_START_SLACK = 3 * 3600.0
#: How many recent audit records the dashboard's table starts from.
_RECENT = 50
_DENIED = frozenset({"denied", "rejected"})
_ERRORS = frozenset({"upstream_error"})

_STATIC = "static"
_ASSETS = {
    "dash.html": "text/html; charset=utf-8",
    "dash.js": "text/javascript; charset=utf-8",
    "dash.css": "text/css; charset=utf-8",
}
#: The page loads nothing from elsewhere and runs no inline script: a key typed into it can
#: only ever be sent to this origin.
_SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


# --- gathering spend ---------------------------------------------------------------------------


@dataclass(slots=True)
class _ScanHints:
    """Per org, a sequence number below which no audit row can fall in a later lookback.

    Rows are numbered in insertion order and ``started_at`` is when a row was inserted,
    give or take; the first row that matched ``started_at >= since`` in one scan bounds
    every later scan whose ``since`` is not earlier (rows before it did not match then
    and cannot now, and new rows get higher numbers). This turns the dashboard's
    two-second poll into a read of the lookback only, not of the org's whole history.
    """

    by_org: dict[str, tuple[float, int]] = field(default_factory=dict)

    def start(self, org: str | None, since: float) -> int:
        hint = self.by_org.get(org or "*")
        return hint[1] if hint is not None and since >= hint[0] else 0

    def remember(self, org: str | None, since: float, seq: int) -> None:
        old = self.by_org.get(org or "*")
        if old is None or seq >= old[1]:
            self.by_org[org or "*"] = (since, seq)


def _hints(request: Request) -> _ScanHints:
    """The app's scan hints, created on first use (kept on the app, not in a module global)."""
    state = request.app.state
    hints: _ScanHints | None = getattr(state, "resgov_dashboard_hints", None)
    if hints is None:
        hints = _ScanHints()
        state.resgov_dashboard_hints = hints
    return hints


async def _pages(
    store: Store, org: str, since: float, hints: _ScanHints | None = None, *, size: int | None = None
) -> AsyncIterator[list[tuple[int, AuditEntry]]]:
    """The audit rows of ``org`` that started at or after ``since``, oldest first, a page at a time."""
    after = hints.start(org, since) if hints else 0
    seen = 0
    limit = size or _PAGE
    while seen < _MAX_ROWS:
        page = await store.audit(AuditQuery(org=org, since=since, after_seq=after, limit=limit))
        if page:
            if hints is not None and seen == 0:
                hints.remember(org, since, page[0][0] - 1)
            seen += len(page)
            yield page
        if len(page) < limit:
            break
        after = page[-1][0]


@dataclass(slots=True)
class _Tally:
    """Calls, denials, errors, in-flight calls and spend among rows that started at or after ``since``."""

    since: float
    calls: int = 0
    denied: int = 0
    errors: int = 0
    in_flight: int = 0
    spend: int = 0
    last: float | None = None

    def add(self, entry: AuditEntry) -> None:
        started = entry.started_at
        if started < self.since:
            return
        self.calls += 1
        status = entry.status
        if status in _DENIED:
            self.denied += 1
        elif status in _ERRORS:
            self.errors += 1
        if status == "in_flight":
            self.in_flight += 1
        else:
            self.spend += entry.actual
        if self.last is None or started > self.last:
            self.last = started

    def json(self) -> dict[str, Any]:
        return {
            "calls": self.calls,
            "denied": self.denied,
            "errors": self.errors,
            "in_flight": self.in_flight,
            "spend": _units(self.spend),
            "last_call_at": _iso(self.last),
        }


class _Lookback:
    """One org's audit rows over a lookback, summed as they are read, page by page.

    Spend per bucket (the org's and each agent's), call counts, the agents that spent, and
    the cursor of the latest records: only sums are kept, never the rows, so a poll of a
    busy org's week (up to ``_MAX_ROWS`` rows) costs the same memory as one of a quiet hour.
    ``bound`` is the agent a key is bound to: the org's totals and the cursor then cover its
    rows only.
    """

    def __init__(self, now: float, lookback: float, size: int, bound: str | None = None) -> None:
        self._now, self._lookback, self._size = now, lookback, size
        self.org = BucketSums(now, lookback, size)
        #: Counts start with the first bucket (the chart's left edge).
        self.since = self.org.buckets().start
        self.agents: dict[str, BucketSums] = {}
        self.tallies: dict[str, _Tally] = {}
        self.org_tally = _Tally(self.since)
        #: Agents with a finished, charged row in the lookback (listed even when the policy no longer has them).
        self.spenders: set[str] = set()
        self._bound = bound
        self._last_seq = 0
        self._first_match: int | None = None
        self._matches = 0
        self._recent: deque[int] = deque(maxlen=_RECENT + 1)

    def add(self, page: Iterable[tuple[int, AuditEntry]]) -> None:
        """Count one page of rows (oldest first)."""
        bound = self._bound
        for seq, entry in page:
            agent = entry.agent
            tally = self.tallies.get(agent)
            if tally is None:
                tally = self.tallies[agent] = _Tally(self.since)
            tally.add(entry)
            self._last_seq = seq
            if bound is None or agent == bound:
                self.org_tally.add(entry)
                if self._first_match is None:
                    self._first_match = seq
                self._matches += 1
                self._recent.append(seq)
            finished = entry.finished_at
            if finished is None or entry.actual <= 0:
                continue
            self.spenders.add(agent)
            if entry.status == "in_flight":
                continue
            # A settled row with a charge: spend at the time it finished.
            self.org.add(finished, entry.actual)
            sums = self.agents.get(agent)
            if sums is None:
                sums = self.agents[agent] = BucketSums(self._now, self._lookback, self._size)
            sums.add(finished, entry.actual)

    def agent_buckets(self, agent: str) -> Buckets:
        """One agent's spend per bucket (all zero when it spent nothing)."""
        sums = self.agents.get(agent) or BucketSums(self._now, self._lookback, self._size)
        return sums.buckets()

    def agent_tally(self, agent: str) -> _Tally:
        """One agent's counts (all zero when it made no call)."""
        return self.tallies.get(agent) or _Tally(self.since)

    def audit_after(self) -> int:
        """A cursor for ``GET /api/v1/audit?after=`` that yields the last ``_RECENT`` rows (and newer)."""
        if self._first_match is None:
            return self._last_seq
        if self._matches <= _RECENT:
            return self._first_match - 1
        return self._recent[0]


async def _read_lookback(
    store: Store,
    org: str,
    now: float,
    lookback: float,
    size: int,
    hints: _ScanHints | None,
    bound: str | None = None,
    *,
    page: int | None = None,
) -> _Lookback:
    """Sum the org's audit rows that started in the lookback (with slack for long calls)."""
    summed = _Lookback(now, lookback, size, bound)
    async for rows in _pages(store, org, now - lookback - size - _START_SLACK, hints, size=page):
        summed.add(rows)
    return summed


# --- forecasts per budget line -----------------------------------------------------------------


def _iso(ts: float | None) -> str | None:
    """Unix seconds as ISO 8601 UTC with a ``Z``, to the second (the brief's format)."""
    if ts is None:
        return None
    return datetime.fromtimestamp(math.floor(ts), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _units(nano: float | int | None) -> float | None:
    """Nano-units as currency units for JSON.

    Ledger amounts (ints) convert exactly; estimated rates (floats) keep their full
    relative precision, since a slow agent's rate can be far below a nano-unit per hour.
    """
    if nano is None:
        return None
    if isinstance(nano, int):
        return to_units(nano)
    return nano / NANO


def _org_lines(policy: Policy, org: str, now: datetime) -> list[BudgetLine]:
    """The org's own budget lines (no agent's)."""
    org_policy = policy.orgs.get(org)
    return lines_for(org, "", {}, org_policy.budgets if org_policy else {}, now, policy.tz)


def _forecast_json(f: Forecast) -> dict[str, Any]:
    """A forecast's numbers as JSON fields (shared by the prediction body and the dashboard)."""
    return {
        "status": f.status,
        "rate_usd_per_hour": _units(f.rate.rate_per_hour),
        "remaining_time_seconds": None
        if f.remaining_time_seconds is None
        else round(f.remaining_time_seconds, 3),
        "prediction_timestamp": _iso(f.exhausts_at),
        "exhausts_before_reset": f.exhausts_before_reset,
        "trend": f.rate.trend,
        "trend_slope_per_hour": _units(f.rate.trend_slope_per_hour),
        "confidence": f.rate.confidence,
    }


def _message(f: Forecast, agent_id: str, period: str, lookback_hours: int, currency: str) -> str:
    """The human sentence of a prediction (``ok`` keeps the brief's exact wording)."""
    if f.status == "ok":
        return "Prediction successful."
    if f.status == "no_budget":
        return f"Agent '{agent_id}' has no {period} budget, and neither does its org: nothing runs out."
    if f.status == "exhausted":
        when = f" It resets at {_iso(f.resets_at)}." if f.resets_at else ""
        return f"The {period} budget is exhausted.{when}"
    return f"No spend in the last {lookback_hours} h: nothing to extrapolate."


def _binding(candidates: Sequence[tuple[BudgetLine, Forecast]]) -> tuple[BudgetLine, Forecast] | None:
    """Of an agent's and its org's line for one period, the one that runs out first."""

    def order(item: tuple[BudgetLine, Forecast]) -> tuple[int, float, int]:
        line, f = item
        if f.status == "exhausted":
            return (0, 0.0, 0)
        seconds = f.remaining_time_seconds if f.remaining_time_seconds is not None else math.inf
        # At equal outlooks the agent's own line is the one to show.
        return (1, seconds, 0 if line.level == "agent" else 1)

    return min(candidates, key=order) if candidates else None


def _visible_org(rt_policy: Policy, caller: Caller, org_id: str | None, agent_id: str | None) -> str:
    """The org a request is about: the key's own, or (admin) ``org_id`` or the agent's only org."""
    if not caller.admin:
        if caller.org is None or (org_id is not None and org_id != caller.org):
            raise NotFound("Not found.", reason="not_found")
        return caller.org
    if org_id is not None:
        return org_id
    if agent_id is None:
        raise InvalidValue("Pass ?org_id= to choose an org.", reason="org_required")
    orgs = sorted({org for (org, agent) in rt_policy.agents if agent == agent_id})
    if len(orgs) > 1:
        raise InvalidValue(
            f"Agent '{agent_id}' exists in several orgs; pass ?org_id=.", reason="ambiguous_agent"
        )
    if not orgs:
        raise NotFound(f"Agent '{agent_id}' not found.", reason="agent_not_found")
    return orgs[0]


def _all_orgs(policy: Policy) -> list[str]:
    """Every org the policy knows (with budgets or with agents)."""
    return sorted(set(policy.orgs) | {org for org, _ in policy.agents})


# --- the forecast.exhaustion hook --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ExhaustionEvent:
    """A budget line predicted to run out within the alert horizon, before its window resets.

    ``line`` is the budget line itself (org, level, agent, period, window, limit), what
    ``resgov.alerts.events.forecast_exhaustion`` takes; ``event_id`` is stable for one line
    in one window, so repeated checks de-duplicate and the alert fires once per window.
    """

    line: BudgetLine
    #: None for an org-wide line (judged on the whole org's spend).
    agent_id: str | None
    remaining: int
    #: Nano-units per hour.
    rate_per_hour: float
    exhausts_at: float
    remaining_time_seconds: float
    confidence: float
    trend: str
    event: str = "forecast.exhaustion"

    @property
    def event_id(self) -> str:
        """Stable per line and window: ``evt_fx_`` + 24 hex digits of SHA-256."""
        raw = f"forecast.exhaustion|{self.line.org}|{self.line.key}"
        return "evt_fx_" + hashlib.sha256(raw.encode()).hexdigest()[:24]

    def payload(self, currency: str = "USD") -> dict[str, Any]:
        """A JSON body in the prediction API's vocabulary (amounts in currency units)."""
        line = self.line
        who = f"agent '{self.agent_id}'" if self.agent_id else f"org '{line.org}'"
        return {
            "event": self.event,
            "event_id": self.event_id,
            "org_id": line.org,
            "agent_id": self.agent_id,
            "level": line.level,
            "period": line.period,
            "currency": currency,
            "limit": _units(line.limit),
            "remaining_budget": _units(self.remaining),
            "rate_usd_per_hour": _units(self.rate_per_hour),
            "prediction_timestamp": _iso(self.exhausts_at),
            "remaining_time_seconds": round(self.remaining_time_seconds, 3),
            "window_resets_at": _iso(line.resets_at),
            "confidence": self.confidence,
            "trend": self.trend,
            "message": (
                f"The {line.period} budget of {who} is predicted to run out at "
                f"{_iso(self.exhausts_at)}, before it resets"
                + (f" at {_iso(line.resets_at)}." if line.resets_at else ".")
            ),
        }


async def exhaustion_events(
    store: Store,
    policy: Policy,
    *,
    horizon_seconds: float,
    lookback_hours: int = 6,
    min_confidence: float = 0.0,
    orgs: Iterable[str] | None = None,
    now: float | None = None,
) -> list[ExhaustionEvent]:
    """Every agent and org budget line predicted to exhaust within ``horizon_seconds``, before it resets.

    For the alerts loop: call it periodically (e.g. every minute) and send the events;
    ``event_id`` is stable per line and window so repeats de-duplicate. Org lines are
    judged on the whole org's spend, agent lines on the agent's. Raises ``StoreError``
    when the store is down (the caller decides whether to retry).
    """
    at = time.time() if now is None else now
    lookback = lookback_hours * 3600.0
    size = bucket_seconds_for(lookback)
    wall = datetime.fromtimestamp(at, UTC)
    events: list[ExhaustionEvent] = []
    for org in sorted(orgs) if orgs is not None else _all_orgs(policy):
        agents = [a for (o, _), a in sorted(policy.agents.items()) if o == org]
        lines: list[tuple[BudgetLine, str | None]] = [(ln, None) for ln in _org_lines(policy, org, wall)]
        for agent in agents:
            lines += [(ln, agent.agent_id) for ln in policy.budget_lines(agent, wall) if ln.level == "agent"]
        if not lines:
            continue
        # Runs every minute on every instance, beside the proxy under load: small pages, summed
        # as they are read (materialised rows once cost 30 MB here at load).
        summed = await _read_lookback(store, org, at, lookback, size, None, page=_ALERT_PAGE)
        states = await store.line_states(org, [ln.key for ln, _ in lines])
        buckets_by = {
            agent_id: summed.org.buckets() if agent_id is None else summed.agent_buckets(agent_id)
            for _, agent_id in lines
        }
        for line, agent_id in lines:
            state = states.get(line.key, LineState())
            f = forecast(buckets_by[agent_id], limit=line.limit, used=state.used, resets_at=line.resets_at)
            if (
                f.within(horizon_seconds, min_confidence)
                and f.remaining is not None
                and f.exhausts_at is not None
                and f.remaining_time_seconds is not None
            ):
                events.append(
                    ExhaustionEvent(
                        line=line,
                        agent_id=agent_id,
                        remaining=f.remaining,
                        rate_per_hour=f.rate.rate_per_hour,
                        exhausts_at=f.exhausts_at,
                        remaining_time_seconds=f.remaining_time_seconds,
                        confidence=f.rate.confidence,
                        trend=f.rate.trend,
                    )
                )
    return events


# --- the dashboard's summary -------------------------------------------------------------------


def _window_json(line: BudgetLine, state: LineState, f: Forecast, currency: str) -> dict[str, Any]:
    """A budget window as ``GET /api/v1/agents/{id}`` shows it, plus its forecast."""
    return {
        "level": line.level,
        "period": line.period,
        "limit": _units(line.limit),
        "spent": _units(state.spent),
        "reserved": _units(state.reserved),
        "remaining": _units(max(0, line.limit - state.used)),
        "currency": currency,
        "window_start": _iso(line.window_start) if line.resets_at else None,
        "resets_at": _iso(line.resets_at),
        "forecast": _forecast_json(f),
    }


def _series(b: Buckets) -> list[float | None]:
    """Spend per bucket in currency units (what the chart draws)."""
    return [_units(a) for a in b.amounts]


async def _summary(
    store: Store,
    policy: Policy,
    caller: Caller,
    org: str,
    lookback_hours: int,
    now: float,
    hints: _ScanHints | None,
) -> dict[str, Any]:
    currency = policy.global_.currency
    lookback = lookback_hours * 3600.0
    size = bucket_seconds_for(lookback)
    wall = datetime.fromtimestamp(now, UTC)
    bound = caller.key.agent_id if caller.key is not None else None
    agents = [a for (o, name), a in sorted(policy.agents.items()) if o == org and bound in (None, name)]

    summed = await _read_lookback(store, org, now, lookback, size, hints, bound)
    org_lines = _org_lines(policy, org, wall)
    agent_lines = {
        a.agent_id: [ln for ln in policy.budget_lines(a, wall) if ln.level == "agent"] for a in agents
    }
    keys = [ln.key for ln in org_lines] + [ln.key for lines in agent_lines.values() for ln in lines]
    states = await store.line_states(org, keys) if keys else {}

    org_buckets = summed.org.buckets()

    def windows(lines: Sequence[BudgetLine], b: Buckets) -> list[dict[str, Any]]:
        out = []
        for line in lines:
            state = states.get(line.key, LineState())
            f = forecast(b, limit=line.limit, used=state.used, resets_at=line.resets_at)
            out.append(_window_json(line, state, f, currency))
        return out

    # Agents the policy no longer lists still spent money in the lookback: show them, flagged,
    # so the org's total is never unexplained (unless the key is bound to one agent).
    extra = sorted(summed.spenders - {a.agent_id for a in agents}) if bound is None else []
    agents_json = []
    for name, lines, in_policy in [(a.agent_id, agent_lines[a.agent_id], True) for a in agents] + [
        (n, [], False) for n in extra
    ]:
        b = summed.agent_buckets(name)
        rate = estimate_rate(b)
        agents_json.append(
            {
                "agent_id": name,
                "in_policy": in_policy,
                "budgets": windows(lines, b),
                "rate_usd_per_hour": _units(rate.rate_per_hour),
                "trend": rate.trend,
                "confidence": rate.confidence,
                "totals": summed.agent_tally(name).json(),
                "spend_series": _series(b),
            }
        )
    org_rate = estimate_rate(org_buckets)
    return {
        "generated_at": _iso(now),
        "now": now,
        "currency": currency,
        "timezone": policy.global_.timezone,
        "caller": {"admin": caller.admin, "org_id": caller.org, "agent_id": bound},
        "orgs": _all_orgs(policy) if caller.admin else [org],
        "org_id": org,
        "lookback_hours": lookback_hours,
        "series": {
            "start": org_buckets.start,
            "bucket_seconds": size,
            "buckets": len(org_buckets.amounts),
            "partial_elapsed": org_buckets.elapsed,
        },
        "org": {
            "budgets": windows(org_lines, org_buckets),
            "rate_usd_per_hour": _units(org_rate.rate_per_hour) if bound is None else None,
            "trend": org_rate.trend if bound is None else None,
            "confidence": org_rate.confidence if bound is None else None,
            "totals": summed.org_tally.json(),
            "spend_series": _series(org_buckets) if bound is None else None,
        },
        "agents": agents_json,
        "audit_after": summed.audit_after(),
    }


# --- the router --------------------------------------------------------------------------------


def _asset(name: str) -> bytes:
    return resources.files("resgov.server").joinpath(_STATIC, name).read_bytes()


def build_dashboard_router(clock: Callable[[], float] | None = None) -> APIRouter:
    """The prediction API, the dashboard page and its JSON.

    ``clock`` (else ``app.state.clock``, else the wall clock) is injectable for tests.
    """

    def now_of(request: Request) -> float:
        chosen = clock or getattr(request.app.state, "clock", None) or time.time
        return float(chosen())

    router = APIRouter()
    # Read once: the files ship in the package and do not change under a running server.
    assets = {name: _asset(name) for name in _ASSETS}

    @router.get("/api/v1/agents/{agent_id}/prediction", tags=["agents"])
    async def prediction(
        agent_id: str,
        request: Request,
        caller: Caller = READ_CALLER,
        period: Annotated[str, Query(max_length=16)] = "daily",
        lookback_hours: Annotated[int, Query(ge=1, le=168)] = 6,
        org_id: Annotated[str | None, Query(max_length=128)] = None,
    ) -> dict[str, Any]:
        """When will this agent's budget for ``period`` run out, at its recent spend rate?

        Of the agent's own budget for the period and its org's, the one that runs out
        first is reported (``budget_level`` says which).
        """
        rt = runtime(request)
        policy = rt.policy
        if period not in PERIODS:
            raise InvalidValue(
                f"period must be one of {', '.join(PERIODS)}; got '{period}'.", reason="invalid_period"
            )
        org = _visible_org(policy, caller, org_id, agent_id)
        if caller.key is not None and caller.key.agent_id not in (None, agent_id):
            raise NotFound(f"Agent '{agent_id}' not found.", reason="agent_not_found")
        agent = policy.agents.get((org, agent_id))
        if agent is None:
            raise NotFound(f"Agent '{agent_id}' not found.", reason="agent_not_found")
        now = now_of(request)
        lookback = lookback_hours * 3600.0
        size = bucket_seconds_for(lookback)
        lines = [
            ln for ln in policy.budget_lines(agent, datetime.fromtimestamp(now, UTC)) if ln.period == period
        ]
        currency = policy.global_.currency
        try:
            summed = await _read_lookback(rt.store, org, now, lookback, size, _hints(request))
            states: Mapping[str, LineState] = (
                await rt.store.line_states(org, [ln.key for ln in lines]) if lines else {}
            )
        except StoreError as exc:
            raise StoreUnavailable("The ledger store is unreachable.", reason="store_unavailable") from exc
        own, whole = summed.agent_buckets(agent_id), summed.org.buckets()
        candidates = []
        for line in lines:
            b = own if line.level == "agent" else whole
            state = states.get(line.key, LineState())
            candidates.append(
                (line, forecast(b, limit=line.limit, used=state.used, resets_at=line.resets_at))
            )
        chosen = _binding(candidates)
        if chosen is None:
            f = forecast(own, limit=None, used=0, resets_at=None)
            level: str | None = None
            limit_units: float | None = None
        else:
            line, f = chosen
            level, limit_units = line.level, _units(line.limit)
        body: dict[str, Any] = {
            "status": f.status,
            "message": _message(f, agent_id, period, lookback_hours, currency),
            "remaining_budget": _units(f.remaining),
        }
        body.update(_forecast_json(f))
        body.update(
            {
                "agent_id": agent_id,
                "org_id": org,
                "period": period,
                "budget_level": level,
                "budget_limit": limit_units,
                "window_resets_at": _iso(f.resets_at),
                "currency": currency,
                "lookback_hours": lookback_hours,
                "bucket_seconds": size,
                "generated_at": _iso(now),
            }
        )
        return body

    @router.get("/api/v1/dashboard/summary", tags=["dashboard"])
    async def summary(
        request: Request,
        caller: Caller = READ_CALLER,
        org_id: Annotated[str | None, Query(max_length=128)] = None,
        lookback_hours: Annotated[int, Query(ge=1, le=168)] = 6,
    ) -> dict[str, Any]:
        """One org's budgets, forecasts, spend per bucket and call counts: what ``/dash`` polls."""
        rt = runtime(request)
        policy = rt.policy
        if caller.admin and org_id is None:
            known = _all_orgs(policy)
            org = known[0] if known else "default"
        else:
            org = _visible_org(policy, caller, org_id, None)
        try:
            return await _summary(
                rt.store, policy, caller, org, lookback_hours, now_of(request), _hints(request)
            )
        except StoreError as exc:
            raise StoreUnavailable("The ledger store is unreachable.", reason="store_unavailable") from exc

    def page(name: str) -> Response:
        return Response(assets[name], media_type=_ASSETS[name], headers=_SECURITY_HEADERS)

    @router.get("/dash", include_in_schema=False)
    async def dash() -> Response:
        return page("dash.html")

    @router.get("/dash/", include_in_schema=False)
    async def dash_slash() -> RedirectResponse:
        return RedirectResponse("/dash", status_code=308)

    @router.get("/dash/dash.js", include_in_schema=False)
    async def dash_js() -> Response:
        return page("dash.js")

    @router.get("/dash/dash.css", include_in_schema=False)
    async def dash_css() -> Response:
        return page("dash.css")

    return router
