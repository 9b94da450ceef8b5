"""Budget windows, calendar-aligned in the policy's timezone."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Literal
from zoneinfo import ZoneInfo

Period = Literal["hourly", "daily", "weekly", "monthly", "total"]
PERIODS: tuple[Period, ...] = ("hourly", "daily", "weekly", "monthly", "total")


def window_bounds(period: Period, now: datetime, tz: ZoneInfo) -> tuple[int, int | None]:
    """``(start, end)`` of the window containing ``now``, as Unix seconds; ``end`` is None for total.

    Boundaries are local wall-clock boundaries (midnight, Monday, the 1st) so a
    "daily" budget resets when the operator's day does, DST included.
    """
    if period == "total":
        return 0, None
    local = now.astimezone(tz)
    if period == "hourly":
        start = local.replace(minute=0, second=0, microsecond=0)
        # Hours are added in UTC so a DST change never yields a zero-length window.
        end_utc = start.astimezone(ZoneInfo("UTC")) + timedelta(hours=1)
        return int(start.timestamp()), int(end_utc.timestamp())
    day = local.replace(hour=0, minute=0, second=0, microsecond=0, tzinfo=None)
    if period == "daily":
        first, nxt = day, day + timedelta(days=1)
    elif period == "weekly":
        first = day - timedelta(days=day.weekday())
        nxt = first + timedelta(days=7)
    elif period == "monthly":
        first = day.replace(day=1)
        nxt = (first + timedelta(days=32)).replace(day=1)
    else:  # pragma: no cover - Literal exhausted
        raise ValueError(f"unknown period {period!r}")
    return int(first.replace(tzinfo=tz).timestamp()), int(nxt.replace(tzinfo=tz).timestamp())
