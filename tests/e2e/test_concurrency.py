"""Hundreds of concurrent calls against a budget that affords a fraction of them: never past it."""

from __future__ import annotations

import asyncio
import random
import re
import threading
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from resgov.core.money import parse_amount
from resgov.simulator.upstream import SimConfig, SimUpstreamThread
from tests.helpers import Ledger, Proxy, policy_for, sim_chat_count

N_REQUESTS = 320
MESSAGE_RE = re.compile(
    r"^(Daily|Org daily) budget exceeded\. Limit: \$[0-9.]+, Spent: \$[0-9.]+, Required: \$[0-9.]+$"
)
# Output billed up to the cap, so settled spend is close to what was reserved and the budget
# really fills up (instead of refunds making room for everyone).
SIM = SimConfig(chunks=32, tokens_per_chunk=64)


class Sampler:
    """Reads the ledger from another connection while the storm runs: no line is ever past its limit."""

    def __init__(self, ledger: Ledger, limits: dict[str, int]) -> None:
        self.ledger = ledger
        self.limits = limits
        self.samples = 0
        self.violations: list[tuple[str, int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for (_, key), (spent, reserved) in self.ledger.lines().items():
                for prefix, limit in self.limits.items():
                    if key.startswith(prefix) and spent + reserved > limit:
                        self.violations.append((key, spent, reserved))
            self.samples += 1
            self._stop.wait(0.01)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


async def storm(
    proxy: Proxy, key: str, agents: list[str], seed: int
) -> list[tuple[int, dict[str, Any] | None]]:
    """Fire every request at once (mixed streaming and not, random caps); return (status, error)."""
    rng = random.Random(seed)
    plans = [
        (rng.choice(agents), rng.random() < 0.5, rng.randint(20, 1500), rng.random() < 0.5)
        for _ in range(N_REQUESTS)
    ]
    gate = asyncio.Event()
    # aiohttp, not httpx: httpx's pool takes seconds to open hundreds of connections at once.
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as client:

        async def one(
            i: int, agent: str, streaming: bool, cap: int, usage: bool
        ) -> tuple[int, dict[str, Any] | None]:
            body: dict[str, Any] = {"model": "gpt-sim", "max_tokens": cap, "stream": streaming,
                                    "messages": [{"role": "user", "content": f"call {i} " + "x" * (i % 50)}]}  # fmt: skip
            if streaming and usage:
                body["stream_options"] = {"include_usage": True}
            headers = {"authorization": f"Bearer {key}", "x-resgov-agent-id": agent}
            await gate.wait()
            async with client.post(f"{proxy.url}/v1/chat/completions", data=orjson.dumps(body),
                                   headers=headers) as r:  # fmt: skip
                data = await r.read()
            if r.status != 200:
                return r.status, orjson.loads(data)
            if streaming:
                assert data.rstrip().endswith(b"data: [DONE]"), data[-200:]
                assert b'"error"' not in data
            else:
                assert "resgov_cost" in orjson.loads(data)
            return 200, None

        tasks = [asyncio.create_task(one(i, *plan)) for i, plan in enumerate(plans)]
        await asyncio.sleep(0.05)
        gate.set()
        return await asyncio.gather(*tasks)


def check_outcomes(results: list[tuple[int, dict[str, Any] | None]], agents: list[str], reason: str) -> int:
    ok = 0
    for status, body in results:
        if status == 200:
            ok += 1
            continue
        assert status == 403, (status, body)
        assert body is not None and list(body) == ["error"]
        error = body["error"]
        assert set(error) == {"type", "message", "agent_id", "reason"}, error
        assert error["type"] == "budget_exceeded"
        assert error["reason"] == reason
        assert error["agent_id"] in agents
        assert MESSAGE_RE.match(error["message"]), error["message"]
        # The message's numbers: what did not fit really did not fit.
        numbers = [parse_amount(x) for x in re.findall(r"\$([0-9.]+)", error["message"])]
        limit, spent, required = numbers
        assert spent + required > limit
    return ok


async def test_agent_daily_budget_under_a_storm(tmp_path: Path) -> None:
    agents = "[agents.runaway]\ndaily_budget = 0.25\n"
    limit = parse_amount("0.25")
    with SimUpstreamThread(SIM) as sim, Proxy(tmp_path, policy_for(sim.base_url, agents)) as proxy:
        key = proxy.key()
        with Sampler(proxy.ledger, {"a:runaway:": limit}) as sampler:
            results = await storm(proxy, key, ["runaway"], seed=20261129)
        ok = check_outcomes(results, ["runaway"], "daily_budget_exceeded")
        # A fraction got through, and a fraction only: the budget did the deciding.
        assert 0 < ok < N_REQUESTS // 2, ok
        assert sim_chat_count(sim) == ok
        assert sampler.samples > 0 and not sampler.violations, sampler.violations[:5]
    ledger = proxy.ledger
    spent = ledger.spent("default", "a:runaway:daily")
    assert 0 < spent <= limit
    assert ledger.reserved_total() == 0
    audit = ledger.audit()
    assert len(audit) == N_REQUESTS
    assert sum(1 for a in audit if a["status"] == "completed") == ok
    assert sum(1 for a in audit if a["status"] == "denied") == N_REQUESTS - ok
    assert sum(a["actual"] for a in audit) == spent
    ledger.check_invariants()


async def test_org_daily_budget_shared_by_two_agents(tmp_path: Path) -> None:
    agents = """
[orgs.acme]
daily_budget = 0.25

[agents.alpha]
org = "acme"
daily_budget = 5

[agents.beta]
org = "acme"
daily_budget = 5
"""
    limit = parse_amount("0.25")
    with SimUpstreamThread(SIM) as sim, Proxy(tmp_path, policy_for(sim.base_url, agents)) as proxy:
        key = proxy.key("acme")
        with Sampler(proxy.ledger, {"o:": limit}) as sampler:
            results = await storm(proxy, key, ["alpha", "beta"], seed=7)
        ok = check_outcomes(results, ["alpha", "beta"], "org_daily_budget_exceeded")
        assert 0 < ok < N_REQUESTS // 2, ok
        assert sim_chat_count(sim) == ok
        assert not sampler.violations, sampler.violations[:5]
    ledger = proxy.ledger
    org_spent = ledger.spent("acme", "o:daily")
    alpha, beta = ledger.spent("acme", "a:alpha:daily"), ledger.spent("acme", "a:beta:daily")
    assert 0 < org_spent <= limit
    assert alpha > 0 and beta > 0 and alpha + beta == org_spent
    audit = ledger.audit()
    assert len(audit) == N_REQUESTS
    assert {a["agent"] for a in audit} == {"alpha", "beta"}
    assert sum(a["actual"] for a in audit) == org_spent
    assert ledger.reserved_total() == 0
    ledger.check_invariants()


async def test_storm_with_failures_cuts_and_disconnects_keeps_the_ledger_exact(tmp_path: Path) -> None:
    """Every outcome at once: upstream errors, cut streams, clients walking away mid-stream."""
    agents = "[agents.chaos]\ndaily_budget = 0.25\n"
    limit = parse_amount("0.25")
    rng = random.Random(99)
    kinds = [rng.choice(["ok", "ok", "ok", "error", "cut", "gone", "nousage"]) for _ in range(N_REQUESTS)]
    with SimUpstreamThread(SIM) as sim, Proxy(tmp_path, policy_for(sim.base_url, agents)) as proxy:
        key = proxy.key()
        gate = asyncio.Event()
        timeout = aiohttp.ClientTimeout(total=60)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as client:

            async def one(i: int, kind: str) -> int:
                streaming = kind in ("cut", "gone") or i % 2 == 0
                body = {"model": "gpt-sim", "max_tokens": rng.randint(20, 1500), "stream": streaming,
                        "messages": [{"role": "user", "content": f"chaos {i}"}]}  # fmt: skip
                headers = {"authorization": f"Bearer {key}", "x-resgov-agent-id": "chaos"}
                if kind == "error":
                    headers["x-sim-error-status"] = "500"
                elif kind == "cut":
                    headers["x-sim-cut-after-chunks"] = "2"
                elif kind == "gone":
                    headers["x-sim-chunk-delay-ms"] = "20"
                elif kind == "nousage":
                    headers["x-sim-omit-usage"] = "true"
                await gate.wait()
                async with client.post(f"{proxy.url}/v1/chat/completions", data=orjson.dumps(body),
                                       headers=headers) as r:  # fmt: skip
                    if kind == "gone" and r.status == 200:
                        await r.content.readany()
                        r.close()  # hang up mid-stream
                        return r.status
                    await r.read()
                    return r.status

            tasks = [asyncio.create_task(one(i, k)) for i, k in enumerate(kinds)]
            await asyncio.sleep(0.05)
            gate.set()
            statuses = await asyncio.gather(*tasks)
        assert set(statuses) <= {200, 403, 500}, set(statuses)
        assert sim_chat_count(sim) == sum(1 for s in statuses if s in (200, 500))
        for _ in range(400):  # abandoned streams settle as the proxy notices; bounded wait
            if proxy.ledger.open_reservations() == 0:
                break
            await asyncio.sleep(0.02)
    ledger = proxy.ledger
    assert ledger.spent("default", "a:chaos:daily") <= limit
    audit = ledger.audit()
    assert len(audit) == N_REQUESTS
    by_status: dict[str, int] = {}
    for a in audit:
        by_status[a["status"]] = by_status.get(a["status"], 0) + 1
    assert by_status.get("upstream_error", 0) == statuses.count(500)
    assert by_status.get("denied", 0) == statuses.count(403)
    ledger.check_invariants()
