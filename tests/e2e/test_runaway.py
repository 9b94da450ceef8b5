"""Runaway agents against a real ResGov and a simulated provider, black-box over HTTP.

The loop detector stops a stuck agent after exactly the configured count, long before its
budget (identical calls, and calls that differ only in UUIDs and timestamps), while an agent
with varied prompts at the same pace is never stopped; rate limits answer 429 with
Retry-After; a tripped breaker pauses until its cooldown ends or an admin resumes it; session
caps hold; and on Redis three instances share one limit.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from resgov.config.rgf import parse_policy
from resgov.config.settings import Settings
from resgov.core.money import NANO
from resgov.server.app import create_app
from resgov.simulator.upstream import SimConfig, SimUpstreamThread
from tests.helpers import ADMIN_TOKEN, Proxy, ServerThread, policy_for, sim_chat_count

DAILY = 10  # USD: every agent here could make thousands of these calls before its budget
LOOP_N = 5

AGENTS = f"""
[agents.looper]
daily_budget = {DAILY}
loop_max_repeats = {LOOP_N}
loop_window_seconds = 300

[agents.volatile-looper]
daily_budget = {DAILY}
loop_max_repeats = {LOOP_N}

[agents.worker]
daily_budget = {DAILY}
loop_max_repeats = {LOOP_N}

[agents.exact-looper]
daily_budget = {DAILY}
loop_max_repeats = {LOOP_N}
loop_match = "exact"

[agents.resumable]
daily_budget = {DAILY}
loop_max_repeats = 2

[agents.cooler]
daily_budget = {DAILY}
loop_max_repeats = 2
cooldown_seconds = 1

[agents.burster]
daily_budget = {DAILY}
max_spend_per_minute = 0.001
cooldown_seconds = 600

[agents.rpm3]
daily_budget = {DAILY}
rpm = 3

[agents.tokens]
daily_budget = {DAILY}
tpm = 400

[agents.single]
daily_budget = {DAILY}
max_concurrent = 1

[agents.sessions]
daily_budget = {DAILY}
max_calls_per_session = 2

[agents.session-budget]
daily_budget = {DAILY}
session_budget = 0.0012

[agents.free]
daily_budget = {DAILY}

[orgs.crowd]
rpm = 4

[agents.crowd-a]
org = "crowd"
daily_budget = {DAILY}

[agents.crowd-b]
org = "crowd"
daily_budget = {DAILY}
"""


@pytest.fixture(scope="module")
def sim() -> Iterator[SimUpstreamThread]:
    with SimUpstreamThread(SimConfig()) as upstream:
        yield upstream


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, sim: SimUpstreamThread) -> Iterator[Proxy]:
    with Proxy(tmp_path_factory.mktemp("runaway"), policy_for(sim.base_url, AGENTS)) as p:
        yield p


@pytest.fixture(scope="module")
def key(proxy: Proxy) -> str:
    return proxy.key("default")


@pytest.fixture(scope="module")
def crowd_key(proxy: Proxy) -> str:
    return proxy.key("crowd")


def chat(
    url: str, key: str, agent: str, text: str, *, max_tokens: int = 100, session: str | None = None,
    **headers: str,
) -> httpx.Response:  # fmt: skip
    h = {"authorization": f"Bearer {key}", "x-resgov-agent-id": agent, **headers}
    if session is not None:
        h["x-resgov-session-id"] = session
    body = {"model": "gpt-sim", "max_tokens": max_tokens,
            "messages": [{"role": "system", "content": "You are a tireless agent."},
                         {"role": "user", "content": text}]}  # fmt: skip
    return httpx.post(f"{url}/v1/chat/completions", content=orjson.dumps(body), headers=h, timeout=30)


def error(r: httpx.Response) -> dict[str, Any]:
    body = r.json()
    assert set(body) == {"error"}, body
    return dict(body["error"])


def audit_rows(proxy: Proxy, agent: str, n: int) -> list[dict[str, Any]]:
    """The agent's audit records once there are ``n`` (refusals land a moment after the answer)."""
    deadline = time.monotonic() + 5
    while True:
        rows = [a for a in proxy.ledger.audit() if a["agent"] == agent]
        if len(rows) >= n or time.monotonic() > deadline:
            return rows
        time.sleep(0.02)


