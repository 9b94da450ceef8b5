"""The guard's state protocol and the plain data that crosses it.

A :class:`GuardState` keeps every sliding window, in-flight slot, loop counter, spend
history, pause and session of the guards, and makes each decision atomically: all checks
of one call (its agent and its org) first, then all writes, or none. Two backends pass the
same contract suite (tests/guard/test_state_contract.py): :mod:`resgov.guard.memory` for
one process, :mod:`resgov.guard.redis` for several instances sharing one Redis.

Semantics both backends implement (times in seconds, money in nano-units):

* ``rpm`` / ``tpm``: over the sliding 60 s before now (never calendar minutes). A call counts
  at its admission time; its tokens are the reserved bound (input bound + output cap) until
  it settles, then the actual tokens. ``max_concurrent``: calls admitted and not yet settled.
  A refused call counts nowhere; a call the budget refuses after admission still counts as
  a request (an attempt), with no tokens and no spend.
* loop: with ``loop_max_repeats = N``, N calls with the same fingerprint within
  ``loop_window_seconds`` are admitted; the next one trips the breaker. A trip forgets the
  scope's loop history, so a resumed (or cooled-down) scope gets a fresh allowance of N.
* velocity: ``max_spend_per_minute`` trips when the spend of the last 60 s (settled actual +
  in-flight worst case) plus this call's worst case would exceed it. ``spend_velocity_multiple``
  trips when the actual spend settled in the last 60 s exceeds the multiple of the scope's
  norm: its mean actual spend per *active* minute (a minute with any spend) over the
  :data:`BASELINE_MINUTES` minutes before that window, once at least
  :data:`MIN_ACTIVE_MINUTES` such minutes exist. Averaging over active minutes only means
  an agent that pauses and then resumes its usual pace is not a "burst" (idle minutes
  would otherwise drag the norm towards zero), and the minimum of active minutes keeps a
  first, partial minute from making a steady start look like one. In-flight reservations
  are left out of this comparison on purpose: worst-case bounds are many times the real
  cost, so counting them would make a steady agent look bursty. Spend counts in the
  minute of the call's admission.
* a trip pauses the scope for ``cooldown_seconds`` (``None``: until :meth:`GuardState.resume`).
* sessions: per session id, ``max_calls_per_session`` counts admitted calls (a call refused
  by the budget afterwards is given back) and ``session_budget`` holds worst case reserved +
  settled actual, reserve-style, so concurrent calls can never overshoot it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from resgov.core.policy import Limits

ScopeKind = Literal["agent", "org"]
Outcome = Literal["ok", "refused", "tripped", "paused"]

#: Every window of rpm, tpm and spend per minute.
WINDOW_SECONDS = 60.0
#: How far back the per-minute spend norm of ``spend_velocity_multiple`` looks.
BASELINE_MINUTES = 30
#: Active minutes (with spend) of baseline a scope needs before ``spend_velocity_multiple`` judges it.
MIN_ACTIVE_MINUTES = 3
#: A session forgotten this long after its last call starts again from zero.
SESSION_IDLE_SECONDS = 86_400.0
#: How long an instance's in-flight slot survives without renewal (the instance died).
DEFAULT_LEASE_SECONDS = 60.0


class GuardStateError(Exception):
    """The shared guard state cannot be reached or failed (the policy's fail-safe action decides)."""


@dataclass(frozen=True, slots=True)
class ScopeCheck:
    """One scope a call is checked against: the agent itself, or its whole org."""

    kind: ScopeKind
    limits: Limits
    #: The call's fingerprint under this scope's ``loop_match``; None when loop detection is off.
    fingerprint: str | None = None
    #: The session id digest when this scope has session limits and the call names a session.
    session: str | None = None


@dataclass(frozen=True, slots=True)
class AdmitRequest:
    """Admit one call (reserve its slot, its tokens, its spend) on every scope, or refuse it."""

    org: str
    agent: str
    rid: str
    #: Reserved token bound: input bound + every output token the call may produce.
    tokens: int
    #: Worst-case cost, nano-units.
    amount: int
    scopes: tuple[ScopeCheck, ...]
    lease_seconds: float = DEFAULT_LEASE_SECONDS


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the state decided. ``outcome`` ok = admitted and recorded; anything else wrote no slot.

    ``tripped``: this call tripped a breaker (the scope is now paused). ``paused``: the scope was
    already paused. ``refused``: a rate limit or a session cap said no; nothing was written.
    """

    outcome: Outcome
    scope: ScopeKind | None = None
    reason: str | None = None
    #: Seconds until a retry can succeed (rate limits) or the pause ends; None = until resumed.
    retry_after: float | None = None
    #: Epoch seconds when the pause ends (None: until an admin resumes).
    paused_until: float | None = None
    #: The numbers behind the decision: count, limit, window, rate… (the audit record's detail).
    evidence: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        """The call was admitted."""
        return self.outcome == "ok"


@dataclass(frozen=True, slots=True)
class SettleReport:
    """The end of an admitted call: what it really used (or that it never went upstream)."""

    org: str
    agent: str
    rid: str
    scopes: tuple[ScopeCheck, ...]
    reserved_tokens: int
    reserved_amount: int
    #: Actual tokens; None keeps the reserved bound (no usage was reported).
    tokens: int | None
    #: Actual cost charged, nano-units.
    cost: int
    #: False when the call was refused after admission (the budget) and never went upstream:
    #: its session call is given back.
    sent: bool = True


@dataclass(frozen=True, slots=True)
class PauseInfo:
    """A paused scope: why, since when, until when (None: until resumed)."""

    reason: str
    paused_at: float
    paused_until: float | None
    evidence: dict[str, Any] = field(default_factory=dict)


class GuardState(Protocol):
    """Atomic guard decisions over shared state. Implementations never raise refusals, only report."""

    name: str

    async def open(self) -> None:
        """Connect (if there is anything to connect to)."""

    async def close(self) -> None:
        """Release every resource."""

    async def admit(self, request: AdmitRequest) -> Verdict:
        """All checks on every scope, then all writes (or none). Raises only for infrastructure."""

    async def settle(self, report: SettleReport) -> None:
        """Release the call's slot; replace reserved tokens and spend by the actual ones. Idempotent."""

    async def renew(self, org_rids: dict[str, list[tuple[str, str]]], lease_seconds: float) -> None:
        """Extend the in-flight slots of live calls: ``{org: [(agent, rid), ...]}``."""

    async def resume(self, org: str, agent: str | None) -> PauseInfo | None:
        """Lift the pause of an agent (``agent``) or of an org (``None``); returns what it was.

        Also forgets the scope's loop history and last-minute spend, so the resumed scope
        starts afresh instead of tripping again on the evidence that paused it.
        """

    async def pause_info(self, org: str, agent: str | None) -> PauseInfo | None:
        """The current pause of an agent or an org, if any (an expired cooldown is no pause)."""
