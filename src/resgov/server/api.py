"""The control plane (FastAPI): health, keys, agents' budgets, audit. Not on the hot path."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, Depends, FastAPI, Header, Query, Request
from pydantic import BaseModel, ConfigDict, Field, StrictInt

from resgov import __version__
from resgov.config.rgf import NAME_RE
from resgov.core.errors import InvalidValue, NotFound, ResGovError, StoreUnavailable, Unauthorized
from resgov.ledger.store import ApiKeyRecord, StoreError
from resgov.server.auth import SCOPES, admin_token_matches, agent_for, key_from_headers, new_key
from resgov.server.runtime import Runtime


class Caller(BaseModel):
    """Who is asking: the admin (every org) or one org's key."""

    admin: bool
    org: str | None
    key: ApiKeyRecord | None = None
    model_config = ConfigDict(arbitrary_types_allowed=True)


def runtime(request: Request) -> Runtime:
    """The Runtime of the app serving this request."""
    rt: Runtime = request.app.state.runtime
    return rt


def caller_dep(scope: str) -> Any:
    """A FastAPI dependency: the admin token (every org) or an org key holding ``scope``."""

    async def dep(
        request: Request,
        x_admin_token: Annotated[str | None, Header()] = None,
    ) -> Caller:
        rt = runtime(request)
        if x_admin_token is not None:
            if not rt.settings.admin_enabled:
                raise Unauthorized(
                    "Admin API is disabled: set RESGOV_ADMIN_TOKEN (at least 32 characters).",
                    reason="admin_disabled",
                )
            if not admin_token_matches(rt.settings.admin_token, x_admin_token):
                raise Unauthorized("Invalid admin token.", reason="invalid_admin_token")
            return Caller(admin=True, org=None)
        headers = {k.lower().encode(): v.encode("latin-1") for k, v in request.headers.items()}
        record = await rt.keys.authenticate(key_from_headers(headers), scope)
        return Caller(admin=False, org=record.org, key=record)

    return Depends(dep)


READ_CALLER = caller_dep("read")


async def admin_only(request: Request, x_admin_token: Annotated[str | None, Header()] = None) -> None:
    """Admin routes: a valid ``X-Admin-Token`` or 401."""
    rt = runtime(request)
    if not rt.settings.admin_enabled:
        raise Unauthorized(
            "Admin API is disabled: set RESGOV_ADMIN_TOKEN (at least 32 characters).", reason="admin_disabled"
        )
    if not admin_token_matches(rt.settings.admin_token, x_admin_token):
        raise Unauthorized("Missing or invalid X-Admin-Token.", reason="invalid_admin_token")


class GenerateKeyBody(BaseModel):
    """``POST /api/v1/admin/generate-key``."""

    model_config = ConfigDict(extra="forbid")
    org_id: str = Field(pattern=NAME_RE.pattern)
    name: str = Field("default", min_length=1, max_length=128)
    scopes: list[str] | None = None
    agent_id: str | None = Field(None, pattern=NAME_RE.pattern)
    expires_in_seconds: StrictInt | None = Field(None, gt=0, le=10 * 365 * 86400)


class GeneratedKey(BaseModel):
    """The new key, shown once."""

    api_key: str
    key_id: str
    org_id: str
    name: str
    scopes: list[str]
    agent_id: str | None
    expires_at: float | None


class KeyInfo(BaseModel):
    """A key as listed: never the key itself, only its id and a short prefix."""

    key_id: str
    org_id: str
    name: str
    prefix: str
    scopes: list[str]
    agent_id: str | None
    created_at: float
    expires_at: float | None
    revoked: bool


class PauseView(BaseModel):
    """A breaker's pause, as it was when lifted."""

    reason: str
    paused_at: str
    paused_until: str | None
    evidence: dict[str, Any]


class ResumeResult(BaseModel):
    """``POST /api/v1/admin/agents/{id}/resume``."""

    agent_id: str
    org_id: str
    scope: str
    #: False when nothing was paused (resuming is idempotent).
    resumed: bool
    was_paused: PauseView | None
    #: The org-level breaker still pauses this agent (lift it with ``?scope=org``).
    org_paused: bool


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


