"""What a running ResGov holds: the store, the current policy, the upstream pool, background work.

Created by ``create_app`` and opened/closed by the app's lifespan; no module-level state.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import secrets
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from resgov.alerts import Alerts
from resgov.config.rgf import PolicyError, load_policy
from resgov.config.settings import Settings
from resgov.core.policy import Policy, ProviderPolicy
from resgov.guard import Guard, state_for_url
from resgov.ledger.journal import Journal, JournalError
from resgov.ledger.store import Store
from resgov.providers.http_client import UpstreamClient
from resgov.server.auth import KeyCache
from resgov.server.governance_service import GovernanceService
from resgov.server.metrics import Metrics

log = logging.getLogger("resgov")
T = TypeVar("T")


@dataclass
class PolicyHolder:
    """The policy in force. A reload validates first and swaps atomically; a bad file keeps the old one."""

    policy: Policy
    path: str | None = None
    error: str | None = None
    mtime: float | None = None
    reloads: int = 0

    def reload(self) -> bool:
        """Re-read the file; True if a new policy is now in force."""
        if not self.path:
            return False
        try:
            self.mtime = os.stat(self.path).st_mtime
            policy = load_policy(self.path)
        except PolicyError as exc:
            self.error = str(exc)
            log.error("policy reload rejected, still enforcing the last good policy: %s", exc)
            return False
        except OSError as exc:
            self.error = f"cannot read {self.path}: {exc}"
            log.error("policy reload failed, still enforcing the last good policy: %s", self.error)
            return False
        self.policy = policy
        self.error = None
        self.reloads += 1
        log.info("policy reloaded from %s", self.path)
        return True

    def changed_on_disk(self) -> bool:
        """True when the file's modification time moved since the last load attempt."""
        if not self.path:
            return False
        try:
            return os.stat(self.path).st_mtime != self.mtime
        except OSError:
            return self.mtime is not None


