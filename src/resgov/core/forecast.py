"""Spend forecasting: how fast an agent spends, which way that is going, and when its budget runs out.

Pure functions over a spend history (``(finished_at, amount)`` pairs of settled audit
records, amounts in nano-units). No I/O: the server gathers the history and the
budget line's state, this module does the math. Floats are fine here: a forecast is
a statistical estimate shown to people, never an amount the ledger stores.

The model, in four steps (the README's "Predictive Budget Forecasting" repeats it):

1. **Buckets.** Spend is summed into buckets of ``bucket_seconds`` aligned to multiples
   of ``bucket_seconds`` in Unix time (so a dashboard polling every two seconds sees the
   same buckets). The lookback is rounded up to whole buckets. The bucket containing
   ``now`` is *partial*: only ``elapsed`` of its ``bucket_seconds`` have happened.
2. **Rate.** Each bucket gives a rate ``r_i = amount_i / duration_i`` where
   ``duration_i`` is ``bucket_seconds`` for a full bucket and ``elapsed`` for the partial
   one (dividing by the elapsed time is what removes the partial bucket's downward
   bias). Weights decay exponentially with the age of the bucket's midpoint,
   ``w_i = 2^(-age_i / half_life)`` (``half_life`` defaults to a sixth of the lookback, so
   the oldest bucket weighs about 1/64 of the newest), and the partial bucket's weight
   is further scaled by ``elapsed / bucket_seconds`` (it is a fraction of an
   observation, and a few seconds of data must not swing the estimate).
   ``rate = Σ w_i r_i / Σ w_i``.
3. **Trend.** A weighted least-squares line ``r = a + b·t`` through the same points and
   weights (``t`` in hours). ``b`` is the slope (nano-units per hour, per hour). The
   direction compares the fitted change across the lookback with the current rate:
   ``rel = b · lookback_hours / rate``; ``rising`` if ``rel > 0.25``, ``falling`` if
   ``rel < -0.25``, else ``steady``.
4. **Confidence**, in ``[0, 1]``: ``coverage × stability`` where
   ``coverage = n / (n + 4)`` with ``n`` the number of non-empty buckets (1 bucket: 0.2,
   12: 0.75, 72: 0.95) and ``stability = 1 / (1 + cv)`` with ``cv`` the weighted
   coefficient of variation of the bucket rates (``sqrt(Σ w (r - rate)² / Σ w) / rate``;
   0 for a perfectly steady spender, large for one burst in an idle lookback).

Exhaustion: ``remaining_time = remaining / rate`` (remaining = limit − spent − reserved,
what a new call could still reserve), ``exhausts_at = now + remaining_time``, and the
budget *exhausts before reset* when ``exhausts_at`` is not after the window's reset
(always, for a ``total`` budget that never resets). The rate is extrapolated flat: the
trend is reported, not compounded into the date, because a slope fitted to a few
hours of bursty spend extrapolates wildly.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

ForecastStatus = Literal["ok", "no_data", "exhausted", "no_budget"]
TrendDirection = Literal["rising", "steady", "falling"]

#: Relative change across the lookback beyond which the trend is "rising"/"falling".
TREND_THRESHOLD = 0.25
#: The coverage term's half-way point: this many non-empty buckets give coverage 0.5.
COVERAGE_K = 4
#: Bucket sizes are multiples of this (5 minutes), so buckets line up with the clock.
BUCKET_STEP = 300
#: About this many buckets per lookback: enough points for a slope, few enough to stay cheap.
TARGET_BUCKETS = 72
#: A predicted exhaustion further away than this is reported as "not in sight" (no date):
#: a tiny rate would otherwise give dates past year 9999.
MAX_HORIZON_SECONDS = 100 * 365 * 86400.0


def bucket_seconds_for(lookback_seconds: float) -> int:
    """The bucket size for a lookback: ``lookback / 72`` rounded up to whole 5 minutes (at least 5 min).

    6 h → 5 min (72 buckets), 24 h → 20 min, 168 h → 140 min.
    """
    raw = max(1.0, lookback_seconds) / TARGET_BUCKETS
    return max(BUCKET_STEP, math.ceil(raw / BUCKET_STEP) * BUCKET_STEP)


@dataclass(frozen=True, slots=True)
class Buckets:
    """Spend per bucket over a lookback; the last bucket is the partial one containing ``now``."""

    start: float
    bucket_seconds: int
    #: Nano-units per bucket, oldest first; the last entry is the partial bucket.
    amounts: tuple[int, ...]
    #: Seconds of the partial bucket that have elapsed (0 when ``now`` is exactly on a boundary).
    elapsed: float
    now: float

    @property
    def full(self) -> int:
        """How many full buckets precede the partial one."""
        return len(self.amounts) - 1

    @property
    def total(self) -> int:
        """All spend in the buckets."""
        return sum(self.amounts)

    @property
    def nonempty(self) -> int:
        """Buckets with any spend (the partial one included)."""
        return sum(1 for a in self.amounts if a > 0)


class BucketSums:
    """Clock-aligned buckets covering a lookback, filled one event at a time.

    For spend read page by page (a busy org's lookback can hold hundreds of thousands of
    audit rows): only the sums are kept, never the events.
    """

    __slots__ = ("_amounts", "_current", "_full", "_now", "_size", "_start")

    def __init__(self, now: float, lookback_seconds: float, bucket_seconds: int) -> None:
        if bucket_seconds <= 0:
            raise ValueError("bucket_seconds must be positive")
        self._now = now
        self._size = bucket_seconds
        self._current = math.floor(now / bucket_seconds) * bucket_seconds
        self._full = max(1, math.ceil(lookback_seconds / bucket_seconds))
        self._start = self._current - self._full * bucket_seconds
        self._amounts = [0] * (self._full + 1)

    def add(self, at: float, amount: int) -> None:
        """Count one event. Events before the first bucket are dropped; events stamped after
        ``now`` (another instance's clock running slightly ahead) are counted in the partial
        bucket rather than lost."""
        if at < self._start or amount <= 0:
            return
        self._amounts[min(self._full, int((at - self._start) // self._size))] += amount

    def buckets(self) -> Buckets:
        """The sums so far."""
        return Buckets(
            start=float(self._start),
            bucket_seconds=self._size,
            amounts=tuple(self._amounts),
            elapsed=self._now - self._current,
            now=self._now,
        )


def bucketize(
    events: Iterable[tuple[float, int]], now: float, lookback_seconds: float, bucket_seconds: int
) -> Buckets:
    """Sum ``(timestamp, amount)`` events into clock-aligned buckets covering the lookback."""
    sums = BucketSums(now, lookback_seconds, bucket_seconds)
    for at, amount in events:
        sums.add(at, amount)
    return sums.buckets()


@dataclass(frozen=True, slots=True)
class RateEstimate:
    """The spend rate and its shape, in nano-units per hour."""

    rate_per_hour: float
    trend: TrendDirection
    #: d(rate)/dt of the weighted fit: nano-units per hour, per hour.
    trend_slope_per_hour: float
    confidence: float
    nonempty_buckets: int
    #: Kish's effective sample size of the weights: how many buckets the estimate really rests on.
    effective_buckets: float


def _points(b: Buckets, half_life_seconds: float) -> list[tuple[float, float, float]]:
    """``(t_hours, rate_per_hour, weight)`` per bucket, ``t`` relative to now (negative = past)."""
    out: list[tuple[float, float, float]] = []
    size = float(b.bucket_seconds)
    for i, amount in enumerate(b.amounts):
        if i < b.full:
            duration = size
            mid = b.start + (i + 0.5) * size
            scale = 1.0
        else:
            # The partial bucket: its rate over the time that has elapsed (unbiased), with
            # a weight proportional to that time (it is only part of an observation).
            duration = b.elapsed
            mid = b.now - b.elapsed / 2
            scale = b.elapsed / size
            if duration <= 0:
                continue
        age = b.now - mid
        weight = scale * 0.5 ** (age / half_life_seconds)
        out.append(((mid - b.now) / 3600.0, amount / duration * 3600.0, weight))
    return out


def estimate_rate(b: Buckets, half_life_seconds: float | None = None) -> RateEstimate:
    """The exponentially weighted spend rate, its linear trend and a confidence (see the module doc)."""
    lookback = b.full * b.bucket_seconds
    half_life = half_life_seconds or max(float(b.bucket_seconds), lookback / 6)
    points = _points(b, half_life)
    sw = sum(w for _, _, w in points)
    nonempty = b.nonempty
    if sw <= 0 or nonempty == 0:
        return RateEstimate(0.0, "steady", 0.0, 0.0, nonempty, 0.0)
    rate = sum(w * r for _, r, w in points) / sw
    if rate <= 0:
        # Spend only in a partial bucket with no elapsed time: nothing measurable yet.
        return RateEstimate(0.0, "steady", 0.0, 0.0, nonempty, 0.0)
    effective = sw * sw / sum(w * w for _, _, w in points)

    # Weighted least squares r = a + slope * t.
    t_mean = sum(w * t for t, _, w in points) / sw
    var_t = sum(w * (t - t_mean) ** 2 for t, _, w in points)
    cov = sum(w * (t - t_mean) * (r - rate) for t, r, w in points)
    slope = cov / var_t if var_t > 0 else 0.0

    trend: TrendDirection = "steady"
    rel = slope * (lookback / 3600.0) / rate
    if rel > TREND_THRESHOLD:
        trend = "rising"
    elif rel < -TREND_THRESHOLD:
        trend = "falling"

    dispersion = math.sqrt(sum(w * (r - rate) ** 2 for _, r, w in points) / sw)
    cv = dispersion / rate
    coverage = nonempty / (nonempty + COVERAGE_K)
    confidence = coverage / (1.0 + cv)
    return RateEstimate(
        rate_per_hour=rate,
        trend=trend,
        trend_slope_per_hour=slope,
        confidence=round(min(1.0, max(0.0, confidence)), 4),
        nonempty_buckets=nonempty,
        effective_buckets=effective,
    )


@dataclass(frozen=True, slots=True)
class Forecast:
    """A budget's outlook: where it stands, how fast it drains, and when it runs out."""

    status: ForecastStatus
    #: ``limit - spent - reserved`` (never below 0), nano-units; None without a budget.
    remaining: int | None
    limit: int | None
    rate: RateEstimate
    #: Seconds until exhaustion at the current rate; 0 when exhausted; None if not in sight.
    remaining_time_seconds: float | None
    #: Unix time of the predicted exhaustion; None when there is no data or it is not in sight.
    exhausts_at: float | None
    resets_at: float | None
    exhausts_before_reset: bool
    now: float

    def within(self, horizon_seconds: float, min_confidence: float = 0.0) -> bool:
        """True when this forecast predicts exhaustion within the horizon and before the window resets.

        What the ``forecast.exhaustion`` alert fires on. Already-exhausted budgets are
        left to ``budget.exceeded``.
        """
        return (
            self.status == "ok"
            and self.exhausts_before_reset
            and self.remaining_time_seconds is not None
            and self.remaining_time_seconds <= horizon_seconds
            and self.rate.confidence >= min_confidence
        )


def forecast(
    buckets: Buckets,
    *,
    limit: int | None,
    used: int,
    resets_at: float | None,
    half_life_seconds: float | None = None,
) -> Forecast:
    """The forecast of one budget line from its spend buckets and its state (``used = spent + reserved``).

    Statuses, in order of precedence: ``no_budget`` (no limit for the period),
    ``exhausted`` (nothing left to reserve), ``no_data`` (no spend in the lookback),
    ``ok``.
    """
    rate = estimate_rate(buckets, half_life_seconds)
    now = buckets.now
    if limit is None:
        return Forecast("no_budget", None, None, rate, None, None, resets_at, False, now)
    remaining = max(0, limit - used)
    if remaining <= 0:
        return Forecast("exhausted", 0, limit, rate, 0.0, now, resets_at, True, now)
    if buckets.total <= 0 or rate.rate_per_hour <= 0:
        return Forecast("no_data", remaining, limit, rate, None, None, resets_at, False, now)
    seconds = remaining / rate.rate_per_hour * 3600.0
    if seconds > MAX_HORIZON_SECONDS:
        return Forecast("ok", remaining, limit, rate, None, None, resets_at, False, now)
    at = now + seconds
    before_reset = resets_at is None or at <= resets_at
    return Forecast("ok", remaining, limit, rate, seconds, at, resets_at, before_reset, now)
