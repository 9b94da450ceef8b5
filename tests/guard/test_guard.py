"""The Guard the proxy calls: scopes, refusals (status, type, reason, Retry-After), hooks, fail-safe."""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

import pytest

from resgov.core.errors import BadRequest, StoreUnavailable
from resgov.core.policy import AgentPolicy, Limits, OrgPolicy
from resgov.guard import CallContext, Guard, GuardRefusal, TripEvent, wanted
from resgov.guard.guard import INDEFINITE_RETRY_AFTER
from resgov.guard.memory import MemoryGuardState
from resgov.guard.state import AdmitRequest, GuardStateError, PauseInfo, SettleReport, Verdict
from tests.guard.conftest import FakeClock


def ctx(
    limits: Limits | None = None,
    org_limits: Limits | None = None,
    *,
    text: str = "hello",
    session: str | None = None,
    amount: int = 1_000_000,
    tokens: int = 100,
    fail_safe: str = "deny",
) -> CallContext:
    agent = AgentPolicy("acme", "bot", limits=limits or Limits())
    org = OrgPolicy("acme", limits=org_limits or Limits())
    return CallContext(
        request_id="rgr_" + uuid.uuid4().hex,
        agent=agent,
        org=org,
        model="gpt-sim",
        body={"messages": [{"role": "user", "content": text}]},
        tokens=tokens,
        amount=amount,
        session_id=session,
        fail_safe_action=fail_safe,  # type: ignore[arg-type]
    )


async def refused(guard: Guard, call: CallContext) -> GuardRefusal:
    with pytest.raises(GuardRefusal) as info:
        await guard.admit(call)
    return info.value


def test_wanted_only_when_a_guard_is_configured() -> None:
    plain = AgentPolicy("acme", "bot")
    assert not wanted(plain, None)
    assert not wanted(plain, OrgPolicy("acme"))
    assert wanted(plain, OrgPolicy("acme", limits=Limits(rpm=5)))
    assert wanted(AgentPolicy("acme", "bot", limits=Limits(max_calls_per_session=3)), None)


async def test_no_guard_configured_admits_without_touching_the_state() -> None:
    state = MemoryGuardState()
    guard = Guard(state)
    assert await guard.admit(ctx()) is None
    assert state._scopes == {}  # nothing was tracked


async def test_rpm_refusal_shape() -> None:
    guard = Guard(MemoryGuardState())
    limits = Limits(rpm=1)
    ticket = await guard.admit(ctx(limits))
    assert ticket is not None and ticket.rid in guard.inflight
    err = await refused(guard, ctx(limits))
    assert (err.status, err.type, err.reason) == (429, "rate_limit_exceeded", "rpm_exceeded")
    assert 59 <= int(err.headers["Retry-After"]) <= 60
    body = err.body()
    assert body["agent_id"] == "bot" and body["scope"] == "agent"
    assert body["retry_after"] == int(err.headers["Retry-After"])
    assert "rpm = 1" in body["message"]
    assert err.detail["tripped"] is False and err.detail["count"] == 1
    await guard.settled(ticket, tokens=10, cost=5)
    assert ticket.rid not in guard.inflight


async def test_concurrency_refusal_retry_after_is_at_least_one_second() -> None:
    guard = Guard(MemoryGuardState())
    limits = Limits(max_concurrent=1)
    await guard.admit(ctx(limits))
    err = await refused(guard, ctx(limits))
    assert (err.status, err.reason, err.headers["Retry-After"]) == (429, "concurrency_exceeded", "1")


async def test_org_scope_is_named() -> None:
    guard = Guard(MemoryGuardState())
    await guard.admit(ctx(None, Limits(rpm=1)))
    err = await refused(guard, ctx(None, Limits(rpm=1)))
    assert err.body()["scope"] == "org"
    assert "org 'acme'" in err.message


