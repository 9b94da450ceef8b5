"""The pure merge of the .rgf file with the API's changes (core/overlay.py) and the price-list parser."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from resgov.config.rgf import parse_policy
from resgov.core.money import NANO, parse_amount
from resgov.core.overlay import (
    ANY,
    SYSTEM_ORG,
    GovernedPolicy,
    Snapshot,
    base_budgets,
    ceiling,
    compile_snapshot,
    govern,
    price_from_json,
    price_json,
)
from resgov.core.price_source import PriceSourceError, parse_openrouter
from resgov.core.pricing import PriceBook

FILE = """
[global]
timezone = "Europe/Paris"

[orgs.acme]
daily_budget = 10
monthly_budget = 100

[orgs.acme.agents.hermes]
daily_budget = 3

[orgs.other]
"""

Record = tuple[str, str, str, dict[str, Any]]


def policy() -> Any:
    p = parse_policy(FILE, library_prices=False)
    assert isinstance(p.prices, PriceBook)
    return p


def snap(*records: Record, version: int = 1) -> Snapshot:
    return compile_snapshot(version, records)


def agent_rec(org: str, agent: str, gen: str = "g1", **budgets: int) -> Record:
    return (org, "agent", agent, {"gen": gen, "budgets": budgets, "created_at": 1.0})


def limits(governed: GovernedPolicy, org: str, agent: str, now: datetime) -> dict[tuple[str, str], int]:
    lines = governed.budget_lines(governed.agent(org, agent), now)
    return {(line.level, line.period): line.limit for line in lines}


NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)


def test_api_agents_join_the_file_and_the_file_wins_a_clash() -> None:
    p = policy()
    g = govern(p, snap(agent_rec("acme", "scraper", daily=NANO), agent_rec("acme", "hermes", daily=9 * NANO),
                       agent_rec("beta", "hermes", daily=NANO)))  # fmt: skip
    assert g.agent("acme", "scraper").budgets == {"daily": NANO}
    assert g.agent("acme", "hermes").budgets == {"daily": 3 * NANO}  # the file's, not the API's 9
    assert g.agent("beta", "hermes").budgets == {"daily": NANO}  # same id, another org: its own agent
    assert "beta" in g.orgs and g.orgs["beta"].budgets == {}
    assert limits(g, "acme", "scraper", NOW) == {("agent", "daily"): NANO, ("org", "daily"): 10 * NANO,
                                                  ("org", "monthly"): 100 * NANO}  # fmt: skip


def test_ceiling_is_the_files_agent_limit_and_never_above_the_org() -> None:
    p = policy()
    s = Snapshot()
    assert ceiling(p, s, "acme", "hermes", "daily") == 3 * NANO
    assert ceiling(p, s, "acme", "new", "daily") == 10 * NANO
    assert ceiling(p, s, "acme", "new", "monthly") == 100 * NANO
    assert ceiling(p, s, "acme", "new", "hourly") is None
    assert ceiling(p, s, "other", "x", "daily") is None


def test_self_service_settings_are_clamped_to_the_file_even_after_it_changes() -> None:
    p = policy()
    setting = ("acme", "budget", "hermes:daily", {"limit": 2 * NANO, "gen": "rgf"})
    assert base_budgets(p, snap(setting), "acme", "hermes") == {"daily": 2 * NANO}
    lowered = parse_policy(FILE.replace("daily_budget = 3", "daily_budget = 1.5"), library_prices=False)
    assert base_budgets(lowered, snap(setting), "acme", "hermes") == {"daily": parse_amount("1.5")}
    admin = ("acme", "budget", "hermes:daily", {"limit": 7 * NANO, "gen": "rgf", "by_admin": True})
    assert base_budgets(p, snap(admin), "acme", "hermes") == {"daily": 7 * NANO}  # an operator decision
    # An extra window added by self-service is kept; a null from an org key only reverts to the file.
    hourly = ("acme", "budget", "hermes:hourly", {"limit": NANO, "gen": "rgf"})
    assert base_budgets(p, snap(hourly), "acme", "hermes") == {"daily": 3 * NANO, "hourly": NANO}


def test_settings_of_a_deleted_agent_do_not_carry_over_to_its_successor() -> None:
    p = policy()
    old_setting = ("acme", "budget", "bot:daily", {"limit": NANO // 2, "gen": "old"})
    g = govern(p, snap(agent_rec("acme", "bot", gen="new", daily=2 * NANO), old_setting))
    assert g.agent("acme", "bot").budgets == {"daily": 2 * NANO}
    removed = ("acme", "budget", "bot:daily", {"limit": None, "gen": "new"})
    g = govern(p, snap(agent_rec("acme", "bot", gen="new", daily=2 * NANO, monthly=NANO), removed))
    assert g.agent("acme", "bot").budgets == {"monthly": NANO}


def adj(ident: str, mode: str, amount: int, *, agent: str | None = "hermes", period: str = "daily",
        created: float, expires: float, window_end: int | None = None) -> Record:  # fmt: skip
    return ("acme", "adjustment", ident, {"agent_id": agent, "period": period, "mode": mode, "amount": amount,
            "created_at": created, "expires_at": expires, "window_end": window_end})  # fmt: skip


def test_overrides_apply_until_they_expire_and_the_latest_wins() -> None:
    p = policy()
    t = NOW.timestamp()
    g = govern(p, snap(adj("a1", "override", 5 * NANO, created=t - 10, expires=t + 60),
                       adj("a2", "override", 6 * NANO, created=t - 5, expires=t + 30),
                       adj("a3", "override", 50 * NANO, agent=None, created=t - 5, expires=t + 30)))  # fmt: skip
    assert limits(g, "acme", "hermes", NOW)[("agent", "daily")] == 6 * NANO
    assert limits(g, "acme", "hermes", NOW)[("org", "daily")] == 50 * NANO
    later = NOW + timedelta(seconds=45)
    assert limits(g, "acme", "hermes", later)[("agent", "daily")] == 5 * NANO
    assert limits(g, "acme", "hermes", later)[("org", "daily")] == 10 * NANO
    assert limits(g, "acme", "hermes", NOW + timedelta(seconds=61))[("agent", "daily")] == 3 * NANO
    # An override may add a window the agent did not have (a temporary tighter cap).
    g = govern(p, snap(adj("h", "override", NANO, period="hourly", created=t - 1, expires=t + 60)))
    assert limits(g, "acme", "hermes", NOW)[("agent", "hourly")] == NANO


def test_topups_apply_to_the_window_they_were_granted_for_only() -> None:
    p = policy()
    t = NOW.timestamp()
    line = p.budget_lines(p.agent("acme", "hermes"), NOW)[0]
    g = govern(p, snap(adj("t1", "topup", 2 * NANO, created=t - 1, expires=t + 7 * 86_400,
                           window_end=line.resets_at)))  # fmt: skip
    assert limits(g, "acme", "hermes", NOW)[("agent", "daily")] == 5 * NANO
    assert limits(g, "acme", "hermes", NOW + timedelta(days=1))[("agent", "daily")] == 3 * NANO


def test_a_reset_starts_a_fresh_window_and_calls_before_it_keep_theirs() -> None:
    p = policy()
    at = int(NOW.timestamp()) - 3600
    before = p.budget_lines(p.agent("acme", "hermes"), NOW)
    g = govern(p, snap(("acme", "reset", "hermes:daily", {"at": at})))
    after = g.budget_lines(g.agent("acme", "hermes"), NOW)
    agent_before, agent_after = before[0], after[0]
    assert agent_after.window_start == at and agent_after.key != agent_before.key
    assert agent_after.resets_at == agent_before.resets_at  # still ends at the calendar boundary
    org_before = next(x for x in before if x.level == "org" and x.period == "daily")
    org_after = next(x for x in after if x.level == "org" and x.period == "daily")
    assert org_after.key == org_before.key  # an agent's reset leaves its org's spend alone
    # A reset in the future (another instance's clock ahead) applies once this clock gets there.
    ahead = govern(p, snap(("acme", "reset", "hermes:daily", {"at": int(NOW.timestamp()) + 5})))
    assert ahead.budget_lines(ahead.agent("acme", "hermes"), NOW)[0].key == agent_before.key
    # The next calendar day starts normally.
    tomorrow = NOW + timedelta(days=1)
    assert g.budget_lines(g.agent("acme", "hermes"), tomorrow)[0].key == \
        p.budget_lines(p.agent("acme", "hermes"), tomorrow)[0].key  # fmt: skip
    # Org-wide and global resets cover every agent line and the org's line.
    for scope_org in ("acme", SYSTEM_ORG):
        g = govern(p, snap((scope_org, "reset", f"{ANY}:daily", {"at": at})))
        starts = {(x.level, x.period): x.window_start for x in g.budget_lines(g.agent("acme", "hermes"), NOW)}
        assert starts[("agent", "daily")] == at and starts[("org", "daily")] == at
        assert starts[("org", "monthly")] != at


def test_windows_are_calendar_aligned_in_the_timezone_and_caught_up_after_downtime() -> None:
    p = policy()
    paris = ZoneInfo("Europe/Paris")
    agent = p.agent("acme", "hermes")
    # 23:30 in Paris on the last Saturday of October (DST ends that night: a 25-hour day follows).
    late = datetime(2026, 10, 24, 23, 30, tzinfo=paris)
    line = p.budget_lines(agent, late)[0]
    assert datetime.fromtimestamp(line.window_start, paris) == datetime(2026, 10, 24, tzinfo=paris)
    nxt = p.budget_lines(agent, late + timedelta(hours=1))[0]
    assert nxt.key != line.key and nxt.window_start == line.resets_at
    assert datetime.fromtimestamp(nxt.window_start, paris).hour == 0
    assert nxt.resets_at is not None and nxt.resets_at - nxt.window_start == 25 * 3600
    # A server down for three days computes the window of "now", not of its last call: caught up.
    back = p.budget_lines(agent, late + timedelta(days=3, hours=1))[0]
    assert datetime.fromtimestamp(back.window_start, paris) == datetime(2026, 10, 28, tzinfo=paris)
    monthly = next(x for x in p.budget_lines(agent, late) if x.period == "monthly")
    assert datetime.fromtimestamp(monthly.window_start, paris) == datetime(2026, 10, 1, tzinfo=paris)


def test_refreshed_prices_sit_below_the_files_and_round_trip() -> None:
    p = parse_policy(FILE + '\n[models."openai/gpt-x"]\ninput_per_mtok = 1\noutput_per_mtok = 2\n',
                     library_prices=False)  # fmt: skip
    prices = parse_openrouter({"data": [
        {"id": "openai/gpt-x", "pricing": {"prompt": "0.000009", "completion": "0.000009"}},
        {"id": "vendor/model-y", "pricing": {"prompt": "0.0000025", "completion": "0.00001"}},
    ]})  # fmt: skip
    stored = (
        "_system",
        "prices",
        "openrouter",
        {"source": "x", "models": {k: price_json(v) for k, v in prices.items()}},
    )
    g = govern(p, snap(stored))
    found = g.prices.lookup(
        "openrouter/vendor/model-y", "openrouter", "vendor/model-y", "https://openrouter.ai/api/v1"
    )
    assert found is not None and found.input.base == parse_amount("2.5") and found.output.base == 10 * NANO
    file_price = g.prices.lookup("openai/gpt-x", "openai", "gpt-x", "https://api.openai.com/v1")
    assert file_price is not None and file_price.input.base == NANO  # the file's override wins
    assert price_from_json(price_json(prices["vendor/model-y"])) == prices["vendor/model-y"]


def test_openrouter_parser_is_exact_and_skips_what_it_cannot_price() -> None:
    prices = parse_openrouter({"data": [
        {"id": "a/exact", "context_length": 1000, "top_provider": {"max_completion_tokens": 77},
         "pricing": {"prompt": "0.0000000001", "completion": "0.000000123456789", "request": "0.001",
                     "input_cache_read": "0.0000001", "input_cache_write": "0", "web_search": "0.004",
                     "internal_reasoning": "0.00002"}},
        {"id": "openrouter/auto", "pricing": {"prompt": "-1", "completion": "-1"}},
        {"id": "b/no-completion", "pricing": {"prompt": "0.1"}},
        {"id": "c/garbage", "pricing": {"prompt": "abc", "completion": "1"}},
        {"id": "d/bool", "pricing": {"prompt": True, "completion": "1"}},
        "not a model", {"pricing": {}},
    ]})  # fmt: skip
    assert set(prices) == {"a/exact"}
    a = prices["a/exact"]
    assert a.input.base == 100_000  # 1e-10 per token = 1e-4 per MTok = 100_000 nano
    assert a.output.base == 123_456_789  # 0.123456789 per MTok, exact (no float rounding)
    assert a.per_request == 1_000_000 and a.per_web_search == 4_000_000
    assert a.cache_read is not None and a.cache_write is None and a.other_output
    assert (a.context_window, a.max_output_tokens) == (1000, 77)
    for bad in ({}, {"data": "x"}, [], {"data": []}, {"data": [{"id": "x", "pricing": {"prompt": "-1"}}]}):
        with pytest.raises(PriceSourceError):
            parse_openrouter(bad)


def test_unknown_or_damaged_records_are_skipped_not_fatal() -> None:
    s = compile_snapshot(3, [("acme", "future-kind", "x", {}), ("acme", "agent", "broken", {}),
                             agent_rec("acme", "ok", daily=1)])  # fmt: skip
    assert s.version == 3 and set(s.agents) == {("acme", "ok")}