def agent_spent(proxy: Proxy, agent: str) -> int:
    return proxy.ledger.spent("default", f"a:{agent}:daily")


def stuck_prompt(turn: int, volatile: bool) -> str:
    if not volatile:
        return "The tool failed. Call the tool again with the same arguments."
    now = datetime.now(UTC)
    return (
        f"Tool run {uuid.uuid4()} failed at {now.isoformat()} (epoch {time.time():.3f}, "
        f"trace {uuid.uuid4().hex[:16]}). Call the tool again with the same arguments."
    )


@pytest.mark.parametrize(("agent", "volatile"), [("looper", False), ("volatile-looper", True)])
def test_runaway_loop_is_stopped_after_exactly_n_calls(
    proxy: Proxy, key: str, sim: SimUpstreamThread, agent: str, volatile: bool
) -> None:
    before = sim_chat_count(sim)
    statuses = []
    for turn in range(LOOP_N + 4):
        r = chat(proxy.url, key, agent, stuck_prompt(turn, volatile))
        statuses.append(r.status_code)
        if r.status_code != 200:
            err = error(r)
            assert (err["type"], err["agent_id"], err["scope"]) == ("circuit_breaker_open", agent, "agent")
            assert err["reason"] == "loop_detected"
            assert err["paused_until"] is None
            assert r.headers["retry-after"] == "300"
    assert statuses == [200] * LOOP_N + [429] * 4
    assert sim_chat_count(sim) - before == LOOP_N  # not one refused call reached the provider
    spent = agent_spent(proxy, agent)
    assert 0 < spent < DAILY * NANO / 1000  # stopped at under a thousandth of its daily budget
    rows = audit_rows(proxy, agent, LOOP_N + 4)
    assert [row["status"] for row in rows] == ["completed"] * LOOP_N + ["denied"] * 4
    trip = json.loads(rows[LOOP_N]["detail"])
    assert rows[LOOP_N]["reason"] == "loop_detected" and rows[LOOP_N]["http_status"] == 429
    assert trip["tripped"] is True
    assert (trip["count"], trip["limit"], trip["window_seconds"]) == (LOOP_N + 1, LOOP_N, 300)
    assert trip["rate_per_minute"] > 0
    assert json.loads(rows[-1]["detail"])["tripped"] is False
    assert sum(row["actual"] for row in rows) == spent


def test_exact_matching_lets_volatile_calls_through(proxy: Proxy, key: str) -> None:
    for turn in range(LOOP_N + 3):
        assert chat(proxy.url, key, "exact-looper", stuck_prompt(turn, True)).status_code == 200


def test_normal_agent_with_varied_prompts_at_the_same_pace_is_never_stopped(proxy: Proxy, key: str) -> None:
    tasks = ["Summarise", "Translate", "Classify", "Critique", "Outline", "Rewrite"]
    for turn in range(4 * LOOP_N):
        text = f"{tasks[turn % 6]} section {turn} of the quarterly report, focusing on {turn * 7 % 11} risks."
        r = chat(proxy.url, key, "worker", text)
        assert r.status_code == 200, r.text


def test_resume_endpoint_lifts_the_pause(proxy: Proxy, key: str) -> None:
    for _ in range(2):
        assert chat(proxy.url, key, "resumable", "same").status_code == 200
    assert chat(proxy.url, key, "resumable", "same").status_code == 429
    assert chat(proxy.url, key, "resumable", "something new").status_code == 429  # the agent is paused
    url = f"{proxy.url}/api/v1/admin/agents/resumable/resume"
    assert httpx.post(url, params={"org_id": "default"}).status_code == 401
    assert httpx.post(url, headers={"authorization": f"Bearer {key}"}).status_code == 401
    missing = httpx.post(
        f"{proxy.url}/api/v1/admin/agents/nobody/resume", headers={"X-Admin-Token": ADMIN_TOKEN}
    )
    assert missing.status_code == 404
    r = httpx.post(url, params={"org_id": "default"}, headers={"X-Admin-Token": ADMIN_TOKEN})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["resumed"], body["agent_id"], body["org_id"], body["org_paused"]) == (
        True,
        "resumable",
        "default",
        False,
    )
    assert body["was_paused"]["reason"] == "loop_detected"
    assert body["was_paused"]["evidence"]["count"] == 3
    assert body["was_paused"]["paused_until"] is None
    # Resumed with a fresh allowance; resuming again is harmless.
    assert chat(proxy.url, key, "resumable", "same").status_code == 200
    again = httpx.post(url, headers={"X-Admin-Token": ADMIN_TOKEN})  # org found from the policy
    assert again.status_code == 200 and again.json()["resumed"] is False


