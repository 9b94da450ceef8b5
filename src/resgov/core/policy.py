"""The compiled policy: who may call what, with which budgets. Pure data and decisions."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from fnmatch import fnmatchcase
from typing import Any, Literal
from zoneinfo import ZoneInfo

from resgov.core.budget import BudgetLine, lines_for
from resgov.core.errors import Forbidden
from resgov.core.pricing import PriceBook
from resgov.core.windows import Period

DEFAULT_ORG = "default"
WireFormat = Literal["openai", "anthropic"]


@dataclass(frozen=True, slots=True)
class ProviderPolicy:
    """An upstream: where it lives, how to authenticate, how long to wait."""

    name: str
    base_url: str
    format: WireFormat = "openai"
    api_key_env: str | None = None
    connect_timeout: float = 10.0
    first_byte_timeout: float = 120.0
    idle_timeout: float = 60.0


@dataclass(frozen=True, slots=True)
class Limits:
    """Runaway-loop guards for an agent or an org. ``None`` (or 0 in the file) = off."""

    rpm: int | None = None
    tpm: int | None = None
    max_concurrent: int | None = None
    loop_max_repeats: int | None = None
    loop_window_seconds: float = 300.0
    loop_match: Literal["normalized", "exact"] = "normalized"
    #: Nano-units per minute (any sliding 60 s).
    max_spend_per_minute: int | None = None
    #: Trip when the last minute's spend exceeds this multiple of the recent per-minute norm.
    spend_velocity_multiple: float | None = None
    #: ``None``: a tripped breaker stays until an admin resumes the agent.
    cooldown_seconds: float | None = None
    #: Per ``X-ResGov-Session-ID``: nano-units, and calls.
    session_budget: int | None = None
    max_calls_per_session: int | None = None
    #: True when at least one guard is on: the hot path skips the guard otherwise, and asks
    #: this on every call (computed once).
    any: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        on = (
            self.rpm, self.tpm, self.max_concurrent, self.loop_max_repeats, self.max_spend_per_minute,
            self.spend_velocity_multiple, self.session_budget, self.max_calls_per_session,
        )  # fmt: skip
        object.__setattr__(self, "any", any(v is not None for v in on))


@dataclass(frozen=True, slots=True)
class AgentPolicy:
    """What one agent of one org may do."""

    org: str
    agent_id: str
    budgets: Mapping[Period, int] = field(default_factory=dict)
    max_tokens_per_request: int | None = None
    allowed_models: tuple[str, ...] | None = None
    allowed_tools: tuple[str, ...] | None = None
    limits: Limits = field(default_factory=Limits)

    def model_allowed(self, model: str) -> bool:
        """Exact names and glob patterns; no list means any (priced) model."""
        if self.allowed_models is None:
            return True
        return any(model == pattern or fnmatchcase(model, pattern) for pattern in self.allowed_models)

    def check_tools(self, names: list[str]) -> None:
        """Refuse the first tool (or booked action) not in ``allowed_tools``."""
        if self.allowed_tools is None:
            return
        for name in names:
            if name not in self.allowed_tools:
                raise Forbidden(
                    f"Tool '{name}' is not allowed for agent '{self.agent_id}'. "
                    f"Allowed: {', '.join(self.allowed_tools) or 'none'}",
                    type="tool_not_allowed",
                    reason="tool_not_allowed",
                    agent_id=self.agent_id,
                )


@dataclass(frozen=True, slots=True)
class OrgPolicy:
    """An organisation's own budgets, covering all of its agents together."""

    org_id: str
    budgets: Mapping[Period, int] = field(default_factory=dict)
    limits: Limits = field(default_factory=Limits)


