"""The GuardState contract: every test runs against the in-process state and the Redis state.

Both run on a simulated clock (the Redis scripts take it instead of ``TIME``), so windows,
cooldowns and half an hour of velocity history take milliseconds, deterministically.
"""

from __future__ import annotations

import asyncio
import itertools
from dataclasses import dataclass, field

import pytest

from resgov.core.policy import Limits
from resgov.guard.state import (
    AdmitRequest,
    GuardState,
    ScopeCheck,
    SettleReport,
    Verdict,
)
from tests.guard.conftest import FakeClock

_ids = itertools.count()


@dataclass
class Harness:
    """Admits and settles calls of one agent (and its org) with the limits under test."""

    state: GuardState
    clock: FakeClock
    agent_limits: Limits | None = None
    org_limits: Limits | None = None
    org: str = "acme"
    admitted: list[AdmitRequest] = field(default_factory=list)

    def request(
        self,
        *,
        agent: str = "bot",
        fp: str = "f" * 32,
        session: str | None = None,
        tokens: int = 100,
        amount: int = 1000,
        lease: float = 60.0,
    ) -> AdmitRequest:
        scopes = []
        for kind, limits in (("agent", self.agent_limits), ("org", self.org_limits)):
            if limits is None:
                continue
            has_session = limits.session_budget is not None or limits.max_calls_per_session is not None
            scopes.append(
                ScopeCheck(
                    kind,  # type: ignore[arg-type]
                    limits,
                    fp if limits.loop_max_repeats is not None else None,
                    session if has_session else None,
                )
            )
        rid = f"rgr_{next(_ids)}"
        return AdmitRequest(self.org, agent, rid, tokens, amount, tuple(scopes), lease)

    async def admit(self, **kw: object) -> Verdict:
        request = self.request(**kw)  # type: ignore[arg-type]
        verdict = await self.state.admit(request)
        if verdict.ok:
            self.admitted.append(request)
        return verdict

    async def settle(
        self, request: AdmitRequest, *, tokens: int | None = None, cost: int = 0, sent: bool = True
    ) -> None:
        await self.state.settle(
            SettleReport(
                request.org, request.agent, request.rid, request.scopes, request.tokens, request.amount,
                tokens, cost, sent,
            )
        )  # fmt: skip

    async def settle_all(self, *, cost: int = 0, tokens: int | None = None) -> None:
        for request in self.admitted:
            await self.settle(request, cost=cost, tokens=tokens)
        self.admitted.clear()


def harness(
    state: GuardState, clock: FakeClock, agent: Limits | None = None, org: Limits | None = None
) -> Harness:
    return Harness(state, clock, agent, org)


# -- rate limits ----------------------------------------------------------------------------------


async def test_rpm_is_a_sliding_window_not_a_calendar_minute(state: GuardState, clock: FakeClock) -> None:
    h = harness(state, clock, Limits(rpm=3))
    clock.advance(58)  # 1.5 s before a calendar minute ends
    for _ in range(3):
        assert (await h.admit()).ok
        clock.advance(0.5)
    clock.advance(2)  # a new calendar minute: a fixed window would reset here
    refused = await h.admit()
    assert (refused.outcome, refused.reason, refused.scope) == ("refused", "rpm_exceeded", "agent")
    # The oldest call ages out 60 s after it was admitted: 3.5 s ago now.
    assert refused.retry_after == pytest.approx(60 - 3.5, abs=0.01)
    assert refused.evidence["count"] == 3 and refused.evidence["limit"] == 3
    clock.advance(56.4)
    assert not (await h.admit()).ok
    clock.advance(0.2)  # the first call is now older than 60 s
    assert (await h.admit()).ok
    assert not (await h.admit()).ok


async def test_a_refused_call_is_not_counted(state: GuardState, clock: FakeClock) -> None:
    h = harness(state, clock, Limits(rpm=2))
    assert (await h.admit()).ok
    assert (await h.admit()).ok
    for _ in range(5):
        assert not (await h.admit()).ok
        clock.advance(1)
    clock.advance(56)  # 61 s after the two admitted calls: the refusals left nothing behind
    assert (await h.admit()).ok
    assert (await h.admit()).ok


