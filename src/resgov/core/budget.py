"""Budget math: which budgets cover a call, whether a reservation fits, how it settles.

The SQLite store and the property tests use these functions directly; the Redis
store mirrors ``first_misfit`` and ``settle`` in Lua (ledger/redis_scripts.py) and
the shared contract suite holds both to the same answers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal
from zoneinfo import ZoneInfo

from resgov.core.windows import PERIODS, Period, window_bounds

Level = Literal["agent", "org"]
SettleKind = Literal["actual", "estimated", "release", "expire_charge", "expire_release"]


@dataclass(frozen=True, slots=True)
class BudgetLine:
    """One budget, in one window, that covers a call (e.g. agent hermes, daily, 2026-11-29)."""

    org: str
    level: Level
    agent: str | None
    period: Period
    limit: int
    window_start: int
    resets_at: int | None
    #: The ledger key of this line, unique within its org (computed once: every reservation,
    #: settlement and cost header looks it up).
    key: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        who = f"a:{self.agent}" if self.level == "agent" else "o"
        object.__setattr__(self, "key", f"{who}:{self.period}:{self.window_start}")

    @property
    def reason(self) -> str:
        """The refusal reason when this line does not fit: ``daily_budget_exceeded``, ``org_daily_…``."""
        base = f"{self.period}_budget_exceeded"
        return base if self.level == "agent" else f"org_{base}"


@dataclass(frozen=True, slots=True)
class LineState:
    """Committed and reserved spend on one ledger line."""

    spent: int = 0
    reserved: int = 0

    @property
    def used(self) -> int:
        """What a new reservation must fit beside."""
        return self.spent + self.reserved


#: The state of a line nothing was ever spent or reserved on.
NO_SPEND = LineState()


def lines_for(
    org: str,
    agent: str,
    agent_limits: Mapping[Period, int],
    org_limits: Mapping[Period, int],
    now: datetime,
    tz: ZoneInfo,
) -> list[BudgetLine]:
    """Every budget line covering a call by ``agent`` of ``org`` at ``now``, agent lines first."""
    lines: list[BudgetLine] = []
    for level, limits, who in (("agent", agent_limits, agent), ("org", org_limits, None)):
        for period in PERIODS:
            limit = limits.get(period)
            if limit is None:
                continue
            start, end = window_bounds(period, now, tz)
            lines.append(BudgetLine(org, level, who, period, limit, start, end))  # type: ignore[arg-type]
    return lines


def first_misfit(
    lines: Sequence[BudgetLine], states: Mapping[str, LineState], amount: int
) -> BudgetLine | None:
    """The first line that cannot take ``amount`` more, or ``None`` if all can (all-or-nothing)."""
    for line in lines:
        state = states.get(line.key, NO_SPEND)
        if state.used + amount > line.limit:
            return line
    return None


def remaining(lines: Sequence[BudgetLine], states: Mapping[str, LineState]) -> int | None:
    """The smallest ``limit - spent - reserved`` over the lines (never below 0); None if no lines."""
    if not lines:
        return None
    return min(max(0, line.limit - states.get(line.key, NO_SPEND).used) for line in lines)


@dataclass(slots=True)
class Charge:
    """How a reservation settles: what is charged, what is refunded, what exceeded it."""

    charged: int
    refund: int
    overage: int


def settle(reserved: int, kind: SettleKind, amount: int) -> Charge:
    """Settle a reservation of ``reserved`` nano-units.

    ``actual`` charges the provider's reported cost even above the reservation (the
    excess is overage, flagged, never hidden); ``estimated`` charges an estimate but
    never more than was reserved; ``release`` and ``expire_release`` charge nothing;
    ``expire_charge`` charges the full reservation. ``charged + refund == reserved + overage``.
    """
    if amount < 0 or reserved < 0:
        raise ValueError("amounts must be non-negative")
    if kind == "actual":
        charged = amount
    elif kind == "estimated":
        charged = min(amount, reserved)
    elif kind == "expire_charge":
        charged = reserved
    else:
        charged = 0
    overage = max(0, charged - reserved)
    return Charge(charged=charged, refund=reserved - charged + overage, overage=overage)
