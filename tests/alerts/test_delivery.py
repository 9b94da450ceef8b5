"""End to end against real HTTP receivers on loopback: signatures, retries, dedupe, restarts, SSRF guards."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from resgov.alerts import Alerts, RetryPolicy, budget_exceeded, budget_threshold, store_down
from resgov.alerts.events import AlertEvent, Crossing
from resgov.alerts.redis_store import RedisAlertStore
from resgov.alerts.store import Destination, OutboxItem, SQLiteAlertStore
from resgov.alerts.urls import UnsafeURL
from resgov.config.settings import Settings
from resgov.core.budget import BudgetLine
from resgov.core.money import NANO
from tests.alerts.conftest import REDIS_URL, Receiver
from tests.alerts.recipe import verify_resgov_signature

Receivers = Callable[..., Awaitable[Receiver]]
LINE = BudgetLine("acme", "agent", "hermes", "daily", 3 * NANO, 1_700_000_000, 1_700_086_400)
FAST = RetryPolicy(max_attempts=5, base_seconds=0.05, factor=2, jitter=0)


def threshold(pct: float = 0.8, line: BudgetLine = LINE) -> AlertEvent:
    return budget_threshold(Crossing(line, pct, 0, int(line.limit * pct)), "USD")


def sqlite_alerts(tmp_path: Path, *, allow_private: bool = True, **kw: Any) -> Alerts:
    kw.setdefault("retry", FAST)
    kw.setdefault("poll_seconds", 0.2)
    return Alerts(SQLiteAlertStore(str(tmp_path / "resgov.alerts.db")), allow_private=allow_private, **kw)


async def until(check: Callable[[], Awaitable[bool]], within: float = 10.0) -> None:
    """Poll ``check`` (bounded) until it holds."""
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


async def test_signed_generic_delivery(
    tmp_path: Path, receivers: Receivers, allow_private: None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="resgov")
    receiver = await receivers()
    alerts = Alerts.from_settings(
        Settings(store_url=f"sqlite:///{tmp_path}/resgov.db"), retry=FAST, poll_seconds=0.2
    )
    assert alerts.allow_private and isinstance(alerts.store, SQLiteAlertStore)
    assert alerts.store.path == f"{tmp_path}/resgov.alerts.db"
    await alerts.start()
    try:
        dest = await alerts.create_webhook(receiver.url)
        assert dest.secret is not None
        event = threshold()
        assert alerts.emit(event)
        (req,) = await receiver.wait_for(1)
        assert req.headers["Content-Type"] == "application/json"
        assert req.headers["X-ResGov-Event-ID"] == event.id
        assert req.headers["X-ResGov-Event-Type"] == "budget.threshold"
        assert req.headers["X-ResGov-Delivery-Attempt"] == "1"
        assert req.json()["id"] == event.id and req.json()["data"]["threshold"] == 0.8
        header = req.headers["X-ResGov-Signature"]
        # Verified by the receiver's own HMAC code, over the raw bytes received.
        assert verify_resgov_signature(dest.secret, header, req.body)
        t = int(header.split(",")[0][2:])
        assert abs(t - time.time()) < 5
        assert not verify_resgov_signature(dest.secret, header, req.body, now=t + 301)  # replayed too late
        assert not verify_resgov_signature(dest.secret, header, req.body.replace(b"0.8", b"0.9"))
        await until(lambda: _pending_is(alerts, 0))
    finally:
        await alerts.stop()
    assert dest.secret not in caplog.text


async def _pending_is(alerts: Alerts, n: int) -> bool:
    status = await alerts.status()
    return bool(status["pending"] == n and status["in_flight"] == 0)


async def test_retries_with_exponential_backoff(tmp_path: Path, receivers: Receivers) -> None:
    receiver = await receivers([500, 500])  # then 200
    outcomes: list[str] = []
    retry = RetryPolicy(max_attempts=5, base_seconds=0.2, factor=2, jitter=0)
    alerts = sqlite_alerts(tmp_path, retry=retry, on_delivery=lambda _t, o: outcomes.append(o))
    await alerts.start()
    try:
        dest = await alerts.create_webhook(receiver.url)
        assert dest.secret is not None
        event = threshold()
        alerts.emit(event)
        reqs = await receiver.wait_for(3)
        await until(lambda: _pending_is(alerts, 0))
    finally:
        await alerts.stop()
    assert [r.status for r in reqs] == [500, 500, 200]
    assert [r.headers["X-ResGov-Delivery-Attempt"] for r in reqs] == ["1", "2", "3"]
    assert {r.headers["X-ResGov-Event-ID"] for r in reqs} == {event.id}
    assert len({r.body for r in reqs}) == 1  # the same bytes every time; only the signature is new
    assert all(verify_resgov_signature(dest.secret, r.headers["X-ResGov-Signature"], r.body) for r in reqs)
    gap1, gap2 = reqs[1].at - reqs[0].at, reqs[2].at - reqs[1].at
    assert gap1 >= 0.19 and gap2 >= 0.39 and gap2 > gap1, (gap1, gap2)  # 0.2 s then 0.4 s
    assert gap2 < 3.0
    assert outcomes == ["retried", "retried", "delivered"]
    assert len(receiver.requests) == 3


async def test_dead_lettered_after_max_attempts_and_secrets_not_logged(
    tmp_path: Path, receivers: Receivers, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="resgov")
    receiver = await receivers(default=500)
    slack = await receivers(default=500)
    alerts = sqlite_alerts(tmp_path, retry=RetryPolicy(max_attempts=3, base_seconds=0.05, jitter=0))
    await alerts.start()
    try:
        dest = await alerts.create_webhook(receiver.url)
        await alerts.create_webhook(slack.url.replace("/hook", "/services/T0/B0/SLACKTOKEN"), type="slack")
        event = threshold()
        alerts.emit(event)
        await receiver.wait_for(3)
        await slack.wait_for(3)

        async def dead() -> bool:
            return bool((await alerts.status())["dead_letters"] == 2)

        await until(dead)
        letters = await alerts.dead_letters()
        assert {d.item.event.id for d in letters} == {event.id}
        assert all(d.item.attempts == 3 and "500" in d.error for d in letters)
        await asyncio.sleep(0.2)
    finally:
        await alerts.stop()
    assert len(receiver.requests) == 3 and len(slack.requests) == 3  # bounded: no 4th attempt
    assert "dead-lettered" in caplog.text
    assert dest.secret is not None and dest.secret not in caplog.text
    assert "SLACKTOKEN" not in caplog.text


async def test_dedupe_by_event_id(tmp_path: Path, receivers: Receivers) -> None:
    receiver = await receivers()
    alerts = sqlite_alerts(tmp_path)
    await alerts.start()
    event = threshold()
    try:
        await alerts.create_webhook(receiver.url)
        assert alerts.emit(event)
        assert not alerts.emit(event)  # same id: dropped locally, O(1)
        await receiver.wait_for(1)
    finally:
        await alerts.stop()
    # A restarted instance seeing the same crossing again: the persisted claim refuses it.
    again = sqlite_alerts(tmp_path)
    await again.start()
    try:
        assert again.emit(event)
        await again.flush()
        await asyncio.sleep(0.3)
        assert (await again.status())["pending"] == 0
    finally:
        await again.stop()
    assert len(receiver.requests) == 1


@pytest.mark.redis
async def test_two_instances_sharing_redis_deliver_once(redis_prefix: str, receivers: Receivers) -> None:
    receiver = await receivers()
    url = f"{REDIS_URL}?prefix={redis_prefix}"
    a = Alerts(RedisAlertStore(url), allow_private=True, retry=FAST, poll_seconds=0.2)
    b = Alerts.from_settings(Settings(store_url=url), allow_private=True, retry=FAST, poll_seconds=0.2)
    assert isinstance(b.store, RedisAlertStore)
    await a.start()
    await b.start()
    try:
        await a.create_webhook(receiver.url)  # stored in Redis: instance b sees it too
        events = [threshold(p) for p in (0.5, 0.8, 1.0)]
        for e in events:
            a.emit(e)
            b.emit(e)
        await a.flush()
        await b.flush()
        await receiver.wait_for(3)
        await asyncio.sleep(0.3)
    finally:
        await a.stop()
        await b.stop()
    ids = [r.headers["X-ResGov-Event-ID"] for r in receiver.requests]
    assert sorted(ids) == sorted(e.id for e in events)  # each crossing exactly once


async def test_restart_keeps_pending_alerts(tmp_path: Path, receivers: Receivers) -> None:
    receiver = await receivers(default=500)
    slow = RetryPolicy(max_attempts=5, base_seconds=0.4, jitter=0)
    first = sqlite_alerts(tmp_path, retry=slow)
    await first.start()
    e1, e2 = threshold(0.5), threshold(0.8)
    try:
        await first.create_webhook(receiver.url)
        first.emit(e1)
        await receiver.wait_for(1)  # attempt 1 failed: rescheduled in the outbox
        await until(lambda: _pending_is(first, 1))
        first.emit(e2)  # not even persisted yet: stop() must persist it
    finally:
        await first.stop()
    receiver.default = 200
    second = sqlite_alerts(tmp_path, retry=slow)
    await second.start()
    try:

        async def both_delivered() -> bool:
            ok = {r.headers["X-ResGov-Event-ID"] for r in receiver.requests if r.status == 200}
            return ok == {e1.id, e2.id}

        await until(both_delivered)
        await until(lambda: _pending_is(second, 0))
    finally:
        await second.stop()
    delivered = [r for r in receiver.requests if r.status == 200]
    assert len(delivered) == 2


async def test_loopback_refused_without_the_flag(
    tmp_path: Path, receivers: Receivers, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RESGOV_ALLOW_PRIVATE_WEBHOOKS", raising=False)
    receiver = await receivers()
    by_name = receiver.url.replace("127.0.0.1", "localhost")
    outcomes: list[str] = []
    rgf = [Destination(id="rgf-local", url=by_name, source="rgf")]
    alerts = Alerts.from_settings(
        Settings(store_url=f"sqlite:///{tmp_path}/resgov.db"),
        rgf_destinations=lambda: rgf,
        retry=RetryPolicy(max_attempts=2, base_seconds=0.05, jitter=0),
        poll_seconds=0.2,
        on_delivery=lambda _t, o: outcomes.append(o),
    )
    assert not alerts.allow_private
    await alerts.start()
    try:
        for url in (receiver.url, by_name, "http://[::1]:9/x", "http://169.254.169.254/latest/meta-data/"):
            with pytest.raises(UnsafeURL):
                await alerts.create_webhook(url)
        # At send time too: a webhook stored while private addresses were allowed (an IP literal),
        # and a name that resolves to loopback (checked after resolution).
        await alerts.store.put_webhook(
            Destination(id="wh_old", url=receiver.url, secret="whsec_x", created_at=1)
        )
        alerts.emit(threshold())

        async def dead() -> bool:
            return bool((await alerts.status())["dead_letters"] == 2)

        await until(dead)
        letters = await alerts.dead_letters()
        assert all("refused" in d.error for d in letters), [d.error for d in letters]
        _, result = await alerts.test_webhook("wh_old")
        assert result.refused and not result.ok and result.status is None
    finally:
        await alerts.stop()
    assert receiver.requests == []  # nothing ever reached the loopback receiver
    assert outcomes.count("refused") == 4


async def test_dns_rebinding_refused_at_send_time(tmp_path: Path, receivers: Receivers) -> None:
    receiver = await receivers()
    answers = iter([["93.184.216.34"]])  # public at creation, loopback afterwards

    async def rebinding(host: str, port: int) -> list[tuple[int, str]]:
        return [(2, a) for a in next(answers, ["127.0.0.1"])]

    alerts = sqlite_alerts(
        tmp_path, allow_private=False, resolve=rebinding, retry=RetryPolicy(max_attempts=1)
    )
    await alerts.start()
    try:
        dest = await alerts.create_webhook(f"http://rebind.test:{receiver.port}/hook")
        _, result = await alerts.test_webhook(dest.id)
        assert result.refused and "refused at send time" in (result.error or "")
    finally:
        await alerts.stop()
    assert receiver.requests == []


async def test_connects_to_the_checked_address(tmp_path: Path, receivers: Receivers) -> None:
    """The delivery connects to the address the guard returned (``.invalid`` never resolves in DNS)."""
    receiver = await receivers()

    async def resolve(host: str, port: int) -> list[tuple[int, str]]:
        assert host == "hooks.invalid"
        return [(2, "127.0.0.1")]

    alerts = sqlite_alerts(tmp_path, allow_private=True, resolve=resolve)
    await alerts.start()
    try:
        dest = await alerts.create_webhook(f"http://hooks.invalid:{receiver.port}/hook")
        _, result = await alerts.test_webhook(dest.id)
        assert result.ok and result.status == 200
    finally:
        await alerts.stop()
    (req,) = receiver.requests
    assert req.headers["Host"] == f"hooks.invalid:{receiver.port}"
    assert req.json()["type"] == "webhook.test"


async def test_slack_discord_and_filters(tmp_path: Path, receivers: Receivers) -> None:
    slack, discord, scoped, everything = [await receivers() for _ in range(4)]
    alerts = sqlite_alerts(tmp_path)
    await alerts.start()
    try:
        await alerts.create_webhook(slack.url, type="slack", events=["budget.*"])
        await alerts.create_webhook(discord.url, type="discord", events=["budget.exceeded"])
        await alerts.create_webhook(scoped.url, org_id="beta")
        await alerts.create_webhook(everything.url, events=["*"])
        events = [threshold(), budget_exceeded(LINE, "hermes", 3 * NANO, 1, "USD"), store_down("sqlite", "x")]
        for e in events:
            alerts.emit(e)
        await slack.wait_for(2)
        await discord.wait_for(1)
        await everything.wait_for(3)
        await alerts.flush()
        await asyncio.sleep(0.3)
    finally:
        await alerts.stop()
    assert scoped.requests == []  # org beta: none of these are its events
    assert len(slack.requests) == 2 and len(discord.requests) == 1 and len(everything.requests) == 3
    blocks = [r.json()["blocks"] for r in slack.requests]
    assert all([b["type"] for b in bl] == ["header", "section", "context"] for bl in blocks)
    embed = discord.requests[0].json()["embeds"][0]
    assert embed["color"] == 0xDC2626 and embed["fields"][0]["name"] == "Org"
    assert discord.requests[0].headers["X-ResGov-Event-ID"] == events[1].id


class _DownStore(SQLiteAlertStore):
    async def claim_and_enqueue(self, event_id: str, ttl_seconds: float, items: Sequence[OutboxItem]) -> bool:
        raise ConnectionError("alert store down")


async def test_store_down_is_delivered_from_memory(tmp_path: Path, receivers: Receivers) -> None:
    receiver = await receivers([500])
    rgf = [Destination(id="rgf-ops", url=receiver.url, secret="whsec_rgf", source="rgf")]
    alerts = Alerts(
        _DownStore(str(tmp_path / "a.db")), allow_private=True, rgf_destinations=lambda: rgf, retry=FAST
    )
    await alerts.start()
    try:
        event = store_down("redis", "Connection refused")
        alerts.emit(event)
        reqs = await receiver.wait_for(2)  # retried from memory too
    finally:
        await alerts.stop()
    assert [r.status for r in reqs] == [500, 200]
    assert all(verify_resgov_signature("whsec_rgf", r.headers["X-ResGov-Signature"], r.body) for r in reqs)


def test_emit_never_blocks() -> None:
    async def run() -> None:
        alerts = Alerts(SQLiteAlertStore(":memory:"), queue_size=100)  # never started: nothing consumes
        started = time.perf_counter()
        results = [alerts.emit(store_down("x", "y", now=i * 300.0)) for i in range(2000)]
        assert time.perf_counter() - started < 0.5
        assert results.count(True) == 100 and alerts.dropped == 1900

    asyncio.run(run())


async def test_test_send_reports_status(tmp_path: Path, receivers: Receivers) -> None:
    receiver = await receivers([503])
    alerts = sqlite_alerts(tmp_path)
    await alerts.start()
    try:
        dest = await alerts.create_webhook(receiver.url, type="discord")
        event, result = await alerts.test_webhook(dest.id)
        assert not result.ok and result.status == 503 and event.type == "webhook.test"
        _, result = await alerts.test_webhook(dest.id)
        assert result.ok and result.status == 200 and result.latency_ms > 0
    finally:
        await alerts.stop()
    assert receiver.requests[1].json()["embeds"][0]["title"].endswith("ResGov test alert")


async def test_breaker_trips_become_alerts(tmp_path: Path, receivers: Receivers) -> None:
    """``guard.on_trip.append(alerts.on_breaker_trip)``: a trip is one ``breaker.tripped`` event."""
    from dataclasses import dataclass, field

    @dataclass
    class Trip:  # the guard's TripEvent, as the hook receives it
        org: str = "acme"
        agent_id: str = "hermes"
        scope: str = "agent"
        reason: str = "loop_detected"
        evidence: dict[str, Any] = field(default_factory=lambda: {"repeats": 12, "window_seconds": 60})
        paused_until: float | None = 1_900_000_000.0
        request_id: str = "rgr_1"
        at: float = 1_899_999_000.0

    receiver = await receivers()
    alerts = sqlite_alerts(tmp_path)
    await alerts.start()
    try:
        await alerts.create_webhook(receiver.url, type="slack", events=["breaker.tripped"])
        alerts.on_breaker_trip(Trip())
        alerts.on_breaker_trip(Trip(request_id="rgr_2", at=1_899_999_001.0))  # same trip seen again
        (req,) = await receiver.wait_for(1)
        await alerts.flush()
        await asyncio.sleep(0.2)
    finally:
        await alerts.stop()
    assert len(receiver.requests) == 1
    body = req.json()
    assert "loop detected" in body["text"] and "repeats=12" in body["blocks"][1]["text"]["text"]
