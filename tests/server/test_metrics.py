"""Prometheus metrics: every metric after proxied calls, /metrics auth, budget gauges from the store."""

from __future__ import annotations

import asyncio
import re
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from resgov.config.rgf import parse_policy
from resgov.core.budget import LineState
from resgov.core.money import NANO
from resgov.ledger.sqlite import SQLiteStore
from resgov.ledger.store import AuditEntry, ReserveRequest, SettleRequest, StoreError
from resgov.server import metrics as metrics_module
from resgov.server.metrics import OTHER, Metrics, ObservedStore
from tests.alerts.conftest import redis_prefix  # noqa: F401 - fixture shared with the alerts suite
from tests.alerts.wiring import ADMIN, METRICS_TOKEN, wired_app
from tests.helpers import policy_for

AGENTS = """
[agents.hermes]
daily_budget = 3.00
max_tokens_per_request = 4096
allowed_models = ["gpt-sim", "sim/gpt-sim"]

[orgs.acme]
monthly_budget = 50.00
"""

EVERY_METRIC = [
    "resgov_requests_total", "resgov_bookings_total", "resgov_bookings_denied_total", "resgov_spend_total",
    "resgov_reservations_total", "resgov_proxy_overhead_seconds", "resgov_upstream_latency_seconds",
    "resgov_store_latency_seconds", "resgov_store_errors_total", "resgov_store_up", "resgov_upstream_errors_total",
    "resgov_budget_limit", "resgov_budget_spent", "resgov_budget_reserved", "resgov_budget_remaining",
    "resgov_alert_deliveries_total", "resgov_info",
]  # fmt: skip


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float:
    return samples(text)[(name, frozenset(labels.items()))]


async def chat(client: Any, key: str, model: str = "gpt-sim", **headers: str) -> Any:
    return await client.post(
        "/v1/chat/completions",
        headers={"Authorization": f"Bearer {key}", "X-ResGov-Agent-ID": "hermes", **headers},
        json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 50},
    )


async def test_every_metric_after_proxied_calls(tmp_path: Path, sim: Any) -> None:
    async with wired_app(tmp_path, policy_for(sim.base_url, AGENTS)) as w:
        key = await w.key()
        ok = await chat(w.client, key)
        assert ok.status_code == 200, ok.text
        assert (await chat(w.client, key, model="gpt-other")).status_code == 403
        assert (await chat(w.client, key, **{"X-Sim-Error-Status": "500"})).status_code == 500
        text = await w.scrape()
        spent = await w.inner.line_states("default", [line.key for line in _hermes_lines(w)])
    for name in EVERY_METRIC:
        assert re.search(rf"^# TYPE {name.removesuffix('_total')}(_total)? ", text, re.M), name
    route = "/v1/chat/completions"
    assert (
        value(
            text, "resgov_requests_total", route=route, model="gpt-sim", provider="sim", outcome="completed"
        )
        == 1
    )
    # A refusal before routing: its model and provider labels depend on who reports it.
    denied = [
        v
        for (n, lab), v in samples(text).items()
        if n == "resgov_requests_total" and ("outcome", "denied") in lab
    ]
    assert denied == [1]
    assert value(text, "resgov_reservations_total", outcome="finalized") == 1
    assert value(text, "resgov_reservations_total", outcome="released") == 1
    assert value(text, "resgov_upstream_errors_total", provider="sim", status="500") == 1
    charged = ok.json()["resgov_cost"]["actual"]
    assert value(text, "resgov_spend_total", org="default", agent="hermes", model="gpt-sim") == pytest.approx(
        charged
    )
    assert value(text, "resgov_store_latency_seconds_count", op="reserve") == 2
    assert value(text, "resgov_store_latency_seconds_count", op="settle") == 2
    assert value(text, "resgov_proxy_overhead_seconds_count", route=route) == 3
    assert (
        value(text, "resgov_upstream_latency_seconds_count", provider="sim") >= 2
    )  # the refusal never went up
    assert value(text, "resgov_store_up") == 1
    daily = {"org": "default", "agent": "hermes", "level": "agent", "period": "daily"}
    state = next(iter(spent.values()))
    assert (
        value(text, "resgov_budget_spent", **daily)
        == pytest.approx(state.spent / NANO)
        == pytest.approx(charged)
    )
    assert value(text, "resgov_budget_limit", **daily) == 3.0
    assert value(text, "resgov_budget_reserved", **daily) == 0
    assert value(text, "resgov_budget_remaining", **daily) == pytest.approx(3.0 - charged)
    acme = {"org": "acme", "agent": "", "level": "org", "period": "monthly"}
    assert (
        value(text, "resgov_budget_limit", **acme) == 50.0 and value(text, "resgov_budget_spent", **acme) == 0
    )