def test_cooldown_ends_the_pause_by_itself(proxy: Proxy, key: str) -> None:
    for _ in range(2):
        assert chat(proxy.url, key, "cooler", "ping").status_code == 200
    r = chat(proxy.url, key, "cooler", "ping")
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    assert error(r)["paused_until"].endswith("Z")
    time.sleep(1.05)
    assert chat(proxy.url, key, "cooler", "ping").status_code == 200


def test_spend_velocity_breaker_trips_on_a_burst(proxy: Proxy, key: str) -> None:
    statuses = []
    for turn in range(20):
        r = chat(proxy.url, key, "burster", f"expensive step {turn}")
        statuses.append(r.status_code)
        if r.status_code != 200:
            break
    assert statuses[-1] == 429 and 2 <= len(statuses) <= 15, statuses
    err = error(r)
    assert (err["type"], err["reason"]) == ("circuit_breaker_open", "spend_velocity_exceeded")
    assert 599 <= int(r.headers["retry-after"]) <= 600
    assert "max_spend_per_minute = $0.001" in err["message"]
    row = audit_rows(proxy, "burster", len(statuses))[-1]
    detail = json.loads(row["detail"])
    assert detail["limit_per_minute_nano"] == 1_000_000
    assert detail["spend_last_minute_nano"] + detail["required_nano"] > 1_000_000


def test_rpm_refusal_is_a_429_with_retry_after(proxy: Proxy, key: str, sim: SimUpstreamThread) -> None:
    for turn in range(3):
        assert chat(proxy.url, key, "rpm3", f"q{turn}").status_code == 200
    before = sim_chat_count(sim)
    r = chat(proxy.url, key, "rpm3", "q3")
    assert r.status_code == 429
    assert r.headers["content-type"] == "application/json"
    assert 1 <= int(r.headers["retry-after"]) <= 60
    err = error(r)
    assert (err["type"], err["reason"], err["agent_id"], err["scope"]) == (
        "rate_limit_exceeded", "rpm_exceeded", "rpm3", "agent")  # fmt: skip
    assert err["retry_after"] == int(r.headers["retry-after"])
    assert sim_chat_count(sim) == before
    row = audit_rows(proxy, "rpm3", 4)[-1]
    assert (row["status"], row["reason"], row["http_status"]) == ("denied", "rpm_exceeded", 429)


def test_org_rpm_covers_all_its_agents(proxy: Proxy, crowd_key: str) -> None:
    statuses = [
        chat(proxy.url, crowd_key, ("crowd-a", "crowd-b")[i % 2], f"c{i}").status_code for i in range(6)
    ]
    assert statuses == [200] * 4 + [429] * 2
    r = chat(proxy.url, crowd_key, "crowd-b", "again")
    assert error(r)["scope"] == "org"


