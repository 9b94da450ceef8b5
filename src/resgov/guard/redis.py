"""Guard state shared by every ResGov instance through one Redis: one limit, not one per instance.

Key layout (``P`` is the key prefix: ``resgov``, or the store URL's ``?prefix=NAME``, so a
guard and the ledger of one deployment share a namespace; ``S`` is one scope, ``a=<agent>``
or ``o`` for the whole org). Every key of an org sits under the org's hash tag, the same
one the Redis ledger uses, so one script only ever touches one Cluster shard::

    {P:org}:guard:S|pause      hash  reason, at, till (ms; absent = until resumed), ev:* evidence
    {P:org}:guard:S|win        zset  request id -> admission time (ms): the sliding 60 s window
    {P:org}:guard:S|winv       hash  t:<rid> tokens, s:<rid> spend, d:<rid> settled flag
    {P:org}:guard:S|sums       hash  tok, spend, done: running sums of what is in the window
    {P:org}:guard:S|inflight   zset  request id -> lease expiry (ms): calls in flight
    {P:org}:guard:S|loop       zset  "<fingerprint>|<rid>" -> time (ms), within the loop window
    {P:org}:guard:S|loopn      hash  fingerprint -> calls in the loop window
    {P:org}:guard:S|min        hash  minute number -> actual spend (the velocity baseline)
    {P:org}:guard:S|s:<digest> hash  calls, reserved, spent, h:<rid> held amount (one session)

Every key expires on its own (windows after two minutes idle, in-flight sets after two
leases, sessions after a day idle, pauses after their cooldown), so nothing needs sweeping.
An instance that dies leaves its in-flight slots to expire with their lease: the guard renews
the leases of its live calls in the background (:meth:`resgov.guard.guard.Guard.start`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError

from resgov.config.redis_url import InvalidRedisPrefix, split_redis_url
from resgov.guard import lua
from resgov.guard.state import (
    BASELINE_MINUTES,
    MIN_ACTIVE_MINUTES,
    SESSION_IDLE_SECONDS,
    AdmitRequest,
    GuardStateError,
    Outcome,
    PauseInfo,
    ScopeCheck,
    ScopeKind,
    SettleReport,
    Verdict,
)

_OUTCOMES: dict[str, Outcome] = {"ok": "ok", "refused": "refused", "tripped": "tripped", "paused": "paused"}
_KINDS: dict[str, ScopeKind] = {"agent": "agent", "org": "org"}


def _value(raw: str) -> Any:
    """An evidence value as Lua rendered it: int, float, or the string itself."""
    for cast in (int, float):
        try:
            return cast(raw)
        except ValueError:
            continue
    return raw


def _pairs(flat: Sequence[str]) -> dict[str, Any]:
    return {flat[i]: _value(flat[i + 1]) for i in range(0, len(flat) - 1, 2)}


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def _limit(value: float | None) -> str:
    return "" if value is None else repr(value) if isinstance(value, float) else str(value)


def _pause_from(reply: Sequence[str]) -> PauseInfo | None:
    if not reply:
        return None
    till = int(reply[2])
    return PauseInfo(
        reason=reply[0],
        paused_at=int(reply[1]) / 1000,
        paused_until=None if till < 0 else till / 1000,
        evidence=_pairs(reply[3:]),
    )


class RedisGuardState:
    """The :class:`~resgov.guard.state.GuardState` of several instances sharing one Redis."""

    name = "redis"

    def __init__(
        self, url: str, *, prefix: str | None = None, clock: Callable[[], float] | None = None
    ) -> None:
        try:
            conn_url, self.prefix = split_redis_url(url, prefix)
        except InvalidRedisPrefix as exc:
            raise GuardStateError(str(exc)) from None
        #: None: Redis ``TIME`` judges every window (the normal case). Tests inject a clock.
        self.clock = clock
        retry = Retry(ExponentialWithJitterBackoff(base=0.01, cap=0.25), 3)
        # Bounded and queueing, like the ledger's pool: a burst waits for a socket, never fails.
        pool = aioredis.BlockingConnectionPool.from_url(
            conn_url, max_connections=32, timeout=5.0, decode_responses=True,
            socket_connect_timeout=2.0, socket_timeout=10.0, retry=retry,
        )  # fmt: skip
        self._client: aioredis.Redis = aioredis.Redis.from_pool(pool)
        # redis-py's scripts run EVALSHA and reload the script on NOSCRIPT by themselves.
        self._admit: AsyncScript = self._client.register_script(lua.ADMIT)
        self._settle: AsyncScript = self._client.register_script(lua.SETTLE)
        self._renew: AsyncScript = self._client.register_script(lua.RENEW)
        self._resume: AsyncScript = self._client.register_script(lua.RESUME)
        self._pause_info: AsyncScript = self._client.register_script(lua.PAUSE_INFO)

    # -- keys ------------------------------------------------------------------------------------

    def _base(self, org: str, agent: str | None) -> str:
        scope = "o" if agent is None else f"a={agent}"
        return "{" + self.prefix + ":" + org + "}:guard:" + scope

    def _scope_base(self, org: str, agent: str, check: ScopeCheck) -> str:
        return self._base(org, agent if check.kind == "agent" else None)

    @staticmethod
    def _session_key(base: str, session: str | None) -> str:
        # A declared but untouched key when the call names no session (scripts declare all keys).
        return f"{base}|s:{session or '-'}"

    def _now(self) -> str:
        return "" if self.clock is None else str(round(self.clock() * 1000))

    async def _run(self, script: AsyncScript, keys: list[str], args: list[str]) -> Any:
        try:
            return await script(keys=keys, args=args)
        except RedisError as exc:
            raise GuardStateError(f"guard state unavailable: {type(exc).__name__}: {exc}") from exc

    # -- lifecycle -------------------------------------------------------------------------------

    async def open(self) -> None:
        """Nothing to do up front: the pool connects on first use (an outage then meets the fail-safe)."""

    async def close(self) -> None:
        """Close every pooled connection."""
        await self._client.aclose()

    async def ping(self) -> bool:
        """True when Redis answers."""
        try:
            return bool(await self._client.ping())
        except RedisError:
            return False

    # -- the protocol ----------------------------------------------------------------------------

    async def admit(self, request: AdmitRequest) -> Verdict:
        """One script: every check on every scope, then every write."""
        keys: list[str] = []
        args = [
            self._now(), request.rid, str(request.tokens), str(request.amount), str(_ms(request.lease_seconds)),
            str(len(request.scopes)), str(BASELINE_MINUTES), str(MIN_ACTIVE_MINUTES),
            str(_ms(SESSION_IDLE_SECONDS)),
        ]  # fmt: skip
        for check in request.scopes:
            base = self._scope_base(request.org, request.agent, check)
            keys += [
                f"{base}|{part}"
                for part in ("pause", "win", "winv", "sums", "inflight", "loop", "loopn", "min")
            ]
            keys.append(self._session_key(base, check.session))
            lim = check.limits
            args += [
                check.kind, check.fingerprint or "", "1" if check.session else "0",
                _limit(lim.rpm), _limit(lim.tpm), _limit(lim.max_concurrent), _limit(lim.loop_max_repeats),
                str(_ms(lim.loop_window_seconds)), _limit(lim.max_spend_per_minute),
                _limit(lim.spend_velocity_multiple),
                str(_ms(lim.cooldown_seconds)) if lim.cooldown_seconds else "",
                _limit(lim.session_budget), _limit(lim.max_calls_per_session),
            ]  # fmt: skip
        reply = await self._run(self._admit, keys, args)
        outcome = _OUTCOMES[reply[0]]
        if outcome == "ok":
            return Verdict("ok")
        retry_ms, till_ms, at_ms = int(reply[3]), int(reply[4]), int(reply[5])
        evidence = _pairs(reply[6:])
        if outcome == "paused":
            evidence = {"paused_at": at_ms / 1000, **evidence}
        return Verdict(
            outcome=outcome,
            scope=_KINDS[reply[1]],
            reason=reply[2],
            retry_after=None if retry_ms < 0 else retry_ms / 1000,
            paused_until=None if till_ms < 0 else till_ms / 1000,
            evidence=evidence,
        )

    async def settle(self, report: SettleReport) -> None:
        """One script: free the slot, replace the reservation by the actuals (idempotent)."""
        keys: list[str] = []
        flags: list[str] = []
        for check in report.scopes:
            base = self._scope_base(report.org, report.agent, check)
            keys += [f"{base}|{part}" for part in ("win", "winv", "sums", "inflight", "min")]
            keys.append(self._session_key(base, check.session))
            flags.append("1" if check.session else "0")
        args = [
            self._now(), report.rid, "" if report.tokens is None else str(report.tokens), str(report.cost),
            "1" if report.sent else "0", str(len(report.scopes)), str(BASELINE_MINUTES), *flags,
        ]  # fmt: skip
        await self._run(self._settle, keys, args)

    async def renew(self, org_rids: dict[str, list[tuple[str, str]]], lease_seconds: float) -> None:
        """One script per org (its keys share one hash tag): push the leases of live calls forward."""
        for org, calls in org_rids.items():
            keys: list[str] = []
            index: dict[str, int] = {}
            args = [self._now(), str(_ms(lease_seconds))]
            for agent, rid in calls:
                for key in (f"{self._base(org, agent)}|inflight", f"{self._base(org, None)}|inflight"):
                    if key not in index:
                        keys.append(key)
                        index[key] = len(keys)
                    args += [str(index[key]), rid]
            await self._run(self._renew, keys, args)

    def _resume_keys(self, org: str, agent: str | None) -> list[str]:
        base = self._base(org, agent)
        return [f"{base}|{part}" for part in ("pause", "win", "winv", "sums", "loop", "loopn")]

    async def resume(self, org: str, agent: str | None) -> PauseInfo | None:
        """Lift the pause; forget the loop history and the last minute's window."""
        reply = await self._run(self._resume, self._resume_keys(org, agent), [self._now()])
        return _pause_from(reply)

    async def pause_info(self, org: str, agent: str | None) -> PauseInfo | None:
        """The pause in force, judged by Redis time."""
        reply = await self._run(self._pause_info, [f"{self._base(org, agent)}|pause"], [self._now()])
        return _pause_from(reply)