def _hermes_lines(w: Any) -> list[Any]:
    policy = w.app.runtime.policy
    return policy.budget_lines(policy.agents[("default", "hermes")], datetime.now(UTC))


def test_every_metric_is_documented() -> None:
    doc = metrics_module.__doc__ or ""
    registered = {f.name for f in Metrics().registry.collect()}
    for name in EVERY_METRIC:
        assert f"`{name}`" in doc, name
        assert name.removesuffix("_total") in registered, name
    assert len(registered) == len(EVERY_METRIC)


async def test_metrics_auth(tmp_path: Path, sim: Any) -> None:
    async with wired_app(tmp_path, policy_for(sim.base_url, AGENTS)) as w:
        key = await w.key()
        get = w.client.get
        assert (await get("/metrics", headers=ADMIN)).status_code == 200
        r = await get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        assert "resgov_info" in r.text
        for headers in (
            {},
            {"Authorization": f"Bearer {key}"},
            {"x-api-key": key},
            {"X-Admin-Token": key},
            {"X-Admin-Token": "wrong" * 10},
            {"X-Admin-Token": METRICS_TOKEN},
            {"Authorization": f"Basic {METRICS_TOKEN}"},
            {"Authorization": f"Bearer {METRICS_TOKEN}x"},
        ):
            r = await get("/metrics", headers=headers)
            assert r.status_code == 401, headers
            assert r.json()["error"]["reason"] == "invalid_metrics_token"
            assert "resgov_" not in r.text
    # A metrics token shorter than 32 characters is never accepted (like the admin token).
    short = "short-metrics-token"
    async with wired_app(tmp_path / "b", policy_for(sim.base_url, AGENTS), metrics_token=short) as w:
        assert (
            await w.client.get("/metrics", headers={"Authorization": f"Bearer {short}"})
        ).status_code == 401
        assert (await w.client.get("/metrics", headers=ADMIN)).status_code == 200


def _reserve(rid: str, lines: Any, amount: int, org: str = "acme", agent: str = "bot") -> ReserveRequest:
    return ReserveRequest(
        rid, org, agent, amount, lines, 300, AuditEntry(rid, org, agent, model="m", started_at=time.time())
    )


POLICY = """
[global]
currency = "USD"

[orgs.acme]
daily_budget = 10.00
[orgs.acme.agents.bot]
daily_budget = 2.00
hourly_budget = 1.00

[orgs.idle]
monthly_budget = 5.00
"""


async def test_budget_gauges_read_from_the_store(tmp_path: Path) -> None:
    policy = parse_policy(POLICY, library_prices=False)
    store = SQLiteStore(str(tmp_path / "l.db"))
    await store.open()
    try:
        lines = policy.budget_lines(policy.agents[("acme", "bot")], datetime.now(UTC))
        assert (await store.reserve(_reserve("r1", lines, 300_000_000))).ok
        await store.settle(SettleRequest("r1", "actual", 250_000_000, "completed"))
        assert (await store.reserve(_reserve("r2", lines, 100_000_000))).ok  # still in flight
        m = Metrics(store=store, policy=lambda: policy)
        text = (await m.render()).decode()
    finally:
        await store.close()
    bot = {"org": "acme", "agent": "bot", "level": "agent"}
    assert value(text, "resgov_budget_spent", **bot, period="daily") == 0.25
    assert value(text, "resgov_budget_reserved", **bot, period="daily") == 0.1
    assert value(text, "resgov_budget_remaining", **bot, period="daily") == 1.65
    assert value(text, "resgov_budget_remaining", **bot, period="hourly") == 0.65
    org = {"org": "acme", "agent": "", "level": "org", "period": "daily"}
    assert (
        value(text, "resgov_budget_spent", **org) == 0.25 and value(text, "resgov_budget_limit", **org) == 10
    )
    idle = {"org": "idle", "agent": "", "level": "org", "period": "monthly"}
    assert value(text, "resgov_budget_remaining", **idle) == 5.0  # an org without agents still shows


