"""The governance API: bookings, agents, usage, audit, orgs, keys, resets, adjustments, prices.

Mounted with :func:`install` (which also wires the :class:`GovernanceService` into the app's
lifespan). Every route is scoped to the caller's org: an org's key can only ever name its own
org's objects, and another org's ids answer 404 exactly like ids that do not exist. The admin
token reads across orgs and governs, but never spends (``POST /api/v1/book`` refuses it).

Money in request bodies (``cost``, ``limit_amount``, ``*_limit``, ``amount``) is read from the raw
JSON with ``parse_float=Decimal``: FastAPI would parse ``0.05`` to a binary float before any model
saw it. JSON numbers and decimal strings are both accepted and converted once, rounding up, with
:func:`resgov.core.money.parse_amount`. Responses show amounts as JSON numbers in currency units.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated, Any, Literal, TypeVar

import orjson
from fastapi import APIRouter, Depends, FastAPI, Header, Path, Query, Request
from fastapi.responses import Response, StreamingResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from resgov.config.rgf import NAME_RE
from resgov.core.budget import BudgetLine, LineState
from resgov.core.errors import (
    BadRequest,
    Forbidden,
    InvalidValue,
    NotFound,
    PayloadTooLarge,
    ResGovError,
    StoreUnavailable,
)
from resgov.core.money import AmountError, parse_amount, to_units
from resgov.core.overlay import (
    ANY,
    RESETTABLE,
    SYSTEM_ORG,
    GovernedPolicy,
    agent_source,
    base_budgets,
    calendar_window,
    ceiling,
    org_base_limits,
)
from resgov.core.windows import PERIODS, Period
from resgov.ledger.store import (
    AuditEntry,
    AuditQuery,
    GovRecord,
    ReserveRequest,
    SettleOutcome,
    SettleRequest,
    StoreError,
)
from resgov.server.api import Caller, KeyInfo, _key_info, admin_only, caller_dep, runtime
from resgov.server.auth import agent_for
from resgov.server.governance_service import GovernanceService
from resgov.server.proxy import budget_refusal
from resgov.server.runtime import Runtime

M = TypeVar("M", bound=BaseModel)

#: Request bodies of the governance API are small; this bounds what a client can make us parse.
MAX_BODY_BYTES = 1024 * 1024
MAX_METADATA_BYTES = 4096
#: An idempotent booking holds its key this long while running (a dead process's claim is then
#: taken over), and its answer is replayed for this long.
IDEM_LEASE_SECONDS = 30.0
IDEM_KEEP_SECONDS = 86_400.0
MAX_TTL_SECONDS = 86_400
MAX_ADJUSTMENT_SECONDS = 90 * 86_400
#: Where the runtime finds the service (set by :func:`install`).
RUNTIME_ATTR = "governance"

Name = Annotated[str, Field(pattern=NAME_RE.pattern)]
Money = Annotated[Decimal, Field(ge=0, le=Decimal(10) ** 12, allow_inf_nan=False)]
IdemKey = Annotated[str | None, Header(alias="Idempotency-Key", max_length=255, pattern=r"^[\x21-\x7e]+$")]
AgentPath = Annotated[str, Path(pattern=NAME_RE.pattern)]
OrgQuery = Annotated[str | None, Query(pattern=NAME_RE.pattern)]
IdPath = Annotated[str, Path(pattern=r"^[A-Za-z0-9_-]{1,64}$")]


# --- models -----------------------------------------------------------------------------------------


class _Body(BaseModel):
    # extra="forbid": a body naming ``spent``, ``org``, ``limit``… is refused (no mass assignment).
    model_config = ConfigDict(extra="forbid")


class ErrorBody(BaseModel):
    """The ``error`` object every refusal carries."""

    model_config = ConfigDict(extra="allow")
    type: str
    message: str
    reason: str


class ErrorResponse(BaseModel):
    """Every 4xx/5xx answer of ResGov."""

    error: ErrorBody


class BookBody(_Body):
    """``POST /api/v1/book``."""

    agent_id: Name | None = None
    resource_type: str = Field(min_length=1, max_length=128)
    action: str = Field(min_length=1, max_length=256)
    cost: Money
    metadata: dict[str, Any] | None = None
    phase: Literal["book", "reserve"] = "book"
    ttl_seconds: StrictInt | None = Field(None, ge=1, le=MAX_TTL_SECONDS)
    allow_overage: StrictBool = False


class CommitBody(_Body):
    """``POST /api/v1/bookings/{id}/commit``."""

    cost: Money
    metadata: dict[str, Any] | None = None


class RenewBody(_Body):
    """``POST /api/v1/bookings/{id}/renew``."""

    ttl_seconds: StrictInt | None = Field(None, ge=1, le=MAX_TTL_SECONDS)


class EmptyBody(_Body):
    """A body with nothing to say (``{}`` or none)."""


class AgentCreate(_Body):
    """``POST /api/v1/agents``."""

    agent_id: Name
    name: str = Field("", max_length=200)
    description: str = Field("", max_length=2000)
    hourly_limit: Money | None = None
    daily_limit: Money | None = None
    weekly_limit: Money | None = None
    monthly_limit: Money | None = None
    total_limit: Money | None = None
    allowed_models: list[Annotated[str, Field(min_length=1, max_length=256)]] | None = Field(
        None, max_length=256
    )
    allowed_tools: list[Annotated[str, Field(min_length=1, max_length=256)]] | None = Field(
        None, max_length=256
    )
    max_tokens_per_request: StrictInt | None = Field(None, ge=1, le=10_000_000)


class BudgetPut(_Body):
    """``PUT /api/v1/agents/{id}/budget``: ``limit_amount`` null removes the API's setting."""

    period: Period
    limit_amount: Money | None


class OrgCreate(_Body):
    """``POST /api/v1/admin/orgs``."""

    org_id: Name
    name: str = Field("", max_length=200)
    hourly_limit: Money | None = None
    daily_limit: Money | None = None
    weekly_limit: Money | None = None
    monthly_limit: Money | None = None
    total_limit: Money | None = None


class ResetBody(_Body):
    """``POST /api/v1/admin/reset-daily``: no org = every org."""

    org_id: Name | None = None
    agent_id: Name | None = None
    periods: list[Literal["hourly", "daily", "weekly", "monthly"]] | None = Field(
        None, min_length=1, max_length=4
    )


class AdjustmentBody(_Body):
    """``POST /api/v1/admin/budget-adjustments``."""

    org_id: Name
    agent_id: Name | None = None
    period: Period
    mode: Literal["topup", "override"]
    amount: Money
    expires_in_seconds: StrictInt | None = Field(None, ge=1, le=MAX_ADJUSTMENT_SECONDS)
    reason: str = Field(min_length=1, max_length=500)


class PriceRefreshBody(_Body):
    """``POST /api/v1/admin/price-cache/refresh``."""

    url: str | None = Field(None, min_length=8, max_length=2048, pattern=r"^https?://\S+$")


class PurgeBody(_Body):
    """``POST /api/v1/admin/audit/purge``."""

    older_than_days: Annotated[Decimal, Field(gt=0, le=36_500, allow_inf_nan=False)]
    org_id: Name | None = None


class BudgetWindow(BaseModel):
    """One budget, in its current window."""

    level: str
    period: str
    limit: float
    spent: float
    reserved: float
    remaining: float
    currency: str
    window_start: str
    resets_at: str | None


class AgentInfo(BaseModel):
    """An agent: where it is defined, its standing limits, its budgets now."""

    agent_id: str
    org_id: str
    source: Literal["rgf", "api"]
    name: str
    description: str
    limits: dict[str, float]
    ceilings: dict[str, float | None]
    budgets: list[BudgetWindow]
    allowed_models: list[str] | None
    allowed_tools: list[str] | None
    max_tokens_per_request: int | None
    created_at: float | None


class AgentList(BaseModel):
    """``GET /api/v1/agents``."""

    items: list[AgentInfo]


class Deleted(BaseModel):
    """A deletion."""

    id: str
    org_id: str
    deleted: bool


class BookResult(BaseModel):
    """``POST /api/v1/book`` and the booking endpoints."""

    status: Literal["booked", "reserved", "committed", "released"]
    booking_id: str
    org_id: str
    agent_id: str
    resource_type: str
    action: str
    currency: str
    cost: float
    reserved: float
    refund: float = 0.0
    overage: bool = False
    allow_overage: StrictBool = False
    expires_at: str | None = None
    remaining: float | None
    budgets: list[BudgetWindow]


