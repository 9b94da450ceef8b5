"""The governed policy: the ``.rgf`` file merged with what the governance API changed. Pure, no I/O.

The file is loaded once per (re)load; the API's changes live in the store as small records
(``GovRecord``: org, kind, key, JSON data) and are compiled here into a :class:`Snapshot`. The
proxy and the control plane both read one :class:`GovernedPolicy` = file + snapshot, so an agent
registered through the API is enforced exactly like one written in the file.

What the API can change, and how it merges (later rows win over earlier ones):

===================  ==================================================================================
file                 agents (``[agents.X]``, ``[orgs.O.agents.X]``), orgs, their budgets: the base
API orgs/agents      orgs and agents the file does not define (the file wins on a name clash)
budget settings      ``PUT /agents/{id}/budget``: one period's limit. Self-service (an org's key) is
                     clamped to the *ceiling* (:func:`ceiling`) at merge time too, so lowering the file
                     later lowers it; an admin's setting is an operator decision and is not clamped
overrides            admin, temporary: the limit of one period is replaced until ``expires_at``
top-ups              admin, temporary: ``amount`` is added to one period's limit for the calendar window
                     that was current when it was granted (and never past ``expires_at``)
resets               admin: the window of a period starts again at ``at`` (see below)
refreshed prices     ``POST /admin/price-cache/refresh``: OpenRouter prices, below the file's [models]
===================  ==================================================================================

**Resets never race with calls in flight.** A budget line's ledger key contains its window's start
(``a:hermes:daily:<start>``). A reset at ``R`` makes every line of that period whose calendar window
contains ``R`` start at ``R`` instead: calls reserved after the reset use a fresh key (spent 0), while
a call reserved before it keeps the line objects it reserved on and settles on the old key. Nothing is
moved, dropped or counted twice; the next calendar window starts normally (its start is after ``R``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from resgov.core.budget import BudgetLine, lines_for
from resgov.core.policy import AgentPolicy, OrgPolicy, Policy
from resgov.core.pricing import ModelPrice, Rate
from resgov.core.windows import PERIODS, Period, window_bounds

#: Records that are not one org's (global resets, refreshed prices) live under this "org". It can
#: never clash with a real org: org names must start with a letter or a digit.
SYSTEM_ORG = "_system"
#: Matches every org / every agent in a reset record.
ANY = "*"
#: Periods an admin may reset (a ``total`` budget has no window to restart; top it up instead).
RESETTABLE: tuple[Period, ...] = ("hourly", "daily", "weekly", "monthly")

Kind = Literal["org", "agent", "budget", "adjustment", "reset", "prices"]
Source = Literal["rgf", "api"]
AdjustmentMode = Literal["override", "topup"]


@dataclass(frozen=True, slots=True)
class ApiOrg:
    """An organisation created through the admin API (the file's orgs need no record)."""

    org_id: str
    name: str = ""
    budgets: Mapping[Period, int] = field(default_factory=dict)
    created_at: float = 0.0


@dataclass(frozen=True, slots=True)
class ApiAgent:
    """An agent registered through the API. ``gen`` tells a re-created agent from its predecessor."""

    org: str
    agent_id: str
    gen: str
    name: str = ""
    description: str = ""
    budgets: Mapping[Period, int] = field(default_factory=dict)
    allowed_models: tuple[str, ...] | None = None
    allowed_tools: tuple[str, ...] | None = None
    max_tokens_per_request: int | None = None
    created_at: float = 0.0


@dataclass(frozen=True, slots=True)
class BudgetSetting:
    """One period's limit set through ``PUT /api/v1/agents/{id}/budget``; ``limit`` None = no limit."""

    org: str
    agent_id: str
    period: Period
    limit: int | None
    gen: str
    by_admin: bool = False
    updated_at: float = 0.0


@dataclass(frozen=True, slots=True)
class Adjustment:
    """An admin's temporary override or top-up of one budget (an agent's, or the org's when agent is None)."""

    id: str
    org: str
    agent_id: str | None
    period: Period
    mode: AdjustmentMode
    amount: int
    created_at: float
    expires_at: float
    #: Top-ups: the end of the calendar window they were granted for (None for ``total``).
    window_end: int | None = None
    reason: str = ""

    def active(self, now: float) -> bool:
        """True while the adjustment applies (it stops by itself at ``expires_at``)."""
        return self.created_at <= now < self.expires_at


@dataclass(frozen=True)
class Snapshot:
    """Everything the API changed, compiled for lookups on the hot path. Immutable; a refresh builds a new one."""

    version: int = 0
    orgs: Mapping[str, ApiOrg] = field(default_factory=dict)
    agents: Mapping[tuple[str, str], ApiAgent] = field(default_factory=dict)
    budgets: Mapping[tuple[str, str, Period], BudgetSetting] = field(default_factory=dict)
    adjustments: Mapping[tuple[str, str | None, Period], tuple[Adjustment, ...]] = field(default_factory=dict)
    #: (org or ANY, agent or ANY, period) -> reset time (Unix seconds).
    resets: Mapping[tuple[str, str, Period], int] = field(default_factory=dict)
    prices: Mapping[str, ModelPrice] = field(default_factory=dict)
    prices_info: Mapping[str, Any] = field(default_factory=dict)

    def adjustment_list(self) -> list[Adjustment]:
        """Every adjustment (active or not), oldest first."""
        return sorted((a for group in self.adjustments.values() for a in group), key=lambda a: a.created_at)


# --- records <-> snapshot ---------------------------------------------------------------------------


def _periods(data: Mapping[str, Any]) -> dict[Period, int]:
    return {p: int(v) for p, v in data.items() if p in PERIODS and v is not None}


def _opt_tuple(value: Any) -> tuple[str, ...] | None:
    return tuple(str(v) for v in value) if value is not None else None


def compile_snapshot(version: int, records: Iterable[tuple[str, str, str, Mapping[str, Any]]]) -> Snapshot:
    """Build a snapshot from stored records ``(org, kind, key, data)``; unknown kinds are skipped.

    Skipping (not failing) matters: a newer ResGov may write a kind this one does not know, and an
    instance must keep enforcing what it understands instead of refusing every call.
    """
    orgs: dict[str, ApiOrg] = {}
    agents: dict[tuple[str, str], ApiAgent] = {}
    budgets: dict[tuple[str, str, Period], BudgetSetting] = {}
    adjustments: dict[tuple[str, str | None, Period], list[Adjustment]] = {}
    resets: dict[tuple[str, str, Period], int] = {}
    prices: dict[str, ModelPrice] = {}
    prices_info: dict[str, Any] = {}
    for org, kind, key, data in records:
        try:
            if kind == "org":
                orgs[org] = ApiOrg(org, str(data.get("name", "")), _periods(data.get("budgets", {})),
                                   float(data.get("created_at", 0)))  # fmt: skip
            elif kind == "agent":
                agents[(org, key)] = ApiAgent(
                    org=org, agent_id=key, gen=str(data["gen"]), name=str(data.get("name", "")),
                    description=str(data.get("description", "")), budgets=_periods(data.get("budgets", {})),
                    allowed_models=_opt_tuple(data.get("allowed_models")),
                    allowed_tools=_opt_tuple(data.get("allowed_tools")),
                    max_tokens_per_request=data.get("max_tokens_per_request"),
                    created_at=float(data.get("created_at", 0)),
                )  # fmt: skip
            elif kind == "budget":
                agent_id, _, period = key.rpartition(":")
                if period in PERIODS:
                    limit = data.get("limit")
                    budgets[(org, agent_id, period)] = BudgetSetting(
                        org, agent_id, period, int(limit) if limit is not None else None,
                        str(data.get("gen", "")), bool(data.get("by_admin", False)),
                        float(data.get("updated_at", 0)),
                    )  # fmt: skip
            elif kind == "adjustment":
                adj = Adjustment(
                    id=key, org=org, agent_id=data.get("agent_id"), period=data["period"], mode=data["mode"],
                    amount=int(data["amount"]), created_at=float(data["created_at"]),
                    expires_at=float(data["expires_at"]), window_end=data.get("window_end"),
                    reason=str(data.get("reason", "")),
                )  # fmt: skip
                if adj.period in PERIODS and adj.mode in ("override", "topup"):
                    adjustments.setdefault((org, adj.agent_id, adj.period), []).append(adj)
            elif kind == "reset":
                agent_id, _, period = key.rpartition(":")
                if period in PERIODS:
                    scope_org = ANY if org == SYSTEM_ORG else org
                    resets[(scope_org, agent_id, period)] = int(data["at"])
            elif kind == "prices":
                prices = {name: price_from_json(p) for name, p in data.get("models", {}).items()}
                prices_info = {k: v for k, v in data.items() if k != "models"}
        except (KeyError, TypeError, ValueError):
            continue  # one damaged record must not take the others down
    return Snapshot(
        version=version, orgs=orgs, agents=agents, budgets=budgets,
        adjustments={k: tuple(sorted(v, key=lambda a: a.created_at)) for k, v in adjustments.items()},
        resets=resets, prices=prices, prices_info=prices_info,
    )  # fmt: skip


def rate_json(rate: Rate | None) -> Any:
    """A rate as stored (nano-units per MTok, and its tiers)."""
    if rate is None:
        return None
    return {"base": rate.base, "tiers": [list(t) for t in rate.tiers]} if rate.tiers else rate.base


def _rate(value: Any) -> Rate | None:
    if value is None:
        return None
    if isinstance(value, dict):
        return Rate(int(value["base"]), tuple((int(a), int(b)) for a, b in value.get("tiers", [])))
    return Rate(int(value))


def price_json(price: ModelPrice) -> dict[str, Any]:
    """A refreshed price as stored in the ``prices`` record (integers only)."""
    return {
        "input": rate_json(price.input), "output": rate_json(price.output),
        "cache_read": rate_json(price.cache_read), "cache_write": rate_json(price.cache_write),
        "other_output": [rate_json(r) for r in price.other_output], "per_request": price.per_request,
        "per_web_search": price.per_web_search, "context_window": price.context_window,
        "max_output_tokens": price.max_output_tokens,
    }  # fmt: skip


def price_from_json(data: Mapping[str, Any]) -> ModelPrice:
    """The inverse of :func:`price_json`."""
    inp, out = _rate(data["input"]), _rate(data["output"])
    if inp is None or out is None:
        raise ValueError("a price needs input and output rates")
    return ModelPrice(
        input=inp, output=out, cache_read=_rate(data.get("cache_read")), cache_write=_rate(data.get("cache_write")),
        other_output=tuple(r for r in (_rate(x) for x in data.get("other_output", [])) if r is not None),
        per_request=int(data.get("per_request") or 0), per_web_search=data.get("per_web_search"),
        context_window=data.get("context_window"), max_output_tokens=data.get("max_output_tokens"),
        source="refreshed",
    )  # fmt: skip


# --- the merge --------------------------------------------------------------------------------------


def org_base_limits(policy: Policy, snap: Snapshot, org: str) -> dict[Period, int]:
    """The org's own budgets: the file's, else the ones the admin gave it at creation."""
    if org in policy.orgs:
        return dict(policy.orgs[org].budgets)
    api = snap.orgs.get(org)
    return dict(api.budgets) if api else {}


def ceiling(policy: Policy, snap: Snapshot, org: str, agent_id: str, period: Period) -> int | None:
    """The most self-service may set for one agent's period: the file's limit for that agent and
    period, and never more than its org's own limit for the same period. ``None``: no ceiling."""
    bounds: list[int] = []
    rgf_agent = policy.agents.get((org, agent_id))
    if rgf_agent is not None and period in rgf_agent.budgets:
        bounds.append(rgf_agent.budgets[period])
    org_limit = org_base_limits(policy, snap, org).get(period)
    if org_limit is not None:
        bounds.append(org_limit)
    return min(bounds) if bounds else None


def agent_source(policy: Policy, snap: Snapshot, org: str, agent_id: str) -> Source | None:
    """Where an agent is defined (the file wins a clash), or None."""
    if (org, agent_id) in policy.agents:
        return "rgf"
    if (org, agent_id) in snap.agents:
        return "api"
    return None


def base_budgets(policy: Policy, snap: Snapshot, org: str, agent_id: str) -> dict[Period, int]:
    """An agent's standing budgets (file or creation, then budget settings, clamped): no temporary changes."""
    source = agent_source(policy, snap, org, agent_id)
    if source is None:
        return {}
    if source == "rgf":
        budgets = dict(policy.agents[(org, agent_id)].budgets)
        gen = "rgf"
    else:
        api = snap.agents[(org, agent_id)]
        budgets = dict(api.budgets)
        gen = api.gen
    for period in PERIODS:
        setting = snap.budgets.get((org, agent_id, period))
        if setting is None or setting.gen != gen:
            continue  # a setting of a deleted-and-re-created agent does not carry over
        if setting.limit is None:
            if source == "api" or setting.by_admin:
                budgets.pop(period, None)
            continue
        limit = setting.limit
        if not setting.by_admin:
            cap = ceiling(policy, snap, org, agent_id, period)
            if cap is not None:
                limit = min(limit, cap)
        budgets[period] = limit
    return budgets


def _merged_agents(policy: Policy, snap: Snapshot) -> dict[tuple[str, str], AgentPolicy]:
    agents: dict[tuple[str, str], AgentPolicy] = {}
    for key, agent in policy.agents.items():
        budgets = base_budgets(policy, snap, *key)
        agents[key] = agent if budgets == dict(agent.budgets) else dataclasses.replace(agent, budgets=budgets)
    for key, api in snap.agents.items():
        if key in agents:
            continue  # the file defines this agent now: it wins
        agents[key] = AgentPolicy(
            org=api.org,
            agent_id=api.agent_id,
            budgets=base_budgets(policy, snap, *key),
            max_tokens_per_request=api.max_tokens_per_request,
            allowed_models=api.allowed_models,
            allowed_tools=api.allowed_tools,
        )
    return agents


def _merged_orgs(policy: Policy, snap: Snapshot) -> dict[str, OrgPolicy]:
    orgs = dict(policy.orgs)
    for org_id, api in snap.orgs.items():
        orgs.setdefault(org_id, OrgPolicy(org_id, dict(api.budgets)))
    # Every org with an API agent has an OrgPolicy, so budget_lines finds it.
    for org_id, _ in snap.agents:
        orgs.setdefault(org_id, OrgPolicy(org_id, {}))
    return orgs


@dataclass(frozen=True)
class GovernedPolicy(Policy):
    """A :class:`Policy` whose agents, orgs, prices and budget lines include the API's changes.

    ``agent()`` and ``route()`` are inherited unchanged (the merged mappings are precomputed);
    ``budget_lines`` adds what depends on the time: overrides, top-ups and resets.
    """

    overlay: Snapshot = field(default_factory=Snapshot)
    base: Policy | None = None

    def _limits_at(
        self, org: str, agent_id: str | None, base: Mapping[Period, int], now: float
    ) -> dict[Period, int]:
        limits = dict(base)
        for period in PERIODS:
            overrides = [a for a in self.overlay.adjustments.get((org, agent_id, period), ())
                         if a.mode == "override" and a.active(now)]  # fmt: skip
            if overrides:
                limits[period] = overrides[-1].amount  # the latest operator decision wins
        return limits

    def _topups(self, line: BudgetLine, now: float) -> int:
        return sum(
            a.amount
            for a in self.overlay.adjustments.get((line.org, line.agent, line.period), ())
            if a.mode == "topup" and a.active(now) and a.window_end == line.resets_at
        )

    def _reset_start(self, line: BudgetLine, now: float) -> int:
        scopes = [(ANY, ANY), (line.org, ANY)]
        if line.level == "agent" and line.agent is not None:
            scopes.append((line.org, line.agent))
        start = line.window_start
        for org, agent in scopes:
            at = self.overlay.resets.get((org, agent, line.period))
            # A reset applies inside the calendar window it was made in, once its time has come
            # (an instance whose clock is behind picks it up when it gets there).
            if at is not None and line.window_start <= at <= now and at > start:
                start = at
        return start

    def budget_lines(self, agent: AgentPolicy, now: datetime) -> list[BudgetLine]:
        """Every budget covering a call by ``agent`` now, with overrides, top-ups and resets applied."""
        if not self.overlay.adjustments and not self.overlay.resets:
            # Nothing time-dependent to apply: the file policy's per-window cache is exact
            # (this object is rebuilt whenever the governance snapshot changes).
            return super().budget_lines(agent, now)
        ts = now.timestamp()
        org = self.orgs.get(agent.org)
        agent_limits = self._limits_at(agent.org, agent.agent_id, agent.budgets, ts)
        org_limits = self._limits_at(agent.org, None, org.budgets if org else {}, ts)
        lines = lines_for(agent.org, agent.agent_id, agent_limits, org_limits, now, self.tz)
        out = []
        for line in lines:
            extra = self._topups(line, ts)
            start = self._reset_start(line, ts) if line.period != "total" else line.window_start
            if extra or start != line.window_start:
                line = dataclasses.replace(line, limit=line.limit + extra, window_start=start)
            out.append(line)
        return out


def govern(policy: Policy, snap: Snapshot) -> GovernedPolicy:
    """The file's policy with the snapshot merged in (cheap enough to redo on every change)."""
    base = policy.base if isinstance(policy, GovernedPolicy) and policy.base is not None else policy
    prices = base.prices
    if snap.prices:
        prices = dataclasses.replace(base.prices, refreshed={**base.prices.refreshed, **snap.prices})
    return GovernedPolicy(
        global_=base.global_,
        providers=base.providers,
        agents=_merged_agents(base, snap),
        orgs=_merged_orgs(base, snap),
        prices=prices,
        source=base.source,
        overlay=snap,
        base=base,
    )


def calendar_window(policy: Policy, period: Period, now: datetime) -> tuple[int, int | None]:
    """The calendar window of ``period`` containing ``now`` in the policy's timezone."""
    return window_bounds(period, now, policy.tz)