def test_tpm_counts_the_reservation_until_settled_then_actual_tokens(proxy: Proxy, key: str) -> None:
    # Each call reserves its input bound (~300 tokens) + max_tokens; it really uses ~60.
    assert chat(proxy.url, key, "tokens", "t", max_tokens=50).status_code == 200
    # Settled at actual tokens, so a second reservation fits beside the first call's.
    assert chat(proxy.url, key, "tokens", "t", max_tokens=50).status_code == 200
    too_big = chat(proxy.url, key, "tokens", "t", max_tokens=1000)
    assert too_big.status_code == 403 and error(too_big)["reason"] == "tpm_request_too_large"

    async def two_at_once() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=30) as client:
            h = {"authorization": f"Bearer {key}", "x-resgov-agent-id": "tokens"}
            body = {"model": "gpt-sim", "max_tokens": 50, "messages": [{"role": "user", "content": "t"}]}
            slow = client.post(f"{proxy.url}/v1/chat/completions", json=body,
                               headers={**h, "x-sim-latency-ms": "700"})  # fmt: skip
            first = asyncio.ensure_future(slow)
            await asyncio.sleep(0.3)
            second = await client.post(f"{proxy.url}/v1/chat/completions", json=body, headers=h)
            return [await first, second]

    first, second = asyncio.run(two_at_once())
    assert first.status_code == 200
    # The in-flight call still counts at its reservation: no room for another.
    assert second.status_code == 429 and error(second)["reason"] == "tpm_exceeded"


def test_concurrency_limit(proxy: Proxy, key: str) -> None:
    async def run() -> list[int]:
        async with httpx.AsyncClient(timeout=30) as client:
            h = {"authorization": f"Bearer {key}", "x-resgov-agent-id": "single"}
            body = {"model": "gpt-sim", "max_tokens": 20, "messages": [{"role": "user", "content": "c"}]}
            slow = asyncio.ensure_future(client.post(f"{proxy.url}/v1/chat/completions", json=body,
                                                     headers={**h, "x-sim-latency-ms": "600"}))  # fmt: skip
            await asyncio.sleep(0.25)
            busy = await client.post(f"{proxy.url}/v1/chat/completions", json=body, headers=h)
            assert busy.headers["retry-after"] == "1"
            assert error(busy)["reason"] == "concurrency_exceeded"
            done = await slow
            after = await client.post(f"{proxy.url}/v1/chat/completions", json=body, headers=h)
            return [done.status_code, busy.status_code, after.status_code]

    assert asyncio.run(run()) == [200, 429, 200]


def test_session_call_cap_and_budget(proxy: Proxy, key: str) -> None:
    assert chat(proxy.url, key, "sessions", "a", session="run-1").status_code == 200
    assert chat(proxy.url, key, "sessions", "b", session="run-1").status_code == 200
    r = chat(proxy.url, key, "sessions", "c", session="run-1")
    assert r.status_code == 403 and "retry-after" not in r.headers
    err = error(r)
    assert (err["type"], err["reason"], err["session_id"]) == (
        "session_limit_exceeded",
        "session_calls_exceeded",
        "run-1",
    )
    assert chat(proxy.url, key, "sessions", "c", session="run-2").status_code == 200
    assert chat(proxy.url, key, "sessions", "no session, no session cap").status_code == 200
    bad = chat(proxy.url, key, "sessions", "x", session="s" * 300)
    assert bad.status_code == 400 and error(bad)["reason"] == "invalid_session_id"

    # $0.0012 per session; each call reserves about $0.0007 (so two never fit side by side)
    # and really costs about $0.0001: settled calls count at their actual cost.
    statuses = []
    for i in range(12):
        statuses.append(chat(proxy.url, key, "session-budget", f"s{i}", session="big").status_code)
        if statuses[-1] != 200:
            break
    assert statuses[-1] == 403 and statuses.count(200) >= 4, statuses
    r = chat(proxy.url, key, "session-budget", "again", session="big")
    err = error(r)
    assert (r.status_code, err["type"], err["reason"]) == (403, "budget_exceeded", "session_budget_exceeded")
    assert err["message"].startswith("Session budget exceeded. Limit: $0.0012, Spent: $")


def test_no_guard_configured_means_no_guard_work(proxy: Proxy, key: str) -> None:
    state = proxy.app.runtime.guard.state
    for turn in range(3):
        assert chat(proxy.url, key, "free", "same every time").status_code == 200, turn
    # The in-process state never even created a scope for an agent without guards.
    assert ("default", "free") not in state._scopes  # type: ignore[attr-defined]