class _DownStore(SQLiteStore):
    async def line_states(self, org: str, keys: Any) -> dict[str, LineState]:
        raise StoreError("redis: connection refused")


async def test_scrape_survives_a_store_outage(tmp_path: Path) -> None:
    policy = parse_policy(POLICY, library_prices=False)
    m = Metrics(store=_DownStore(str(tmp_path / "x.db")), policy=lambda: policy)
    text = (await m.render()).decode()
    assert value(text, "resgov_store_up") == 0
    assert "resgov_budget_spent{" not in text and "# TYPE resgov_budget_spent gauge" in text


@pytest.mark.redis
async def test_budget_gauges_agree_across_redis_instances(redis_prefix: str) -> None:  # noqa: F811
    from resgov.ledger.redis import RedisStore
    from tests.alerts.conftest import REDIS_URL

    policy = parse_policy(POLICY, library_prices=False)
    a, b = RedisStore(REDIS_URL, prefix=redis_prefix), RedisStore(REDIS_URL, prefix=redis_prefix)
    await a.open()
    await b.open()
    try:
        lines = policy.budget_lines(policy.agents[("acme", "bot")], datetime.now(UTC))
        assert (await a.reserve(_reserve("r1", lines, 300_000_000))).ok
        await a.settle(SettleRequest("r1", "actual", 120_000_000, "completed"))
        assert (await b.reserve(_reserve("r2", lines, 50_000_000))).ok
        texts = [(await Metrics(store=s, policy=lambda: policy).render()).decode() for s in (a, b)]
    finally:
        await a.close()
        await b.close()

    def budget_samples(text: str) -> dict[Any, float]:
        return {k: v for k, v in samples(text).items() if k[0].startswith("resgov_budget_")}

    first, second = (budget_samples(t) for t in texts)
    assert first == second and len(first) == 4 * 4  # 4 lines (bot daily+hourly, acme daily, idle monthly)
    assert (
        value(texts[1], "resgov_budget_spent", org="acme", agent="bot", level="agent", period="daily") == 0.12
    )
    assert (
        value(texts[0], "resgov_budget_reserved", org="acme", agent="", level="org", period="daily") == 0.05
    )


async def test_observed_store_counts_without_alerts(tmp_path: Path) -> None:
    policy = parse_policy(POLICY, library_prices=False)
    m = Metrics(policy=lambda: policy)
    store = ObservedStore(SQLiteStore(str(tmp_path / "o.db")), metrics=m, policy=lambda: policy)
    await store.open()
    try:
        lines = policy.budget_lines(policy.agents[("acme", "bot")], datetime.now(UTC))
        assert (await store.reserve(_reserve("r1", lines, 100))).ok
        await store.settle(SettleRequest("r1", "actual", 150, "completed"))  # overage
        assert (await store.reserve(_reserve("r2", lines, 100))).ok
        await store.settle(SettleRequest("r2", "estimated", 80, "estimated", reason="no_usage"))
        assert (await store.reserve(_reserve("r3", lines, 100))).ok
        await store.settle(
            SettleRequest(
                "r3", "release", 0, "upstream_error", reason="upstream_unreachable", http_status=502
            )
        )
        assert (await store.reserve(_reserve("r4", lines, 10**12))).ok is False  # refused
        assert store.name == "sqlite" and await store.ping()
        await store.flush()  # a backend extra, passed through
    finally:
        await store.close()
    text = generate(m)
    for outcome, n in (("overage", 1), ("estimated", 1), ("released", 1)):
        assert value(text, "resgov_reservations_total", outcome=outcome) == n
    assert value(text, "resgov_spend_total", org="acme", agent="bot", model="m") == pytest.approx(230e-9)
    assert value(text, "resgov_upstream_errors_total", provider="", status="upstream_unreachable") == 1