class BookingInfo(BaseModel):
    """``GET /api/v1/bookings/{id}``."""

    booking_id: str
    org_id: str
    agent_id: str
    status: str
    resource_type: str
    action: str
    reserved: float
    cost: float
    overage: bool
    allow_overage: bool
    metadata: dict[str, Any] | None
    created_at: float
    finished_at: float | None


class AuditItem(BaseModel):
    """One audit record (amounts in currency units)."""

    seq: int
    request_id: str
    org: str
    agent: str
    kind: str
    route: str
    model: str
    provider: str
    status: str
    reason: str | None
    http_status: int | None
    reserved: float
    actual: float
    overage: bool
    estimated: bool
    expired: bool
    input_tokens: int | None
    output_tokens: int | None
    upstream_request_id: str | None
    started_at: float
    finished_at: float | None
    detail: dict[str, Any] | None


class AuditPage(BaseModel):
    """``GET /api/v1/audit``: one page; pass ``next_cursor`` back as ``cursor`` for the next."""

    items: list[AuditItem]
    next_cursor: str | None
    #: The same cursor as a sequence number for ``?after=`` (ascending order only; compatibility).
    next_after: int | None


class UsageInfo(BaseModel):
    """``GET /api/v1/usage/{agent_id}``."""

    agent_id: str
    org_id: str
    currency: str
    windows: list[BudgetWindow]
    remaining: float | None
    reserved: float
    recent_calls: list[AuditItem]


class OrgInfo(BaseModel):
    """An organisation."""

    org_id: str
    source: Literal["rgf", "api"]
    name: str
    limits: dict[str, float]
    agents: int


class OrgList(BaseModel):
    """``GET /api/v1/admin/orgs``."""

    items: list[OrgInfo]


class ResetResult(BaseModel):
    """``POST /api/v1/admin/reset-daily``."""

    org_id: str | None
    agent_id: str | None
    periods: list[str]
    reset_at: str
    at: int


class AdjustmentInfo(BaseModel):
    """A top-up or override."""

    id: str
    org_id: str
    agent_id: str | None
    period: str
    mode: str
    amount: float
    currency: str
    created_at: float
    expires_at: float
    active: bool
    reason: str


class AdjustmentList(BaseModel):
    """``GET /api/v1/admin/budget-adjustments``."""

    items: list[AdjustmentInfo]


class PriceStatus(BaseModel):
    """The refreshed price cache."""

    ok: bool
    source: str | None
    models: int
    fetched_at: float | None
    error: str | None = None


class PurgeResult(BaseModel):
    """``POST /api/v1/admin/audit/purge``."""

    deleted: int


class KeyList(BaseModel):
    """``GET /api/v1/keys``."""

    items: list[KeyInfo]


# --- plumbing ---------------------------------------------------------------------------------------


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    return {code: {"model": ErrorResponse} for code in (*codes, 400, 401, 422, 503)}


def _body_doc(model: type[BaseModel], required: bool = True) -> dict[str, Any]:
    """The OpenAPI request body of a route that reads its JSON itself (for Decimal-exact money)."""
    return {
        "requestBody": {
            "required": required,
            "content": {"application/json": {"schema": model.model_json_schema()}},
        }
    }


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number")


