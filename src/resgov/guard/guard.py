"""The guard the proxy calls: rate limits, loop detector, spend-velocity breaker, sessions.

One :meth:`Guard.admit` before the budget reservation (one state round trip) and one
:meth:`Guard.settled` after settlement (one more), both skipped entirely when neither the
agent nor its org configures any guard. Refusals are :class:`GuardRefusal` errors that the
proxy answers like any other, in the route's JSON envelope:

==========================  ======  ===========================  ==============================
what                        status  ``type``                     ``reason``
==========================  ======  ===========================  ==============================
requests per minute         429     ``rate_limit_exceeded``      ``rpm_exceeded``
tokens per minute           429     ``rate_limit_exceeded``      ``tpm_exceeded``
one call above ``tpm``      403     ``rate_limit_exceeded``      ``tpm_request_too_large``
calls in flight             429     ``rate_limit_exceeded``      ``concurrency_exceeded``
loop breaker (trip/paused)  429     ``circuit_breaker_open``     ``loop_detected``
spend-velocity breaker      429     ``circuit_breaker_open``     ``spend_velocity_exceeded``
session call cap            403     ``session_limit_exceeded``   ``session_calls_exceeded``
session budget              403     ``budget_exceeded``          ``session_budget_exceeded``
==========================  ======  ===========================  ==============================

Every 429 carries ``Retry-After`` in whole seconds (at least 1): when the window frees a
slot, or when the pause ends. A pause with no ``cooldown_seconds`` lasts until an admin
resumes the agent (or org), so its ``Retry-After`` is only a polite re-check interval
(:data:`INDEFINITE_RETRY_AFTER`) and the body says ``paused_until: null``. The 403s are
final for that request (or that session): retrying cannot help, so SDKs must not retry.
The body names the ``scope`` (``agent`` or ``org``) whose limit refused the call.

A breaker trip logs a warning, calls every hook in :attr:`Guard.on_trip` (the alerting
seam), and the refused request's audit record carries the evidence (see
:attr:`GuardRefusal.detail`).

Limits on an org cover all of its agents together, as org budgets do: the org's ``rpm``
counts every agent's calls, its loop counter sees the same request from any of its agents,
its sessions are per session id across its agents, and an org-level trip pauses every agent
of the org (``POST /api/v1/admin/agents/{id}/resume?scope=org`` lifts it). A call must pass
both its agent's limits and its org's; a refusal by either writes nothing on the other.

A session is named by the client in ``X-ResGov-Session-ID`` (1 to 256 characters, stored
only as a digest); the header is ignored unless a session limit applies to the call.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from resgov.core.errors import BadRequest, ResGovError, StoreUnavailable
from resgov.core.money import format_money
from resgov.core.policy import AgentPolicy, Limits, OrgPolicy
from resgov.guard.fingerprint import fingerprint
from resgov.guard.state import (
    DEFAULT_LEASE_SECONDS,
    AdmitRequest,
    GuardState,
    GuardStateError,
    PauseInfo,
    ScopeCheck,
    ScopeKind,
    SettleReport,
    Verdict,
)

log = logging.getLogger("resgov.guard")

#: ``Retry-After`` of a pause that lasts until an admin resumes it: how often to look again.
INDEFINITE_RETRY_AFTER = 300
#: Longest session id accepted in ``X-ResGov-Session-ID``.
MAX_SESSION_ID = 256
_RATE_REASONS = frozenset({"rpm_exceeded", "tpm_exceeded", "concurrency_exceeded", "tpm_request_too_large"})
_BREAKER_REASONS = frozenset({"loop_detected", "spend_velocity_exceeded"})


class GuardRefusal(ResGovError):
    """A guard said no. ``detail`` is what the request's audit record keeps as evidence."""

    status = 429
    type = "rate_limit_exceeded"

    def __init__(self, message: str, *, detail: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.detail = detail


@dataclass(frozen=True, slots=True)
class CallContext:
    """What the guard needs to know about one call, decided before its budget reservation."""

    request_id: str
    agent: AgentPolicy
    org: OrgPolicy | None
    model: str
    body: Mapping[str, Any]
    #: Reserved token bound: input bound + every output token the call may produce.
    tokens: int
    #: Worst-case cost, nano-units.
    amount: int
    session_id: str | None = None
    currency: str = "USD"
    fail_safe_action: Literal["deny", "allow"] = "deny"


@dataclass(slots=True)
class Ticket:
    """An admitted call; settle it exactly once with :meth:`Guard.settled`."""

    org: str
    agent: str
    rid: str
    scopes: tuple[ScopeCheck, ...]
    tokens: int
    amount: int
    done: bool = False


@dataclass(frozen=True, slots=True)
class TripEvent:
    """A breaker tripped: what alerting hooks receive."""

    org: str
    agent_id: str
    scope: ScopeKind
    reason: str
    evidence: dict[str, Any]
    paused_until: float | None
    request_id: str
    at: float = field(default_factory=time.time)


TripHook = Callable[[TripEvent], object]


def session_digest(session_id: str) -> str:
    """A fixed-size key part for a client-chosen session id."""
    return hashlib.sha256(session_id.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def wanted(agent: AgentPolicy, org: OrgPolicy | None) -> bool:
    """True when the agent or its org configures any guard (else the proxy skips the guard)."""
    return agent.limits.any or (org is not None and org.limits.any)


def _seconds(value: float | None) -> int | None:
    """Whole seconds for ``Retry-After``, rounded up, at least 1."""
    return None if value is None else max(1, math.ceil(value - 1e-9))


def _iso(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


class Guard:
    """Decides, through a :class:`GuardState`, whether a call may go ahead, and accounts for it."""

    def __init__(self, state: GuardState, *, lease_seconds: float = DEFAULT_LEASE_SECONDS) -> None:
        self.state = state
        self.lease_seconds = lease_seconds
        #: Called with a :class:`TripEvent` on every breaker trip; a coroutine result runs in the
        #: background so alerting never delays the refusal. Exceptions are logged, never raised.
        self.on_trip: list[TripHook] = []
        #: This process's admitted, unsettled calls (their in-flight leases are renewed).
        self.inflight: dict[str, Ticket] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._heartbeat: asyncio.Task[None] | None = None

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the state; on shared state, renew this process's in-flight leases in the background."""
        await self.state.open()
        if self.state.name != "memory":
            self._heartbeat = asyncio.create_task(self._renew_forever(), name="resgov-guard-leases")

    async def stop(self) -> None:
        """Stop renewing, let alert hooks finish briefly, close the state."""
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
            self._heartbeat = None
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=2.0)
        await self.state.close()

    async def _renew_forever(self) -> None:
        while True:
            await asyncio.sleep(self.lease_seconds / 3)
            await self.renew_once()

    async def renew_once(self) -> None:
        """Push the in-flight leases of every live call of this process forward."""
        if not self.inflight:
            return
        by_org: dict[str, list[tuple[str, str]]] = {}
        for ticket in list(self.inflight.values()):
            if any(s.limits.max_concurrent is not None for s in ticket.scopes):
                by_org.setdefault(ticket.org, []).append((ticket.agent, ticket.rid))
        if not by_org:
            return
        try:
            await self.state.renew(by_org, self.lease_seconds)
        except Exception as exc:  # keep renewing after an outage
            log.error("guard: in-flight lease renewal failed: %s", exc)

    # -- the call --------------------------------------------------------------------------------

    @staticmethod
    def _scopes(ctx: CallContext) -> tuple[ScopeCheck, ...]:
        prints: dict[str, str] = {}
        session: str | None = None
        if ctx.session_id is not None:
            if not 0 < len(ctx.session_id) <= MAX_SESSION_ID:
                raise BadRequest(
                    f"X-ResGov-Session-ID must be 1 to {MAX_SESSION_ID} characters.",
                    reason="invalid_session_id",
                )
            session = session_digest(ctx.session_id)
        out: list[ScopeCheck] = []
        pairs: tuple[tuple[ScopeKind, Limits | None], ...] = (
            ("agent", ctx.agent.limits),
            ("org", ctx.org.limits if ctx.org is not None else None),
        )
        for kind, limits in pairs:
            if limits is None or not limits.any:
                continue
            fp = None
            if limits.loop_max_repeats is not None:
                fp = prints.get(limits.loop_match)
                if fp is None:
                    fp = prints[limits.loop_match] = fingerprint(ctx.model, ctx.body, limits.loop_match)
            has_session = limits.session_budget is not None or limits.max_calls_per_session is not None
            out.append(ScopeCheck(kind, limits, fp, session if has_session else None))
        return tuple(out)

    async def admit(self, ctx: CallContext) -> Ticket | None:
        """Admit the call (None when no guard applies) or raise the refusal.

        A state outage follows the policy's ``fail_safe_action``: ``deny`` answers 503
        (the upstream is never called), ``allow`` lets the call through unguarded.
        """
        scopes = self._scopes(ctx)
        if not scopes:
            return None
        agent = ctx.agent
        request = AdmitRequest(
            agent.org, agent.agent_id, ctx.request_id, ctx.tokens, ctx.amount, scopes, self.lease_seconds
        )
        try:
            verdict = await self.state.admit(request)
        except GuardStateError as exc:
            if ctx.fail_safe_action == "allow":
                log.error(
                    "guard state unavailable, passing the call unguarded (fail_safe_action=allow): %s", exc
                )
                return None
            log.error("guard state unavailable, refusing (fail_safe_action=deny): %s", exc)
            raise StoreUnavailable(
                "The rate-limit state is unavailable; the call was not sent upstream (fail_safe_action = deny).",
                reason="store_unavailable",
            ) from exc
        if verdict.ok:
            ticket = Ticket(agent.org, agent.agent_id, ctx.request_id, scopes, ctx.tokens, ctx.amount)
            self.inflight[ctx.request_id] = ticket
            return ticket
        if verdict.outcome == "tripped":
            self._tripped(ctx, verdict)
        raise self.refusal(ctx, verdict)

    async def settled(
        self, ticket: Ticket | None, *, tokens: int | None, cost: int, sent: bool = True
    ) -> None:
        """The call ended: free its slot, account its actual tokens and cost. Once; never raises.

        ``tokens`` None keeps the reserved bound in the token window (no usage reported);
        ``sent`` False means the call was refused after admission and never went upstream.
        """
        if ticket is None or ticket.done:
            return
        ticket.done = True
        self.inflight.pop(ticket.rid, None)
        report = SettleReport(
            ticket.org,
            ticket.agent,
            ticket.rid,
            ticket.scopes,
            ticket.tokens,
            ticket.amount,
            tokens,
            cost,
            sent,
        )
        try:
            await self.state.settle(report)
        except Exception as exc:  # the ledger is settled already; a stale slot expires with its lease
            log.error("guard: settling %s failed: %s", ticket.rid, exc)

    async def release(self, ticket: Ticket | None) -> None:
        """Give back a call that never went upstream (refused by the budget after admission)."""
        await self.settled(ticket, tokens=0, cost=0, sent=False)

    # -- pauses ----------------------------------------------------------------------------------

    async def resume(self, org: str, agent_id: str | None) -> PauseInfo | None:
        """Lift an agent's (or, with None, an org's) pause; returns the pause that was lifted."""
        was = await self.state.resume(org, agent_id)
        log.warning(
            "guard: %s resumed by an admin%s",
            f"agent {org}/{agent_id}" if agent_id else f"org {org}",
            f" (was paused: {was.reason})" if was else " (was not paused)",
        )
        return was

    async def pause_info(self, org: str, agent_id: str | None) -> PauseInfo | None:
        """The pause in force on an agent (or an org), if any."""
        return await self.state.pause_info(org, agent_id)

    # -- refusals --------------------------------------------------------------------------------

    def _tripped(self, ctx: CallContext, verdict: Verdict) -> None:
        assert verdict.scope is not None and verdict.reason is not None
        agent = ctx.agent
        log.warning(
            "guard: %s breaker tripped for %s %s/%s: %s; paused %s",
            verdict.reason, verdict.scope, agent.org, agent.agent_id, verdict.evidence,
            f"until {_iso(verdict.paused_until)}" if verdict.paused_until else "until an admin resumes it",
        )  # fmt: skip
        event = TripEvent(
            agent.org, agent.agent_id, verdict.scope, verdict.reason, dict(verdict.evidence),
            verdict.paused_until, ctx.request_id,
        )  # fmt: skip
        for hook in list(self.on_trip):
            try:
                result = hook(event)
                if inspect.isawaitable(result):
                    task = asyncio.ensure_future(result)
                    self._tasks.add(task)
                    task.add_done_callback(self._hook_done)
            except Exception:
                log.exception("guard: trip hook %r failed", hook)

    def _hook_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("guard: trip hook failed: %r", task.exception())

    @staticmethod
    def refusal(ctx: CallContext, verdict: Verdict) -> GuardRefusal:
        """The error a verdict becomes: status, type, reason, message, ``Retry-After``, evidence."""
        reason = verdict.reason or "rate_limit_exceeded"
        scope = verdict.scope or "agent"
        agent = ctx.agent
        who = f"agent '{agent.agent_id}'" if scope == "agent" else f"org '{agent.org}'"
        ev = verdict.evidence
        cur = ctx.currency
        retry = _seconds(verdict.retry_after)
        status = 429
        type_ = "rate_limit_exceeded"
        extra: dict[str, Any] = {"agent_id": agent.agent_id, "scope": scope}
        if reason in _BREAKER_REASONS:
            type_ = "circuit_breaker_open"
            if verdict.paused_until is None:
                retry = INDEFINITE_RETRY_AFTER
                until = "until an admin resumes it"
                path = f"agents/{agent.agent_id}/resume?org_id={agent.org}" + (
                    "" if scope == "agent" else "&scope=org"
                )
                until += f" (POST /api/v1/admin/{path})"
            else:
                until = f"until {_iso(verdict.paused_until)} (retry in {retry} s)"
            if verdict.outcome == "tripped":
                message = f"{_why(reason, ev, cur, who)} {who[0].upper() + who[1:]} is paused {until}."
            else:
                message = f"{who[0].upper() + who[1:]} is paused ({reason.replace('_', ' ')}) {until}."
            extra["paused_until"] = _iso(verdict.paused_until)
        elif reason == "rpm_exceeded":
            message = (f"Rate limit exceeded for {who}: {ev.get('count')} requests in the last 60 s "
                       f"(rpm = {ev.get('limit')}). Retry after {retry} s.")  # fmt: skip
        elif reason == "tpm_exceeded":
            message = (f"Token rate limit exceeded for {who}: {ev.get('tokens_last_minute')} tokens in the last "
                       f"60 s, this call reserves {ev.get('required_tokens')} (input bound + output cap; "
                       f"tpm = {ev.get('limit')}). Retry after {retry} s.")  # fmt: skip
        elif reason == "tpm_request_too_large":
            status = 403
            retry = None
            message = (f"This call reserves {ev.get('required_tokens')} tokens (input bound + output cap), more "
                       f"than the tpm of {who} ({ev.get('limit')}); it can never fit. Lower max_tokens.")  # fmt: skip
        elif reason == "concurrency_exceeded":
            message = (f"Too many calls in flight for {who}: {ev.get('in_flight')} "
                       f"(max_concurrent = {ev.get('limit')}). Retry after {retry} s.")  # fmt: skip
        elif reason == "session_calls_exceeded":
            status, type_, retry = 403, "session_limit_exceeded", None
            message = (f"Session call limit reached for {who}: {ev.get('calls')} calls "
                       f"(max_calls_per_session = {ev.get('limit')}).")  # fmt: skip
            extra["session_id"] = ctx.session_id
        elif reason == "session_budget_exceeded":
            status, type_, retry = 403, "budget_exceeded", None
            used = int(ev.get("spent_nano", 0)) + int(ev.get("reserved_nano", 0))
            message = (f"Session budget exceeded. Limit: {format_money(int(ev.get('limit_nano', 0)), cur)}, "
                       f"Spent: {format_money(used, cur)}, "
                       f"Required: {format_money(int(ev.get('required_nano', 0)), cur)}")  # fmt: skip
            extra["session_id"] = ctx.session_id
        else:  # a reason this version does not know (a newer peer on shared state)
            message = f"Refused by a guard of {who}: {reason}."
        headers = {"Retry-After": str(retry)} if retry is not None else {}
        if retry is not None:
            extra["retry_after"] = retry
        detail = {"scope": scope, "tripped": verdict.outcome == "tripped", **ev}
        if verdict.outcome in ("tripped", "paused"):
            detail["paused_until"] = verdict.paused_until
        return GuardRefusal(
            message, detail=detail, reason=reason, type=type_, status=status, headers=headers, **extra
        )


def _why(reason: str, ev: Mapping[str, Any], cur: str, who: str) -> str:
    """The first sentence of a trip: what the breaker saw."""
    if reason == "loop_detected":
        return (f"Loop detected: {who} sent {ev.get('count')} near-identical requests within "
                f"{float(ev.get('window_seconds', 0)):g} s (loop_max_repeats = {ev.get('limit')}).")  # fmt: skip
    if "limit_per_minute_nano" in ev:
        spent = int(ev.get("spend_last_minute_nano", 0)) + int(ev.get("required_nano", 0))
        return (f"Spend velocity exceeded: {who} would spend {format_money(spent, cur)} within 60 s "
                f"(max_spend_per_minute = {format_money(int(ev['limit_per_minute_nano']), cur)}).")  # fmt: skip
    return (f"Spend velocity exceeded: {who} spent {format_money(int(ev.get('spend_last_minute_nano', 0)), cur)} "
            f"in the last 60 s, {ev.get('ratio')}x its norm of "
            f"{format_money(int(ev.get('norm_per_minute_nano', 0)), cur)} per active minute "
            f"(spend_velocity_multiple = {ev.get('multiple')}).")  # fmt: skip
