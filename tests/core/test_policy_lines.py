"""Budget lines are cached per agent only until the earliest window reset."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from resgov.config.rgf import parse_policy

POLICY = """
[global]
timezone = "Europe/Paris"
[orgs.acme]
monthly_budget = 100
[agents.bot]
org = "acme"
hourly_budget = 1
daily_budget = 5
"""


def test_lines_roll_over_at_each_reset_and_never_serve_a_stale_window() -> None:
    policy = parse_policy(POLICY)
    agent = policy.agents[("acme", "bot")]
    start = datetime(2026, 3, 29, 0, 30, tzinfo=UTC)  # the night Paris moves to summer time
    seen: dict[str, set[str]] = {}
    for minutes in range(0, 24 * 60, 7):
        now = start + timedelta(minutes=minutes)
        cached = policy.budget_lines(agent, now)
        fresh = parse_policy(POLICY).budget_lines(agent, now)
        assert [line.key for line in cached] == [line.key for line in fresh], now
        for line in cached:
            seen.setdefault(line.period, set()).add(line.key)
            assert line.window_start <= now.timestamp() < (line.resets_at or float("inf"))
    assert len(seen["hourly"]) >= 23 and len(seen["daily"]) == 2 and len(seen["monthly"]) == 1
    # A clock set back before the cached windows recomputes them too.
    early = start - timedelta(days=3)
    assert policy.budget_lines(agent, early)[0].window_start <= early.timestamp()
