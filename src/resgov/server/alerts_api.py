"""Admin API for alert destinations: ``/api/v1/admin/webhooks`` (create, list, update, delete, test).

Every route needs ``X-Admin-Token``. A webhook's signing ``secret`` is in the answer
to its creation (and to a ``rotate_secret`` update) and never again. Slack and
Discord URLs carry their token in the path, so listings show them masked.
Webhooks from the ``.rgf`` file are listed (``source: "rgf"``) but are read-only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from resgov.alerts.events import iso
from resgov.alerts.service import Alerts, WebhookNotFound, WebhookReadOnly
from resgov.alerts.store import Destination
from resgov.alerts.urls import UnsafeURL, redact_url
from resgov.config.rgf import NAME_RE
from resgov.core.errors import InvalidValue, NotFound, ResGovError
from resgov.server.api import admin_only

WebhookType = Literal["generic", "slack", "discord"]


class AlertsUnavailable(ResGovError):
    """The alerts subsystem is not configured in this app (503)."""

    status = 503
    type = "alerts_unavailable"


class WebhookCreate(BaseModel):
    """``POST /api/v1/admin/webhooks``."""

    model_config = ConfigDict(extra="forbid")
    url: str = Field(min_length=1, max_length=2048)
    type: WebhookType = "generic"
    #: Event names, glob patterns (``budget.*``) or ``["*"]``; absent = all.
    events: list[str] | None = Field(None, max_length=50)
    #: Only this org's events (absent: every org's, and system events such as ``store.down``).
    org_id: str | None = Field(None, pattern=NAME_RE.pattern)
    description: str = Field("", max_length=500)
    enabled: bool = True


class WebhookReplace(WebhookCreate):
    """``PUT /api/v1/admin/webhooks/{id}``: every field replaced (the secret is kept unless rotated)."""

    rotate_secret: bool = False


class WebhookPatch(BaseModel):
    """``PATCH /api/v1/admin/webhooks/{id}``: only the fields given change."""

    model_config = ConfigDict(extra="forbid")
    url: str | None = Field(None, min_length=1, max_length=2048)
    type: WebhookType | None = None
    events: list[str] | None = Field(None, max_length=50)
    org_id: str | None = Field(None, pattern=NAME_RE.pattern)
    description: str | None = Field(None, max_length=500)
    enabled: bool | None = None
    rotate_secret: bool = False


class WebhookOut(BaseModel):
    """A webhook as listed: never its secret."""

    id: str
    url: str
    type: str
    events: list[str]
    org_id: str | None
    description: str
    enabled: bool
    source: str
    signed: bool
    created_at: str | None
    updated_at: str | None


class WebhookCreated(WebhookOut):
    """A new webhook with its signing secret, shown once."""

    secret: str


class WebhookTestResult(BaseModel):
    """What the receiver answered to a test send."""

    webhook_id: str
    event_id: str
    delivered: bool
    status: int | None
    error: str | None
    latency_ms: float


def _masked_url(dest: Destination) -> str:
    # Slack/Discord webhook URLs are credentials; a generic URL is shown as configured.
    return redact_url(dest.url) if dest.type in ("slack", "discord") else dest.url


def _out(dest: Destination) -> WebhookOut:
    return WebhookOut(
        id=dest.id,
        url=_masked_url(dest),
        type=dest.type,
        events=list(dest.events) if dest.events is not None else ["*"],
        org_id=dest.org_id,
        description=dest.description,
        enabled=dest.enabled,
        source=dest.source,
        signed=bool(dest.secret),
        created_at=iso(dest.created_at) if dest.created_at else None,
        updated_at=iso(dest.updated_at) if dest.updated_at else None,
    )


def _created(dest: Destination) -> WebhookCreated:
    assert dest.secret is not None
    return WebhookCreated(**_out(dest).model_dump(), secret=dest.secret)


def _default_alerts(request: Request) -> Alerts:
    state = request.app.state
    found = getattr(state, "alerts", None)
    if found is None:
        found = getattr(getattr(state, "runtime", None), "alerts", None)
    if not isinstance(found, Alerts):
        raise AlertsUnavailable("Alerts are not enabled on this server.", reason="alerts_unavailable")
    return found


def _map_errors(exc: Exception, webhook_id: str | None = None) -> ResGovError:
    if isinstance(exc, WebhookNotFound):
        return NotFound(f"No webhook '{webhook_id}'.", reason="webhook_not_found")
    if isinstance(exc, WebhookReadOnly):
        return ResGovError(
            f"Webhook '{webhook_id}' is defined in the policy file; edit [[webhooks]] there.",
            reason="webhook_read_only",
            type="conflict",
            status=409,
        )
    if isinstance(exc, UnsafeURL):
        return InvalidValue(str(exc), reason="webhook_url_refused")
    return InvalidValue(str(exc), reason="invalid_webhook")


def build_alerts_router(alerts_of: Callable[[Request], Alerts] = _default_alerts) -> APIRouter:
    """The webhook admin routes; by default the Alerts at ``app.state.alerts`` (or ``runtime.alerts``)."""
    router = APIRouter(prefix="/api/v1/admin", dependencies=[Depends(admin_only)], tags=["alerts"])

    @router.post("/webhooks", response_model=WebhookCreated, status_code=201)
    async def create_webhook(body: WebhookCreate, request: Request) -> WebhookCreated:
        """Create a destination; the answer carries its signing ``secret``, shown this once."""
        try:
            dest = await alerts_of(request).create_webhook(
                body.url, body.type, body.events, body.org_id, body.description, body.enabled
            )
        except (UnsafeURL, ValueError) as exc:
            raise _map_errors(exc) from exc
        return _created(dest)

    @router.get("/webhooks", response_model=list[WebhookOut])
    async def list_webhooks(
        request: Request, org_id: Annotated[str | None, Query(pattern=NAME_RE.pattern)] = None
    ) -> list[WebhookOut]:
        """Every destination (API and ``.rgf``), without secrets; ``?org_id=`` filters by scope."""
        dests = await alerts_of(request).destinations_fresh()
        return [_out(d) for d in dests if org_id is None or d.org_id == org_id]

    @router.get("/webhooks/{webhook_id}", response_model=WebhookOut)
    async def get_webhook(webhook_id: str, request: Request) -> WebhookOut:
        """One destination, without its secret."""
        dest = await alerts_of(request).find(webhook_id)
        if dest is None:
            raise _map_errors(WebhookNotFound(webhook_id), webhook_id)
        return _out(dest)

    async def _update(
        request: Request, webhook_id: str, changes: dict[str, Any], rotate: bool
    ) -> WebhookCreated | WebhookOut:
        try:
            dest = await alerts_of(request).update_webhook(webhook_id, changes, rotate_secret=rotate)
        except (WebhookNotFound, WebhookReadOnly, UnsafeURL, ValueError) as exc:
            raise _map_errors(exc, webhook_id) from exc
        return _created(dest) if rotate else _out(dest)

    @router.patch("/webhooks/{webhook_id}", response_model=WebhookCreated | WebhookOut)
    async def patch_webhook(
        webhook_id: str, body: WebhookPatch, request: Request
    ) -> WebhookCreated | WebhookOut:
        """Change the given fields; ``rotate_secret: true`` answers with the new secret (once)."""
        changes = body.model_dump(exclude_unset=True, exclude={"rotate_secret"})
        # An explicit null on a field that cannot be null means "no change", except for scope and
        # events, where null means "every org" / "every event".
        changes = {k: v for k, v in changes.items() if v is not None or k in ("org_id", "events")}
        return await _update(request, webhook_id, changes, body.rotate_secret)

    @router.put("/webhooks/{webhook_id}", response_model=WebhookCreated | WebhookOut)
    async def put_webhook(
        webhook_id: str, body: WebhookReplace, request: Request
    ) -> WebhookCreated | WebhookOut:
        """Replace every field (the signing secret is kept unless ``rotate_secret``)."""
        changes = body.model_dump(exclude={"rotate_secret"})
        return await _update(request, webhook_id, changes, body.rotate_secret)

    @router.delete("/webhooks/{webhook_id}")
    async def delete_webhook(webhook_id: str, request: Request) -> dict[str, Any]:
        """Delete a destination and its pending deliveries."""
        try:
            dropped = await alerts_of(request).delete_webhook(webhook_id)
        except (WebhookNotFound, WebhookReadOnly) as exc:
            raise _map_errors(exc, webhook_id) from exc
        return {"id": webhook_id, "deleted": True, "pending_dropped": dropped}

    @router.post("/webhooks/{webhook_id}/test", response_model=WebhookTestResult)
    async def test_webhook(webhook_id: str, request: Request) -> WebhookTestResult:
        """Send a ``webhook.test`` event now and report the receiver's answer (not retried)."""
        try:
            event, result = await alerts_of(request).test_webhook(webhook_id)
        except WebhookNotFound as exc:
            raise _map_errors(exc, webhook_id) from exc
        return WebhookTestResult(
            webhook_id=webhook_id,
            event_id=event.id,
            delivered=result.ok,
            status=result.status,
            error=result.error,
            latency_ms=result.latency_ms,
        )

    @router.get("/alerts/status")
    async def alerts_status(request: Request) -> dict[str, Any]:
        """Outbox depth, dead letters, drops."""
        return await alerts_of(request).status()

    @router.get("/alerts/dead-letters")
    async def dead_letters(
        request: Request, limit: Annotated[int, Query(ge=1, le=1000)] = 50
    ) -> dict[str, Any]:
        """Deliveries that exhausted their attempts, newest first (event, destination, last error)."""
        letters = await alerts_of(request).dead_letters(limit)
        return {
            "items": [
                {
                    "delivery_id": d.item.item_id,
                    "webhook_id": d.item.dest_id,
                    "attempts": d.item.attempts,
                    "error": d.error,
                    "dead_at": iso(d.dead_at),
                    "event": d.item.event.body(),
                }
                for d in letters
            ]
        }

    return router
