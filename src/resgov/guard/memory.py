"""In-process guard state, for the single-process SQLite deployment.

Every method runs to completion without awaiting anything, so on one event loop each
decision is atomic by construction (all checks, then all writes). Nothing here survives a
restart, which is what a single process wants: its in-flight calls die with it, and a
restarted agent starts with fresh rate windows. Memory stays bounded: windows are trimmed on
every access, one scope exists per agent and org of the policy, and idle sessions are dropped.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from resgov.core.policy import Limits
from resgov.guard.state import (
    BASELINE_MINUTES,
    MIN_ACTIVE_MINUTES,
    SESSION_IDLE_SECONDS,
    WINDOW_SECONDS,
    AdmitRequest,
    PauseInfo,
    ScopeCheck,
    SettleReport,
    Verdict,
)

#: Sessions are swept for idleness once every this many admissions.
_PRUNE_EVERY = 1024


@dataclass(slots=True)
class _Entry:
    """One admitted call in the 60 s window: its tokens and spend (reserved, then actual)."""

    rid: str
    at: float
    tokens: int
    spend: int
    settled: bool = False


@dataclass(slots=True)
class _Session:
    calls: int = 0
    reserved: int = 0
    spent: int = 0
    holds: dict[str, int] = field(default_factory=dict)
    last: float = 0.0


@dataclass(slots=True)
class _Scope:
    """Everything the guards track for one agent, or for one org."""

    window: deque[_Entry] = field(default_factory=deque)
    entries: dict[str, _Entry] = field(default_factory=dict)
    tokens: int = 0
    spend: int = 0
    settled_spend: int = 0
    inflight: set[str] = field(default_factory=set)
    loop: deque[tuple[float, str]] = field(default_factory=deque)
    loop_counts: dict[str, int] = field(default_factory=dict)
    minutes: dict[int, int] = field(default_factory=dict)
    pause: PauseInfo | None = None
    sessions: dict[str, _Session] = field(default_factory=dict)

    def trim(self, now: float) -> None:
        cutoff = now - WINDOW_SECONDS
        while self.window and self.window[0].at <= cutoff:
            old = self.window.popleft()
            self.entries.pop(old.rid, None)
            self.tokens -= old.tokens
            self.spend -= old.spend
            if old.settled:
                self.settled_spend -= old.spend

    def trim_loop(self, now: float, window: float) -> None:
        cutoff = now - window
        while self.loop and self.loop[0][0] <= cutoff:
            _, fp = self.loop.popleft()
            left = self.loop_counts.get(fp, 0) - 1
            if left > 0:
                self.loop_counts[fp] = left
            else:
                self.loop_counts.pop(fp, None)

    def forget_loops(self) -> None:
        self.loop.clear()
        self.loop_counts.clear()

    def forget_window(self) -> None:
        self.window.clear()
        self.entries.clear()
        self.tokens = self.spend = self.settled_spend = 0


def retry_for_rpm(window: deque[_Entry], rpm: int, now: float) -> float:
    """Seconds until the window holds fewer than ``rpm`` calls."""
    excess = len(window) - rpm  # the entry at this index must age out
    return window[excess].at + WINDOW_SECONDS - now


def retry_for_tpm(window: deque[_Entry], total: int, tokens: int, tpm: int, now: float) -> float:
    """Seconds until ``tokens`` more fit under ``tpm`` as the oldest calls age out."""
    freed = 0
    for entry in window:
        freed += entry.tokens
        if total - freed + tokens <= tpm:
            return entry.at + WINDOW_SECONDS - now
    return WINDOW_SECONDS


class MemoryGuardState:
    """The :class:`~resgov.guard.state.GuardState` of one process."""

    name = "memory"

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        #: Wall clock (pauses are shown as dates); tests inject a fake one.
        self.clock = clock
        self._scopes: dict[tuple[str, str | None], _Scope] = {}
        self._admits = 0

    async def open(self) -> None:
        """Nothing to connect to."""

    async def close(self) -> None:
        """Nothing to release."""

    def _scope(self, org: str, agent: str, check: ScopeCheck) -> _Scope:
        key = (org, agent if check.kind == "agent" else None)
        scope = self._scopes.get(key)
        if scope is None:
            scope = self._scopes[key] = _Scope()
        return scope

    # -- admission -------------------------------------------------------------------------------

    async def admit(self, request: AdmitRequest) -> Verdict:
        """All checks on every scope, then all writes (no await in between: atomic on the loop)."""
        now = self.clock()
        pairs = [(check, self._scope(request.org, request.agent, check)) for check in request.scopes]
        for check, scope in pairs:
            scope.trim(now)
            if check.limits.loop_max_repeats is not None:
                scope.trim_loop(now, check.limits.loop_window_seconds)
            paused = self._paused(check, scope, now)
            if paused is not None:
                return paused
        for check, scope in pairs:
            tripped = self._breakers(check, scope, request, now)
            if tripped is not None:
                return tripped
        for check, scope in pairs:
            refused = self._rates(check, scope, request, now)
            if refused is not None:
                return refused
        for check, scope in pairs:
            refused = self._session_caps(check, scope, request)
            if refused is not None:
                return refused
        for check, scope in pairs:
            self._write(check, scope, request, now)
        self._admits += 1
        if self._admits % _PRUNE_EVERY == 0:
            self._prune_sessions(now)
        return Verdict("ok")

    @staticmethod
    def _paused(check: ScopeCheck, scope: _Scope, now: float) -> Verdict | None:
        pause = scope.pause
        if pause is None:
            return None
        if pause.paused_until is not None and pause.paused_until <= now:
            scope.pause = None  # the cooldown is over
            return None
        retry = None if pause.paused_until is None else pause.paused_until - now
        evidence = {"paused_at": pause.paused_at, **pause.evidence}
        return Verdict("paused", check.kind, pause.reason, retry, pause.paused_until, evidence)

    def _trip(
        self, check: ScopeCheck, scope: _Scope, reason: str, evidence: dict[str, Any], now: float
    ) -> Verdict:
        cooldown = check.limits.cooldown_seconds
        until = now + cooldown if cooldown else None
        scope.pause = PauseInfo(reason, now, until, dict(evidence))
        # The evidence is in the audit trail; the next allowance starts from zero.
        scope.forget_loops()
        return Verdict("tripped", check.kind, reason, cooldown or None, until, evidence)

    def _breakers(
        self, check: ScopeCheck, scope: _Scope, request: AdmitRequest, now: float
    ) -> Verdict | None:
        limits = check.limits
        if limits.loop_max_repeats is not None and check.fingerprint is not None:
            seen = scope.loop_counts.get(check.fingerprint, 0)
            if seen >= limits.loop_max_repeats:
                evidence = loop_evidence(seen, limits, check.fingerprint)
                return self._trip(check, scope, "loop_detected", evidence, now)
        if limits.max_spend_per_minute is not None:
            projected = scope.spend + request.amount
            if projected > limits.max_spend_per_minute:
                evidence = {
                    "spend_last_minute_nano": scope.spend,
                    "required_nano": request.amount,
                    "limit_per_minute_nano": limits.max_spend_per_minute,
                    "window_seconds": WINDOW_SECONDS,
                    "calls_last_minute": len(scope.window),
                }
                return self._trip(check, scope, "spend_velocity_exceeded", evidence, now)
        if limits.spend_velocity_multiple is not None:
            norm = self._norm(scope, now)
            if norm is not None:
                mean, minutes = norm
                if mean > 0 and scope.settled_spend > limits.spend_velocity_multiple * mean:
                    evidence = velocity_evidence(
                        scope.settled_spend, mean, minutes, limits, len(scope.window)
                    )
                    return self._trip(check, scope, "spend_velocity_exceeded", evidence, now)
        return None

    @staticmethod
    def _norm(scope: _Scope, now: float) -> tuple[float, int] | None:
        """(mean actual spend per active minute of the baseline, active minutes), or None."""
        end = math.floor((now - WINDOW_SECONDS) / 60)
        active = [v for m, v in scope.minutes.items() if end - BASELINE_MINUTES <= m < end and v > 0]
        if len(active) < MIN_ACTIVE_MINUTES:
            return None
        return sum(active) / len(active), len(active)

    @staticmethod
    def _rates(check: ScopeCheck, scope: _Scope, request: AdmitRequest, now: float) -> Verdict | None:
        limits = check.limits
        if limits.max_concurrent is not None and len(scope.inflight) >= limits.max_concurrent:
            return Verdict("refused", check.kind, "concurrency_exceeded", 1.0,
                           evidence={"in_flight": len(scope.inflight), "limit": limits.max_concurrent})  # fmt: skip
        if limits.rpm is not None and len(scope.window) >= limits.rpm:
            retry = retry_for_rpm(scope.window, limits.rpm, now)
            return Verdict("refused", check.kind, "rpm_exceeded", retry,
                           evidence={"count": len(scope.window), "limit": limits.rpm,
                                     "window_seconds": WINDOW_SECONDS})  # fmt: skip
        if limits.tpm is not None and scope.tokens + request.tokens > limits.tpm:
            evidence = {"tokens_last_minute": scope.tokens, "required_tokens": request.tokens,
                        "limit": limits.tpm, "window_seconds": WINDOW_SECONDS}  # fmt: skip
            if request.tokens > limits.tpm:
                return Verdict("refused", check.kind, "tpm_request_too_large", None, evidence=evidence)
            retry = retry_for_tpm(scope.window, scope.tokens, request.tokens, limits.tpm, now)
            return Verdict("refused", check.kind, "tpm_exceeded", retry, evidence=evidence)
        return None

    @staticmethod
    def _session_caps(check: ScopeCheck, scope: _Scope, request: AdmitRequest) -> Verdict | None:
        if check.session is None:
            return None
        limits = check.limits
        session = scope.sessions.get(check.session) or _Session()
        if limits.max_calls_per_session is not None and session.calls >= limits.max_calls_per_session:
            return Verdict("refused", check.kind, "session_calls_exceeded", None,
                           evidence={"calls": session.calls, "limit": limits.max_calls_per_session})  # fmt: skip
        if limits.session_budget is not None:
            used = session.spent + session.reserved
            if used + request.amount > limits.session_budget:
                return Verdict("refused", check.kind, "session_budget_exceeded", None,
                               evidence={"limit_nano": limits.session_budget, "spent_nano": session.spent,
                                         "reserved_nano": session.reserved,
                                         "required_nano": request.amount})  # fmt: skip
        return None

    def _write(self, check: ScopeCheck, scope: _Scope, request: AdmitRequest, now: float) -> None:
        limits = check.limits
        rid = request.rid
        if rid not in scope.entries:
            entry = _Entry(rid, now, request.tokens, request.amount)
            scope.window.append(entry)
            scope.entries[rid] = entry
            scope.tokens += request.tokens
            scope.spend += request.amount
        if limits.max_concurrent is not None:
            scope.inflight.add(rid)
        if limits.loop_max_repeats is not None and check.fingerprint is not None:
            scope.loop.append((now, check.fingerprint))
            scope.loop_counts[check.fingerprint] = scope.loop_counts.get(check.fingerprint, 0) + 1
        if check.session is not None:
            session = scope.sessions.get(check.session)
            if session is None:
                session = scope.sessions[check.session] = _Session()
            if rid not in session.holds:
                # Held even without a session budget: settling then knows the call is this
                # session's (once), and the numbers are right if a reload turns the budget on.
                session.calls += 1
                session.reserved += request.amount
                session.holds[rid] = request.amount
            session.last = now

    def _prune_sessions(self, now: float) -> None:
        for scope in self._scopes.values():
            idle = [
                sid
                for sid, s in scope.sessions.items()
                if not s.holds and s.last < now - SESSION_IDLE_SECONDS
            ]
            for sid in idle:
                del scope.sessions[sid]

    # -- settlement ------------------------------------------------------------------------------

    async def settle(self, report: SettleReport) -> None:
        """Free the slot and replace the reservation by the actuals; a second call changes nothing."""
        for check in report.scopes:
            key = (report.org, report.agent if check.kind == "agent" else None)
            scope = self._scopes.get(key)
            if scope is None:
                continue
            scope.inflight.discard(report.rid)
            entry = scope.entries.get(report.rid)
            if entry is not None and not entry.settled:
                tokens = report.tokens if report.tokens is not None else entry.tokens
                cost = report.cost
                if not report.sent:
                    tokens = cost = 0
                scope.tokens += tokens - entry.tokens
                scope.spend += cost - entry.spend
                scope.settled_spend += cost
                entry.tokens, entry.spend, entry.settled = tokens, cost, True
                minute = math.floor(entry.at / 60)
                scope.minutes[minute] = scope.minutes.get(minute, 0) + cost
                horizon = minute - BASELINE_MINUTES - 2
                for old in [m for m in scope.minutes if m < horizon]:
                    del scope.minutes[old]
            if check.session is not None:
                session = scope.sessions.get(check.session)
                if session is None:
                    continue
                hold = session.holds.pop(report.rid, None)
                if hold is None:
                    continue  # settled already
                session.reserved -= hold
                if report.sent:
                    session.spent += report.cost
                else:
                    session.calls -= 1  # refused after admission: it never was a call

    async def renew(self, org_rids: dict[str, list[tuple[str, str]]], lease_seconds: float) -> None:
        """Slots of this process live as long as the process: nothing to renew."""

    # -- pauses ----------------------------------------------------------------------------------

    async def resume(self, org: str, agent: str | None) -> PauseInfo | None:
        """Lift the pause, forget the loop history and the last minute's spend."""
        scope = self._scopes.get((org, agent))
        if scope is None:
            return None
        now = self.clock()
        was = scope.pause
        scope.pause = None
        scope.forget_loops()
        # Calls still in flight settle against entries that no longer exist: nothing to undo.
        scope.forget_window()
        if was is not None and was.paused_until is not None and was.paused_until <= now:
            return None
        return was

    async def pause_info(self, org: str, agent: str | None) -> PauseInfo | None:
        """The pause in force, if any."""
        scope = self._scopes.get((org, agent))
        if scope is None or scope.pause is None:
            return None
        pause = scope.pause
        if pause.paused_until is not None and pause.paused_until <= self.clock():
            return None
        return pause


def loop_evidence(seen: int, limits: Limits, fingerprint: str) -> dict[str, Any]:
    """What the audit trail keeps about a loop trip."""
    window = limits.loop_window_seconds
    return {
        "count": seen + 1,
        "limit": limits.loop_max_repeats,
        "window_seconds": window,
        "rate_per_minute": round((seen + 1) * 60 / window, 3),
        "fingerprint": fingerprint[:16],
    }


def velocity_evidence(spent: int, mean: float, minutes: int, limits: Limits, calls: int) -> dict[str, Any]:
    """What the audit trail keeps about a trip of ``spend_velocity_multiple``."""
    return {
        "spend_last_minute_nano": spent,
        "norm_per_minute_nano": round(mean),
        "ratio": round(spent / mean, 3),
        "multiple": limits.spend_velocity_multiple,
        "active_minutes": minutes,
        "window_seconds": WINDOW_SECONDS,
        "calls_last_minute": calls,
    }
