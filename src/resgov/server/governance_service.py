"""The governance state of one ResGov process: a cached snapshot of the API's changes, kept fresh.

**Hot path.** ``effective(policy)`` is a dictionary-speed call: it returns a memoised
:class:`~resgov.core.overlay.GovernedPolicy` (file + snapshot) that is rebuilt only when the file
was reloaded or the snapshot changed. No store round trip happens on a proxied call for this.

**Freshness.** Every governance write bumps a version in the store (in the same SQLite transaction;
right after the write on Redis). The process that wrote reloads at once (read-your-writes); every
process polls the version every ``refresh_seconds`` (default 1 s: one ``GET`` on Redis, one indexed
read on SQLite) and reloads when it moved. So several instances on one Redis agree on agents,
budget changes, top-ups and resets within ``refresh_seconds`` plus one load. A store outage keeps
the last snapshot in force (fail-safe: what was enforced stays enforced).

**Retention.** With ``audit_retention_days`` set (``[global]``; ``RESGOV_AUDIT_RETENTION_DAYS``
overrides it), finished audit records older than that are purged every ``purge_interval`` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import orjson

from resgov.core.overlay import SYSTEM_ORG, GovernedPolicy, Snapshot, compile_snapshot, govern, price_json
from resgov.core.policy import Policy
from resgov.core.price_source import PriceSourceError, parse_openrouter
from resgov.ledger.store import AuditEntry, GovRecord, Store

log = logging.getLogger("resgov.governance")

DEFAULT_PRICE_SOURCE = "https://openrouter.ai/api/v1/models"
#: A price list larger than this is refused (OpenRouter's is well under 2 MiB).
MAX_PRICE_BYTES = 16 * 1024 * 1024
PRICE_TIMEOUT_SECONDS = 15.0


@dataclass(frozen=True, slots=True)
class PriceRefresh:
    """What a price refresh did (``ok`` False: the old prices stay, ``error`` says why)."""

    ok: bool
    url: str
    models: int
    fetched_at: float
    error: str | None = None


class GovernanceService:
    """Holds the snapshot, refreshes it, writes governance records, purges old audit records."""

    def __init__(
        self,
        store: Store,
        base_policy: Callable[[], Policy],
        *,
        refresh_seconds: float | None = None,
        purge_interval: float = 3600.0,
        price_source_url: str | None = None,
        retention_days: float | None = None,
    ) -> None:
        env = os.environ
        self.store = store
        self.base_policy = base_policy
        self.refresh_seconds = refresh_seconds or float(env.get("RESGOV_GOVERNANCE_REFRESH_SECONDS") or 1.0)
        self.purge_interval = purge_interval
        self.price_source_url = price_source_url or env.get("RESGOV_PRICE_SOURCE_URL") or DEFAULT_PRICE_SOURCE
        env_days = env.get("RESGOV_AUDIT_RETENTION_DAYS")
        self.retention_override = retention_days if retention_days is not None else (
            float(env_days) if env_days else None
        )  # fmt: skip
        self.snapshot = Snapshot()
        self.loaded = False
        self.last_error: str | None = None
        self.last_price_refresh: PriceRefresh | None = None
        self._memo: tuple[Policy, Snapshot, GovernedPolicy] | None = None
        self._lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []

    # -- the hot path ----------------------------------------------------------------------------

    def effective(self, base: Policy) -> GovernedPolicy:
        """The file's policy with the API's changes merged (memoised per file load and snapshot)."""
        memo = self._memo
        if memo is not None and memo[0] is base and memo[1] is self.snapshot:
            return memo[2]
        governed = govern(base, self.snapshot)
        self._memo = (base, self.snapshot, governed)
        return governed

    @property
    def policy(self) -> GovernedPolicy:
        """The governed policy in force now."""
        return self.effective(self.base_policy())

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the snapshot (a store outage is logged: the file's policy alone applies until it
        answers) and start the poller and the retention purge."""
        await self.refresh(force=True)
        self._tasks.append(asyncio.create_task(self._poll(), name="resgov-governance-poll"))
        self._tasks.append(asyncio.create_task(self._purge_loop(), name="resgov-audit-retention"))

    async def stop(self) -> None:
        """Stop background work (the store is closed by the runtime afterwards)."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()

    async def refresh(self, *, force: bool = False) -> bool:
        """Reload the snapshot if the store's version moved (or ``force``); True if it changed."""
        try:
            if not force and self.loaded and await self.store.gov_version() == self.snapshot.version:
                return False
            async with self._lock:
                version, records = await self.store.gov_load()
                if self.loaded and version == self.snapshot.version and not force:
                    return False
                self.snapshot = compile_snapshot(version, ((r.org, r.kind, r.key, r.data) for r in records))
                self.loaded = True
                self.last_error = None
                return True
        except Exception as exc:  # the poller must outlive a store outage; the last snapshot stays
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.error("governance refresh failed, keeping the last snapshot: %s", self.last_error)
            return False

    async def _poll(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_seconds)
            await self.refresh()

    def retention_days(self) -> float | None:
        """``RESGOV_AUDIT_RETENTION_DAYS`` or the policy's ``[global] audit_retention_days``."""
        if self.retention_override is not None:
            return self.retention_override
        days = getattr(self.base_policy().global_, "audit_retention_days", None)
        return float(days) if days else None

    async def purge_once(self, now: float | None = None) -> int:
        """Apply the retention limit now; returns how many records were deleted."""
        days = self.retention_days()
        if not days:
            return 0
        cutoff = (now if now is not None else time.time()) - days * 86_400
        deleted = await self.store.purge_audit(None, cutoff)
        if deleted:
            log.info("audit retention (%g days): purged %d record(s)", days, deleted)
        return deleted

    async def _purge_loop(self) -> None:
        await asyncio.sleep(min(60.0, self.purge_interval))
        while True:
            try:
                await self.purge_once()
            except Exception as exc:  # keep purging after a store outage
                log.error("audit retention purge failed: %s", exc)
            await asyncio.sleep(self.purge_interval)

    # -- writes ----------------------------------------------------------------------------------

    async def put(self, record: GovRecord, *, if_absent: bool = False) -> bool:
        """Write a record and reload at once, so the next request on this instance sees it."""
        written = await self.store.gov_put(record, if_absent=if_absent)
        if written:
            await self.refresh(force=True)
        return written

    async def delete(self, org: str, kind: str, key: str) -> bool:
        """Delete a record and reload at once."""
        deleted = await self.store.gov_delete(org, kind, key)
        if deleted:
            await self.refresh(force=True)
        return deleted

    async def audit_event(
        self, org: str, agent: str, route: str, action: str, detail: Mapping[str, Any], *, admin: bool
    ) -> str:
        """Record a governance change in the org's audit trail (``kind`` governance, no money)."""
        now = time.time()
        request_id = "rgg_" + uuid.uuid4().hex
        await self.store.record(
            AuditEntry(
                request_id=request_id, org=org, agent=agent, kind="governance", route=route, model=action,
                provider="admin" if admin else "api", status="completed", reason=action, http_status=200,
                started_at=now, finished_at=now, detail=dict(detail),
            )
        )  # fmt: skip
        return request_id

    # -- prices ----------------------------------------------------------------------------------

    async def refresh_prices(self, url: str | None = None) -> PriceRefresh:
        """Fetch an OpenRouter-format price list; on any failure the old prices stay in force."""
        import aiohttp  # only when prices are refreshed: it costs memory the proxy does not need

        source = url or self.price_source_url
        started = time.time()
        try:
            parts = urlsplit(source)
            if parts.scheme not in ("http", "https") or not parts.netloc:
                raise PriceSourceError(f"not an http(s) URL: {source!r}")
            timeout = aiohttp.ClientTimeout(total=PRICE_TIMEOUT_SECONDS)
            async with aiohttp.ClientSession(timeout=timeout) as session, session.get(source) as resp:
                if resp.status != 200:
                    raise PriceSourceError(f"the price source answered HTTP {resp.status}")
                raw = await resp.content.read(MAX_PRICE_BYTES + 1)
            if len(raw) > MAX_PRICE_BYTES:
                raise PriceSourceError(f"the answer is larger than {MAX_PRICE_BYTES} bytes")
            try:
                payload = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                raise PriceSourceError(f"the answer is not JSON: {exc}") from exc
            prices = parse_openrouter(payload)
        except PriceSourceError as exc:
            result = PriceRefresh(False, source, 0, started, str(exc))
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            result = PriceRefresh(
                False, source, 0, started, f"cannot fetch the price source: {type(exc).__name__}: {exc}"
            )
        else:
            data = {
                "source": source, "fetched_at": started, "count": len(prices),
                "models": {name: price_json(p) for name, p in prices.items()},
            }  # fmt: skip
            await self.put(GovRecord(SYSTEM_ORG, "prices", "openrouter", data, started))
            result = PriceRefresh(True, source, len(prices), started)
        self.last_price_refresh = result
        if not result.ok:
            log.warning("price refresh from %s failed, keeping the old prices: %s", source, result.error)
        return result
