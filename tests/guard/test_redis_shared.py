"""Three Guard "instances" sharing one Redis (real Redis TIME): one limit, not one per instance."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable

import pytest

from resgov.core.errors import StoreUnavailable
from resgov.core.policy import AgentPolicy, Limits, OrgPolicy
from resgov.guard import CallContext, Guard, GuardRefusal, Ticket
from resgov.guard.redis import RedisGuardState

pytestmark = pytest.mark.redis

Factory = Callable[..., Awaitable[RedisGuardState]]


def ctx(limits: Limits, *, agent: str = "bot", text: str | None = None, session: str | None = None,
        amount: int = 1_000) -> CallContext:  # fmt: skip
    return CallContext(
        request_id="rgr_" + uuid.uuid4().hex,
        agent=AgentPolicy("acme", agent, limits=limits),
        org=OrgPolicy("acme"),
        model="gpt-sim",
        body={"messages": [{"role": "user", "content": text or uuid.uuid4().hex + " unique words"}]},
        tokens=10,
        amount=amount,
        session_id=session,
    )


async def guards(make: Factory, n: int = 3, **kw: float) -> list[Guard]:
    out = []
    for _ in range(n):
        guard = Guard(await make(), **kw)
        await guard.start()
        out.append(guard)
    return out


async def try_admit(guard: Guard, call: CallContext) -> Ticket | GuardRefusal:
    try:
        ticket = await guard.admit(call)
    except GuardRefusal as err:
        return err
    assert ticket is not None
    return ticket


async def stop_all(gs: list[Guard]) -> None:
    for guard in gs:
        await guard.stop()


async def test_rpm_across_three_instances_is_the_limit_exactly(redis_states: Factory) -> None:
    gs = await guards(redis_states)
    limits = Limits(rpm=10)
    results = await asyncio.gather(*(try_admit(gs[i % 3], ctx(limits)) for i in range(45)))
    admitted = [r for r in results if isinstance(r, Ticket)]
    refusals = [r for r in results if isinstance(r, GuardRefusal)]
    assert len(admitted) == 10
    assert {r.reason for r in refusals} == {"rpm_exceeded"}
    assert all(1 <= int(r.headers["Retry-After"]) <= 60 for r in refusals)
    # Every instance admitted some: the limit is shared, not split.
    assert len({t.rid for t in admitted}) == 10
    await stop_all(gs)


async def test_concurrency_across_three_instances(redis_states: Factory) -> None:
    gs = await guards(redis_states)
    limits = Limits(max_concurrent=4)
    results = await asyncio.gather(*(try_admit(gs[i % 3], ctx(limits)) for i in range(12)))
    admitted = [r for r in results if isinstance(r, Ticket)]
    assert len(admitted) == 4
    # Settled on the instance that admitted it (any instance would do): one slot frees everywhere.
    owner = next(g for g in gs if admitted[0].rid in g.inflight)
    await owner.settled(admitted[0], tokens=5, cost=100)
    other = next(g for g in gs if g is not owner)
    assert isinstance(await try_admit(other, ctx(limits)), Ticket)
    assert isinstance(await try_admit(owner, ctx(limits)), GuardRefusal)
    await stop_all(gs)


async def test_loop_trip_on_one_instance_pauses_the_agent_on_all(redis_states: Factory) -> None:
    gs = await guards(redis_states)
    limits = Limits(loop_max_repeats=5, loop_window_seconds=60)
    same = "Retry the failed upload, attempt 7f3c2a91-0b6e-4a55-9d11-2f1e4c7b8a00"
    outcomes = [await try_admit(gs[i % 3], ctx(limits, text=same)) for i in range(6)]
    assert all(isinstance(o, Ticket) for o in outcomes[:5])
    last = outcomes[5]
    assert isinstance(last, GuardRefusal) and last.reason == "loop_detected" and last.detail["count"] == 6
    for guard in gs:
        err = await try_admit(guard, ctx(limits))
        assert isinstance(err, GuardRefusal) and err.reason == "loop_detected"
    assert (await gs[2].resume("acme", "bot")) is not None
    for guard in gs:
        assert await guard.pause_info("acme", "bot") is None
        assert isinstance(await try_admit(guard, ctx(limits)), Ticket)
    await stop_all(gs)


async def test_session_budget_across_three_instances_is_never_overshot(redis_states: Factory) -> None:
    gs = await guards(redis_states)
    limits = Limits(session_budget=10_000)
    results = await asyncio.gather(
        *(try_admit(gs[i % 3], ctx(limits, session="run-42", amount=700)) for i in range(45))
    )
    assert sum(isinstance(r, Ticket) for r in results) == 14
    await stop_all(gs)


async def test_live_calls_keep_their_slot_and_a_dead_instance_loses_it(redis_states: Factory) -> None:
    live, dead, observer = await guards(redis_states, lease_seconds=0.6)
    limits = Limits(max_concurrent=2)
    assert isinstance(await try_admit(live, ctx(limits)), Ticket)
    assert isinstance(await try_admit(dead, ctx(limits)), Ticket)
    await dead.stop()  # "killed": its heartbeat stops, its call is never settled
    await asyncio.sleep(1.5)  # > two leases: the live call was renewed, the dead one expired
    assert isinstance(await try_admit(observer, ctx(limits)), Ticket)
    assert isinstance(await try_admit(observer, ctx(limits)), GuardRefusal)
    await live.stop()
    await observer.stop()


async def test_unreachable_redis_follows_fail_safe(redis_url: str) -> None:
    guard = Guard(RedisGuardState("redis://127.0.0.1:1/14?socket_connect_timeout=0.2", prefix="nowhere"))
    await guard.start()
    with pytest.raises(StoreUnavailable):
        await guard.admit(ctx(Limits(rpm=5)))
    await guard.stop()
