"""Alerts from real proxied calls: threshold crossing, overage, one budget.exceeded per window."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

from resgov.alerts import Alerts, RetryPolicy
from resgov.alerts.store import SQLiteAlertStore
from tests.alerts.conftest import Receiver
from tests.alerts.recipe import verify_resgov_signature
from tests.alerts.wiring import wired_app
from tests.helpers import policy_for

AGENTS = """
[agents.hermes]
daily_budget = 0.001
"""


def _delivered(metrics_text: str) -> int:
    found = re.search(
        r'resgov_alert_deliveries_total\{outcome="delivered",type="generic"\} (\d+)\.0', metrics_text
    )
    return int(found.group(1)) if found else 0


async def _chat(client: Any, key: str, **headers: str) -> Any:
    return await client.post(
        "/v1/chat/completions",
        headers={"Authorization": f"Bearer {key}", "X-ResGov-Agent-ID": "hermes", **headers},
        json={"model": "gpt-sim", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50},
    )


async def test_budget_alerts_from_proxied_calls(tmp_path: Path, sim: Any, receivers: Any) -> None:
    generic: Receiver = await receivers()
    slack: Receiver = await receivers()
    alerts = Alerts(
        SQLiteAlertStore(str(tmp_path / "resgov.alerts.db")),
        allow_private=True,
        retry=RetryPolicy(max_attempts=3, base_seconds=0.05, jitter=0),
        poll_seconds=0.2,
    )
    async with wired_app(tmp_path, policy_for(sim.base_url, AGENTS), alerts=alerts) as w:
        hook = await alerts.create_webhook(generic.url)
        await alerts.create_webhook(slack.url, type="slack", events=["budget.exceeded"])
        key = await w.key()
        # The provider bills 10x what it should: the real cost (~0.00065) passes the reservation
        # (overage) and 50 % of the 0.001 daily budget in one call.
        first = await _chat(w.client, key, **{"X-Sim-Usage-Multiplier": "10"})
        assert first.status_code == 200 and first.json()["resgov_cost"]["overage"] is True
        for _ in range(3):  # the budget cannot take another worst case: refused each time
            denied = await _chat(w.client, key)
            assert denied.status_code == 403 and denied.json()["error"]["reason"] == "daily_budget_exceeded"
        reqs = await generic.wait_for(3)
        await slack.wait_for(1)
        await alerts.flush()
        # The worker counts a delivery after the receiver has answered, so the receiver can
        # see a request just before the counter moves: scrape until it has (bounded).
        text = await w.scrape()
        for _ in range(50):
            if _delivered(text) >= 3:
                break
            await asyncio.sleep(0.1)
            text = await w.scrape()
    by_type = {r.json()["type"]: r for r in reqs}
    assert sorted(by_type) == ["budget.exceeded", "budget.threshold", "reservation.overage"]
    # Delivery is at least once (a slow, loaded machine may redeliver after a lease runs out):
    # receivers de-duplicate on the event id, so that is what must be exactly three and one.
    assert len({r.headers["X-ResGov-Event-ID"] for r in reqs}) == 3
    assert len({r.headers["X-ResGov-Event-ID"] for r in slack.requests}) == 1  # three denials, one alert
    threshold = by_type["budget.threshold"].json()
    assert threshold["data"]["threshold"] == 0.5 and threshold["agent_id"] == "hermes"
    assert threshold["data"]["limit"] == 0.001 and threshold["data"]["period"] == "daily"
    exceeded = by_type["budget.exceeded"].json()
    assert exceeded["data"]["reason"] == "daily_budget_exceeded" and exceeded["severity"] == "critical"
    assert slack.requests[0].headers["X-ResGov-Event-ID"] == exceeded["id"]
    overage = by_type["reservation.overage"].json()
    assert overage["data"]["charged"] > overage["data"]["reserved"]
    assert hook.secret is not None
    assert all(verify_resgov_signature(hook.secret, r.headers["X-ResGov-Signature"], r.body) for r in reqs)
    assert _delivered(text) >= 3
    assert 'resgov_reservations_total{outcome="overage"} 1.0' in text
