"""``resgov check`` shows each agent's and org's guards, and suggests values for those that are off."""

from __future__ import annotations

from resgov.config.rgf import describe, parse_policy

POLICY = """
[orgs.acme]
monthly_budget = 100
max_concurrent = 10

[agents.plain]
daily_budget = 3.00

[agents.guarded]
org = "acme"
daily_budget = 3.00
rpm = 30
loop_max_repeats = 8
max_spend_per_minute = 0.2
cooldown_seconds = 120
session_budget = 1
"""


def lines() -> dict[str, str]:
    out = {}
    for line in describe(parse_policy(POLICY, library_prices=False)):
        head, _, rest = line.partition(" guards: ")
        if rest:
            out[head] = rest
    return out


def test_guards_off_get_toml_ready_suggestions() -> None:
    plain = lines()["agent default/plain"]
    assert plain.startswith("off (suggested: ")
    for hint in ("loop_max_repeats = 10", "loop_window_seconds = 300", "max_spend_per_minute = 0.15",
                 "rpm = 60", "cooldown_seconds = 300"):  # fmt: skip
        assert hint in plain
    # The suggestions parse as the keys they name (pasted into the agent's section).
    hints = plain.removeprefix("off (suggested: ").removesuffix(")").replace(", ", "\n")
    parse_policy(f"[agents.plain]\ndaily_budget = 3\n{hints}\n", library_prices=False)


def test_guards_on_are_listed() -> None:
    guarded = lines()["agent acme/guarded"]
    assert guarded == (
        "rpm 30, loop after 8 repeats in 300s (normalized), max $0.20/min, session budget $1.00, "
        "paused 120s on a trip"
    )
    assert lines()["org acme"].startswith("max_concurrent 10 (suggested: max_spend_per_minute = 5, rpm = 600")
