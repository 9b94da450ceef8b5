"""The ASGI application: raw handlers for proxied routes, FastAPI for everything else."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from resgov import __version__
from resgov.alerts import Alerts, RgfDestinations
from resgov.alerts.events import forecast_exhaustion
from resgov.alerts.urls import allow_private_from_env
from resgov.config.settings import Settings
from resgov.core.policy import Policy
from resgov.ledger.store import Store
from resgov.providers.anthropic import Messages
from resgov.providers.embeddings import Embeddings
from resgov.providers.openai import ChatCompletions
from resgov.providers.responses import Responses
from resgov.providers.translate import ChatToMessages, MessagesToChat
from resgov.server.alerts_api import build_alerts_router
from resgov.server.api import build_router, install_error_handlers
from resgov.server.asgi import Receive, Scope, Send
from resgov.server.dashboard import build_dashboard_router, exhaustion_events
from resgov.server.governance import install as install_governance
from resgov.server.metrics import Metrics, ObservedStore, build_metrics_router
from resgov.server.proxy import ProxyRoute
from resgov.server.runtime import PolicyHolder, Runtime

log = logging.getLogger("resgov")


class ResGovApp:
    """Dispatches proxied routes to raw handlers before FastAPI sees them (the hot path)."""

    def __init__(self, runtime: Runtime, api: FastAPI) -> None:
        self.runtime = runtime
        self.api = api
        chat = ProxyRoute(
            runtime,
            "/v1/chat/completions",
            "openai",
            {"openai": ChatCompletions(), "anthropic": ChatToMessages()},
        )
        messages = ProxyRoute(
            runtime, "/v1/messages", "anthropic", {"anthropic": Messages(), "openai": MessagesToChat()}
        )
        embeddings = ProxyRoute(runtime, "/v1/embeddings", "openai", {"openai": Embeddings()})
        responses = ProxyRoute(runtime, "/v1/responses", "openai", {"openai": Responses()})
        self.routes: dict[tuple[str, str], ProxyRoute] = {}
        for route in (chat, messages, embeddings, responses):
            self.routes[("POST", route.route)] = route
            # Clients whose base URL has no /v1 (some SDK configurations) reach the same route.
            self.routes[("POST", route.route.removeprefix("/v1"))] = route

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            handler = self.routes.get((scope["method"], scope["path"]))
            if handler is not None:
                await handler(scope, receive, send)
                return
        await self.api(scope, receive, send)


async def _forecast_alerts(runtime: Runtime, alerts: Alerts) -> None:
    """Every ``forecast_interval`` seconds: alert on budgets predicted to run out within the horizon.

    Each event id is stable for one budget line in one window, so the alert fires once per
    window however often this runs and however many instances run it.
    """
    while True:
        await asyncio.sleep(runtime.settings.forecast_interval)
        policy = runtime.policy
        horizon = policy.global_.forecast_alert_horizon_seconds
        if not horizon:
            continue
        try:
            events = await exhaustion_events(runtime.store, policy, horizon_seconds=horizon)
        except Exception as exc:  # a store outage must not end the loop
            log.warning("forecast alerts skipped: %s", exc)
            continue
        for ev in events:
            alerts.emit(
                forecast_exhaustion(
                    ev.line,
                    ev.agent_id or "",
                    ev.exhausts_at,
                    ev.remaining,
                    round(ev.rate_per_hour),
                    policy.global_.currency,
                )
            )


def create_app(settings: Settings, store: Store, policy: Policy) -> ResGovApp:
    """Build the app. Resources are opened and closed by its lifespan."""
    holder = PolicyHolder(policy=policy, path=settings.config_path)
    # The policy in force (with the governance API's agents), read when used: reloads apply.
    metrics = Metrics(policy=lambda: runtime.policy)
    allow_private = allow_private_from_env()
    alerts = Alerts.from_settings(
        settings,
        allow_private=allow_private,
        rgf_destinations=RgfDestinations(lambda: holder.policy.webhooks, allow_private=allow_private),
        on_delivery=metrics.observe_alert_delivery,
    )
    # Every ledger round trip is timed; settlements feed the spend metrics and the budget alerts.
    observed = ObservedStore(store, metrics=metrics, alerts=alerts, policy=lambda: runtime.policy)
    metrics.store = observed
    runtime = Runtime(settings=settings, store=observed, policies=holder, metrics=metrics, alerts=alerts)
    runtime.guard.on_trip.append(alerts.on_breaker_trip)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if not settings.admin_enabled:
            log.warning(
                "admin API disabled: RESGOV_ADMIN_TOKEN is %s (it must be at least 32 characters)",
                "missing" if not settings.admin_token else "too short",
            )
        await runtime.start()
        forecaster = asyncio.create_task(_forecast_alerts(runtime, alerts), name="resgov-forecast-alerts")
        try:
            yield
        finally:
            forecaster.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await forecaster
            await runtime.stop()

    api = FastAPI(
        title="ResGov",
        version=__version__,
        description="Budget firewall for AI agents: OpenAI/Anthropic-compatible proxy and governance API.",
        lifespan=lifespan,
    )
    api.state.runtime = runtime
    api.include_router(build_router())
    api.include_router(build_metrics_router())
    api.include_router(build_alerts_router())
    api.include_router(build_dashboard_router())
    install_error_handlers(api)
    install_governance(api)
    return ResGovApp(runtime, api)