async def test_tpm_counts_the_reservation_until_settled_then_the_actual(
    state: GuardState, clock: FakeClock
) -> None:
    h = harness(state, clock, Limits(tpm=1000))
    assert (await h.admit(tokens=600)).ok
    refused = await h.admit(tokens=600)
    assert (refused.reason, refused.evidence["tokens_last_minute"]) == ("tpm_exceeded", 600)
    assert refused.retry_after == pytest.approx(60, abs=0.01)
    await h.settle(h.admitted[0], tokens=150, cost=10)
    assert (await h.admit(tokens=600)).ok  # 150 + 600
    assert (await h.admit(tokens=250)).ok  # 1000 exactly
    assert not (await h.admit(tokens=1)).ok
    # No usage reported: the reservation stays counted.
    await h.settle(h.admitted[1], tokens=None, cost=10)
    assert not (await h.admit(tokens=1)).ok
    too_big = await h.admit(tokens=1001)
    assert (too_big.reason, too_big.retry_after) == ("tpm_request_too_large", None)
    clock.advance(60.01)
    assert (await h.admit(tokens=1000)).ok


async def test_tpm_retry_after_waits_for_enough_tokens_to_age_out(
    state: GuardState, clock: FakeClock
) -> None:
    h = harness(state, clock, Limits(tpm=1000))
    for _ in range(4):
        assert (await h.admit(tokens=250)).ok
        clock.advance(10)
    # 1000 in the window (at -40, -30, -20, -10 s); 400 more needs the two oldest gone.
    refused = await h.admit(tokens=400)
    assert refused.retry_after == pytest.approx(60 - 30, abs=0.01)


async def test_concurrency_counts_calls_in_flight(state: GuardState, clock: FakeClock) -> None:
    h = harness(state, clock, Limits(max_concurrent=2))
    assert (await h.admit()).ok
    assert (await h.admit()).ok
    refused = await h.admit()
    assert (refused.reason, refused.retry_after, refused.evidence["in_flight"]) == (
        "concurrency_exceeded",
        1.0,
        2,
    )
    first = h.admitted[0]
    await h.settle(first, cost=5)
    await h.settle(first, cost=5)  # a replay frees nothing more
    assert (await h.admit()).ok
    assert not (await h.admit()).ok
    # A call refused after admission (the budget) gives its slot back too.
    await h.settle(h.admitted[1], sent=False)
    assert (await h.admit()).ok


async def test_org_limits_cover_all_its_agents_and_refusals_write_nothing(
    state: GuardState, clock: FakeClock
) -> None:
    h = harness(state, clock, Limits(rpm=2), Limits(rpm=3))
    assert (await h.admit(agent="a")).ok
    assert (await h.admit(agent="a")).ok
    assert (await h.admit(agent="b")).ok
    refused = await h.admit(agent="c")
    assert (refused.reason, refused.scope) == ("rpm_exceeded", "org")
    refused = await h.admit(agent="a")
    assert (refused.reason, refused.scope) == ("rpm_exceeded", "agent")
    # c's refusal by the org wrote nothing on c: once the org window frees, c has its full rpm.
    clock.advance(61)
    h.org_limits = Limits(rpm=100)
    assert (await h.admit(agent="c")).ok
    assert (await h.admit(agent="c")).ok


# -- loop detector --------------------------------------------------------------------------------


async def test_loop_allows_n_then_trips_and_pauses_until_resumed(state: GuardState, clock: FakeClock) -> None:
    h = harness(state, clock, Limits(loop_max_repeats=3, loop_window_seconds=300))
    for _ in range(3):
        assert (await h.admit()).ok
        clock.advance(5)
    assert (await h.admit(fp="b" * 32)).ok  # another request is no repeat
    tripped = await h.admit()
    assert (tripped.outcome, tripped.reason, tripped.scope) == ("tripped", "loop_detected", "agent")
    assert tripped.retry_after is None and tripped.paused_until is None
    assert tripped.evidence["count"] == 4
    assert tripped.evidence["limit"] == 3
    assert tripped.evidence["window_seconds"] == 300
    assert tripped.evidence["rate_per_minute"] == pytest.approx(0.8)
    # Paused: every call is refused, whatever it asks, and nothing expires on its own.
    clock.advance(3600)
    paused = await h.admit(fp="c" * 32)
    assert (paused.outcome, paused.reason, paused.retry_after) == ("paused", "loop_detected", None)
    assert paused.evidence["count"] == 4
    info = await state.pause_info("acme", "bot")
    assert info is not None and info.reason == "loop_detected" and info.paused_until is None
    was = await state.resume("acme", "bot")
    assert was is not None and was.reason == "loop_detected" and was.evidence["count"] == 4
    assert await state.pause_info("acme", "bot") is None
    assert await state.resume("acme", "bot") is None  # idempotent
    # A fresh allowance of N after a resume.
    for _ in range(3):
        assert (await h.admit()).ok
    assert (await h.admit()).outcome == "tripped"


