"""Alert events: what happened, with an id that every instance derives the same way.

An event's ``id`` is a hash of what identifies the *occurrence*, never of when or
where it was noticed: ``type + org + agent + window + threshold`` (plus the budget
limit, so a raised limit is a new budget that may cross its thresholds again).
Two ResGov instances that both see agent ``hermes`` cross 80 % of its daily budget
of 2026-11-29 compute the same id; the dedupe claim (see ``alerts.store``) lets only
one of them enqueue it, and receivers de-duplicate retries by the same id.

Constructors below build each event type with a title and message for humans and a
``data`` object for machines (amounts in currency units, as decimal numbers).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from fractions import Fraction
from typing import Any, Literal

from resgov.core.budget import BudgetLine, LineState
from resgov.core.money import format_money, to_units

EventType = Literal[
    "budget.threshold",
    "budget.exceeded",
    "reservation.expired",
    "reservation.overage",
    "breaker.tripped",
    "store.down",
    "forecast.exhaustion",
    "webhook.test",
]
#: Every event type a destination can subscribe to (``webhook.test`` is sent on demand only).
EVENT_TYPES: tuple[str, ...] = (
    "budget.threshold",
    "budget.exceeded",
    "reservation.expired",
    "reservation.overage",
    "breaker.tripped",
    "store.down",
    "forecast.exhaustion",
)
Severity = Literal["info", "warning", "critical"]

#: Default budget thresholds (fractions of the limit): 50 %, 80 %, 100 %.
DEFAULT_THRESHOLDS: tuple[float, ...] = (0.5, 0.8, 1.0)

_DAY = 86_400.0
#: Claims of events whose window never resets (``total`` budgets) are kept this long.
_FOREVER = 400 * _DAY
#: ``store.down`` events are bucketed: one event per bucket per backend, whichever instance sees it.
STORE_DOWN_BUCKET_SECONDS = 300


def event_id(*parts: object) -> str:
    """``evt_`` + 32 hex chars of SHA-256 over the parts (unit-separator joined, so no ambiguity)."""
    text = "\x1f".join("" if p is None else str(p) for p in parts)
    return "evt_" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def iso(ts: float) -> str:
    """Unix seconds as ISO 8601 UTC with a ``Z`` (what every receiver parses)."""
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class AlertEvent:
    """One alert. ``dedupe_ttl`` (seconds) is how long its claim is kept; it is not sent."""

    id: str
    type: str
    severity: Severity
    title: str
    message: str
    created_at: float
    org: str | None = None
    agent: str | None = None
    data: Mapping[str, Any] = field(default_factory=dict)
    dedupe_ttl: float = _DAY

    def body(self) -> dict[str, Any]:
        """The generic webhook body (and the outbox's persisted form, with ``dedupe_ttl``)."""
        return {
            "id": self.id,
            "type": self.type,
            "severity": self.severity,
            "title": self.title,
            "message": self.message,
            "created_at": iso(self.created_at),
            "org_id": self.org,
            "agent_id": self.agent,
            "data": dict(self.data),
        }

    def to_record(self) -> dict[str, Any]:
        """Everything needed to rebuild the event after a restart."""
        record = self.body()
        record["created_at"] = self.created_at
        record["dedupe_ttl"] = self.dedupe_ttl
        return record

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> AlertEvent:
        """Inverse of :meth:`to_record`."""
        return cls(
            id=str(record["id"]),
            type=str(record["type"]),
            severity=record["severity"],
            title=str(record["title"]),
            message=str(record["message"]),
            created_at=float(record["created_at"]),
            org=record.get("org_id"),
            agent=record.get("agent_id"),
            data=dict(record.get("data") or {}),
            dedupe_ttl=float(record.get("dedupe_ttl", _DAY)),
        )


# -- threshold crossings ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Crossing:
    """``line``'s committed spend went from below ``threshold × limit`` to at or above it."""

    line: BudgetLine
    threshold: float
    spent_before: int
    spent_after: int


def threshold_mark(limit: int, threshold: float) -> int:
    """The spend (nano) at which ``threshold`` is reached: ``ceil(limit × threshold)``, exactly.

    The threshold goes through its decimal text (``0.8`` → 4/5), so 80 % of 3.00 is
    exactly 2.40, never 2.4000000000000004 because of binary floats.
    """
    frac = Fraction(str(threshold))
    return math.ceil(limit * frac)


def threshold_crossings(
    lines: Sequence[BudgetLine],
    before_states: Mapping[str, LineState],
    after_states: Mapping[str, LineState],
    thresholds: Sequence[float],
) -> list[Crossing]:
    """Every (line, threshold) whose committed spend crossed ``threshold × limit`` between two states.

    Pure. Spend within a window only grows, and each settlement's ``before`` is read at
    its reservation (not later than the spend it adds to), so the intervals of all
    settlements cover every increment: no crossing is missed; one may be seen by two
    settlements (or two instances), which the event id de-duplicates. Lines without
    an ``after`` state, and limits of 0 (a budget that allows nothing), are skipped.
    Reserved amounts do not count: a reservation that is refunded never spent anything.
    """
    out: list[Crossing] = []
    for line in lines:
        limit = line.limit
        if limit <= 0:
            continue
        key = line.key  # a computed property: build it once
        after = after_states.get(key)
        if after is None:
            continue
        spent = after.spent
        prior = before_states.get(key)
        before = prior.spent if prior is not None else 0
        if spent <= before:
            continue  # nothing was charged to this line (a release): nothing can be crossed
        for threshold in thresholds:
            # Hot path: a float pre-check rules out the usual case (nowhere near the mark) in
            # ~100 ns; the exact rational mark is computed only near a crossing.
            approx = limit * threshold
            slack = approx * 1e-9 + 2.0
            if spent < approx - slack or before > approx + slack:
                continue
            mark = threshold_mark(limit, threshold)
            if before < mark <= spent:
                out.append(Crossing(line, threshold, before, spent))
    return out


def highest_per_line(crossings: Sequence[Crossing]) -> list[Crossing]:
    """Keep only the highest threshold crossed on each line (one jump past 50 % and 80 % alerts once)."""
    best: dict[str, Crossing] = {}
    for c in crossings:
        cur = best.get(c.line.key)
        if cur is None or c.threshold > cur.threshold:
            best[c.line.key] = c
    return list(best.values())


def _window_ttl(line: BudgetLine, now: float) -> float:
    """Keep a window's claim until it resets, plus a day of clock-skew margin."""
    if line.resets_at is None:
        return _FOREVER
    return max(line.resets_at - now, 0.0) + _DAY


def _line_event_id(kind: str, line: BudgetLine, threshold: object) -> str:
    """type + org + agent + window (level, period, start) + threshold + limit: the same on every instance."""
    return event_id(
        kind, line.org, line.agent, line.level, line.period, line.window_start, threshold, line.limit
    )


def _who(line: BudgetLine) -> str:
    return f"agent {line.agent}" if line.level == "agent" else f"org {line.org}"


def _window_label(line: BudgetLine) -> str:
    return "all-time" if line.period == "total" else line.period


def _line_data(line: BudgetLine, spent: int, reserved: int, currency: str) -> dict[str, Any]:
    return {
        "level": line.level,
        "period": line.period,
        "window_start": iso(line.window_start) if line.period != "total" else None,
        "resets_at": iso(line.resets_at) if line.resets_at else None,
        "limit": to_units(line.limit),
        "spent": to_units(spent),
        "reserved": to_units(reserved),
        "remaining": to_units(max(0, line.limit - spent - reserved)),
        "currency": currency,
    }


# -- constructors -----------------------------------------------------------------------------------


def budget_threshold(
    crossing: Crossing, currency: str, *, reserved: int = 0, now: float | None = None
) -> AlertEvent:
    """``budget.threshold``: a budget's committed spend reached ``threshold`` of its limit."""
    now = time.time() if now is None else now
    line = crossing.line
    pct = round(crossing.threshold * 100, 2)
    pct_text = f"{pct:g}%"
    severity: Severity = (
        "critical" if crossing.threshold >= 1 else "warning" if crossing.threshold >= 0.8 else "info"
    )
    data = _line_data(line, crossing.spent_after, reserved, currency)
    data["threshold"] = crossing.threshold
    data["used_fraction"] = round(crossing.spent_after / line.limit, 6)
    return AlertEvent(
        id=_line_event_id("budget.threshold", line, crossing.threshold),
        type="budget.threshold",
        severity=severity,
        title=f"{_who(line).capitalize()} reached {pct_text} of its {_window_label(line)} budget",
        message=(
            f"{_who(line).capitalize()} (org {line.org}) has spent {format_money(crossing.spent_after, currency)} "
            f"of its {_window_label(line)} budget of {format_money(line.limit, currency)} ({pct_text} threshold)."
        ),
        created_at=now,
        org=line.org,
        agent=line.agent,
        data=data,
        dedupe_ttl=_window_ttl(line, now),
    )


def budget_exceeded(
    line: BudgetLine,
    agent: str,
    used: int,
    required: int,
    currency: str,
    *,
    now: float | None = None,
) -> AlertEvent:
    """``budget.exceeded``: a call or booking was refused because ``line`` could not take it.

    Once per line per window (a runaway agent hammering a spent budget alerts once, not per call).
    """
    now = time.time() if now is None else now
    data = _line_data(line, used, 0, currency)
    data["used"] = data.pop("spent")
    data.pop("reserved")
    data["required"] = to_units(required)
    data["reason"] = line.reason
    return AlertEvent(
        id=_line_event_id("budget.exceeded", line, ""),
        type="budget.exceeded",
        severity="critical",
        title=f"Agent {agent} was refused: {_window_label(line)} budget of {_who(line)} exhausted",
        message=(
            f"A call by agent {agent} (org {line.org}) was refused: the {_window_label(line)} budget of "
            f"{_who(line)} has {format_money(used, currency)} of {format_money(line.limit, currency)} used and "
            f"the call needed up to {format_money(required, currency)}. Further refusals in this window are "
            "not alerted again."
        ),
        created_at=now,
        org=line.org,
        agent=agent,
        data=data,
        dedupe_ttl=_window_ttl(line, now),
    )


def reservation_overage(
    org: str,
    agent: str,
    request_id: str,
    model: str,
    reserved: int,
    charged: int,
    currency: str,
    *,
    now: float | None = None,
) -> AlertEvent:
    """``reservation.overage``: the provider reported more than the worst case reserved (a bound was wrong)."""
    now = time.time() if now is None else now
    over = charged - reserved
    return AlertEvent(
        id=event_id("reservation.overage", org, agent, request_id, "", ""),
        type="reservation.overage",
        severity="warning",
        title=f"Overage on a call by agent {agent}: {format_money(over, currency)} above its reservation",
        message=(
            f"Request {request_id} by agent {agent} (org {org}, model {model}) cost "
            f"{format_money(charged, currency)}, above the {format_money(reserved, currency)} reserved. "
            "The real cost was recorded; the cost bound for this model may be wrong."
        ),
        created_at=now,
        org=org,
        agent=agent,
        data={
            "request_id": request_id,
            "model": model,
            "reserved": to_units(reserved),
            "charged": to_units(charged),
            "overage": to_units(over),
            "currency": currency,
        },
    )


def reservations_expired(
    count: int,
    mode: str,
    *,
    backend: str = "",
    reservation_ids: Sequence[str] = (),
    org: str | None = None,
    agent: str | None = None,
    now: float | None = None,
) -> AlertEvent:
    """``reservation.expired``: the sweeper settled leases no live process renewed (a process died).

    The store settles each reservation once, so no two instances report the same ones; the id is
    derived from the reservation ids when known (stable across retries either way: it is fixed when
    the event is built and persisted with it).
    """
    now = time.time() if now is None else now
    if reservation_ids:
        eid = event_id("reservation.expired", org, agent, ",".join(sorted(reservation_ids)), "")
    else:
        eid = event_id("reservation.expired", org, agent, backend, f"{now:.6f}:{count}")
    charged = "charged at their reserved bound" if mode == "charge" else "released (nothing charged)"
    return AlertEvent(
        id=eid,
        type="reservation.expired",
        severity="warning",
        title=f"{count} reservation(s) expired and were {'charged' if mode == 'charge' else 'released'}",
        message=(
            f"{count} reservation(s) were not renewed before their lease ran out (a ResGov process probably "
            f"stopped mid-call) and were {charged}."
        ),
        created_at=now,
        org=org,
        agent=agent,
        data={"count": count, "mode": mode, "backend": backend, "reservation_ids": list(reservation_ids)},
    )


def breaker_tripped(
    org: str,
    agent: str,
    reason: str,
    window: str | int,
    *,
    detail: str = "",
    until: float | None = None,
    now: float | None = None,
) -> AlertEvent:
    """``breaker.tripped``: a loop guard / rate limit stopped an agent.

    ``window`` identifies the trip (e.g. the breaker's trip time in whole seconds, or its
    state's version): instances that share the breaker state pass the same value and so
    produce one event.
    """
    now = time.time() if now is None else now
    until_text = f" until {iso(until)}" if until else " until an admin resumes it"
    return AlertEvent(
        id=event_id("breaker.tripped", org, agent, window, reason),
        type="breaker.tripped",
        severity="critical",
        title=f"Agent {agent} stopped: {reason.replace('_', ' ')}",
        message=f"A breaker stopped agent {agent} (org {org}){until_text}. {detail}".strip(),
        created_at=now,
        org=org,
        agent=agent,
        data={"reason": reason, "window": window, "until": iso(until) if until else None, "detail": detail},
    )


def store_down(backend: str, error: str, *, now: float | None = None) -> AlertEvent:
    """``store.down``: the ledger could not be reached (calls are refused or let through per fail_safe_action).

    Bucketed by :data:`STORE_DOWN_BUCKET_SECONDS`: every instance seeing the outage in the
    same bucket produces the same id, so a long outage alerts once per bucket, not per call.
    """
    now = time.time() if now is None else now
    bucket = int(now // STORE_DOWN_BUCKET_SECONDS) * STORE_DOWN_BUCKET_SECONDS
    return AlertEvent(
        id=event_id("store.down", None, None, backend, bucket),
        type="store.down",
        severity="critical",
        title=f"Budget ledger ({backend}) unreachable",
        message=(
            f"ResGov cannot reach its {backend} ledger: {error[:300]}. Calls are handled per "
            "fail_safe_action (deny: refused with 503) until it answers again."
        ),
        created_at=now,
        data={"backend": backend, "error": error[:300], "since_bucket": iso(bucket)},
        dedupe_ttl=2 * STORE_DOWN_BUCKET_SECONDS,
    )


def forecast_exhaustion(
    line: BudgetLine,
    agent: str,
    exhaustion_at: float,
    remaining: int,
    rate_per_hour: int,
    currency: str,
    *,
    now: float | None = None,
) -> AlertEvent:
    """``forecast.exhaustion``: at the current rate, ``line`` runs out before its window resets.

    Once per line per window (``rate_per_hour`` in nano-units per hour).
    """
    now = time.time() if now is None else now
    minutes = max(0, round((exhaustion_at - now) / 60))
    data = _line_data(line, line.limit - remaining, 0, currency)
    data.pop("reserved")
    data.update(
        {
            "predicted_exhaustion_at": iso(exhaustion_at),
            "remaining_time_seconds": max(0, round(exhaustion_at - now)),
            "rate_per_hour": to_units(rate_per_hour),
        }
    )
    return AlertEvent(
        id=_line_event_id("forecast.exhaustion", line, ""),
        type="forecast.exhaustion",
        severity="warning",
        title=f"{_who(line).capitalize()} will exhaust its {_window_label(line)} budget in ~{minutes} min",
        message=(
            f"At {format_money(rate_per_hour, currency)}/h, the {_window_label(line)} budget of {_who(line)} "
            f"(org {line.org}) runs out around {iso(exhaustion_at)}, before the window resets; "
            f"{format_money(remaining, currency)} remain."
        ),
        created_at=now,
        org=line.org,
        agent=agent,
        data=data,
        dedupe_ttl=_window_ttl(line, now),
    )


def test_event(webhook_id: str, *, now: float | None = None) -> AlertEvent:
    """``webhook.test``: sent by ``POST /api/v1/admin/webhooks/{id}/test`` (a fresh id every time)."""
    now = time.time() if now is None else now
    return AlertEvent(
        id=event_id("webhook.test", None, None, webhook_id, f"{now:.6f}"),
        type="webhook.test",
        severity="info",
        title="ResGov test alert",
        message="This is a test alert from ResGov: this destination is set up correctly.",
        created_at=now,
        data={"webhook_id": webhook_id},
    )