class Health(BaseModel):
    """``GET /health``."""

    status: str
    version: str
    store: dict[str, Any]
    policy: dict[str, Any]


def _key_info(r: ApiKeyRecord) -> KeyInfo:
    return KeyInfo(
        key_id=r.key_id,
        org_id=r.org,
        name=r.name,
        prefix=r.prefix,
        scopes=list(r.scopes),
        agent_id=r.agent_id,
        created_at=r.created_at,
        expires_at=r.expires_at,
        revoked=r.revoked_at is not None,
    )


def build_router() -> APIRouter:
    """All control-plane routes."""
    router = APIRouter()

    @router.get("/health", response_model=Health, tags=["health"])
    async def health(request: Request) -> Health:
        rt = runtime(request)
        reachable = await rt.store.ping()
        rt.store_ok = reachable
        policy_ok = rt.policies.error is None
        journal = rt.journal
        return Health(
            # Fail-open calls not yet booked: the ledger is behind what was spent.
            status="ok" if reachable and policy_ok and not journal.pending else "degraded",
            version=__version__,
            store={
                "backend": rt.store.name,
                "reachable": reachable,
                "fail_open": {
                    "journal": journal.path,
                    "unbooked_calls": journal.pending,
                    "calls_let_through": journal.stats.fail_open_calls,
                    "reconciled": journal.stats.reconciled,
                    "last_error": journal.stats.last_error,
                },
            },
            policy={
                "source": rt.policy.source,
                "ok": policy_ok,
                "error": rt.policies.error,
                "reloads": rt.policies.reloads,
            },
        )

    @router.post(
        "/api/v1/admin/generate-key",
        response_model=GeneratedKey,
        dependencies=[Depends(admin_only)],
        tags=["admin"],
    )
    async def generate_key(body: GenerateKeyBody, request: Request) -> GeneratedKey:
        rt = runtime(request)
        scopes = tuple(body.scopes) if body.scopes else SCOPES
        bad = [s for s in scopes if s not in SCOPES]
        if bad:
            raise InvalidValue(
                f"Unknown scopes: {', '.join(bad)}. Known: {', '.join(SCOPES)}.", reason="invalid_scope"
            )
        expires = time.time() + body.expires_in_seconds if body.expires_in_seconds else None
        secret, record = new_key(
            body.org_id, body.name, scopes=scopes, agent_id=body.agent_id, expires_at=expires
        )
        await rt.store.put_api_key(record)
        return GeneratedKey(
            api_key=secret,
            key_id=record.key_id,
            org_id=record.org,
            name=record.name,
            scopes=list(record.scopes),
            agent_id=record.agent_id,
            expires_at=expires,
        )

    @router.get(
        "/api/v1/admin/keys", response_model=list[KeyInfo], dependencies=[Depends(admin_only)], tags=["admin"]
    )
    async def list_keys(request: Request, org_id: str | None = None) -> list[KeyInfo]:
        return [_key_info(r) for r in await runtime(request).store.list_api_keys(org_id)]

    @router.delete("/api/v1/admin/keys/{key_id}", dependencies=[Depends(admin_only)], tags=["admin"])
    async def revoke_key(key_id: str, request: Request) -> dict[str, Any]:
        rt = runtime(request)
        if not await rt.store.revoke_api_key(None, key_id):
            raise NotFound(f"No active key '{key_id}'.", reason="key_not_found")
        rt.keys.forget(key_id)
        return {"key_id": key_id, "revoked": True}

    @router.post(
        "/api/v1/admin/agents/{agent_id}/resume",
        response_model=ResumeResult,
        dependencies=[Depends(admin_only)],
        tags=["admin"],
    )
    async def resume_agent(
        agent_id: str,
        request: Request,
        org_id: Annotated[str | None, Query()] = None,
        scope: Annotated[Literal["agent", "org"], Query()] = "agent",
    ) -> ResumeResult:
        """Lift a tripped breaker (loop, spend velocity) before its cooldown, or when it has none.

        ``scope=org`` lifts the org-level pause that covers this agent (and every agent of
        its org). Resuming also forgets the scope's loop history and last minute's window, so
        the agent starts afresh instead of tripping again on the evidence that paused it.
        """
        rt = runtime(request)
        org = org_id or _only_org(rt, agent_id)
        if org is None or (org, agent_id) not in rt.policy.agents:
            raise NotFound(f"Agent '{agent_id}' not found.", reason="agent_not_found")
        was = await rt.guard.resume(org, agent_id if scope == "agent" else None)
        still = await rt.guard.pause_info(org, None) if scope == "agent" else None
        return ResumeResult(
            agent_id=agent_id,
            org_id=org,
            scope=scope,
            resumed=was is not None,
            was_paused=None
            if was is None
            else PauseView(
                reason=was.reason,
                paused_at=_iso(was.paused_at),
                paused_until=_iso(was.paused_until) if was.paused_until is not None else None,
                evidence=was.evidence,
            ),
            org_paused=still is not None,
        )

    @router.get("/v1/models", tags=["proxy"])
    async def list_models(
        request: Request, x_resgov_agent_id: Annotated[str | None, Header()] = None
    ) -> dict[str, Any]:
        """The models this key's agent may call, in OpenAI's list format."""
        rt = runtime(request)
        headers = {k.lower().encode(): v.encode("latin-1") for k, v in request.headers.items()}
        record = await rt.keys.authenticate(key_from_headers(headers), "proxy")
        policy = rt.policy
        agent = policy.agent(record.org, agent_for(record, x_resgov_agent_id))
        owners: dict[str, str] = {
            name: name.partition("/")[0] if "/" in name else "custom" for name in policy.prices.overrides
        }
        for provider in policy.providers.values():
            for model_id in policy.prices.known_models(provider.name, provider.base_url):
                owners.setdefault(f"{provider.name}/{model_id}", provider.name)
                if provider.name == policy.global_.default_provider:
                    owners.setdefault(model_id, provider.name)
        data = [
            {"id": name, "object": "model", "created": 0, "owned_by": owner}
            for name, owner in sorted(owners.items())
            if agent.model_allowed(name)
        ]
        return {"object": "list", "data": data}

    return router


