"""Event ids, threshold crossings (pure), and the event constructors."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from resgov.alerts import (
    DEFAULT_THRESHOLDS,
    budget_exceeded,
    budget_threshold,
    event_id,
    forecast_exhaustion,
    highest_per_line,
    reservation_overage,
    store_down,
    threshold_crossings,
    validate_thresholds,
)
from resgov.alerts.events import AlertEvent, Crossing, breaker_tripped, reservations_expired, threshold_mark
from resgov.core.budget import BudgetLine, LineState
from resgov.core.money import NANO

DAY = BudgetLine("acme", "agent", "hermes", "daily", 3 * NANO, 1_700_000_000, 1_700_086_400)
ORG = BudgetLine("acme", "org", None, "monthly", 10 * NANO, 1_698_796_800, 1_701_388_800)
TOTAL = BudgetLine("acme", "agent", "hermes", "total", 100 * NANO, 0, None)


def test_threshold_mark_is_exact_decimal() -> None:
    # 80 % of 3.00 is exactly 2.40 (no binary-float 2.4000000000000004).
    assert threshold_mark(3 * NANO, 0.8) == 2_400_000_000
    assert threshold_mark(3 * NANO, 1.0) == 3 * NANO
    assert threshold_mark(1, 0.5) == 1  # rounds up: half of one nano is reached at one nano


def test_crossings_basic() -> None:
    before = {DAY.key: LineState(spent=1_400_000_000, reserved=200)}
    after = {DAY.key: LineState(spent=1_500_000_000)}
    crossings = threshold_crossings([DAY], before, after, DEFAULT_THRESHOLDS)
    assert [(c.line, c.threshold) for c in crossings] == [(DAY, 0.5)]  # reaching the mark exactly counts
    # Already past it before: nothing new.
    assert (
        threshold_crossings([DAY], after, {DAY.key: LineState(spent=1_600_000_000)}, DEFAULT_THRESHOLDS) == []
    )


def test_crossings_several_lines_and_jumps() -> None:
    before = {DAY.key: LineState(spent=0), ORG.key: LineState(spent=4 * NANO)}
    after = {DAY.key: LineState(spent=3 * NANO), ORG.key: LineState(spent=7 * NANO)}
    crossings = threshold_crossings([DAY, ORG], before, after, DEFAULT_THRESHOLDS)
    assert {(c.line.key, c.threshold) for c in crossings} == {
        (DAY.key, 0.5), (DAY.key, 0.8), (DAY.key, 1.0), (ORG.key, 0.5),
    }  # fmt: skip
    top = highest_per_line(crossings)
    assert {(c.line.key, c.threshold) for c in top} == {(DAY.key, 1.0), (ORG.key, 0.5)}


def test_crossings_edge_cases() -> None:
    zero = BudgetLine("acme", "agent", "z", "daily", 0, 0, 86_400)
    assert threshold_crossings([zero], {}, {zero.key: LineState(spent=5)}, DEFAULT_THRESHOLDS) == []
    # No after-state for a line: nothing can be said about it.
    assert threshold_crossings([DAY], {}, {}, DEFAULT_THRESHOLDS) == []
    # Missing before-state means zero spent; reserved amounts never count.
    assert threshold_crossings([DAY], {}, {DAY.key: LineState(spent=0, reserved=3 * NANO)}, (0.5,)) == []
    # Thresholds above 1 alert on overage beyond the limit.
    over = threshold_crossings([DAY], {}, {DAY.key: LineState(spent=4 * NANO)}, (1.2,))
    assert [c.threshold for c in over] == [1.2]


def test_ids_are_deterministic_and_distinct() -> None:
    c = Crossing(DAY, 0.8, 0, 2_500_000_000)
    a = budget_threshold(c, "USD", now=1.0)
    b = budget_threshold(Crossing(DAY, 0.8, 100, 2_600_000_000), "USD", now=999.0)
    assert a.id == b.id  # same type, org, agent, window, threshold: whoever sees it, whenever
    assert a.id.startswith("evt_") and len(a.id) == 36
    other_threshold = budget_threshold(Crossing(DAY, 0.5, 0, 2_500_000_000), "USD")
    next_window = BudgetLine("acme", "agent", "hermes", "daily", 3 * NANO, 1_700_086_400, 1_700_172_800)
    other_window = budget_threshold(Crossing(next_window, 0.8, 0, 2_500_000_000), "USD")
    raised = BudgetLine("acme", "agent", "hermes", "daily", 5 * NANO, DAY.window_start, DAY.resets_at)
    raised_limit = budget_threshold(Crossing(raised, 0.8, 0, 4 * NANO), "USD")
    other_org = BudgetLine("beta", "agent", "hermes", "daily", 3 * NANO, DAY.window_start, DAY.resets_at)
    other = budget_threshold(Crossing(other_org, 0.8, 0, 2_500_000_000), "USD")
    ids = {a.id, other_threshold.id, other_window.id, raised_limit.id, other.id}
    assert len(ids) == 5
    assert event_id("x", "a", "b") != event_id("x", "ab", "")  # separator: no ambiguity


def test_threshold_event_content_and_ttl() -> None:
    e = budget_threshold(Crossing(DAY, 0.8, 0, 2_400_000_000), "USD", reserved=100_000_000, now=1_700_000_100)
    assert e.type == "budget.threshold" and e.severity == "warning"
    assert e.org == "acme" and e.agent == "hermes"
    assert e.data["limit"] == 3.0 and e.data["spent"] == 2.4 and e.data["remaining"] == 0.5
    assert e.data["threshold"] == 0.8 and e.data["period"] == "daily"
    assert "80%" in e.title and "$2.40" in e.message
    # The claim lives until the window resets (+1 day margin).
    assert e.dedupe_ttl == pytest.approx(1_700_086_400 - 1_700_000_100 + 86_400)
    assert budget_threshold(Crossing(DAY, 1.0, 0, 3 * NANO), "USD").severity == "critical"
    assert budget_threshold(Crossing(TOTAL, 0.5, 0, 60 * NANO), "USD").dedupe_ttl > 300 * 86_400


def test_other_constructors_and_roundtrip() -> None:
    events: list[AlertEvent] = [
        budget_exceeded(DAY, "hermes", 2_900_000_000, 150_000_000, "USD"),
        reservation_overage("acme", "hermes", "rgr_1", "gpt-x", 100, 250, "USD"),
        reservations_expired(3, "charge", backend="sqlite"),
        breaker_tripped("acme", "hermes", "loop_detected", 1_700_000_000, detail="12 identical calls"),
        store_down("redis", "connection refused", now=1_000_000),
        forecast_exhaustion(DAY, "hermes", 1_700_050_000, NANO, 200_000_000, "USD", now=1_700_040_000),
    ]
    for e in events:
        assert e.id.startswith("evt_")
        assert AlertEvent.from_record(e.to_record()) == e
        body = e.body()
        assert body["id"] == e.id and body["type"] == e.type and body["created_at"].endswith("Z")
    exceeded = events[0]
    assert exceeded.data["reason"] == "daily_budget_exceeded" and exceeded.data["required"] == 0.15
    # Another refusal in the same window is the same event (alerted once per window).
    assert budget_exceeded(DAY, "hermes", 3 * NANO, 1, "USD").id == exceeded.id
    assert events[1].data["overage"] == pytest.approx(150e-9)
    # store.down: same id within a 5-minute bucket, whichever instance sees it.
    assert store_down("redis", "x", now=1_000_001).id == events[4].id
    assert store_down("redis", "x", now=1_000_000 + 300).id != events[4].id
    assert events[5].data["remaining_time_seconds"] == 10_000


def test_validate_thresholds() -> None:
    assert validate_thresholds([1.0, 0.5, 0.8, 0.5]) == (0.5, 0.8, 1.0)
    for bad in ([0], [-0.1], [11]):
        with pytest.raises(ValueError):
            validate_thresholds(bad)


@given(
    limit=st.integers(min_value=1, max_value=10**21),
    a=st.integers(min_value=0, max_value=10**22),
    b=st.integers(min_value=0, max_value=10**22),
    threshold=st.sampled_from([0.01, 0.1, 0.25, 0.333, 0.5, 0.8, 0.9, 0.99, 1.0, 1.5]),
    near=st.booleans(),
)
def test_crossings_match_exact_arithmetic(limit: int, a: int, b: int, threshold: float, near: bool) -> None:
    """The float pre-check never changes the exact answer, including right at the mark."""
    from fractions import Fraction
    from math import ceil

    mark = ceil(limit * Fraction(str(threshold)))
    if near:  # land around the mark, where rounding would matter
        a, b = mark - 1 - a % 3, mark - 1 + b % 3
    before, after = min(a, b), max(a, b)
    line = BudgetLine("o", "agent", "x", "daily", limit, 0, 86_400)
    got = threshold_crossings(
        [line], {line.key: LineState(before)}, {line.key: LineState(after)}, (threshold,)
    )
    assert bool(got) == (before < mark <= after)
