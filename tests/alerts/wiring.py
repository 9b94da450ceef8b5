"""Test-side wiring of metrics and alerts into a real ResGov app (until app.py/proxy.py do it).

Everything runs in the test's event loop: the app is driven through httpx's ASGI transport
after entering its lifespan, the simulator and the receivers are real loopback servers.
``TimedRoute`` stands in for the ``observe_call`` hook the proxy will call itself.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from resgov.alerts import Alerts
from resgov.config.rgf import parse_policy
from resgov.config.settings import Settings
from resgov.ledger.sqlite import SQLiteStore
from resgov.server.alerts_api import build_alerts_router
from resgov.server.app import ResGovApp, create_app
from resgov.server.asgi import Receive, Scope, Send
from resgov.server.metrics import Metrics, ObservedStore, build_metrics_router
from tests.helpers import ADMIN_TOKEN

METRICS_TOKEN = "metrics-token-0123456789abcdef-0123456789"
ADMIN = {"X-Admin-Token": ADMIN_TOKEN}


class TimedRoute:
    """Wraps a proxied route: times it and reports it to ``Metrics.observe_call`` by response status."""

    def __init__(self, inner: Any, metrics: Metrics) -> None:
        self.inner = inner
        self.route = inner.route
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        status = 0

        async def capture(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        started = time.perf_counter()
        await self.inner(scope, receive, capture)
        total = time.perf_counter() - started
        if status < 400:
            outcome = "completed"
        elif status == 401:
            outcome = "unauthorized"
        elif status in (403, 429):
            outcome = "denied"
        elif status >= 500:
            outcome = "upstream_error"
        else:
            outcome = "rejected"
        self.metrics.observe_call(self.route, "gpt-sim", "sim", outcome, total / 2, total / 2)


@dataclass
class Wired:
    app: ResGovApp
    client: httpx.AsyncClient
    metrics: Metrics
    store: ObservedStore
    inner: SQLiteStore
    alerts: Alerts | None

    async def key(self, org: str = "default") -> str:
        r = await self.client.post(
            "/api/v1/admin/generate-key", headers=ADMIN, json={"org_id": org, "name": "t"}
        )
        r.raise_for_status()
        return str(r.json()["api_key"])

    async def scrape(self, **headers: str) -> str:
        r = await self.client.get("/metrics", headers=headers or ADMIN)
        assert r.status_code == 200, r.text
        return r.text


@asynccontextmanager
async def wired_app(
    tmp_path: Path,
    policy_text: str,
    *,
    alerts: Alerts | None = None,
    metrics_token: str | None = METRICS_TOKEN,
) -> AsyncIterator[Wired]:
    """A ResGov app over SQLite with ObservedStore, Metrics, /metrics, the webhook API and ``alerts``.

    Once app.py wires metrics and alerts itself (``runtime.metrics`` is set), its own wiring is
    used and only ``alerts`` (the test's, with its fast retry policy) is swapped in.
    """
    db = str(tmp_path / "resgov.db")
    policy = parse_policy(policy_text, "test.rgf")
    settings = Settings(store_url=f"sqlite:///{db}", admin_token=ADMIN_TOKEN, metrics_token=metrics_token)
    inner = SQLiteStore(db)
    box: dict[str, ResGovApp] = {}

    def policy_now() -> Any:
        return box["app"].runtime.policy

    probe = create_app(settings, inner, policy)
    integrated: Metrics | None = getattr(probe.runtime, "metrics", None)
    if integrated is not None:
        app = box["app"] = probe
        metrics = integrated
        store = app.runtime.store
        assert isinstance(store, ObservedStore)
        if alerts is not None:
            # The app's own Alerts was never started (nothing opened yet): replace it.
            app.runtime.alerts = alerts  # type: ignore[attr-defined]
            store.alerts = alerts
            app.api.state.alerts = alerts
    else:
        metrics = Metrics(policy=policy_now)
        store = ObservedStore(inner, metrics=metrics, alerts=alerts, policy=policy_now)
        metrics.store = store
        app = box["app"] = create_app(settings, store, policy)  # type: ignore[arg-type]
        app.api.state.metrics = metrics
        app.api.state.alerts = alerts
        app.api.include_router(build_metrics_router())
        app.api.include_router(build_alerts_router())
        for key, route in list(app.routes.items()):
            app.routes[key] = TimedRoute(route, metrics)  # type: ignore[assignment]
    if alerts is not None:
        alerts.on_delivery = metrics.observe_alert_delivery
    async with app.api.router.lifespan_context(app.api):
        started_here = alerts is not None and integrated is None
        if started_here:
            assert alerts is not None
            await alerts.start()
        try:
            transport = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
            async with httpx.AsyncClient(
                transport=transport, base_url="http://resgov.test", timeout=30
            ) as client:
                yield Wired(app, client, metrics, store, inner, alerts)
        finally:
            if started_here:
                assert alerts is not None
                await alerts.stop()