@dataclass(frozen=True, slots=True)
class GlobalPolicy:
    """The ``[global]`` section, with defaults applied."""

    currency: str = "USD"
    fail_safe_action: Literal["deny", "allow"] = "deny"
    timezone: str = "UTC"
    reservation_ttl_seconds: float = 300.0
    default_provider: str = "openai"
    on_insufficient_budget: Literal["deny", "shrink"] = "deny"
    shrink_min_tokens: int = 256
    on_expired_reservation: Literal["charge", "release"] = "charge"
    default_max_tokens: int = 4096
    max_request_bytes: int = 32 * 1024 * 1024
    #: Fractions of each budget's limit at which a ``budget.threshold`` alert fires.
    alert_thresholds: tuple[float, ...] = (0.5, 0.8, 1.0)
    audit_retention_days: float | None = None
    #: Alert when a budget is predicted to run out within this many seconds (0: off).
    forecast_alert_horizon_seconds: float = 3600.0


def _window_floor(lines: list[BudgetLine]) -> float:
    """The latest window start among the lines: a clock set back before it invalidates them."""
    return float(max((line.window_start for line in lines if line.resets_at is not None), default=0))


@dataclass(frozen=True)
class Policy:
    """Everything an ``.rgf`` file says, compiled and validated. Immutable: a reload builds a new one."""

    global_: GlobalPolicy
    providers: Mapping[str, ProviderPolicy]
    agents: Mapping[tuple[str, str], AgentPolicy]
    orgs: Mapping[str, OrgPolicy]
    prices: PriceBook
    source: str = "<defaults>"
    #: ``[[webhooks]]`` as validated by the loader (``resgov.alerts.WebhookSection``; core imports no alerts code).
    webhooks: tuple[Any, ...] = ()
    #: (org, agent) -> (valid from, valid until, lines): windows only change at a reset, and
    #: computing them (zoneinfo arithmetic) is a measurable share of the hot path.
    _lines_cache: dict[tuple[str, str], tuple[float, float, tuple[BudgetLine, ...]]] = field(
        default_factory=dict, compare=False, repr=False
    )

    @property
    def tz(self) -> ZoneInfo:
        """The timezone budget windows are aligned to."""
        return ZoneInfo(self.global_.timezone)

    def agent(self, org: str, agent_id: str) -> AgentPolicy:
        """The agent's policy, or the ``agent_not_found`` refusal (agents are never created on the fly)."""
        found = self.agents.get((org, agent_id))
        if found is None:
            raise Forbidden(
                f"Agent '{agent_id}' is not defined for this organisation.",
                type="agent_not_found",
                reason="agent_not_found",
                agent_id=agent_id,
            )
        return found

    def budget_lines(self, agent: AgentPolicy, now: datetime) -> list[BudgetLine]:
        """Every budget covering a call by ``agent`` now: the agent's windows and its org's."""
        key = (agent.org, agent.agent_id)
        stamp = now.timestamp()
        cached = self._lines_cache.get(key)
        if cached is not None and cached[0] <= stamp < cached[1]:
            return list(cached[2])
        org = self.orgs.get(agent.org)
        lines = lines_for(agent.org, agent.agent_id, agent.budgets, org.budgets if org else {}, now, self.tz)
        resets = [line.resets_at for line in lines if line.resets_at is not None]
        if len(self._lines_cache) > 100_000:
            self._lines_cache.clear()
        until = float(min(resets)) if resets else float("inf")
        self._lines_cache[key] = (_window_floor(lines), until, tuple(lines))
        return lines

    def route(self, model: str) -> tuple[ProviderPolicy, str]:
        """``provider/model`` selects that provider; a bare name goes to ``default_provider``."""
        prefix, sep, rest = model.partition("/")
        if sep and prefix in self.providers and rest:
            return self.providers[prefix], rest
        provider = self.providers.get(self.global_.default_provider)
        if provider is None:
            raise Forbidden(
                f"Model '{model}' names no configured provider and default_provider "
                f"'{self.global_.default_provider}' is not configured.",
                type="provider_not_found",
                reason="provider_not_found",
            )
        return provider, model
