"""The store goes away mid-run: ``fail_safe_action`` decides, and no spend is lost either way.

Each test starts its OWN ``redis-server`` on a free loopback port (AOF with ``appendfsync always``
in the test's directory, so a kill -9 loses nothing and a restart on the same port brings the
ledger back), kills it mid-run and restarts it. The machine's shared Redis is never touched.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import redis

from resgov.ledger.redis import RedisStore
from resgov.ledger.store import AuditEntry, AuditQuery
from resgov.simulator.upstream import SimConfig, SimUpstreamThread
from tests.helpers import ADMIN_TOKEN, free_port, policy_for, resgov_process, sim_chat_count, sim_cost
from tests.redis_support import in_ci

pytestmark = [pytest.mark.slow, pytest.mark.redis]

TTL = 2.0
#: Longer than the proxy's API-key cache (5 s): the outage must hold past it.
KEY_CACHE_SECONDS = 5.0
AGENTS = """
[agents.worker]
total_budget = 5
"""
LINE = "a:worker:total:0"


class OwnRedis:
    """A private redis-server: start, kill -9, restart on the same port with the same data."""

    def __init__(self, workdir: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            if in_ci():
                pytest.fail("CI=true but redis-server is not installed; the store-outage tests cannot run")
            pytest.skip("!!! redis-server NOT INSTALLED: the store-outage tests did NOT run.")
        self.binary = binary
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        log = open(self.workdir / "redis.log", "ab")  # noqa: SIM115 - lives as long as the server
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.workdir)],
            stdout=log, stderr=log,
        )  # fmt: skip
        log.close()
        deadline = time.monotonic() + 10
        while True:
            try:
                client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.5)
                try:
                    if client.ping():
                        return
                finally:
                    client.close()
            except redis.RedisError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start: {(self.workdir / 'redis.log').read_text()}")
            time.sleep(0.05)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    workdir = tmp_path / "redis"
    workdir.mkdir()
    server = OwnRedis(workdir)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def policy(sim: SimUpstreamThread, action: str) -> str:
    return policy_for(
        sim.base_url, AGENTS, f'fail_safe_action = "{action}"\nreservation_ttl_seconds = {TTL:g}'
    )


def make_key(url: str) -> str:
    r = httpx.post(f"{url}/api/v1/admin/generate-key", headers={"X-Admin-Token": ADMIN_TOKEN},
                   json={"org_id": "default", "name": "outage"})  # fmt: skip
    r.raise_for_status()
    return str(r.json()["api_key"])


def call(url: str, key: str, i: int, *, stream: bool = False, timeout: float = 20) -> httpx.Response:
    body: dict[str, Any] = {"model": "gpt-sim", "max_tokens": 50 + i, "stream": stream,
                            "messages": [{"role": "user", "content": f"outage {i}"}]}  # fmt: skip
    if stream:
        body["stream_options"] = {"include_usage": True}
    return httpx.post(f"{url}/v1/chat/completions", content=orjson.dumps(body), timeout=timeout,
                      headers={"authorization": f"Bearer {key}", "x-resgov-agent-id": "worker"})  # fmt: skip


def cost_of(r: httpx.Response) -> int:
    """What the simulator billed for a 200 (usage from the JSON body or the stream's last chunk)."""
    if r.headers.get("content-type", "").startswith("text/event-stream"):
        usage = next(orjson.loads(line[6:])["usage"] for line in r.content.split(b"\n")
                     if line.startswith(b"data: {") and b'"usage":{' in line)  # fmt: skip
    else:
        usage = r.json()["usage"]
    return sim_cost(usage["prompt_tokens"], usage["completion_tokens"])


def slow_stream(url: str, key: str) -> str:
    """A stream of 16 chunks 150 ms apart; returns its request id however it ends."""
    body = orjson.dumps({"model": "gpt-sim", "max_tokens": 64, "stream": True,
                         "messages": [{"role": "user", "content": "slow"}]})  # fmt: skip
    headers = {"authorization": f"Bearer {key}", "x-resgov-agent-id": "worker", "x-sim-chunk-delay-ms": "150"}
    with httpx.stream("POST", f"{url}/v1/chat/completions", content=body, headers=headers, timeout=30) as r:
        assert r.status_code == 200
        rid = r.headers["x-resgov-request-id"]
        data = b""
        try:
            for chunk in r.iter_bytes():
                data += chunk
        except httpx.HTTPError:
            pass
    return str(rid)


def health(url: str) -> dict[str, Any]:
    r = httpx.get(f"{url}/health", timeout=20)
    assert r.status_code == 200
    return dict(r.json())


def wait_for(predicate: Any, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return bool(predicate())


async def read_ledger(url: str) -> tuple[dict[str, AuditEntry], int, int, int]:
    """(audit by request id, spent, reserved, open reservations) of the test's ledger."""
    store = RedisStore(url)
    await store.open()
    try:
        audit = {e.request_id: e for _, e in await store.audit(AuditQuery(org="default", limit=10_000))}
        line = (await store.line_states("default", [LINE]))[LINE]
        return audit, line.spent, line.reserved, (await store.totals()).open_reservations
    finally:
        await store.close()


async def test_deny_refuses_with_503_and_never_calls_upstream_until_redis_is_back(
    tmp_path: Path, own_redis: OwnRedis
) -> None:
    store_url = f"{own_redis.url}?prefix=outage-deny"
    # (A settlement the store refuses mid-call may be journaled: keep that file in the test's dir.)
    env = {"RESGOV_STORE": store_url, "RESGOV_JOURNAL": str(tmp_path / "journal.jsonl")}
    with (
        SimUpstreamThread(SimConfig()) as sim,
        resgov_process(tmp_path, policy(sim, "deny"), env=env) as (
            _proc,
            url,
        ),
    ):
        key = make_key(url)
        first = await asyncio.to_thread(call, url, key, 0)
        assert first.status_code == 200, first.text
        assert health(url)["status"] == "ok"
        # A stream in flight when Redis dies: its reservation is durable (AOF always), so it is
        # settled after Redis returns (by the sweeper, at most its bound), never lost. (What its
        # client sees is the proxy's business: today the final settle fails and the stream is cut.)
        slow = asyncio.create_task(asyncio.to_thread(slow_stream, url, key))
        await asyncio.sleep(0.5)
        upstream_before = sim_chat_count(sim)

        own_redis.kill()
        outage_started = time.monotonic()
        refused: list[httpx.Response] = []
        for i in range(1, 7):
            refused.append(await asyncio.to_thread(call, url, key, i, stream=i % 2 == 0))
        status = health(url)
        assert status["status"] == "degraded"
        assert (status["store"]["backend"], status["store"]["reachable"]) == ("redis", False)
        # Past the API-key cache: still a clean 503, not an authentication error or a 500.
        await asyncio.sleep(max(0.0, KEY_CACHE_SECONDS + 0.5 - (time.monotonic() - outage_started)))
        for i in range(7, 10):
            refused.append(await asyncio.to_thread(call, url, key, i, stream=i % 2 == 0))
        for r in refused:
            assert r.status_code == 503, (r.status_code, r.text)
            assert r.headers["content-type"].startswith("application/json")
            error = r.json()["error"]
            assert (error["type"], error["reason"]) == ("store_unavailable", "store_unavailable"), error
            assert "ledger" in error["message"] and "not sent upstream" in error["message"]
        assert sim_chat_count(sim) == upstream_before  # the upstream was never called
        slow_id = await slow

        own_redis.start()  # same port, same AOF: the ledger is back as it was
        assert await asyncio.to_thread(wait_for, lambda: call(url, key, 10).status_code == 200, 15)
        back = await asyncio.to_thread(call, url, key, 11, stream=True)
        assert back.status_code == 200 and back.content.rstrip().endswith(b"data: [DONE]")
        assert await asyncio.to_thread(wait_for, lambda: health(url)["status"] == "ok", 5)
        # The stream that outlived Redis is settled by the sweeper once its lease runs out.
        audit: dict[str, AuditEntry] = {}

        def settled() -> bool:
            nonlocal audit
            audit, _, _, open_count = asyncio.run(read_ledger(store_url))
            return open_count == 0

        assert await asyncio.to_thread(wait_for, settled, TTL + 5)
    audit, spent, reserved, open_count = await read_ledger(store_url)
    assert (reserved, open_count) == (0, 0)
    assert spent == sum(e.actual for e in audit.values())
    slow_row = audit[slow_id]
    # Settled once: by the sweeper at its bound, or with its real cost if the proxy journaled it.
    assert slow_row.status in ("expired", "completed"), slow_row
    assert 0 < slow_row.actual <= slow_row.reserved
    assert not any(e.status == "in_flight" for e in audit.values())


async def test_allow_lets_calls_through_journals_them_and_books_them_once_when_redis_returns(
    tmp_path: Path, own_redis: OwnRedis
) -> None:
    """fail_safe_action = "allow": the wiring of ledger/journal.py into the proxy and the runtime."""
    store_url = f"{own_redis.url}?prefix=outage-allow"
    journal = tmp_path / "journal.jsonl"
    env = {"RESGOV_STORE": store_url, "RESGOV_JOURNAL": str(journal)}
    with (
        SimUpstreamThread(SimConfig()) as sim,
        resgov_process(tmp_path, policy(sim, "allow"), env=env) as (
            _proc,
            url,
        ),
    ):
        key = make_key(url)
        first = await asyncio.to_thread(call, url, key, 0)
        assert first.status_code == 200, first.text
        _, spent_before, _, _ = await read_ledger(store_url)
        assert spent_before == cost_of(first)
        upstream_before = sim_chat_count(sim)

        own_redis.kill()
        outage_started = time.monotonic()
        allowed: list[httpx.Response] = []
        for i in range(1, 5):
            allowed.append(await asyncio.to_thread(call, url, key, i, stream=i % 2 == 0))
        status = health(url)
        assert status["status"] == "degraded" and status["store"]["reachable"] is False
        # Past the API-key cache: a key seen before keeps working while the store is away.
        await asyncio.sleep(max(0.0, KEY_CACHE_SECONDS + 0.5 - (time.monotonic() - outage_started)))
        for i in range(5, 7):
            allowed.append(await asyncio.to_thread(call, url, key, i, stream=i % 2 == 0))
        for r in allowed:
            assert r.status_code == 200, (r.status_code, r.text)
            assert r.headers.get("x-resgov-fail-open") == "journaled", dict(r.headers)
        assert sim_chat_count(sim) == upstream_before + len(allowed)  # they really went upstream
        ids = [r.headers["x-resgov-request-id"] for r in allowed]
        costs = {rid: cost_of(r) for rid, r in zip(ids, allowed, strict=True)}
        # Journaled on disk, opened and closed, with the real cost, before Redis is back.
        written = [orjson.loads(line) for line in journal.read_bytes().splitlines()]
        assert [w["id"] for w in written if w["t"] == "open"] == ids
        assert {w["id"]: w["actual"] for w in written if w["t"] == "close"} == costs
        log = await asyncio.to_thread(lambda: next(tmp_path.glob("server-*.log")).read_text())
        assert log.count("FAIL-OPEN") >= len(allowed)

        own_redis.start()

        def reconciled() -> bool:
            audit, _, _, _ = asyncio.run(read_ledger(store_url))
            return all(rid in audit for rid in ids)

        assert await asyncio.to_thread(wait_for, reconciled, 15), "journaled calls were not booked"
        await asyncio.sleep(2.5)  # more reconcile passes: nothing may be booked twice
        after = await asyncio.to_thread(call, url, key, 7)
        assert after.status_code == 200 and "x-resgov-fail-open" not in after.headers
        assert health(url)["status"] == "ok"
    audit, spent, reserved, open_count = await read_ledger(store_url)
    for rid in ids:
        row = audit[rid]
        assert row.actual == costs[rid] and row.reserved == 0, row
        assert (
            row.detail is not None
            and row.detail.get("fail_open") is True
            and row.detail.get("reconciled") is True
        )
    assert spent == spent_before + sum(costs.values()) + cost_of(after)
    assert spent == sum(e.actual for e in audit.values())
    assert (reserved, open_count) == (0, 0)
    assert not await asyncio.to_thread(journal.exists)
    assert await asyncio.to_thread(lambda: list(tmp_path.glob("journal.jsonl.*.reconciled")))
