"""Forecasting math on synthetic spend histories with known answers.

Times are anchored on a bucket boundary (``T0``) so the expected numbers are exact:
a history of N full buckets plus a partial one whose elapsed time each test chooses.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from resgov.core.forecast import (
    MAX_HORIZON_SECONDS,
    Buckets,
    bucket_seconds_for,
    bucketize,
    estimate_rate,
    forecast,
)

NANO = 1_000_000_000
B = 300  # bucket seconds for a 6 h lookback
LOOKBACK = 6 * 3600
T0 = 1_780_000_200.0  # a multiple of 300: a bucket boundary
assert T0 % B == 0


def history(per_bucket: list[int], elapsed: float = 0.0, partial: int = 0) -> Buckets:
    """Buckets from one call per full bucket (at its middle) plus ``partial`` spent in the partial one."""
    now = T0 + elapsed
    n = len(per_bucket)
    start = T0 - n * B
    events = [(start + (i + 0.5) * B, amount) for i, amount in enumerate(per_bucket)]
    if partial:
        events.append((T0 + elapsed / 2, partial))
    return bucketize(events, now, n * B, B)


def test_bucket_sizes_follow_the_lookback() -> None:
    assert bucket_seconds_for(3600) == 300
    assert bucket_seconds_for(6 * 3600) == 300
    assert bucket_seconds_for(24 * 3600) == 1200
    assert bucket_seconds_for(168 * 3600) == 8400
    assert all(bucket_seconds_for(h * 3600) % 300 == 0 for h in range(1, 169))


def test_bucketize_aligns_to_the_clock_and_keeps_late_events() -> None:
    now = T0 + 120
    b = bucketize(
        [(T0 - 1, 5), (T0 - 301, 7), (T0 + 10, 11), (now + 30, 13), (T0 - 10_000_000, 99)], now, 900, B
    )
    assert b.start == T0 - 3 * B
    assert b.amounts == (0, 7, 5, 24)  # the clock-skewed event lands in the partial bucket
    assert b.elapsed == 120
    assert b.full == 3
    assert b.nonempty == 3
    assert b.total == 36


def test_constant_rate_is_exact_with_full_confidence_shape() -> None:
    per = 50_000_000  # $0.05 per 5 minutes = $0.60/h
    b = history([per] * 72)
    r = estimate_rate(b)
    assert r.rate_per_hour == pytest.approx(0.6 * NANO)
    assert r.trend == "steady"
    assert r.trend_slope_per_hour == pytest.approx(0.0, abs=1e-3)
    # No dispersion: confidence is the coverage term alone, 72 / (72 + 4).
    assert r.confidence == pytest.approx(72 / 76, abs=1e-4)

    f = forecast(b, limit=10 * NANO, used=4 * NANO, resets_at=T0 + 24 * 3600)
    assert f.status == "ok"
    assert f.remaining == 6 * NANO
    assert f.remaining_time_seconds == pytest.approx(10 * 3600)  # $6 at $0.60/h
    assert f.exhausts_at == pytest.approx(T0 + 10 * 3600)
    assert f.exhausts_before_reset is True


def test_partial_bucket_is_scaled_by_elapsed_time_not_taken_as_full() -> None:
    per = 60_000_000
    full = estimate_rate(history([per] * 72))
    # Half of the current bucket has elapsed and half a bucket's worth was spent in it:
    # the same rate, exactly (a naive sum would read it as half the rate).
    half = estimate_rate(history([per] * 72, elapsed=150, partial=per // 2))
    assert half.rate_per_hour == pytest.approx(full.rate_per_hour)
    assert half.trend == "steady"
    # Ten seconds in with nothing spent yet: the partial bucket weighs 10/300 of a bucket,
    # so the rate barely moves (a zero-weighted-as-full bucket would drop it by ~2%).
    early = estimate_rate(history([per] * 72, elapsed=10))
    assert early.rate_per_hour == pytest.approx(full.rate_per_hour, rel=0.002)
    # A big call ten seconds in moves the estimate as much as the same call in the newest
    # full bucket would, not 30x more (its rate over 10 s is huge, but it weighs 10/300).
    spike = estimate_rate(history([per] * 72, elapsed=10, partial=10 * per))
    in_last_full = estimate_rate(history([per] * 71 + [11 * per]))
    assert spike.rate_per_hour == pytest.approx(in_last_full.rate_per_hour, rel=0.1)
    assert spike.rate_per_hour < 2 * full.rate_per_hour


def test_acceleration_reads_as_rising_with_the_exact_slope() -> None:
    c = 1_000_000  # bucket i spends c * (i + 1): the hourly rate grows by 144 c per hour
    b = history([c * (i + 1) for i in range(72)])
    r = estimate_rate(b)
    assert r.trend == "rising"
    assert r.trend_slope_per_hour == pytest.approx(144 * c, rel=1e-9)
    newest = 72 * c * 12  # the last bucket's hourly rate
    plain_mean = sum(c * (i + 1) for i in range(72)) / 72 * 12
    # Recent buckets weigh more: the estimate sits well above the plain mean, below the newest.
    assert plain_mean * 1.4 < r.rate_per_hour < newest
    f_accel = forecast(b, limit=10 * NANO, used=0, resets_at=None)
    flat = history([round(plain_mean / 12)] * 72)
    f_flat = forecast(flat, limit=10 * NANO, used=0, resets_at=None)
    assert f_accel.remaining_time_seconds is not None and f_flat.remaining_time_seconds is not None
    assert f_accel.remaining_time_seconds < f_flat.remaining_time_seconds


def test_deceleration_reads_as_falling() -> None:
    c = 1_000_000
    r = estimate_rate(history([c * (72 - i) for i in range(72)]))
    assert r.trend == "falling"
    assert r.trend_slope_per_hour == pytest.approx(-144 * c, rel=1e-9)


def test_recent_buckets_weigh_more_by_the_half_life() -> None:
    """A burst one half-life (1 h = 12 buckets) older counts exactly half as much."""
    burst = 500_000_000

    def with_burst_at(age_buckets: int) -> float:
        amounts = [0] * 72
        amounts[71 - age_buckets] = burst
        return estimate_rate(history(amounts)).rate_per_hour

    assert with_burst_at(0) == pytest.approx(2 * with_burst_at(12))
    assert with_burst_at(3) == pytest.approx(4 * with_burst_at(27))


def test_bursts_lower_confidence_but_keep_the_mean_rate() -> None:
    per = 20_000_000
    steady = estimate_rate(history([per] * 72))
    # The same spend in bursts: six buckets' worth every sixth bucket.
    bursty = estimate_rate(history([6 * per if i % 6 == 5 else 0 for i in range(72)]))
    assert bursty.rate_per_hour == pytest.approx(steady.rate_per_hour, rel=0.25)
    assert bursty.confidence < steady.confidence / 2
    # One lone burst in an idle lookback: almost no confidence.
    lone = estimate_rate(history([0] * 71 + [72 * per]))
    assert lone.confidence < 0.05
    assert lone.nonempty_buckets == 1


def test_idle_history_has_no_data() -> None:
    b = history([0] * 72)
    f = forecast(b, limit=5 * NANO, used=NANO, resets_at=T0 + 3600)
    assert f.status == "no_data"
    assert f.rate.rate_per_hour == 0
    assert f.rate.confidence == 0
    assert f.remaining == 4 * NANO
    assert f.remaining_time_seconds is None and f.exhausts_at is None
    assert f.exhausts_before_reset is False


def test_going_idle_decays_the_rate_and_reads_as_falling() -> None:
    per = 100_000_000
    active = estimate_rate(history([per] * 72)).rate_per_hour
    # Busy for the first three hours, idle for the last three (three half-lives).
    gone_quiet = estimate_rate(history([per] * 36 + [0] * 36))
    assert gone_quiet.rate_per_hour < active / 8
    assert gone_quiet.trend == "falling"


def test_statuses() -> None:
    b = history([10_000_000] * 72)
    assert forecast(b, limit=None, used=0, resets_at=None).status == "no_budget"
    exhausted = forecast(b, limit=NANO, used=NANO, resets_at=T0 + 60)
    assert exhausted.status == "exhausted"
    assert exhausted.remaining == 0 and exhausted.remaining_time_seconds == 0
    assert exhausted.exhausts_before_reset is True
    # Exhausted wins over no data: an idle agent with nothing left is still exhausted.
    assert forecast(history([0] * 72), limit=NANO, used=2 * NANO, resets_at=None).status == "exhausted"


def test_exhausts_before_reset_compares_with_the_window() -> None:
    b = history([50_000_000] * 72)  # $0.60/h
    soon = forecast(b, limit=NANO, used=0, resets_at=T0 + 3 * 3600)  # runs out in 1 h 40 min
    later = forecast(b, limit=NANO, used=0, resets_at=T0 + 3600)
    total = forecast(b, limit=NANO, used=0, resets_at=None)
    assert soon.exhausts_before_reset is True
    assert later.exhausts_before_reset is False
    assert total.exhausts_before_reset is True  # a total budget never resets
    assert soon.within(2 * 3600) and not soon.within(3600)
    assert not later.within(10 * 3600)  # the reset comes first: no alert
    assert not soon.within(2 * 3600, min_confidence=0.99)


def test_a_trickle_is_not_a_date_in_year_9999() -> None:
    b = history([0] * 71 + [1])
    f = forecast(b, limit=10**27, used=0, resets_at=None)
    assert f.status == "ok"
    assert f.exhausts_at is None and f.remaining_time_seconds is None
    assert 10**27 / f.rate.rate_per_hour * 3600 > MAX_HORIZON_SECONDS


@settings(max_examples=150, deadline=None)
@given(
    amounts=st.lists(st.integers(0, 10**12), min_size=12, max_size=72),
    elapsed=st.floats(0, 299),
    partial=st.integers(0, 10**12),
    scale=st.integers(1, 1000),
)
def test_properties(amounts: list[int], elapsed: float, partial: int, scale: int) -> None:
    b = history(amounts, elapsed, partial)
    r = estimate_rate(b)
    assert 0.0 <= r.confidence <= 1.0
    rates = [a / B * 3600 for a in amounts]
    if elapsed > 0:
        rates.append((partial if partial else 0) / elapsed * 3600)
    if b.total == 0:
        assert r.rate_per_hour == 0
        return
    # A weighted mean lies between the smallest and the largest bucket rate.
    assert min(rates) * (1 - 1e-9) <= r.rate_per_hour <= max(rates) * (1 + 1e-9)
    # Linear in the amounts; the shape (trend, confidence) does not depend on the scale.
    scaled = estimate_rate(history([a * scale for a in amounts], elapsed, partial * scale))
    assert scaled.rate_per_hour == pytest.approx(r.rate_per_hour * scale, rel=1e-9)
    assert scaled.confidence == pytest.approx(r.confidence, abs=1e-3)
    assert scaled.trend == r.trend or math.isclose(
        abs(r.trend_slope_per_hour) * 6 / r.rate_per_hour, 0.25, rel_tol=1e-6
    )