def test_ledger_invariants_hold_after_all_of_it(proxy: Proxy) -> None:
    proxy.ledger.check_invariants()
    assert proxy.app.runtime.guard.inflight == {}


# -- three instances on one Redis ------------------------------------------------------------------


@pytest.mark.redis
def test_rate_limit_and_loop_breaker_hold_across_three_instances(
    tmp_path: Path, sim: SimUpstreamThread
) -> None:
    pytest.importorskip("resgov.ledger.redis")
    from resgov.ledger.redis import RedisStore
    from tests.guard.conftest import REDIS_URL, delete_prefix, new_prefix, require_redis

    require_redis()
    prefix = new_prefix()
    url = f"{REDIS_URL}?prefix={prefix}"
    text = policy_for(sim.base_url, "[agents.fleet]\ndaily_budget = 10\nrpm = 6\n"
                                    "[agents.stuck]\ndaily_budget = 10\nloop_max_repeats = 3\n")  # fmt: skip
    servers = []
    try:
        for i in range(3):
            policy_path = tmp_path / f"p{i}.rgf"
            policy_path.write_text(text)
            settings = Settings(config_path=str(policy_path), store_url=url, admin_token=ADMIN_TOKEN)
            app = create_app(settings, RedisStore(url), parse_policy(text, str(policy_path)))
            servers.append(ServerThread(app).__enter__())
        r = httpx.post(f"{servers[0].url}/api/v1/admin/generate-key", headers={"X-Admin-Token": ADMIN_TOKEN},
                       json={"org_id": "default", "name": "fleet"})  # fmt: skip
        api_key = r.json()["api_key"]

        async def burst() -> list[int]:
            async with httpx.AsyncClient(timeout=30) as client:
                h = {"authorization": f"Bearer {api_key}", "x-resgov-agent-id": "fleet"}
                calls = [
                    client.post(f"{servers[i % 3].url}/v1/chat/completions", headers=h,
                                json={"model": "gpt-sim", "max_tokens": 10,
                                      "messages": [{"role": "user", "content": f"task {i}"}]})
                    for i in range(18)
                ]  # fmt: skip
                return [r.status_code for r in await asyncio.gather(*calls)]

        before = sim_chat_count(sim)
        statuses = asyncio.run(burst())
        assert statuses.count(200) == 6 and statuses.count(429) == 12, statuses
        assert sim_chat_count(sim) - before == 6

        # A loop spread over the three instances trips once, and the pause is everywhere.
        stuck = [chat(servers[i % 3].url, api_key, "stuck", "same again").status_code for i in range(4)]
        assert stuck == [200, 200, 200, 429]
        for server in servers:
            r = chat(server.url, api_key, "stuck", "anything")
            assert r.status_code == 429 and error(r)["reason"] == "loop_detected"
        r = httpx.post(
            f"{servers[1].url}/api/v1/admin/agents/stuck/resume", headers={"X-Admin-Token": ADMIN_TOKEN}
        )
        assert r.json()["resumed"] is True
        assert chat(servers[2].url, api_key, "stuck", "anything").status_code == 200
    finally:
        for server in servers:
            server.__exit__(None, None, None)
        asyncio.run(delete_prefix(prefix))


# -- the demo --------------------------------------------------------------------------------------


async def test_demo_shows_the_loop_detector_then_the_budget() -> None:
    import io

    from rich.console import Console

    from resgov.demo import LOOP_REPEATS, run_demo

    out = io.StringIO()
    console = Console(file=out, force_terminal=False, width=120, color_system=None)
    code = await run_demo(console, "0.02", 200)
    text = out.getvalue()
    assert code == 0, text
    assert "✘" not in text
    act1, act2 = text.index("Act 1: the loop detector"), text.index("Act 2: the budget")
    stopped = text.index(
        f"loop stopped: {LOOP_REPEATS} near-identical calls allowed, then paused (loop_detected)"
    )
    assert act1 < act2 < stopped < text.index("budget held: spent")
    assert '"type":"circuit_breaker_open"' in text and '"reason":"loop_detected"' in text
    assert '"reason":"daily_budget_exceeded"' in text
    assert text.count("REFUSED 429 loop_detected") == 4