@dataclass
class Runtime:
    """Shared state of one ResGov process."""

    settings: Settings
    store: Store
    policies: PolicyHolder
    keys: KeyCache = field(init=False)
    #: Calls let through with no reservation while the store is unreachable (fail_safe_action = allow).
    journal: Journal = field(init=False)
    #: Set by server.governance.install; None: the .rgf alone applies.
    governance: GovernanceService | None = None
    #: Rate limits, loop and velocity breakers, sessions: in-process state beside a SQLite
    #: ledger, shared Redis state (one limit for every instance) beside a Redis ledger.
    guard: Guard = field(init=False)
    upstream: UpstreamClient | None = None
    #: reservation id -> monotonic start time, for every call in flight (their leases are renewed).
    inflight: dict[str, float] = field(default_factory=dict)
    settling: set[asyncio.Task[Any]] = field(default_factory=set)
    background: list[asyncio.Task[None]] = field(default_factory=list)
    store_ok: bool = True
    started_at: float = field(default_factory=time.time)
    #: Prometheus metrics (``GET /metrics``) and the alert pipeline (None in bare runtimes).
    metrics: Metrics | None = None
    alerts: Alerts | None = None

    def __post_init__(self) -> None:
        self.keys = KeyCache(self.store, self.settings.key_cache_seconds)
        self.journal = Journal(self.settings.journal)
        # Request ids: a random per-process prefix and a counter. uuid4 per call read
        # os.urandom, which releases the GIL to other threads: measurable at load.
        self._id_prefix = "rgr_" + secrets.token_hex(8)
        self._ids = itertools.count(1)
        self.guard = Guard(state_for_url(self.settings.store_url))

    def new_request_id(self) -> str:
        """A request id unique across processes and restarts (random prefix) and cheap to make."""
        return f"{self._id_prefix}{next(self._ids):012x}"

    @staticmethod
    def provider_key(provider: ProviderPolicy) -> str | None:
        """The provider's key, read from the environment at call time (never from the file, never logged)."""
        return os.environ.get(provider.api_key_env) if provider.api_key_env else None

    @property
    def policy(self) -> Policy:
        """The policy in force now: the file's, with the governance API's changes merged.

        Callers keep the object for the whole call, so a call finishes under the policy it
        started with.
        """
        base = self.policies.policy
        return self.governance.effective(base) if self.governance is not None else base

    async def start(self) -> None:
        """Open the store and the upstream pool, start the sweeper and the policy watcher."""
        await self.store.open()
        try:
            # A journal left by a previous run: its calls are booked by the reconcile task below.
            await self.journal.open()
        except JournalError as exc:
            log.error("%s; with fail_safe_action = allow, calls are refused while the store is down", exc)
        await self.guard.start()
        self.upstream = UpstreamClient(max_idle_per_host=256, keepalive_timeout=30.0)
        if self.policies.path and self.policies.mtime is None:
            with contextlib.suppress(OSError):
                self.policies.mtime = os.stat(self.policies.path).st_mtime
        if self.alerts is not None:
            # Before the first sweep, so its reservation.expired alert goes out promptly.
            await self.alerts.start()
        # Settle leases that expired while no process ran, before taking traffic.
        await self.sweep_once()
        self.background.append(asyncio.create_task(self._sweeper(), name="resgov-sweeper"))
        self.background.append(asyncio.create_task(self._heartbeat(), name="resgov-lease-heartbeat"))
        self.background.append(asyncio.create_task(self._watch_policy(), name="resgov-policy-watch"))
        self.background.append(
            asyncio.create_task(
                self.journal.run(self.store, lambda: self.policy.global_.on_expired_reservation),
                name="resgov-journal-reconcile",
            )
        )
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signal.SIGHUP, self.policies.reload)

    async def stop(self) -> None:
        """Wait for every settlement, stop background work, flush the store."""
        if self.settling:
            await asyncio.wait(set(self.settling), timeout=self.settings.drain_seconds)
        for task in self.background:
            task.cancel()
        for task in self.background:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.upstream is not None:
            await self.upstream.close()
        if self.journal.due:
            # Book what can be booked now; the rest waits in the file for the next start.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(
                    self.journal.reconcile(self.store, on_orphan=self.policy.global_.on_expired_reservation),
                    10,
                )
        await self.journal.close()
        await self.guard.stop()
        if self.alerts is not None:
            # After the settlements drained (their alerts are emitted), before the store closes.
            await self.alerts.stop()
        await self.store.close()

    async def sweep_once(self) -> int:
        """Settle expired reservations now."""
        try:
            count = await self.store.sweep(self.policy.global_.on_expired_reservation)
            self.store_ok = True
        except Exception as exc:  # the sweeper must outlive a store outage
            self.store_ok = False
            log.error("sweeper: store unavailable: %s", exc)
            return 0
        if count:
            log.warning(
                "settled %d expired reservation(s) (%s mode)",
                count,
                self.policy.global_.on_expired_reservation,
            )
        return count

    async def _sweeper(self) -> None:
        while True:
            await asyncio.sleep(self.settings.sweep_interval)
            await self.sweep_once()

    async def _heartbeat(self) -> None:
        """Renew the leases of every call this process has in flight, in one batch.

        A lease guards against a dead process, not a slow provider: while this process
        lives, each of its calls is bounded by the provider timeouts instead, so a unary
        call waiting longer than the TTL, or a long stream, is never settled as expired.
        """
        while True:
            ttl = self.policy.global_.reservation_ttl_seconds
            await asyncio.sleep(max(ttl / 3, 0.2))
            if self.inflight:
                try:
                    await self.store.renew(list(self.inflight), ttl)
                except Exception as exc:  # keep renewing after a store outage
                    log.error("lease renewal failed: %s", exc)

    async def _watch_policy(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            if self.policies.changed_on_disk():
                self.policies.reload()

    def shielded(self, factory: Callable[[], Awaitable[T]]) -> Awaitable[T]:
        """Run a settlement so that cancelling the caller cannot cancel it, and track it for shutdown."""
        task: asyncio.Task[T] = asyncio.ensure_future(factory())
        self.settling.add(task)
        task.add_done_callback(self.settling.discard)
        return asyncio.shield(task)
