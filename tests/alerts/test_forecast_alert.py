"""A budget predicted to run out within the horizon sends one forecast.exhaustion alert per window."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import Proxy, policy_for


async def test_forecast_exhaustion_alert_fires_once(
    tmp_path: Path, sim: Any, receivers: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RESGOV_ALLOW_PRIVATE_WEBHOOKS", "1")
    receiver = await receivers()
    agents = f"""
[[webhooks]]
name = "forecasts"
url = "{receiver.url}"
events = ["forecast.exhaustion"]

[agents.burner]
total_budget = 0.02
"""
    extra = "forecast_alert_horizon_seconds = 31000000"
    with Proxy(tmp_path, policy_for(sim.base_url, agents, extra), forecast_interval=0.2) as proxy:
        key = proxy.key()
        async with httpx.AsyncClient(base_url=proxy.url) as client:
            for _ in range(3):
                r = await client.post(
                    "/v1/chat/completions",
                    headers={"Authorization": f"Bearer {key}", "X-ResGov-Agent-ID": "burner"},
                    json={
                        "model": "gpt-sim",
                        "max_tokens": 50,
                        "messages": [{"role": "user", "content": "go"}],
                    },
                )
                assert r.status_code == 200
            got = await receiver.wait_for(1)
            # Several more checks run (every 0.2 s); the same window's alert is not sent again.
            await asyncio.sleep(1.0)
    body = got[0].json()
    assert body["type"] == "forecast.exhaustion" and body["agent_id"] == "burner"
    assert body["data"]["period"] == "total"
    assert len({r.headers["X-ResGov-Event-ID"] for r in receiver.requests}) == 1
