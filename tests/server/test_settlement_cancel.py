"""A proxied call cancelled while it settles (a shutdown) still settles once, at its real cost.

The settlement is awaited in the call's own task (so it joins the ledger's current batch);
these tests cancel that task at the worst moments and read the ledger afterwards.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest

from resgov.config.rgf import parse_policy
from resgov.config.settings import Settings
from resgov.ledger.sqlite import SQLiteStore
from resgov.ledger.store import SettleOutcome, SettleRequest
from resgov.server.app import ResGovApp, create_app
from resgov.simulator.upstream import SimUpstreamThread
from tests.helpers import ADMIN_TOKEN, Ledger, policy_for, sim_cost

AGENTS = """
[agents.hermes]
daily_budget = 5.00
allowed_models = ["gpt-sim"]
"""
BODY = b'{"model":"gpt-sim","messages":[{"role":"user","content":"hi"}],"max_tokens":64}'


async def _app(tmp: Path, sim: SimUpstreamThread) -> tuple[ResGovApp, str]:
    text = policy_for(sim.base_url, AGENTS)
    db = str(tmp / "resgov.db")
    settings = Settings(store_url=f"sqlite:///{db}", admin_token=ADMIN_TOKEN)
    app = create_app(settings, SQLiteStore(db), parse_policy(text, "test.rgf"))
    await app.runtime.start()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        r = await client.post(
            "/api/v1/admin/generate-key",
            headers={"X-Admin-Token": ADMIN_TOKEN},
            json={"org_id": "default", "name": "t"},
        )
        r.raise_for_status()
    return app, str(r.json()["api_key"])


async def _call(app: ResGovApp, key: str) -> None:
    """One non-streaming call through the ASGI app, as uvicorn would make it."""
    sent = False

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": BODY, "more_body": False}
        await asyncio.Event().wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        return None

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
        "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions", "query_string": b"", "root_path": "",
        "headers": [(b"authorization", f"Bearer {key}".encode()), (b"x-resgov-agent-id", b"hermes"),
                    (b"content-type", b"application/json")],
        "server": ("127.0.0.1", 8080), "client": ("127.0.0.1", 5000),
    }  # fmt: skip
    await app(scope, receive, send)


@pytest.mark.parametrize("reached_the_ledger", [False, True])
async def test_a_call_cancelled_while_settling_is_settled_once_at_its_cost(
    tmp_path: Path, sim: SimUpstreamThread, reached_the_ledger: bool
) -> None:
    app, key = await _app(tmp_path, sim)
    store = app.runtime.store
    real_settle = store.settle
    entered = asyncio.Event()
    calls: list[SettleOutcome | None] = []

    async def slow_settle(request: SettleRequest) -> SettleOutcome:
        # First attempt: hold it (before or after it reached the ledger) until the call is cancelled.
        if calls:
            outcome = await real_settle(request)
            calls.append(outcome)
            return outcome
        calls.append(None)
        if reached_the_ledger:
            await real_settle(request)
        entered.set()
        await asyncio.Event().wait()  # the reply never comes: the call is cancelled here
        raise AssertionError("not reached")

    store.settle = slow_settle  # type: ignore[method-assign]
    task = asyncio.create_task(_call(app, key))
    await asyncio.wait_for(entered.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await app.runtime.stop()  # waits for the settlement finished on the call's behalf
    await store.close()

    # The settlement was retried in a task of its own: once more, and only once.
    assert len(calls) == 2
    retry = calls[1]
    assert retry is not None and retry.settled is not reached_the_ledger
    ledger = Ledger(str(tmp_path / "resgov.db"))
    assert ledger.open_reservations() == 0 and ledger.reserved_total() == 0
    (row,) = ledger.audit()
    cost = sim_cost(row["input_tokens"], row["output_tokens"])
    assert row["status"] == "completed" and row["actual"] == cost > 0
    assert ledger.spent("default", "a:hermes:daily") == cost  # charged once, at the real cost
    ledger.check_invariants()
