"""Runaway-loop guards: rate limits, the loop detector, the spend-velocity breaker, sessions.

* :mod:`resgov.guard.fingerprint`: what makes two requests "near-identical" (pure).
* :mod:`resgov.guard.state`: the :class:`GuardState` protocol and its semantics.
* :mod:`resgov.guard.memory`: state for one process (the SQLite deployment).
* :mod:`resgov.guard.redis`: state shared by every instance on one Redis (Lua, Redis time).
* :mod:`resgov.guard.guard`: the :class:`Guard` the proxy calls, and its refusals.
"""

from __future__ import annotations

from resgov.guard.guard import CallContext, Guard, GuardRefusal, Ticket, TripEvent, wanted
from resgov.guard.memory import MemoryGuardState
from resgov.guard.state import GuardState, GuardStateError, PauseInfo


def state_for_url(store_url: str) -> GuardState:
    """Shared Redis state when the ledger is on Redis (``redis://``, ``rediss://``, ``unix://``), else memory.

    The Redis state uses the store URL's server and key prefix, so one deployment is one
    namespace; it keeps its own connection pool (it depends on nothing inside the ledger).
    """
    if store_url.startswith(("redis://", "rediss://", "unix://")):
        from resgov.guard.redis import RedisGuardState

        return RedisGuardState(store_url)
    return MemoryGuardState()


__all__ = [
    "CallContext",
    "Guard",
    "GuardRefusal",
    "GuardState",
    "GuardStateError",
    "MemoryGuardState",
    "PauseInfo",
    "Ticket",
    "TripEvent",
    "state_for_url",
    "wanted",
]