async def test_loop_cooldown_expires_and_grants_a_fresh_allowance(
    state: GuardState, clock: FakeClock
) -> None:
    h = harness(state, clock, Limits(loop_max_repeats=2, loop_window_seconds=600, cooldown_seconds=30))
    assert (await h.admit()).ok
    assert (await h.admit()).ok
    tripped = await h.admit()
    assert tripped.outcome == "tripped"
    assert tripped.retry_after == pytest.approx(30)
    assert tripped.paused_until == pytest.approx(clock.now + 30, abs=0.01)
    clock.advance(20)
    paused = await h.admit()
    assert paused.outcome == "paused"
    assert paused.retry_after == pytest.approx(10, abs=0.01)
    clock.advance(10.01)
    assert await state.pause_info("acme", "bot") is None
    assert (await h.admit()).ok
    assert (await h.admit()).ok
    assert (await h.admit()).outcome == "tripped"


async def test_repeats_spread_beyond_the_loop_window_never_trip(state: GuardState, clock: FakeClock) -> None:
    h = harness(state, clock, Limits(loop_max_repeats=2, loop_window_seconds=10))
    for _ in range(20):
        assert (await h.admit()).ok
        clock.advance(5.01)  # at most two repeats in any 10 s


async def test_org_loop_trip_pauses_every_agent_of_the_org(state: GuardState, clock: FakeClock) -> None:
    h = harness(state, clock, None, Limits(loop_max_repeats=2, cooldown_seconds=60))
    assert (await h.admit(agent="a")).ok
    assert (await h.admit(agent="b")).ok
    tripped = await h.admit(agent="c")
    assert (tripped.outcome, tripped.scope) == ("tripped", "org")
    paused = await h.admit(agent="d", fp="e" * 32)
    assert (paused.outcome, paused.scope, paused.reason) == ("paused", "org", "loop_detected")
    assert await state.pause_info("acme", None) is not None
    assert (await state.resume("acme", None)) is not None
    assert (await h.admit(agent="d")).ok


# -- spend velocity -------------------------------------------------------------------------------


async def test_max_spend_per_minute_trips_on_a_burst_not_on_steady_spend(
    state: GuardState, clock: FakeClock
) -> None:
    h = harness(state, clock, Limits(max_spend_per_minute=1_000, cooldown_seconds=120))
    # Steady: one call every 10 s reserving 400, really costing 100 (600 a minute at most).
    for _ in range(60):
        assert (await h.admit(amount=400)).ok
        await h.settle_all(cost=100)
        clock.advance(10)
    # Burst: reservations in flight count at their worst case.
    assert (await h.admit(amount=400)).ok  # 500 settled in the window + 400
    tripped = await h.admit(amount=400)
    assert (tripped.outcome, tripped.reason) == ("tripped", "spend_velocity_exceeded")
    assert tripped.evidence["spend_last_minute_nano"] == 900
    assert tripped.evidence["required_nano"] == 400
    assert tripped.evidence["limit_per_minute_nano"] == 1_000
    assert (await h.admit(amount=1)).outcome == "paused"
    clock.advance(120.01)
    assert (await h.admit(amount=400)).ok