async def read_json(request: Request, model: type[M], *, optional: bool = False) -> M:
    """Read and validate a JSON body with floats parsed as Decimal; 400/413/422 like every route."""
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > MAX_BODY_BYTES:
            raise PayloadTooLarge(
                f"Request body larger than {MAX_BODY_BYTES} bytes.", reason="request_too_large"
            )
    if not raw and optional:
        # Only a truly absent body means "no options"; whitespace is not JSON (400 below).
        raw = b"{}"
    try:
        data = json.loads(raw, parse_float=Decimal, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as exc:
        raise BadRequest(f"Invalid JSON body: {exc}", reason="invalid_json") from exc
    if not isinstance(data, dict):
        raise InvalidValue("The body must be a JSON object.", reason="invalid_value")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = [{"loc": list(e.get("loc", ())), "msg": e.get("msg")} for e in exc.errors()]
        message = "; ".join(f"{'.'.join(map(str, p['loc']))}: {p['msg']}" for p in problems)
        raise InvalidValue(message or "invalid body", reason="invalid_value", problems=problems) from exc


def _jsonable(value: Any) -> Any:
    """Metadata as stored: Decimals (from the exact parse) back to JSON numbers."""
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() and abs(value) < 2**53 else float(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


def _metadata(value: dict[str, Any] | None) -> dict[str, Any] | None:
    if value is None:
        return None
    clean = _jsonable(value)
    if len(orjson.dumps(clean)) > MAX_METADATA_BYTES:
        raise InvalidValue(
            f"metadata is larger than {MAX_METADATA_BYTES} bytes.", reason="metadata_too_large"
        )
    return dict(clean)


def _nano(value: Decimal) -> int:
    try:
        return parse_amount(value)
    except AmountError as exc:
        raise InvalidValue(str(exc), reason="invalid_amount") from exc


def _iso(ts: float | int) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


def _json(payload: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> Response:
    return Response(orjson.dumps(payload), status_code=status, headers=dict(headers or {}),
                    media_type="application/json")  # fmt: skip


def service(request: Request) -> GovernanceService:
    """The governance service of the app serving this request."""
    svc: GovernanceService = request.app.state.governance
    return svc


PROXY = caller_dep("proxy")
READ = caller_dep("read")
WRITE = caller_dep("write")
ADMIN = [Depends(admin_only)]


def _not_found(what: str, ident: str, reason: str) -> NotFound:
    return NotFound(f"{what} '{ident}' not found.", reason=reason)


def _org_of(
    caller: Caller, org_id: str | None, policy: GovernedPolicy, agent_id: str | None, *, write: bool
) -> str:
    """The org a call acts in: the key's own (``org_id`` cannot widen it), or the admin's ``?org_id=``.

    Admin writes naming an agent must name its org; an admin read may leave it out when exactly
    one org has that agent (what ``GET /api/v1/agents/{id}`` always allowed).
    """
    if not caller.admin:
        assert caller.org is not None
        if write and org_id not in (None, caller.org):
            # A write aimed at another org must not silently land in the caller's own.
            raise _not_found("Org", org_id or "", "org_not_found")
        return caller.org
    if org_id:
        return org_id
    if write or agent_id is None:
        raise InvalidValue(
            "Admin calls naming an agent must name its org: add ?org_id=.", reason="org_id_required"
        )
    orgs = sorted({org for (org, agent) in policy.agents if agent == agent_id})
    if len(orgs) > 1:
        raise InvalidValue(
            f"Agent '{agent_id}' exists in several orgs; pass ?org_id=.", reason="ambiguous_agent"
        )
    if not orgs:
        raise _not_found("Agent", agent_id, "agent_not_found")
    return orgs[0]


def _check_bound(caller: Caller, agent_id: str) -> None:
    """A key bound to one agent sees only that agent (anything else is 'not found')."""
    if caller.key is not None and caller.key.agent_id not in (None, agent_id):
        raise _not_found("Agent", agent_id, "agent_not_found")


def _no_bound_writes(caller: Caller) -> None:
    if caller.key is not None and caller.key.agent_id is not None:
        raise Forbidden(
            "This API key is bound to an agent; managing agents and budgets needs an org key.",
            type="agent_bound_key", reason="agent_bound_key",
        )  # fmt: skip


def _windows(
    lines: Sequence[BudgetLine], states: Mapping[str, LineState], currency: str
) -> list[BudgetWindow]:
    out = []
    for line in lines:
        state = states.get(line.key, LineState())
        out.append(
            BudgetWindow(
                level=line.level, period=line.period, limit=to_units(line.limit), spent=to_units(state.spent),
                reserved=to_units(state.reserved), remaining=to_units(max(0, line.limit - state.used)),
                currency=currency, window_start=_iso(line.window_start),
                resets_at=_iso(line.resets_at) if line.resets_at else None,
            )
        )  # fmt: skip
    return out


def _audit_item(seq: int, entry: AuditEntry) -> AuditItem:
    data = entry.public()
    data["reserved"], data["actual"] = to_units(entry.reserved), to_units(entry.actual)
    return AuditItem(seq=seq, **data)


async def _agent_info(rt: Runtime, svc: GovernanceService, org: str, agent_id: str) -> AgentInfo:
    policy = svc.policy
    base = policy.base or policy
    snap = policy.overlay
    source = agent_source(base, snap, org, agent_id)
    agent = policy.agents.get((org, agent_id))
    if source is None or agent is None:
        raise _not_found("Agent", agent_id, "agent_not_found")
    lines = policy.budget_lines(agent, datetime.now(UTC))
    states = await rt.store.line_states(org, [line.key for line in lines])
    api = snap.agents.get((org, agent_id)) if source == "api" else None
    ceilings = {p: ceiling(base, snap, org, agent_id, p) for p in PERIODS}
    return AgentInfo(
        agent_id=agent_id, org_id=org, source=source, name=api.name if api else agent_id,
        description=api.description if api else "",
        limits={p: to_units(v) for p, v in base_budgets(base, snap, org, agent_id).items()},
        ceilings={p: to_units(v) if v is not None else None for p, v in ceilings.items()},
        budgets=_windows(lines, states, policy.global_.currency),
        allowed_models=list(agent.allowed_models) if agent.allowed_models is not None else None,
        allowed_tools=list(agent.allowed_tools) if agent.allowed_tools is not None else None,
        max_tokens_per_request=agent.max_tokens_per_request, created_at=api.created_at if api else None,
    )  # fmt: skip


def _limits_of(body: AgentCreate | OrgCreate) -> dict[Period, int]:
    out: dict[Period, int] = {}
    for period in PERIODS:
        value = getattr(body, f"{period}_limit")
        if value is not None:
            out[period] = _nano(value)
    return out


def _ceiling_refusal(period: str, asked: int, cap: int, currency: str, agent_id: str) -> Forbidden:
    from resgov.core.money import format_money

    return Forbidden(
        f"The {period} limit {format_money(asked, currency)} is above what the policy file allows "
        f"({format_money(cap, currency)}); only an admin top-up or override can go above it.",
        type="ceiling_exceeded", reason="ceiling_exceeded", agent_id=agent_id,
    )  # fmt: skip


def _org_known(policy: GovernedPolicy, org: str) -> bool:
    base = policy.base or policy
    return org in base.orgs or org in policy.overlay.orgs or any(o == org for o, _ in policy.agents)


async def _shielded(rt: Runtime, factory: Callable[[], Awaitable[Any]]) -> Any:
    """Run money work so that a client going away cannot cut it in half."""
    return await rt.shielded(factory)


# --- bookings ---------------------------------------------------------------------------------------


def _book_fingerprint(agent_id: str, body: BookBody) -> str:
    canonical = body.model_dump(mode="json")
    canonical["agent_id"] = agent_id
    canonical["cost"] = str(_nano(body.cost))  # 0.05 and "0.050" are the same request
    canonical["metadata"] = _jsonable(body.metadata)
    return hashlib.sha256(b"book\x00" + orjson.dumps(canonical, option=orjson.OPT_SORT_KEYS)).hexdigest()


async def _result(
    rt: Runtime, policy: GovernedPolicy, entry: AuditEntry, status: str, *, outcome: SettleOutcome | None = None,
    states: Mapping[str, LineState] | None = None, expires_at: float | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The answer of a booking operation, with the budgets covering its agent now."""
    agent = policy.agents.get((entry.org, entry.agent))
    lines = policy.budget_lines(agent, datetime.now(UTC)) if agent else []
    keys = [line.key for line in lines]
    if states is None or any(k not in states for k in keys):
        states = await rt.store.line_states(entry.org, keys)
    windows = _windows(lines, states, policy.global_.currency)
    detail = entry.detail or {}
    remaining = min(
        (max(0, line.limit - states.get(line.key, LineState()).used) for line in lines), default=None
    )
    cost = outcome.charged if outcome is not None else (entry.actual if status != "reserved" else 0)
    return BookResult(
        status=status, booking_id=entry.request_id, org_id=entry.org, agent_id=entry.agent,
        resource_type=entry.provider, action=entry.model, currency=policy.global_.currency, cost=to_units(cost),
        reserved=to_units(entry.reserved), refund=to_units(outcome.refund) if outcome else 0.0,
        overage=bool(outcome.overage) if outcome else entry.overage, allow_overage=bool(detail.get("allow_overage")),
        expires_at=_iso(expires_at) if expires_at else None,
        remaining=to_units(remaining) if remaining is not None else None, budgets=windows,
    ).model_dump(mode="json")  # fmt: skip


async def _record_refusal(rt: Runtime, entry: AuditEntry, err: ResGovError) -> None:
    entry.status, entry.reason, entry.http_status = "denied", err.reason, err.status
    entry.finished_at = time.time()
    # The refusal stands even if its record is lost (the store is down anyway).
    with contextlib.suppress(StoreError):
        await rt.store.record(entry)


async def _book_once(
    rt: Runtime, svc: GovernanceService, org: str, agent_id: str, body: BookBody, booking_id: str,
    idem_key: str | None, progress: dict[str, bool] | None = None,
) -> tuple[int, dict[str, Any]]:  # fmt: skip
    """Check, reserve and (one-phase) settle one booking. Policy refusals are answers (403), not errors."""
    policy = svc.policy
    now = time.time()
    detail: dict[str, Any] = {"phase": body.phase, "resource_type": body.resource_type, "action": body.action}
    if body.metadata is not None:
        detail["metadata"] = _metadata(body.metadata)
    if body.phase == "reserve":
        detail["allow_overage"] = body.allow_overage
    if idem_key:
        detail["idempotency_key"] = idem_key
    entry = AuditEntry(
        request_id=booking_id, org=org, agent=agent_id, kind="booking", route="/api/v1/book", model=body.action,
        provider=body.resource_type, started_at=now, detail=detail,
    )  # fmt: skip
    amount = _nano(body.cost)
    try:
        agent = policy.agent(org, agent_id)
        agent.check_tools([body.action])
    except Forbidden as err:
        await _record_refusal(rt, entry, err)
        return err.status, {"error": err.body()}
    lines = policy.budget_lines(agent, datetime.fromtimestamp(now, UTC))
    ttl = float(body.ttl_seconds or policy.global_.reservation_ttl_seconds)
    if progress is not None:
        progress["money"] = True
    outcome = await rt.store.reserve(ReserveRequest(booking_id, org, agent_id, amount, lines, ttl, entry))
    if not outcome.ok:
        line = outcome.refused
        assert line is not None
        used = outcome.states.get(line.key, LineState()).used
        refusal = budget_refusal(line, used, amount, policy.global_.currency, agent_id)
        await _record_refusal(rt, entry, refusal)
        return refusal.status, {"error": refusal.body()}
    entry.reserved = amount
    if body.phase == "reserve":
        return 200, await _result(rt, policy, entry, "reserved", states=outcome.states, expires_at=now + ttl)
    settled = await rt.store.settle(SettleRequest(booking_id, "actual", amount, "completed", http_status=200))
    return 200, await _result(rt, policy, entry, "booked", outcome=settled, states=settled.states)


async def _recover(
    rt: Runtime, svc: GovernanceService, org: str, previous: str, body: BookBody
) -> tuple[int, dict[str, Any]] | None:
    """An earlier attempt with this idempotency key died mid-way: finish or reuse what it did.

    Its reservation id is known, so nothing is charged twice: a booking it reserved and never
    settled is settled now (a one-phase booking's cost is its reservation); one it completed is
    answered from its record. If it reserved nothing, None: the booking is made afresh.
    """
    entry = await rt.store.get_audit(org, previous)
    if entry is None or entry.kind != "booking":
        return None
    policy = svc.policy
    if entry.status == "in_flight":
        if body.phase == "reserve":
            return 200, await _result(rt, policy, entry, "reserved")
        settled = await rt.store.settle(
            SettleRequest(previous, "actual", entry.reserved, "completed", http_status=200)
        )
        if settled.settled:
            entry.actual = settled.charged
            return 200, await _result(rt, policy, entry, "booked", outcome=settled, states=settled.states)
        entry = await rt.store.get_audit(org, previous) or entry
    if entry.status == "completed" or (entry.status == "expired" and entry.actual > 0):
        return 200, await _result(rt, policy, entry, "booked" if body.phase == "book" else "committed")
    return None


def build_router() -> APIRouter:
    """Every governance route (see the module docstring and the README's API section)."""
    router = APIRouter()

    # -- bookings ----------------------------------------------------------------------------------

    @router.post(
        "/api/v1/book", response_model=BookResult, tags=["bookings"], openapi_extra=_body_doc(BookBody),
        responses=_errors(403, 409, 413),
        summary="Book a non-LLM resource (one phase) or reserve it (two phases)",
    )  # fmt: skip
    async def book(request: Request, idempotency_key: IdemKey = None, caller: Caller = PROXY) -> Response:
        """Charge ``cost`` against every budget of the agent, atomically; ``phase: reserve`` holds it instead."""
        rt, svc = runtime(request), service(request)
        if caller.key is None:
            raise Forbidden("The admin token governs but never spends: book with an org's key.",
                            type="admin_cannot_spend", reason="admin_cannot_spend")  # fmt: skip
        body = await read_json(request, BookBody)
        org = caller.key.org
        agent_id = agent_for(caller.key, body.agent_id)
        booking_id = "bk_" + uuid.uuid4().hex
        if not idempotency_key:
            status, payload = await _shielded(
                rt, lambda: _book_once(rt, svc, org, agent_id, body, booking_id, None)
            )
            return _json(payload, status)
        fingerprint = _book_fingerprint(agent_id, body)
        claim = await rt.store.idem_claim(org, idempotency_key, fingerprint, booking_id, IDEM_LEASE_SECONDS,
                                          IDEM_KEEP_SECONDS)  # fmt: skip
        if claim.state == "mismatch":
            raise InvalidValue("This Idempotency-Key was already used with a different request.",
                               reason="idempotency_key_reused")  # fmt: skip
        if claim.state == "in_flight":
            raise ResGovError("A request with this Idempotency-Key is still in progress; retry shortly.",
                              type="idempotency_in_flight", reason="idempotency_in_flight", status=409,
                              headers={"Retry-After": "1"})  # fmt: skip
        if claim.state == "done":
            return Response(claim.body or "{}", status_code=claim.status or 200, media_type="application/json",
                            headers={"Idempotent-Replayed": "true"})  # fmt: skip

        async def run() -> tuple[int, dict[str, Any]]:
            # Set once money may have moved (a reservation may exist): from then on a failure keeps
            # the claim, so a retry takes it over when its lease ends and _recover finishes that
            # reservation instead of booking a second time.
            progress = {"money": False}
            try:
                answer = None
                if claim.previous_owner:
                    progress["money"] = True
                    answer = await _recover(rt, svc, org, claim.previous_owner, body)
                    progress["money"] = False
                if answer is None:
                    answer = await _book_once(
                        rt, svc, org, agent_id, body, booking_id, idempotency_key, progress
                    )
            except BaseException:
                if not progress["money"]:
                    with contextlib.suppress(StoreError):  # the original error wins
                        await rt.store.idem_release(org, idempotency_key, booking_id)
                raise
            status, payload = answer
            await rt.store.idem_complete(org, idempotency_key, booking_id, status,
                                         orjson.dumps(payload).decode(), IDEM_KEEP_SECONDS)  # fmt: skip
            return status, payload

        status, payload = await _shielded(rt, run)
        return _json(payload, status)

    async def _open_booking(request: Request, caller: Caller, booking_id: str) -> tuple[Runtime, AuditEntry]:
        rt = runtime(request)
        if caller.key is None:
            raise Forbidden("The admin token governs but never spends: use an org's key.",
                            type="admin_cannot_spend", reason="admin_cannot_spend")  # fmt: skip
        entry = await rt.store.get_audit(caller.key.org, booking_id)
        if entry is None or entry.kind != "booking" or (caller.key.agent_id not in (None, entry.agent)):
            raise _not_found("Booking", booking_id, "booking_not_found")
        if entry.status != "in_flight":
            raise ResGovError(f"Booking '{booking_id}' is no longer open (it is {entry.status}).",
                              type="booking_not_open", reason="booking_not_open", status=409)  # fmt: skip
        return rt, entry

    def _closed(booking_id: str) -> ResGovError:
        return ResGovError(f"Booking '{booking_id}' was settled meanwhile (expired or committed elsewhere).",
                           type="booking_not_open", reason="booking_not_open", status=409)  # fmt: skip

    @router.get("/api/v1/bookings/{booking_id}", response_model=BookingInfo, tags=["bookings"],
                responses=_errors(403, 404))  # fmt: skip
    async def get_booking(booking_id: IdPath, request: Request, caller: Caller = READ,
                          org_id: OrgQuery = None) -> BookingInfo:  # fmt: skip
        """A booking's state: reserved (open), completed, released, expired or denied."""
        rt = runtime(request)
        org = caller.org if not caller.admin else org_id
        if org is None:
            raise InvalidValue("Admin calls naming a booking must name its org: add ?org_id=.",
                               reason="org_id_required")  # fmt: skip
        entry = await rt.store.get_audit(org, booking_id)
        if entry is None or entry.kind != "booking" or (caller.key is not None and caller.key.agent_id
                                                         not in (None, entry.agent)):  # fmt: skip
            raise _not_found("Booking", booking_id, "booking_not_found")
        detail = entry.detail or {}
        return BookingInfo(
            booking_id=entry.request_id, org_id=entry.org, agent_id=entry.agent,
            status="reserved" if entry.status == "in_flight" else entry.status, resource_type=entry.provider,
            action=entry.model, reserved=to_units(entry.reserved), cost=to_units(entry.actual),
            overage=entry.overage, allow_overage=bool(detail.get("allow_overage")),
            metadata=detail.get("metadata"), created_at=entry.started_at, finished_at=entry.finished_at,
        )  # fmt: skip

    @router.post("/api/v1/bookings/{booking_id}/commit", response_model=BookResult, tags=["bookings"],
                 openapi_extra=_body_doc(CommitBody), responses=_errors(403, 404, 409, 413))  # fmt: skip
    async def commit_booking(booking_id: IdPath, request: Request, caller: Caller = PROXY) -> Response:
        """Charge the real cost of a reserved booking (above the reservation only with ``allow_overage``)."""
        rt, entry = await _open_booking(request, caller, booking_id)
        body = await read_json(request, CommitBody)
        amount = _nano(body.cost)
        detail = dict(entry.detail or {})
        if detail.get("phase") != "reserve":
            raise ResGovError("Only a booking made with phase 'reserve' can be committed.",
                              type="booking_not_open", reason="booking_not_open", status=409)  # fmt: skip
        if amount > entry.reserved and not detail.get("allow_overage"):
            raise ResGovError(
                f"The cost {to_units(amount)} is above the reserved {to_units(entry.reserved)}; reserve with "
                "allow_overage to record the excess as flagged overage.",
                type="commit_above_reservation", reason="commit_above_reservation", status=409,
            )  # fmt: skip
        if body.metadata is not None:
            detail["commit_metadata"] = _metadata(body.metadata)
        request_ = SettleRequest(booking_id, "actual", amount, "completed", reason="overage" if amount >
                                 entry.reserved else None, http_status=200, detail=detail)  # fmt: skip
        outcome: SettleOutcome = await _shielded(rt, lambda: rt.store.settle(request_))
        if not outcome.settled:
            raise _closed(booking_id)
        entry.actual, entry.detail = outcome.charged, detail
        svc = service(request)
        return _json(
            await _result(rt, svc.policy, entry, "committed", outcome=outcome, states=outcome.states)
        )

    @router.post("/api/v1/bookings/{booking_id}/release", response_model=BookResult, tags=["bookings"],
                 openapi_extra=_body_doc(EmptyBody, required=False), responses=_errors(403, 404, 409, 413))  # fmt: skip
    async def release_booking(booking_id: IdPath, request: Request, caller: Caller = PROXY) -> Response:
        """Give a reserved booking back in full (nothing charged)."""
        rt, entry = await _open_booking(request, caller, booking_id)
        await read_json(request, EmptyBody, optional=True)
        request_ = SettleRequest(booking_id, "release", 0, "released", reason="released", http_status=200)
        outcome: SettleOutcome = await _shielded(rt, lambda: rt.store.settle(request_))
        if not outcome.settled:
            raise _closed(booking_id)
        entry.actual = 0
        return _json(await _result(rt, service(request).policy, entry, "released", outcome=outcome,
                                   states=outcome.states))  # fmt: skip

    @router.post("/api/v1/bookings/{booking_id}/renew", response_model=BookResult, tags=["bookings"],
                 openapi_extra=_body_doc(RenewBody, required=False), responses=_errors(403, 404, 409, 413))  # fmt: skip
    async def renew_booking(booking_id: IdPath, request: Request, caller: Caller = PROXY) -> Response:
        """Extend a reserved booking's lease by ``ttl_seconds`` (default: the booking's own TTL)."""
        rt, entry = await _open_booking(request, caller, booking_id)
        body = await read_json(request, RenewBody, optional=True)
        policy = service(request).policy
        ttl = float(body.ttl_seconds or (entry.detail or {}).get("ttl_seconds")
                    or policy.global_.reservation_ttl_seconds)  # fmt: skip
        await rt.store.renew([booking_id], ttl)
        return _json(await _result(rt, policy, entry, "reserved", expires_at=time.time() + ttl))

    # -- agents ------------------------------------------------------------------------------------

    @router.get("/api/v1/agents", response_model=AgentList, tags=["agents"], responses=_errors(403))
    async def list_agents(request: Request, caller: Caller = READ, org_id: OrgQuery = None) -> AgentList:
        """The org's agents, from the policy file and the API alike (admin: every org, or ``?org_id=``)."""
        rt, svc = runtime(request), service(request)
        policy = svc.policy
        org = org_id if caller.admin else caller.org
        keys = sorted(k for k in policy.agents if (org is None or k[0] == org))
        if caller.key is not None and caller.key.agent_id is not None:
            keys = [k for k in keys if k[1] == caller.key.agent_id]
        return AgentList(items=[await _agent_info(rt, svc, o, a) for o, a in keys])

    @router.post("/api/v1/agents", response_model=AgentInfo, status_code=201, tags=["agents"],
                 openapi_extra=_body_doc(AgentCreate), responses=_errors(403, 404, 409, 413))  # fmt: skip
    async def create_agent(request: Request, caller: Caller = WRITE, org_id: OrgQuery = None) -> AgentInfo:
        """Register an agent in the org (ids are unique per org); self-service limits stay under the file's."""
        rt, svc = runtime(request), service(request)
        _no_bound_writes(caller)
        body = await read_json(request, AgentCreate)
        policy = svc.policy
        org = _org_of(caller, org_id, policy, None, write=True)
        if caller.admin and not _org_known(policy, org):
            raise _not_found("Org", org, "org_not_found")
        base, snap = policy.base or policy, policy.overlay
        if agent_source(base, snap, org, body.agent_id) is not None:
            raise ResGovError(f"Agent '{body.agent_id}' already exists in this org.", type="conflict",
                              reason="agent_exists", status=409)  # fmt: skip
        limits = _limits_of(body)
        currency = policy.global_.currency
        if not caller.admin:
            for period, asked in limits.items():
                cap = ceiling(base, snap, org, body.agent_id, period)
                if cap is not None and asked > cap:
                    raise _ceiling_refusal(period, asked, cap, currency, body.agent_id)
        if not limits and not org_base_limits(base, snap, org):
            raise InvalidValue("Neither the agent nor its org would have any budget: give it a limit.",
                               reason="unbounded_budget")  # fmt: skip
        now = time.time()
        data = {
            "gen": uuid.uuid4().hex, "name": body.name, "description": body.description, "budgets": limits,
            "allowed_models": body.allowed_models, "allowed_tools": body.allowed_tools,
            "max_tokens_per_request": body.max_tokens_per_request, "created_at": now,
        }  # fmt: skip
        if not await svc.put(GovRecord(org, "agent", body.agent_id, data, now), if_absent=True):
            raise ResGovError(f"Agent '{body.agent_id}' already exists in this org.", type="conflict",
                              reason="agent_exists", status=409)  # fmt: skip
        await svc.audit_event(org, body.agent_id, "/api/v1/agents", "agent_created",
                              {"limits": {p: v for p, v in limits.items()}}, admin=caller.admin)  # fmt: skip
        return await _agent_info(rt, svc, org, body.agent_id)

    @router.get(
        "/api/v1/agents/{agent_id}", response_model=AgentInfo, tags=["agents"], responses=_errors(403, 404)
    )
    async def get_agent(agent_id: AgentPath, request: Request, caller: Caller = READ,
                        org_id: OrgQuery = None) -> AgentInfo:  # fmt: skip
        """One agent with its budgets now (``level``, ``period``, ``limit``, ``spent``, ``reserved``…)."""
        rt, svc = runtime(request), service(request)
        _check_bound(caller, agent_id)
        org = _org_of(caller, org_id, svc.policy, agent_id, write=False)
        return await _agent_info(rt, svc, org, agent_id)

    @router.delete("/api/v1/agents/{agent_id}", response_model=Deleted, tags=["agents"],
                   responses=_errors(403, 404, 409))  # fmt: skip
    async def delete_agent(agent_id: AgentPath, request: Request, caller: Caller = WRITE,
                           org_id: OrgQuery = None) -> Deleted:  # fmt: skip
        """Remove an API-registered agent (calls in flight finish and settle; new ones are refused)."""
        svc = service(request)
        _no_bound_writes(caller)
        policy = svc.policy
        org = _org_of(caller, org_id, policy, agent_id, write=True)
        source = agent_source(policy.base or policy, policy.overlay, org, agent_id)
        if source is None:
            raise _not_found("Agent", agent_id, "agent_not_found")
        if source == "rgf":
            raise ResGovError(f"Agent '{agent_id}' is defined in the policy file; remove it there.",
                              type="conflict", reason="agent_defined_in_policy_file", status=409)  # fmt: skip
        if not await svc.delete(org, "agent", agent_id):
            raise _not_found("Agent", agent_id, "agent_not_found")
        # Its settings and adjustments would not apply to a re-created agent anyway (generations
        # for settings); removing them keeps the store tidy. Best effort: a failure changes nothing.
        for period in PERIODS:
            await svc.store.gov_delete(org, "budget", f"{agent_id}:{period}")
        for adj in policy.overlay.adjustment_list():
            if adj.org == org and adj.agent_id == agent_id:
                await svc.store.gov_delete(org, "adjustment", adj.id)
        await svc.refresh(force=True)
        await svc.audit_event(
            org, agent_id, f"/api/v1/agents/{agent_id}", "agent_deleted", {}, admin=caller.admin
        )
        return Deleted(id=agent_id, org_id=org, deleted=True)

    @router.put("/api/v1/agents/{agent_id}/budget", response_model=AgentInfo, tags=["agents"],
                openapi_extra=_body_doc(BudgetPut), responses=_errors(403, 404, 413))  # fmt: skip
    async def put_budget(agent_id: AgentPath, request: Request, caller: Caller = WRITE,
                         org_id: OrgQuery = None) -> AgentInfo:  # fmt: skip
        """Set one period's limit; an org's key cannot go above the policy file's ceiling."""
        rt, svc = runtime(request), service(request)
        _no_bound_writes(caller)
        body = await read_json(request, BudgetPut)
        policy = svc.policy
        org = _org_of(caller, org_id, policy, agent_id, write=True)
        base, snap = policy.base or policy, policy.overlay
        source = agent_source(base, snap, org, agent_id)
        if source is None:
            raise _not_found("Agent", agent_id, "agent_not_found")
        limit = _nano(body.limit_amount) if body.limit_amount is not None else None
        if limit is not None and not caller.admin:
            cap = ceiling(base, snap, org, agent_id, body.period)
            if cap is not None and limit > cap:
                raise _ceiling_refusal(body.period, limit, cap, policy.global_.currency, agent_id)
        gen = "rgf" if source == "rgf" else snap.agents[(org, agent_id)].gen
        key = f"{agent_id}:{body.period}"
        if limit is None and source == "rgf" and not caller.admin:
            await svc.delete(org, "budget", key)  # back to the file's own limit
        else:
            if limit is None:
                remaining = {
                    p: v for p, v in base_budgets(base, snap, org, agent_id).items() if p != body.period
                }
                if not remaining and not org_base_limits(base, snap, org):
                    raise InvalidValue("Removing this limit would leave the agent without any budget.",
                                       reason="unbounded_budget")  # fmt: skip
            data = {"limit": limit, "gen": gen, "by_admin": caller.admin, "updated_at": time.time()}
            await svc.put(GovRecord(org, "budget", key, data))
        await svc.audit_event(org, agent_id, f"/api/v1/agents/{agent_id}/budget", "budget_set",
                              {"period": body.period, "limit": limit}, admin=caller.admin)  # fmt: skip
        return await _agent_info(rt, svc, org, agent_id)

    # -- usage and audit ---------------------------------------------------------------------------

    @router.get(
        "/api/v1/usage/{agent_id}", response_model=UsageInfo, tags=["agents"], responses=_errors(403, 404)
    )
    async def usage(
        agent_id: AgentPath, request: Request, caller: Caller = READ, org_id: OrgQuery = None,
        recent: Annotated[int, Query(ge=0, le=100)] = 20,
    ) -> UsageInfo:  # fmt: skip
        """Spend per window, what is left, what is reserved now, and the agent's most recent calls."""
        rt, svc = runtime(request), service(request)
        _check_bound(caller, agent_id)
        policy = svc.policy
        org = _org_of(caller, org_id, policy, agent_id, write=False)
        agent = policy.agents.get((org, agent_id))
        if agent is None:
            raise _not_found("Agent", agent_id, "agent_not_found")
        lines = policy.budget_lines(agent, datetime.now(UTC))
        states = await rt.store.line_states(org, [line.key for line in lines])
        rows = (
            await rt.store.audit_desc(AuditQuery(org=org, agent=agent_id, limit=recent), None)
            if recent
            else []
        )
        agent_reserved = max(
            (states[line.key].reserved for line in lines if line.level == "agent"), default=0
        )
        left = min((max(0, line.limit - states[line.key].used) for line in lines), default=None)
        return UsageInfo(
            agent_id=agent_id, org_id=org, currency=policy.global_.currency,
            windows=_windows(lines, states, policy.global_.currency),
            remaining=to_units(left) if left is not None else None, reserved=to_units(agent_reserved),
            recent_calls=[_audit_item(seq, e) for seq, e in rows],
        )  # fmt: skip

    @router.get(
        "/api/v1/audit", response_model=AuditPage, tags=["audit"], responses={
            **_errors(403),
            200: {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/AuditPage"}},
                              "text/csv": {"schema": {"type": "string"}},
                              "application/x-ndjson": {"schema": {"type": "string"}}}},
        },
    )  # fmt: skip
    async def audit(
        request: Request,
        caller: Caller = READ,
        agent_id: Annotated[str | None, Query(pattern=NAME_RE.pattern)] = None,
        status: Annotated[str | None, Query(pattern=r"^[a-z_]{1,32}$")] = None,
        kind: Annotated[Literal["llm", "booking", "governance"] | None, Query()] = None,
        org_id: OrgQuery = None,
        since: Annotated[str | None, Query(max_length=40, description="ISO 8601 or Unix seconds")] = None,
        until: Annotated[str | None, Query(max_length=40, description="ISO 8601 or Unix seconds")] = None,
        cursor: Annotated[str | None, Query(pattern=r"^[ad]\.[0-9]{1,18}$")] = None,
        after: Annotated[int, Query(ge=0, le=2**62)] = 0,
        order: Literal["asc", "desc"] = "asc",
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        format: Literal["json", "csv", "jsonl"] = "json",
    ) -> Response:
        """The audit trail, scoped to the key's org; paginated by cursor; ``format=csv|jsonl`` streams it all."""
        rt = runtime(request)
        org = org_id if caller.admin else caller.org
        if caller.key is not None and caller.key.agent_id is not None:
            if agent_id not in (None, caller.key.agent_id):
                return _json(AuditPage(items=[], next_cursor=None, next_after=None).model_dump(mode="json"))
            agent_id = caller.key.agent_id
        query = AuditQuery(org=org, agent=agent_id, status=status, since=_when(since, "since"),
                           until=_when(until, "until"), after_seq=after, limit=limit)  # fmt: skip
        if cursor is not None:
            direction, _, seq_text = cursor.partition(".")
            if (direction == "d") != (order == "desc"):
                raise InvalidValue("This cursor belongs to the other order.", reason="invalid_cursor")
            seq = int(seq_text)
        else:
            seq = None
        if format != "json":
            return _export(rt, query, kind, order, seq, format)
        items: list[AuditItem] = []
        last: int | None = None
        more = False
        # ``kind`` is not a store filter: scan on until the page is full (bounded; the cursor
        # then continues where the scan stopped, so a short page is never the end by mistake).
        for _ in range(_KIND_SCAN_PAGES):
            if order == "desc":
                rows = await rt.store.audit_desc(_with(query, after_seq=after), seq)
            else:
                rows = await rt.store.audit(_with(query, after_seq=max(after, seq or 0)))
            for s, e in rows:
                last = s
                if kind is None or e.kind == kind:
                    items.append(_audit_item(s, e))
                    if len(items) >= limit:
                        break
            more = len(rows) >= limit or (bool(rows) and last != rows[-1][0])
            if len(items) >= limit or not more:
                break
            seq = last
        cursor_out = f"{'d' if order == 'desc' else 'a'}.{last}" if more and last is not None else None
        page = AuditPage(items=items, next_cursor=cursor_out, next_after=last if order == "asc" else None)
        return _json(page.model_dump(mode="json"))

    # -- keys of one's own org ---------------------------------------------------------------------

    @router.get("/api/v1/keys", response_model=KeyList, tags=["keys"], responses=_errors(403))
    async def org_keys(request: Request, caller: Caller = WRITE) -> KeyList:
        """The org's keys (ids, prefixes, scopes; never a key): needs the ``write`` scope."""
        if caller.admin:
            return KeyList(items=[_key_info(r) for r in await runtime(request).store.list_api_keys(None)])
        _no_bound_writes(caller)
        return KeyList(items=[_key_info(r) for r in await runtime(request).store.list_api_keys(caller.org)])

    @router.delete(
        "/api/v1/keys/{key_id}", response_model=Deleted, tags=["keys"], responses=_errors(403, 404)
    )
    async def revoke_org_key(key_id: IdPath, request: Request, caller: Caller = WRITE) -> Deleted:
        """Revoke one of the org's keys (another org's key id is 'not found')."""
        rt = runtime(request)
        _no_bound_writes(caller)
        if not await rt.store.revoke_api_key(caller.org, key_id):
            raise _not_found("Key", key_id, "key_not_found")
        rt.keys.forget(key_id)
        owner = caller.org or "*"
        await service(request).audit_event(owner, "", "/api/v1/keys", "key_revoked", {"key_id": key_id},
                                           admin=caller.admin)  # fmt: skip
        return Deleted(id=key_id, org_id=owner, deleted=True)

    # -- admin -------------------------------------------------------------------------------------

    @router.post("/api/v1/admin/reset-daily", response_model=ResetResult, dependencies=ADMIN, tags=["admin"],
                 openapi_extra=_body_doc(ResetBody, required=False), responses=_errors(404, 413))  # fmt: skip
    async def reset_daily(request: Request) -> ResetResult:
        """Restart the current window now (every org, one org, or one agent); calls in flight are unaffected."""
        svc = service(request)
        body = await read_json(request, ResetBody, optional=True)
        policy = svc.policy
        if body.agent_id is not None and body.org_id is None:
            raise InvalidValue("Resetting an agent needs its org_id.", reason="org_id_required")
        if body.org_id is not None and not _org_known(policy, body.org_id):
            raise _not_found("Org", body.org_id, "org_not_found")
        if body.agent_id is not None and (body.org_id or "", body.agent_id) not in policy.agents:
            raise _not_found("Agent", body.agent_id, "agent_not_found")
        periods: list[Period] = list(dict.fromkeys(body.periods or ["daily"]))
        scope_agent = body.agent_id or ANY
        now = time.time()
        at = int(now)
        # Strictly after every earlier reset of these periods (whatever its scope): two resets in
        # one second must still give two windows; the later one applies when the clock reaches it.
        earlier = [t for (_, _, period), t in policy.overlay.resets.items() if period in periods]
        at = max(at, max(earlier, default=at - 1) + 1)
        for period in periods:
            assert period in RESETTABLE
            await svc.store.gov_put(GovRecord(body.org_id or SYSTEM_ORG, "reset", f"{scope_agent}:{period}",
                                              {"at": at}, now))  # fmt: skip
        await svc.refresh(force=True)
        await svc.audit_event(body.org_id or SYSTEM_ORG, body.agent_id or "", "/api/v1/admin/reset-daily",
                              "reset", {"periods": periods, "at": at}, admin=True)  # fmt: skip
        return ResetResult(org_id=body.org_id, agent_id=body.agent_id, periods=list(periods), reset_at=_iso(at),
                           at=at)  # fmt: skip

    @router.get("/api/v1/admin/orgs", response_model=OrgList, dependencies=ADMIN, tags=["admin"],
                responses=_errors())  # fmt: skip
    async def list_orgs(request: Request) -> OrgList:
        """Every org: from the policy file, from the API, and any org that has agents."""
        policy = service(request).policy
        names = sorted({*policy.orgs, *(o for o, _ in policy.agents)})
        return OrgList(items=[_org_info(policy, name) for name in names])

    @router.post("/api/v1/admin/orgs", response_model=OrgInfo, status_code=201, dependencies=ADMIN,
                 tags=["admin"], openapi_extra=_body_doc(OrgCreate), responses=_errors(409, 413))  # fmt: skip
    async def create_org(request: Request) -> OrgInfo:
        """Create an org, optionally with its own budgets (which cover all of its agents together)."""
        svc = service(request)
        body = await read_json(request, OrgCreate)
        if _org_known(svc.policy, body.org_id) or body.org_id == SYSTEM_ORG:
            raise ResGovError(f"Org '{body.org_id}' already exists.", type="conflict", reason="org_exists",
                              status=409)  # fmt: skip
        limits = _limits_of(body)
        now = time.time()
        data = {"name": body.name, "budgets": limits, "created_at": now}
        if not await svc.put(GovRecord(body.org_id, "org", "", data, now), if_absent=True):
            raise ResGovError(f"Org '{body.org_id}' already exists.", type="conflict", reason="org_exists",
                              status=409)  # fmt: skip
        await svc.audit_event(
            body.org_id, "", "/api/v1/admin/orgs", "org_created", {"limits": limits}, admin=True
        )
        return _org_info(svc.policy, body.org_id)

    @router.get("/api/v1/admin/orgs/{org_id}", response_model=OrgInfo, dependencies=ADMIN, tags=["admin"],
                responses=_errors(404))  # fmt: skip
    async def get_org(org_id: Annotated[str, Path(pattern=NAME_RE.pattern)], request: Request) -> OrgInfo:
        """One org."""
        policy = service(request).policy
        if not _org_known(policy, org_id):
            raise _not_found("Org", org_id, "org_not_found")
        return _org_info(policy, org_id)

    @router.post("/api/v1/admin/budget-adjustments", response_model=AdjustmentInfo, status_code=201,
                 dependencies=ADMIN, tags=["admin"], openapi_extra=_body_doc(AdjustmentBody),
                 responses=_errors(404, 413))  # fmt: skip
    async def create_adjustment(request: Request) -> AdjustmentInfo:
        """A top-up (``amount`` added for the current window) or an override (limit replaced) until it expires."""
        svc = service(request)
        body = await read_json(request, AdjustmentBody)
        policy = svc.policy
        if not _org_known(policy, body.org_id):
            raise _not_found("Org", body.org_id, "org_not_found")
        if body.agent_id is not None and (body.org_id, body.agent_id) not in policy.agents:
            raise _not_found("Agent", body.agent_id, "agent_not_found")
        now = time.time()
        _, window_end = calendar_window(policy, body.period, datetime.fromtimestamp(now, UTC))
        if body.expires_in_seconds is not None:
            expires = now + body.expires_in_seconds
        elif body.mode == "topup" and window_end is not None:
            expires = float(window_end)  # a top-up lasts the window it was granted for
        else:
            raise InvalidValue("An override (and a top-up of a total budget) needs expires_in_seconds.",
                               reason="expiry_required")  # fmt: skip
        adj_id = "adj_" + uuid.uuid4().hex[:20]
        data = {"agent_id": body.agent_id, "period": body.period, "mode": body.mode, "amount": _nano(body.amount),
                "created_at": now, "expires_at": expires, "window_end": window_end if body.mode == "topup" else None,
                "reason": body.reason}  # fmt: skip
        await svc.put(GovRecord(body.org_id, "adjustment", adj_id, data, now))
        await svc.audit_event(body.org_id, body.agent_id or "", "/api/v1/admin/budget-adjustments", body.mode,
                              {"id": adj_id, **data}, admin=True)  # fmt: skip
        found = [a for a in svc.snapshot.adjustment_list() if a.id == adj_id]
        if not found:  # pragma: no cover - the write was reloaded just above
            raise StoreUnavailable(
                "The adjustment was written but cannot be read back.", reason="store_unavailable"
            )
        return _adjustment_info(found[0], policy.global_.currency, now)

    @router.get("/api/v1/admin/budget-adjustments", response_model=AdjustmentList, dependencies=ADMIN,
                tags=["admin"], responses=_errors())  # fmt: skip
    async def list_adjustments(
        request: Request, org_id: OrgQuery = None, active: bool = False
    ) -> AdjustmentList:
        """Top-ups and overrides (``?active=true``: only those in force now)."""
        svc = service(request)
        now = time.time()
        items = [_adjustment_info(a, svc.policy.global_.currency, now) for a in svc.snapshot.adjustment_list()
                 if (org_id is None or a.org == org_id) and (not active or a.active(now))]  # fmt: skip
        return AdjustmentList(items=items)

    @router.delete("/api/v1/admin/budget-adjustments/{adjustment_id}", response_model=Deleted,
                   dependencies=ADMIN, tags=["admin"], responses=_errors(404))  # fmt: skip
    async def delete_adjustment(adjustment_id: IdPath, request: Request,
                                org_id: Annotated[str, Query(pattern=NAME_RE.pattern)]) -> Deleted:  # fmt: skip
        """End a top-up or override now."""
        svc = service(request)
        if not await svc.delete(org_id, "adjustment", adjustment_id):
            raise _not_found("Adjustment", adjustment_id, "adjustment_not_found")
        await svc.audit_event(org_id, "", "/api/v1/admin/budget-adjustments", "adjustment_deleted",
                              {"id": adjustment_id}, admin=True)  # fmt: skip
        return Deleted(id=adjustment_id, org_id=org_id, deleted=True)

    @router.post("/api/v1/admin/price-cache/refresh", response_model=PriceStatus, dependencies=ADMIN,
                 tags=["admin"], openapi_extra=_body_doc(PriceRefreshBody, required=False),
                 responses=_errors(413, 502))  # fmt: skip
    async def refresh_prices(request: Request) -> Response:
        """Fetch prices (OpenRouter ``/models`` format); a failure keeps the old prices and says why (502)."""
        svc = service(request)
        body = await read_json(request, PriceRefreshBody, optional=True)
        result = await svc.refresh_prices(body.url)
        await svc.audit_event(SYSTEM_ORG, "", "/api/v1/admin/price-cache/refresh", "price_refresh",
                              {"ok": result.ok, "url": result.url, "models": result.models, "error": result.error},
                              admin=True)  # fmt: skip
        if not result.ok:
            err = ResGovError(f"Price refresh failed; the previous prices stay in force: {result.error}",
                              type="price_refresh_failed", reason="price_refresh_failed", status=502,
                              source=result.url)  # fmt: skip
            return _json({"error": err.body()}, 502)
        return _json(_price_status(svc).model_dump(mode="json"))

    @router.get("/api/v1/admin/price-cache", response_model=PriceStatus, dependencies=ADMIN, tags=["admin"],
                responses=_errors())  # fmt: skip
    async def price_cache(request: Request) -> PriceStatus:
        """The refreshed prices in force and the last refresh's outcome."""
        return _price_status(service(request))

    @router.post("/api/v1/admin/audit/purge", response_model=PurgeResult, dependencies=ADMIN, tags=["admin"],
                 openapi_extra=_body_doc(PurgeBody), responses=_errors(413))  # fmt: skip
    async def purge(request: Request) -> PurgeResult:
        """Delete finished audit records older than ``older_than_days`` now (retention does it hourly)."""
        svc = service(request)
        body = await read_json(request, PurgeBody)
        deleted = await svc.store.purge_audit(body.org_id, time.time() - float(body.older_than_days) * 86_400)
        return PurgeResult(deleted=deleted)

    return router


# --- helpers used by the routes ---------------------------------------------------------------------


def _with(query: AuditQuery, **changes: Any) -> AuditQuery:
    from dataclasses import replace

    return replace(query, **changes)


def _when(value: str | None, name: str) -> float | None:
    """``since`` / ``until``: Unix seconds or ISO 8601 (naive = UTC)."""
    if value is None:
        return None
    try:
        number = float(value)
    except ValueError:
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError as exc:
            raise InvalidValue(f"{name}: expected ISO 8601 or Unix seconds.", reason="invalid_time") from exc
        if parsed.tzinfo is None:
            parsed = parsed.replace(tzinfo=UTC)
        return parsed.timestamp()
    if not (0 <= number < 1e11):
        raise InvalidValue(f"{name}: out of range.", reason="invalid_time")
    return number


_CSV_FIELDS = ["seq", *(f for f in AuditItem.model_fields if f != "seq")]


def _export(
    rt: Runtime, query: AuditQuery, kind: str | None, order: str, seq: int | None, fmt: str
) -> Response:
    """Stream every matching record, page by page (constant memory whatever the size)."""

    async def rows() -> AsyncIterator[AuditItem]:
        cursor = seq
        while True:
            if order == "desc":
                page = await rt.store.audit_desc(_with(query, limit=500), cursor)
            else:
                page = await rt.store.audit(
                    _with(query, after_seq=max(query.after_seq, cursor or 0), limit=500)
                )
            for s, entry in page:
                if kind is None or entry.kind == kind:
                    yield _audit_item(s, entry)
            if len(page) < 500:
                return
            cursor = page[-1][0]

    async def csv_body() -> AsyncIterator[bytes]:
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(_CSV_FIELDS)
        async for item in rows():
            data = item.model_dump(mode="json")
            data["detail"] = orjson.dumps(data["detail"]).decode() if data["detail"] is not None else ""
            writer.writerow(["" if data[f] is None else data[f] for f in _CSV_FIELDS])
            if buffer.tell() > 64 * 1024:
                yield buffer.getvalue().encode()
                buffer.seek(0)
                buffer.truncate()
        yield buffer.getvalue().encode()

    async def jsonl_body() -> AsyncIterator[bytes]:
        async for item in rows():
            yield orjson.dumps(item.model_dump(mode="json")) + b"\n"

    if fmt == "csv":
        return StreamingResponse(csv_body(), media_type="text/csv; charset=utf-8",
                                 headers={"Content-Disposition": 'attachment; filename="audit.csv"'})  # fmt: skip
    return StreamingResponse(jsonl_body(), media_type="application/x-ndjson")


def _org_info(policy: GovernedPolicy, org: str) -> OrgInfo:
    base = policy.base or policy
    api = policy.overlay.orgs.get(org)
    return OrgInfo(
        org_id=org, source="rgf" if org in base.orgs or api is None else "api", name=api.name if api else org,
        limits={p: to_units(v) for p, v in org_base_limits(base, policy.overlay, org).items()},
        agents=sum(1 for o, _ in policy.agents if o == org),
    )  # fmt: skip


def _adjustment_info(adj: Any, currency: str, now: float) -> AdjustmentInfo:
    return AdjustmentInfo(
        id=adj.id, org_id=adj.org, agent_id=adj.agent_id, period=adj.period, mode=adj.mode,
        amount=to_units(adj.amount), currency=currency, created_at=adj.created_at, expires_at=adj.expires_at,
        active=adj.active(now), reason=adj.reason,
    )  # fmt: skip


def _price_status(svc: GovernanceService) -> PriceStatus:
    info = svc.snapshot.prices_info
    last = svc.last_price_refresh
    return PriceStatus(
        ok=last.ok if last else bool(info), source=str(info["source"]) if "source" in info else None,
        models=len(svc.snapshot.prices), fetched_at=float(info["fetched_at"]) if "fetched_at" in info else None,
        error=last.error if last and not last.ok else None,
    )  # fmt: skip


# --- installation -----------------------------------------------------------------------------------

#: Routes of api.py this router replaces (same path and method): :func:`install` removes them.
REPLACED = {("/api/v1/agents/{agent_id}", "GET"), ("/api/v1/audit", "GET")}
_KIND_SCAN_PAGES = 20
_STANDARD_ERRORS = ("400", "401", "403", "404", "422", "503")


def install(api: FastAPI, *, governance: GovernanceService | None = None) -> GovernanceService:
    """Mount the governance API on the app's FastAPI and run its service with the app's lifespan.

    Replaces api.py's basic ``GET /api/v1/agents/{id}`` and ``GET /api/v1/audit`` (kept compatible:
    same fields, ``?after=`` and ``next_after`` still work), maps StoreError to 503 on every route,
    and documents ResGov's error body for every operation in ``/openapi.json``.
    """
    installed: GovernanceService | None = getattr(api.state, "governance", None)
    if installed is not None:
        return installed  # idempotent: app.py installs it; a test helper may try again
    rt: Runtime = api.state.runtime
    svc = governance or GovernanceService(rt.store, lambda: rt.policies.policy)
    api.state.governance = svc
    setattr(rt, RUNTIME_ATTR, svc)  # the runtime's ``policy`` consults it (see the integration notes)
    _drop_routes(api.router, REPLACED)
    api.include_router(build_router())

    async def store_down(_: Request, exc: Exception) -> Response:
        err = StoreUnavailable(f"The ledger is unavailable: {exc}", reason="store_unavailable")
        return _json({"error": err.body()}, err.status)

    api.add_exception_handler(StoreError, store_down)

    async def http_error(_: Request, exc: Exception) -> Response:
        # FastAPI's own refusals (an unparseable form body, an unknown path, a wrong method) in
        # ResGov's error shape, like every other answer.
        status = int(getattr(exc, "status_code", 500))
        detail = str(getattr(exc, "detail", "") or "")
        kind = {401: "authentication_error", 404: "not_found", 405: "method_not_allowed"}.get(
            status, "invalid_request_error"
        )
        err = ResGovError(detail or kind, type=kind, status=status, reason=kind)
        return _json({"error": err.body()}, status, getattr(exc, "headers", None))

    api.add_exception_handler(StarletteHTTPException, http_error)

    previous = api.router.lifespan_context

    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[Any]:
        async with previous(app) as state:
            await svc.start()
            try:
                yield state
            finally:
                await svc.stop()

    api.router.lifespan_context = lifespan
    _document_errors(api)
    return svc


def _drop_routes(router: Any, replaced: set[tuple[str, str]], prefix: str = "") -> None:
    """Remove routes by (path, method), also inside included routers (FastAPI keeps those nested)."""
    kept = []
    for route in router.routes:
        inner = getattr(route, "original_router", None)
        if inner is not None:
            _drop_routes(inner, replaced, prefix + str(getattr(route, "prefix", "") or ""))
        elif isinstance(route, APIRoute) and any(
            (prefix + route.path, m) in replaced for m in route.methods or ()
        ):
            continue
        kept.append(route)
    if len(kept) != len(router.routes):
        router.routes = kept
        mark = getattr(router, "_mark_routes_changed", None)
        if mark is not None:
            mark()


def _document_errors(api: FastAPI) -> None:
    """Make ``/openapi.json`` say what the error handlers send: ResGov's error body, not FastAPI's."""
    original = api.openapi

    def openapi() -> dict[str, Any]:
        if api.openapi_schema is not None:
            return api.openapi_schema
        schema = original()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components.setdefault(
            "ErrorBody", ErrorBody.model_json_schema(ref_template="#/components/schemas/{model}")
        )
        components.setdefault("ErrorResponse", {
            "title": "ErrorResponse", "type": "object", "required": ["error"],
            "properties": {"error": {"$ref": "#/components/schemas/ErrorBody"}},
        })  # fmt: skip
        ref = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
        for path_item in schema.get("paths", {}).values():
            for operation in path_item.values():
                responses = operation.setdefault("responses", {})
                for code in _STANDARD_ERRORS:
                    entry = responses.get(code)
                    if entry is None or "HTTPValidationError" in orjson.dumps(entry).decode():
                        responses[code] = {"description": "ResGov error", "content": ref}
        components.pop("HTTPValidationError", None)
        components.pop("ValidationError", None)
        api.openapi_schema = schema
        return schema

    api.openapi = openapi  # type: ignore[method-assign]