def generate(m: Metrics) -> str:
    from prometheus_client import generate_latest

    return generate_latest(m.registry).decode()


def test_hooks_are_cheap_and_bounded() -> None:
    m = Metrics(max_label_values=3)
    started = time.perf_counter()
    for i in range(20_000):
        m.observe_call("/v1/chat/completions", "gpt-sim", "sim", "completed", 0.0002, 0.01)
        m.observe_settlement("acme", "bot", "gpt-sim", "finalized", i)
        m.observe_store("settle", 0.0001)
    assert time.perf_counter() - started < 2.0  # a few µs per hook
    for i in range(10):
        m.observe_call("/r", f"random-model-{i}", "sim", "denied", 0.001)
    text = generate(m)
    models = {dict(k[1]).get("model") for k in samples(text) if k[0] == "resgov_requests_total"}
    assert OTHER in models and len(models) == 4  # gpt-sim + 2 randoms + __other__


async def test_render_is_serialised() -> None:
    m = Metrics()
    texts = await asyncio.gather(*(m.render() for _ in range(5)))
    assert all(b"resgov_info" in t for t in texts)


# -- the loop-owned histogram ------------------------------------------------------------------------

_BOUNDS = metrics_module.STORE_BUCKETS
_VALUES = st.one_of(
    st.sampled_from([*_BOUNDS, 0.0, -1.0]),  # exactly on a bound (le is inclusive), zero, negative
    st.floats(min_value=-1.0, max_value=2 * _BOUNDS[-1], allow_nan=False),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["reserve", "settle"]), _VALUES), max_size=60))
def test_loop_histogram_exposes_what_prometheus_client_would(observations: list[tuple[str, float]]) -> None:
    # The same observations through prometheus_client's own Histogram (clamped at 0, as the
    # hooks always did) and through LoopHistogram must give the same exposition, _created aside.
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    ours_registry, theirs_registry = CollectorRegistry(), CollectorRegistry()
    ours = metrics_module.LoopHistogram("h_seconds", "help", ["op"], _BOUNDS)
    ours_registry.register(ours)
    theirs = Histogram("h_seconds", "help", ["op"], buckets=_BOUNDS, registry=theirs_registry)
    for op, value in observations:
        ours.observe((op,), value)
        theirs.labels(op).observe(max(0.0, value))

    def lines(registry: CollectorRegistry) -> list[str]:
        text = generate_latest(registry).decode()
        return [x for x in text.splitlines() if "_created" not in x]

    assert lines(ours_registry) == lines(theirs_registry)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["finalized", "released", "expired"]), st.integers(min_value=0, max_value=5)
        ),
        max_size=40,
    )
)
def test_loop_counter_exposes_what_prometheus_client_would(increments: list[tuple[str, int]]) -> None:
    # The same increments through prometheus_client's Counter and through LoopCounter: the same
    # exposition, and a _created series for every label set (its timestamp aside).
    from prometheus_client import CollectorRegistry, Counter, generate_latest

    ours_registry, theirs_registry = CollectorRegistry(), CollectorRegistry()
    ours = metrics_module.LoopCounter("c_total", "help", ["outcome"])
    ours_registry.register(ours)
    theirs = Counter("c_total", "help", ["outcome"], registry=theirs_registry)
    for outcome, amount in increments:
        ours.inc((outcome,), amount)
        theirs.labels(outcome).inc(amount)

    def lines(registry: CollectorRegistry) -> list[str]:
        text = generate_latest(registry).decode()
        return [x.rsplit(" ", 1)[0] if "_created" in x else x for x in text.splitlines()]

    assert lines(ours_registry) == lines(theirs_registry)