async def test_velocity_multiple_trips_on_a_burst_not_on_steady_spend(
    state: GuardState, clock: FakeClock
) -> None:
    h = harness(state, clock, Limits(spend_velocity_multiple=3.0, cooldown_seconds=60))
    # 40 minutes of steady spend, with jitter and idle stretches (the norm is per active minute).
    for minute in range(40):
        if minute in (12, 13, 14, 15, 16, 17, 18, 25):
            clock.advance(60)
            continue
        for call in range(4):
            assert (await h.admit(amount=5_000)).ok, (minute, call)
            await h.settle_all(cost=100 + (minute * 37 + call * 11) % 60)
            clock.advance(15)
    # A burst: 20 calls within a few seconds at the usual price.
    outcomes = []
    for _ in range(20):
        verdict = await h.admit(amount=5_000)
        outcomes.append(verdict.outcome)
        await h.settle_all(cost=120)
        clock.advance(0.2)
        if verdict.outcome != "ok":
            tripped = verdict
            break
    assert outcomes[-1] == "tripped", outcomes
    assert tripped.reason == "spend_velocity_exceeded"
    assert tripped.evidence["ratio"] > 3
    assert tripped.evidence["multiple"] == 3
    assert tripped.evidence["active_minutes"] >= 3
    # The norm is about 4 calls a minute; the trip comes once the minute exceeds 3x that.
    assert 8 <= len(outcomes) <= 14, outcomes


async def test_velocity_multiple_needs_history_first(state: GuardState, clock: FakeClock) -> None:
    h = harness(state, clock, Limits(spend_velocity_multiple=2.0))
    assert (await h.admit()).ok
    await h.settle_all(cost=10)
    clock.advance(120)
    # One active minute of history only: a burst is not judged yet.
    for _ in range(50):
        assert (await h.admit()).ok
        await h.settle_all(cost=1_000)


# -- sessions -------------------------------------------------------------------------------------


async def test_session_call_cap(state: GuardState, clock: FakeClock) -> None:
    h = harness(state, clock, Limits(max_calls_per_session=2))
    assert (await h.admit(session="s1")).ok
    assert (await h.admit(session="s1")).ok
    refused = await h.admit(session="s1")
    assert (refused.reason, refused.retry_after, refused.evidence["calls"]) == (
        "session_calls_exceeded",
        None,
        2,
    )
    assert (await h.admit(session="s2")).ok
    assert (await h.admit()).ok  # no session named: no session cap
    # A call refused by the budget after admission is given back to its session.
    await h.settle(h.admitted[1], sent=False)
    assert (await h.admit(session="s1")).ok
    assert not (await h.admit(session="s1")).ok


async def test_session_budget_holds_worst_case_then_actual(state: GuardState, clock: FakeClock) -> None:
    h = harness(state, clock, Limits(session_budget=1_000))
    assert (await h.admit(session="s", amount=400)).ok
    assert (await h.admit(session="s", amount=400)).ok
    refused = await h.admit(session="s", amount=400)
    assert refused.reason == "session_budget_exceeded"
    assert refused.evidence == {
        "limit_nano": 1_000,
        "spent_nano": 0,
        "reserved_nano": 800,
        "required_nano": 400,
    }
    await h.settle(h.admitted[0], cost=100)
    await h.settle(h.admitted[0], cost=100)  # a replay changes nothing
    assert (await h.admit(session="s", amount=400)).ok  # 100 + 400 + 400
    assert not (await h.admit(session="s", amount=101)).ok
    assert (await h.admit(session="s", amount=100)).ok  # exactly the budget
    assert (await h.admit(session="other", amount=1_000)).ok


async def test_session_budget_is_never_overshot_by_concurrent_calls(
    state: GuardState, clock: FakeClock
) -> None:
    h = harness(state, clock, Limits(session_budget=10_000))
    verdicts = await asyncio.gather(*(h.admit(session="s", amount=700) for _ in range(40)))
    assert sum(v.ok for v in verdicts) == 14  # 14 x 700 = 9 800 <= 10 000 < 15 x 700


# -- in-flight leases (shared state only: one process's slots live as long as it does) -------------


async def test_in_flight_slot_of_a_dead_instance_expires_with_its_lease(
    state: GuardState, clock: FakeClock
) -> None:
    if state.name == "memory":
        pytest.skip("in-process slots die with their process; there is no lease to expire")
    h = harness(state, clock, Limits(max_concurrent=1))
    assert (await h.admit(lease=10)).ok
    clock.advance(8)
    await state.renew({"acme": [("bot", h.admitted[0].rid)]}, 10)
    clock.advance(8)
    assert not (await h.admit()).ok  # renewed: still in flight
    clock.advance(2.01)
    assert (await h.admit()).ok  # never renewed again: the instance is gone