async def test_loop_trip_logs_fires_hooks_and_carries_evidence(caplog: pytest.LogCaptureFixture) -> None:
    guard = Guard(MemoryGuardState())
    seen: list[TripEvent] = []
    async_seen: list[str] = []

    async def async_hook(event: TripEvent) -> None:
        await asyncio.sleep(0)
        async_seen.append(event.reason)

    def broken_hook(event: TripEvent) -> None:
        raise RuntimeError("alerting is down")

    guard.on_trip += [seen.append, broken_hook, async_hook]
    limits = Limits(loop_max_repeats=2, loop_window_seconds=60)
    for _ in range(2):
        await guard.admit(ctx(limits))
    with caplog.at_level(logging.WARNING, logger="resgov.guard"):
        err = await refused(guard, ctx(limits))
    assert (err.status, err.type, err.reason) == (429, "circuit_breaker_open", "loop_detected")
    assert err.headers["Retry-After"] == str(INDEFINITE_RETRY_AFTER)
    assert err.body()["paused_until"] is None
    assert "Loop detected" in err.message and "3 near-identical requests within 60 s" in err.message
    assert "POST /api/v1/admin/agents/bot/resume?org_id=acme" in err.message
    assert err.detail["tripped"] is True and err.detail["count"] == 3 and err.detail["window_seconds"] == 60
    assert any("loop_detected breaker tripped" in r.getMessage() for r in caplog.records)
    assert [e.reason for e in seen] == ["loop_detected"] and seen[0].evidence["count"] == 3
    await asyncio.sleep(0.01)
    assert async_seen == ["loop_detected"]
    # Paused: another request gets the same reason, not a new trip.
    err = await refused(guard, ctx(limits, text="something else"))
    assert (err.reason, err.detail["tripped"]) == ("loop_detected", False)
    assert "is paused (loop detected) until an admin resumes it" in err.message
    assert len(seen) == 1
    was = await guard.resume("acme", "bot")
    assert isinstance(was, PauseInfo)
    assert await guard.admit(ctx(limits)) is not None
    await guard.stop()


async def test_cooldown_retry_after_is_the_remaining_pause() -> None:
    clock = FakeClock()
    guard = Guard(MemoryGuardState(clock))
    limits = Limits(max_spend_per_minute=1_500_000, cooldown_seconds=90)
    await guard.admit(ctx(limits))
    err = await refused(guard, ctx(limits))
    assert (err.reason, err.headers["Retry-After"]) == ("spend_velocity_exceeded", "90")
    assert "would spend $0.002 within 60 s" in err.message
    assert err.body()["paused_until"].endswith("Z")
    clock.advance(60.5)
    err = await refused(guard, ctx(limits))
    assert err.headers["Retry-After"] == "30"  # 29.5 s left, rounded up
    clock.advance(30)
    assert await guard.admit(ctx(limits)) is not None


async def test_session_refusals_are_final_403s() -> None:
    guard = Guard(MemoryGuardState())
    calls = Limits(max_calls_per_session=1)
    await guard.admit(ctx(calls, session="run-1"))
    err = await refused(guard, ctx(calls, session="run-1"))
    assert (err.status, err.type, err.reason) == (403, "session_limit_exceeded", "session_calls_exceeded")
    assert "Retry-After" not in err.headers and err.body()["session_id"] == "run-1"
    budget = Limits(session_budget=1_500_000)
    await guard.admit(ctx(budget, session="run-2"))
    err = await refused(guard, ctx(budget, session="run-2"))
    assert (err.status, err.type, err.reason) == (403, "budget_exceeded", "session_budget_exceeded")
    assert err.message == "Session budget exceeded. Limit: $0.0015, Spent: $0.001, Required: $0.001"
    with pytest.raises(BadRequest):
        await guard.admit(ctx(budget, session="x" * 300))


async def test_tpm_above_the_limit_is_a_final_refusal() -> None:
    guard = Guard(MemoryGuardState())
    err = await refused(guard, ctx(Limits(tpm=50), tokens=51))
    assert (err.status, err.reason) == (403, "tpm_request_too_large")


class _DownState(MemoryGuardState):
    name = "down"

    async def admit(self, request: AdmitRequest) -> Verdict:
        raise GuardStateError("connection refused")

    async def settle(self, report: SettleReport) -> None:
        raise GuardStateError("connection refused")


async def test_state_outage_follows_fail_safe_action() -> None:
    guard = Guard(_DownState())
    with pytest.raises(StoreUnavailable):
        await guard.admit(ctx(Limits(rpm=5)))
    assert await guard.admit(ctx(Limits(rpm=5), fail_safe="allow")) is None


async def test_settled_is_once_and_never_raises() -> None:
    state = MemoryGuardState()
    guard = Guard(state)
    ticket = await guard.admit(ctx(Limits(max_concurrent=1)))
    assert ticket is not None
    calls: list[Any] = []
    original = state.settle

    async def counting(report: SettleReport) -> None:
        calls.append(report)
        await original(report)

    state.settle = counting  # type: ignore[method-assign]
    await guard.settled(ticket, tokens=1, cost=1)
    await guard.release(ticket)
    assert len(calls) == 1
    down = Guard(_DownState())
    down.inflight.clear()
    await down.settled(ticket.__class__("acme", "bot", "rgr_x", (), 1, 1), tokens=None, cost=0)