def _only_org(rt: Runtime, agent_id: str) -> str | None:
    """For the admin without ``?org_id=``: the agent's org if exactly one org has that agent."""
    orgs = [org for (org, agent) in rt.policy.agents if agent == agent_id]
    if len(orgs) > 1:
        raise InvalidValue(
            f"Agent '{agent_id}' exists in several orgs; pass ?org_id=.", reason="ambiguous_agent"
        )
    return orgs[0] if orgs else None


def install_error_handlers(app: FastAPI) -> None:
    """One mapping from exceptions to JSON errors for the control plane."""
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import Response

    def json(payload: Any, status: int, headers: dict[str, str] | None = None) -> Response:
        return Response(
            orjson.dumps(payload), status_code=status, headers=headers, media_type="application/json"
        )

    @app.exception_handler(ResGovError)
    async def _resgov(_: Request, exc: ResGovError) -> Response:
        return json({"error": exc.body()}, exc.status, exc.headers)

    @app.exception_handler(StoreError)
    async def _store(_: Request, exc: StoreError) -> Response:
        err = StoreUnavailable("The ledger is unavailable; try again shortly.", reason="store_unavailable")
        return json({"error": err.body()}, err.status)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> Response:
        problems = [{"loc": list(e.get("loc", ())), "msg": e.get("msg")} for e in exc.errors()]
        json_error = any(e.get("type") == "json_invalid" for e in exc.errors())
        status = 400 if json_error else 422
        return json(
            {
                "error": {
                    "type": "invalid_request_error" if json_error else "invalid_value",
                    "message": "; ".join(f"{'.'.join(map(str, p['loc']))}: {p['msg']}" for p in problems),
                    "reason": "invalid_json" if json_error else "invalid_value",
                    "problems": problems,
                }
            },
            status,
        )
