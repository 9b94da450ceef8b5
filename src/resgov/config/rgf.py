"""Loading and validating ``.rgf`` policy files (TOML).

Every error names the TOML key path (``agents.hermes.daily_budget``) and the
problem. Amounts are parsed as decimals straight from the TOML text, never floats.
"""

from __future__ import annotations

import re
import tomllib
from decimal import Decimal
from pathlib import Path
from typing import Annotated, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from resgov.alerts.config import WebhookSection, validate_thresholds
from resgov.core.money import parse_amount, price_per_mtok
from resgov.core.policy import (
    DEFAULT_ORG,
    AgentPolicy,
    GlobalPolicy,
    Limits,
    OrgPolicy,
    Policy,
    ProviderPolicy,
)
from resgov.core.pricing import ModelPrice, PriceBook, Rate
from resgov.core.windows import PERIODS, Period

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}$")

Amount = Annotated[Decimal, Field(ge=0, le=Decimal(10) ** 12)]
Seconds = Annotated[float, Field(gt=0, le=86_400)]


class PolicyError(ValueError):
    """An invalid ``.rgf`` file; ``problems`` holds ``(key path, message)`` pairs."""

    def __init__(self, source: str, problems: list[tuple[str, str]]) -> None:
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  {path}: {msg}" for path, msg in problems)
        super().__init__(f"invalid policy {source}:\n{lines}")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class GlobalSection(_Section):
    """``[global]``."""

    currency: str = Field("USD", pattern=r"^[A-Z]{3}$")
    fail_safe_action: Literal["deny", "allow"] = "deny"
    timezone: str = "UTC"
    reservation_ttl_seconds: Seconds = 300.0
    default_provider: str = "openai"
    on_insufficient_budget: Literal["deny", "shrink"] = "deny"
    shrink_min_tokens: int = Field(256, ge=1, le=1_000_000)
    on_expired_reservation: Literal["charge", "release"] = "charge"
    default_max_tokens: int = Field(4096, ge=1, le=10_000_000)
    max_request_bytes: int = Field(32 * 1024 * 1024, ge=1024, le=1024 * 1024 * 1024)
    alert_thresholds: list[float] = Field(default_factory=lambda: [0.5, 0.8, 1.0], max_length=20)

    @field_validator("alert_thresholds")
    @classmethod
    def _alert_thresholds(cls, value: list[float]) -> list[float]:
        return list(validate_thresholds(value))

    audit_retention_days: float | None = Field(None, gt=0, le=36_500)
    forecast_alert_horizon_seconds: float = Field(3600.0, ge=0, le=366 * 86_400)

    @field_validator("timezone")
    @classmethod
    def _tz(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown timezone {value!r}") from exc
        return value


class ProviderSection(_Section):
    """``[providers.NAME]``: an upstream."""

    base_url: str = Field(pattern=r"^https?://[^\s]+$")
    api_key_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    format: Literal["openai", "anthropic"] = "openai"
    connect_timeout: Seconds = 10.0
    first_byte_timeout: Seconds = 120.0
    idle_timeout: Seconds = 60.0


class ModelSection(_Section):
    """``[models."NAME"]``: a price override or a private model's price, per million tokens."""

    input_per_mtok: Amount
    output_per_mtok: Amount
    cache_read_per_mtok: Amount | None = None
    cache_write_per_mtok: Amount | None = None
    per_request: Amount | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    context_window: int | None = Field(None, ge=1)


class _Budgets(_Section):
    hourly_budget: Amount | None = None
    daily_budget: Amount | None = None
    weekly_budget: Amount | None = None
    monthly_budget: Amount | None = None
    total_budget: Amount | None = None

    def limits(self) -> dict[Period, int]:
        out: dict[Period, int] = {}
        for period in PERIODS:
            value = getattr(self, f"{period}_budget")
            if value is not None:
                out[period] = parse_amount(value)
        return out


class _Limits(_Section):
    """Runaway-loop guards shared by agents and orgs (absent or 0 = off)."""

    rpm: int | None = Field(None, ge=0, le=10_000_000)
    tpm: int | None = Field(None, ge=0, le=10_000_000_000)
    max_concurrent: int | None = Field(None, ge=0, le=1_000_000)
    loop_max_repeats: int | None = Field(None, ge=0, le=1_000_000)
    loop_window_seconds: Seconds = 300.0
    loop_match: Literal["normalized", "exact"] = "normalized"
    max_spend_per_minute: Amount | None = None
    spend_velocity_multiple: float | None = Field(None, ge=0, le=1_000_000)
    cooldown_seconds: float | None = Field(None, ge=0, le=30 * 86_400)
    session_budget: Amount | None = None
    max_calls_per_session: int | None = Field(None, ge=0, le=100_000_000)

    def compile(self) -> Limits:
        return Limits(
            rpm=self.rpm or None,
            tpm=self.tpm or None,
            max_concurrent=self.max_concurrent or None,
            loop_max_repeats=self.loop_max_repeats or None,
            loop_window_seconds=self.loop_window_seconds,
            loop_match=self.loop_match,
            max_spend_per_minute=parse_amount(self.max_spend_per_minute)
            if self.max_spend_per_minute
            else None,
            spend_velocity_multiple=self.spend_velocity_multiple or None,
            cooldown_seconds=self.cooldown_seconds or None,
            session_budget=parse_amount(self.session_budget) if self.session_budget else None,
            max_calls_per_session=self.max_calls_per_session or None,
        )


class AgentSection(_Budgets, _Limits):
    """``[agents.NAME]`` (or ``[orgs.ORG.agents.NAME]``)."""

    org: str | None = None
    max_tokens_per_request: int | None = Field(None, ge=1, le=10_000_000)
    allowed_models: list[str] | None = None
    allowed_tools: list[str] | None = None


class OrgSection(_Budgets, _Limits):
    """``[orgs.NAME]``: an organisation's budgets and, optionally, its agents."""

    agents: dict[str, AgentSection] = Field(default_factory=dict)


class RgfFile(_Section):
    """The whole file."""

    global_: GlobalSection = Field(default_factory=GlobalSection, alias="global")
    providers: dict[str, ProviderSection] = Field(default_factory=dict)
    models: dict[str, ModelSection] = Field(default_factory=dict)
    orgs: dict[str, OrgSection] = Field(default_factory=dict)
    agents: dict[str, AgentSection] = Field(default_factory=dict)
    webhooks: list[WebhookSection] = Field(default_factory=list, max_length=100)

    @model_validator(mode="after")
    def _names(self) -> RgfFile:
        for section, names in (("agents", self.agents), ("orgs", self.orgs), ("providers", self.providers)):
            for name in names:
                if not NAME_RE.match(name):
                    raise ValueError(f"{section}.{name}: invalid name (letters, digits, . _ : @ -)")
        return self


#: Providers known without any configuration; a ``[providers.NAME]`` section replaces one.
BUILTIN_PROVIDERS: dict[str, ProviderPolicy] = {
    "openai": ProviderPolicy("openai", "https://api.openai.com/v1", "openai", "OPENAI_API_KEY"),
    "anthropic": ProviderPolicy("anthropic", "https://api.anthropic.com", "anthropic", "ANTHROPIC_API_KEY"),
    "openrouter": ProviderPolicy(
        "openrouter", "https://openrouter.ai/api/v1", "openai", "OPENROUTER_API_KEY"
    ),
}


def documented_keys() -> set[str]:
    """Every key the loader accepts, as ``section.key`` (the README must document each)."""
    keys: set[str] = set()
    for prefix, model in (
        ("global", GlobalSection),
        ("providers.NAME", ProviderSection),
        ('models."NAME"', ModelSection),
        ("orgs.NAME", OrgSection),
        ("agents.NAME", AgentSection),
        ("webhooks[]", WebhookSection),
    ):
        for name in model.model_fields:
            keys.add(f"{prefix}.{name}")
    return keys


def _loc(loc: tuple[int | str, ...]) -> str:
    parts = ["global" if p == "global_" else str(p) for p in loc]
    return ".".join(parts) or "<file>"


def parse_policy(text: str, source: str = "<string>", *, library_prices: bool = True) -> Policy:
    """Parse and validate ``.rgf`` text into a :class:`Policy`, or raise :class:`PolicyError`."""
    try:
        raw = tomllib.loads(text, parse_float=Decimal)
    except tomllib.TOMLDecodeError as exc:
        raise PolicyError(source, [("<toml>", str(exc))]) from exc
    try:
        rgf = RgfFile.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = "unknown key"
            problems.append((_loc(err["loc"]), msg))
        raise PolicyError(source, problems) from exc
    return compile_policy(rgf, source, library_prices=library_prices)


def load_policy(path: str | Path, *, library_prices: bool = True) -> Policy:
    """Read and validate a ``.rgf`` file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise PolicyError(str(p), [("<file>", f"cannot read: {exc.strerror or exc}")]) from exc
    except UnicodeDecodeError as exc:
        raise PolicyError(str(p), [("<file>", f"not UTF-8: {exc}")]) from exc
    return parse_policy(text, str(p), library_prices=library_prices)


def compile_policy(rgf: RgfFile, source: str, *, library_prices: bool = True) -> Policy:
    """Turn a validated file into the immutable :class:`Policy` the proxy enforces."""
    problems: list[tuple[str, str]] = []
    g = rgf.global_
    providers = dict(BUILTIN_PROVIDERS)
    for name, prov in rgf.providers.items():
        providers[name] = ProviderPolicy(
            name=name,
            base_url=prov.base_url.rstrip("/"),
            format=prov.format,
            api_key_env=prov.api_key_env,
            connect_timeout=prov.connect_timeout,
            first_byte_timeout=prov.first_byte_timeout,
            idle_timeout=prov.idle_timeout,
        )
    if g.default_provider not in providers:
        problems.append(("global.default_provider", f"no provider named {g.default_provider!r}"))

    orgs: dict[str, OrgPolicy] = {}
    agents: dict[tuple[str, str], AgentPolicy] = {}

    def add_agent(path: str, org: str, agent_id: str, section: AgentSection) -> None:
        if (org, agent_id) in agents:
            problems.append((path, f"agent {agent_id!r} is defined twice in org {org!r}"))
            return
        agents[(org, agent_id)] = AgentPolicy(
            org=org,
            agent_id=agent_id,
            budgets=section.limits(),
            max_tokens_per_request=section.max_tokens_per_request,
            allowed_models=tuple(section.allowed_models) if section.allowed_models is not None else None,
            allowed_tools=tuple(section.allowed_tools) if section.allowed_tools is not None else None,
            limits=section.compile(),
        )

    for org_id, org_section in rgf.orgs.items():
        orgs[org_id] = OrgPolicy(org_id, org_section.limits(), org_section.compile())
        for agent_id, section in org_section.agents.items():
            if not NAME_RE.match(agent_id):
                problems.append((f"orgs.{org_id}.agents.{agent_id}", "invalid name"))
                continue
            if section.org not in (None, org_id):
                problems.append((f"orgs.{org_id}.agents.{agent_id}.org", "contradicts the enclosing org"))
            add_agent(f"orgs.{org_id}.agents.{agent_id}", org_id, agent_id, section)
    for agent_id, section in rgf.agents.items():
        org = section.org or DEFAULT_ORG
        if section.org is not None and not NAME_RE.match(section.org):
            problems.append((f"agents.{agent_id}.org", "invalid org name"))
        orgs.setdefault(org, OrgPolicy(org, {}))
        add_agent(f"agents.{agent_id}", org, agent_id, section)

    overrides: dict[str, ModelPrice] = {}
    for name, m in rgf.models.items():
        overrides[name] = ModelPrice(
            input=Rate(price_per_mtok(m.input_per_mtok)),
            output=Rate(price_per_mtok(m.output_per_mtok)),
            cache_read=Rate(price_per_mtok(m.cache_read_per_mtok))
            if m.cache_read_per_mtok is not None
            else None,
            cache_write=Rate(price_per_mtok(m.cache_write_per_mtok))
            if m.cache_write_per_mtok is not None
            else None,
            per_request=parse_amount(m.per_request) if m.per_request is not None else 0,
            max_output_tokens=m.max_output_tokens,
            context_window=m.context_window,
            source="rgf",
        )
    if g.currency != "USD" and library_prices:
        # The price library is in USD; a budget in another currency can only use prices
        # the operator states in that currency.
        library_prices = False
    if problems:
        raise PolicyError(source, problems)
    prices = PriceBook(overrides=overrides)
    if not library_prices:
        prices.library = None
    global_ = GlobalPolicy(
        currency=g.currency,
        fail_safe_action=g.fail_safe_action,
        timezone=g.timezone,
        reservation_ttl_seconds=g.reservation_ttl_seconds,
        default_provider=g.default_provider,
        on_insufficient_budget=g.on_insufficient_budget,
        shrink_min_tokens=g.shrink_min_tokens,
        on_expired_reservation=g.on_expired_reservation,
        default_max_tokens=g.default_max_tokens,
        max_request_bytes=g.max_request_bytes,
        alert_thresholds=tuple(g.alert_thresholds),
        audit_retention_days=g.audit_retention_days,
        forecast_alert_horizon_seconds=g.forecast_alert_horizon_seconds,
    )
    return Policy(
        global_=global_,
        providers=providers,
        agents=agents,
        orgs=orgs,
        prices=prices,
        source=source,
        webhooks=tuple(rgf.webhooks),
    )


def describe(policy: Policy) -> list[str]:
    """Human-readable lines of what a policy enforces (for ``resgov check``).

    Each agent and org also gets a ``guards`` line: the runaway-loop guards it sets, and
    TOML-ready suggestions for the ones that are off (all are off unless configured).
    """
    from collections.abc import Mapping

    from resgov.core.money import format_money, units_decimal

    cur = policy.global_.currency

    def guards(limits: Limits, budgets: Mapping[Period, int], agent: bool) -> str:
        on: list[str] = []
        if limits.rpm:
            on.append(f"rpm {limits.rpm}")
        if limits.tpm:
            on.append(f"tpm {limits.tpm}")
        if limits.max_concurrent:
            on.append(f"max_concurrent {limits.max_concurrent}")
        if limits.loop_max_repeats:
            on.append(f"loop after {limits.loop_max_repeats} repeats in {limits.loop_window_seconds:g}s "
                      f"({limits.loop_match})")  # fmt: skip
        if limits.max_spend_per_minute:
            on.append(f"max {format_money(limits.max_spend_per_minute, cur)}/min")
        if limits.spend_velocity_multiple:
            on.append(f"velocity x{limits.spend_velocity_multiple:g} of its norm")
        if limits.session_budget:
            on.append(f"session budget {format_money(limits.session_budget, cur)}")
        if limits.max_calls_per_session:
            on.append(f"{limits.max_calls_per_session} calls/session")
        tripped = limits.loop_max_repeats or limits.max_spend_per_minute or limits.spend_velocity_multiple
        if tripped:
            cooldown = limits.cooldown_seconds
            on.append(f"paused {cooldown:g}s on a trip" if cooldown else "paused until resumed on a trip")
        # Suggestions for what is off: a loop detector (ten near-identical calls in five minutes
        # is a stuck agent, not a busy one), a velocity cap at 1/20 of the smallest budget (a
        # burst cannot burn it in under 20 minutes), a generous rpm, and a cooldown that pauses
        # long enough for a human to look.
        hints: list[str] = []
        if agent and not limits.loop_max_repeats:
            hints += ["loop_max_repeats = 10", "loop_window_seconds = 300"]
        if not limits.max_spend_per_minute and not limits.spend_velocity_multiple and budgets:
            cap = -(-min(budgets.values()) // 20)
            hints.append(f"max_spend_per_minute = {units_decimal(cap).normalize():f}")
        if not limits.rpm:
            hints.append("rpm = 60" if agent else "rpm = 600")
        breaker_hinted = any(h.startswith(("loop_max_repeats", "max_spend_per_minute")) for h in hints)
        if not limits.cooldown_seconds and (tripped or breaker_hinted):
            hints.append("cooldown_seconds = 300")
        text = "guards: " + (", ".join(on) if on else "off")
        return text + (f" (suggested: {', '.join(hints)})" if hints else "")

    g = policy.global_
    out = [
        f"currency {cur}, timezone {g.timezone}, fail_safe_action={g.fail_safe_action}, "
        f"on_insufficient_budget={g.on_insufficient_budget}, on_expired_reservation={g.on_expired_reservation}",
        f"reservation TTL {g.reservation_ttl_seconds:g}s, default provider {g.default_provider}, "
        f"default max_tokens {g.default_max_tokens}",
    ]
    for name, p in sorted(policy.providers.items()):
        out.append(f"provider {name}: {p.base_url} ({p.format}), key from ${p.api_key_env or '-'}")
    for org_id, org in sorted(policy.orgs.items()):
        budgets = ", ".join(f"{k} {format_money(v, cur)}" for k, v in org.budgets.items()) or "no org budget"
        out.append(f"org {org_id}: {budgets}")
        out.append(f"org {org_id} {guards(org.limits, org.budgets, False)}")
    for (org_id, agent_id), a in sorted(policy.agents.items()):
        budgets = ", ".join(f"{k} {format_money(v, cur)}" for k, v in a.budgets.items())
        if not budgets and not policy.orgs.get(org_id, OrgPolicy(org_id)).budgets:
            budgets = "WARNING: no budget on the agent or its org: spend is unlimited"
        models = ", ".join(a.allowed_models) if a.allowed_models is not None else "any priced model"
        tools = ", ".join(a.allowed_tools) if a.allowed_tools is not None else "any"
        cap = a.max_tokens_per_request or f"client's, else {g.default_max_tokens}"
        out.append(
            f"agent {org_id}/{agent_id}: {budgets}; models: {models}; tools: {tools}; max_tokens {cap}"
        )
        out.append(f"agent {org_id}/{agent_id} {guards(a.limits, a.budgets, True)}")
    return out
