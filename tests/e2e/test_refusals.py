"""Every way ResGov says no (and the few ways it says yes with conditions), black-box over HTTP."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from resgov.core.money import NANO, format_money, parse_amount
from resgov.simulator.upstream import SimConfig, SimUpstreamThread
from tests.helpers import (
    ADMIN_TOKEN,
    Proxy,
    policy_for,
    sim_bound,
    sim_chat_bodies,
    sim_chat_count,
    sim_cost,
)

AGENTS = """
[orgs.acme]
daily_budget = 100

[orgs.lean]
daily_budget = 0.001

[orgs.lean_hourly]
hourly_budget = 0.001

[agents.hermes]
daily_budget = 3.00
max_tokens_per_request = 4096

[agents.spender]
daily_budget = 0.01
max_tokens_per_request = 100000

[agents.tiny]
daily_budget = 0.001

[agents.limited]
daily_budget = 1
max_tokens_per_request = 100
allowed_models = ["gpt-*"]
allowed_tools = ["search"]

[agents.hourly-agent]
org = "acme"
hourly_budget = 0.001
daily_budget = 1

[agents.daily-agent]
org = "acme"
hourly_budget = 1
daily_budget = 0.001

[agents.weekly-agent]
org = "acme"
weekly_budget = 0.001

[agents.monthly-agent]
org = "acme"
monthly_budget = 0.001

[agents.total-agent]
org = "acme"
daily_budget = 1
total_budget = 0.001

[agents.org-agent]
org = "lean"
daily_budget = 1

[agents.org-hourly-agent]
org = "lean_hourly"
daily_budget = 1

[agents.reader]
org = "acme"
daily_budget = 5
"""

MSG = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def sim() -> Iterator[SimUpstreamThread]:
    with SimUpstreamThread(SimConfig()) as upstream:
        yield upstream


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, sim: SimUpstreamThread) -> Iterator[Proxy]:
    with Proxy(tmp_path_factory.mktemp("refusals"), policy_for(sim.base_url, AGENTS)) as p:
        yield p


@pytest.fixture(scope="module")
def keys(proxy: Proxy) -> dict[str, str]:
    return {org: proxy.key(org) for org in ("default", "acme", "lean", "lean_hourly")}


def raw_body(**fields: Any) -> bytes:
    body: dict[str, Any] = {"model": "gpt-sim", "messages": MSG}
    body.update(fields)
    return orjson.dumps(body)


def post(proxy: Proxy, key: str | None, agent: str | None, raw: bytes, **headers: str) -> httpx.Response:
    h = {"content-type": "application/json", **headers}
    if key is not None:
        h["authorization"] = f"Bearer {key}"
    if agent is not None:
        h["x-resgov-agent-id"] = agent
    return httpx.post(f"{proxy.url}/v1/chat/completions", content=raw, headers=h, timeout=30)


def audit_row(proxy: Proxy, request_id: str) -> dict[str, Any]:
    """The audit record of a request (refusals are written a moment after the answer)."""
    deadline = time.monotonic() + 5
    while True:
        rows = [a for a in proxy.ledger.audit() if a["request_id"] == request_id]
        if rows or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    assert len(rows) == 1, f"expected one audit record for {request_id}, found {len(rows)}"
    return rows[0]


def assert_refused(
    r: httpx.Response, status: int, type_: str, reason: str, proxy: Proxy | None = None, sim_before: int = -1,
    sim: SimUpstreamThread | None = None,
) -> dict[str, Any]:  # fmt: skip
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    error = r.json()["error"]
    assert error["type"] == type_, error
    assert error["reason"] == reason, error
    assert isinstance(error["message"], str) and error["message"]
    assert r.headers.get("x-resgov-request-id", "").startswith("rgr_")
    if sim is not None:
        assert sim_chat_count(sim) == sim_before, "a refused call reached the upstream"
    if proxy is not None and status != 401:
        row = audit_row(proxy, r.headers["x-resgov-request-id"])
        assert row["actual"] == 0 and row["reserved"] == 0
        assert row["status"] in ("denied", "rejected")
        assert row["reason"] == reason
    return dict(error)


# --- the brief's budget_exceeded body ------------------------------------------------------------

MESSAGE_RE = re.compile(
    r"^(?P<label>[A-Za-z ]+) budget exceeded\. Limit: \$(?P<limit>[0-9.]+), Spent: \$(?P<spent>[0-9.]+), "
    r"Required: \$(?P<required>[0-9.]+)$"
)


def test_budget_exceeded_body_is_exactly_the_briefs(
    proxy: Proxy, keys: dict[str, str], sim: SimUpstreamThread
) -> None:
    raw = raw_body(max_tokens=1000)
    before = sim_chat_count(sim)
    r = post(proxy, keys["default"], "tiny", raw)
    assert r.status_code == 403
    body = r.json()
    assert list(body) == ["error"]
    error = body["error"]
    assert set(error) == {"type", "message", "agent_id", "reason"}
    assert error["type"] == "budget_exceeded"
    assert error["agent_id"] == "tiny"
    assert error["reason"] == "daily_budget_exceeded"
    m = MESSAGE_RE.match(error["message"])
    assert m, error["message"]
    assert m["label"] == "Daily"
    required = sim_bound(raw, 1, 1000)
    assert parse_amount(m["limit"]) == NANO // 1000
    assert m["spent"] == "0.00"
    assert parse_amount(m["required"]) == required
    assert error["message"] == (
        f"Daily budget exceeded. Limit: $0.001, Spent: $0.00, Required: {format_money(required)}"
    )
    assert sim_chat_count(sim) == before
    row = audit_row(proxy, r.headers["x-resgov-request-id"])
    assert (row["status"], row["reason"], row["reserved"], row["actual"]) == (
        "denied",
        "daily_budget_exceeded",
        0,
        0,
    )
    assert row["agent"] == "tiny" and row["org"] == "default"


def test_budget_message_numbers_match_the_ledger_after_spending(
    proxy: Proxy, keys: dict[str, str], sim: SimUpstreamThread
) -> None:
    ok = post(proxy, keys["default"], "spender", raw_body(max_tokens=50))
    assert ok.status_code == 200, ok.text
    charged = parse_amount(ok.headers["x-resgov-cost"])
    assert charged > 0
    raw = raw_body(max_tokens=5000)  # 5,000 output tokens at $4/MTok = $0.02 > $0.01
    before = sim_chat_count(sim)
    r = post(proxy, keys["default"], "spender", raw)
    error = assert_refused(r, 403, "budget_exceeded", "daily_budget_exceeded", proxy, before, sim)
    m = MESSAGE_RE.match(error["message"])
    assert m, error["message"]
    spent_line = proxy.ledger.spent("default", "a:spender:daily")
    assert spent_line == charged
    assert parse_amount(m["spent"]) == spent_line
    assert parse_amount(m["limit"]) == parse_amount("0.01")
    assert parse_amount(m["required"]) == sim_bound(raw, 1, 5000)
    assert error["agent_id"] == "spender"


@pytest.mark.parametrize(
    ("agent", "org", "reason", "label"),
    [
        ("hourly-agent", "acme", "hourly_budget_exceeded", "Hourly"),
        ("daily-agent", "acme", "daily_budget_exceeded", "Daily"),
        ("weekly-agent", "acme", "weekly_budget_exceeded", "Weekly"),
        ("monthly-agent", "acme", "monthly_budget_exceeded", "Monthly"),
        ("total-agent", "acme", "total_budget_exceeded", "Total"),
        ("org-agent", "lean", "org_daily_budget_exceeded", "Org daily"),
        ("org-hourly-agent", "lean_hourly", "org_hourly_budget_exceeded", "Org hourly"),
    ],
)
def test_reason_names_the_budget_that_refused(
    proxy: Proxy, keys: dict[str, str], sim: SimUpstreamThread, agent: str, org: str, reason: str, label: str
) -> None:
    before = sim_chat_count(sim)
    r = post(proxy, keys[org], agent, raw_body(max_tokens=1000))
    error = assert_refused(r, 403, "budget_exceeded", reason, proxy, before, sim)
    assert error["agent_id"] == agent
    m = MESSAGE_RE.match(error["message"])
    assert m and m["label"] == label, error["message"]
    assert parse_amount(m["limit"]) == parse_amount("0.001")


def test_spent_in_the_message_counts_reserved_spend(tmp_path: Path) -> None:
    """Spent = committed + reserved: an open stream's reservation shows in a concurrent refusal."""
    with SimUpstreamThread(SimConfig(chunks=4, chunk_delay_ms=400)) as slow, Proxy(
        tmp_path, policy_for(slow.base_url, "[agents.a]\ndaily_budget = 0.01\n")
    ) as proxy:  # fmt: skip
        key = proxy.key()
        first = raw_body(max_tokens=2000, stream=True)
        with httpx.stream("POST", f"{proxy.url}/v1/chat/completions", content=first, timeout=30,
                          headers={"authorization": f"Bearer {key}", "x-resgov-agent-id": "a"}) as s:  # fmt: skip
            assert s.status_code == 200
            reserved = parse_amount(s.headers["x-resgov-reserved"])
            r = post(proxy, key, "a", raw_body(max_tokens=1000))
            error = r.json()["error"]
            m = MESSAGE_RE.match(error["message"])
            assert m, error
            assert parse_amount(m["spent"]) == reserved
            for _ in s.iter_bytes():
                pass
        proxy.ledger.check_invariants()


# --- other policy refusals -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("agent", "fields", "type_"),
    [
        ("limited", {"model": "sim/gpt-sim"}, "model_not_allowed"),
        ("limited", {"max_tokens": 101}, "max_tokens_exceeded"),
        ("limited", {"max_completion_tokens": 101}, "max_tokens_exceeded"),
        ("limited", {"max_tokens": 10, "tools": [{"type": "function", "function": {"name": "delete_db"}}]},
         "tool_not_allowed"),
        ("limited", {"max_tokens": 10, "tools": [{"type": "function", "function": {"name": "search"}}],
                     "tool_choice": {"type": "function", "function": {"name": "rm_rf"}}}, "tool_not_allowed"),
        ("ghost", {}, "agent_not_found"),
        ("hermes", {"model": "sim/unpriced-mystery-model"}, "unknown_model_price"),
        ("hermes", {"model": "mystery-model-without-a-price"}, "unknown_model_price"),
    ],
)  # fmt: skip
def test_policy_refusals_have_their_own_type_and_never_reach_upstream(
    proxy: Proxy, keys: dict[str, str], sim: SimUpstreamThread, agent: str, fields: dict[str, Any], type_: str
) -> None:
    before = sim_chat_count(sim)
    r = post(proxy, keys["default"], agent, raw_body(**fields))
    error = assert_refused(r, 403, type_, type_, proxy, before, sim)
    assert error["type"] != "budget_exceeded"
    assert error.get("agent_id") == agent


def test_agent_of_another_org_is_not_found(
    proxy: Proxy, keys: dict[str, str], sim: SimUpstreamThread
) -> None:
    before = sim_chat_count(sim)
    # hermes belongs to the org "default"; acme's key cannot act as it.
    r = post(proxy, keys["acme"], "hermes", raw_body())
    assert_refused(r, 403, "agent_not_found", "agent_not_found", proxy, before, sim)


def test_allowed_tool_and_model_pattern_pass(proxy: Proxy, keys: dict[str, str]) -> None:
    tools = [{"type": "function", "function": {"name": "search", "parameters": {"type": "object"}}}]
    r = post(proxy, keys["default"], "limited", raw_body(max_tokens=50, tools=tools))
    assert r.status_code == 200, r.text


def test_missing_agent_header_is_a_400(proxy: Proxy, keys: dict[str, str], sim: SimUpstreamThread) -> None:
    before = sim_chat_count(sim)
    r = post(proxy, keys["default"], None, raw_body())
    assert_refused(r, 400, "invalid_request_error", "missing_agent_id", proxy, before, sim)


# --- authentication ------------------------------------------------------------------------------


def test_missing_unknown_and_revoked_keys_are_401(proxy: Proxy, sim: SimUpstreamThread) -> None:
    before = sim_chat_count(sim)
    audit_before = len(proxy.ledger.audit())
    assert_refused(post(proxy, None, "hermes", raw_body()), 401, "authentication_error", "missing_api_key")
    assert_refused(post(proxy, "rgf_not_a_key", "hermes", raw_body()), 401, "authentication_error",
                   "invalid_api_key")  # fmt: skip
    r = post(proxy, None, "hermes", raw_body(), authorization="Basic dXNlcjpwYXNz")
    assert_refused(r, 401, "authentication_error", "missing_api_key")
    r = post(proxy, None, "hermes", raw_body(), authorization="Bearer")
    assert r.status_code == 401
    made = httpx.post(f"{proxy.url}/api/v1/admin/generate-key", headers={"X-Admin-Token": ADMIN_TOKEN},
                      json={"org_id": "default", "name": "to-revoke"}).json()  # fmt: skip
    key = made["api_key"]
    assert post(proxy, key, "hermes", raw_body(max_tokens=10)).status_code == 200
    revoked = httpx.delete(
        f"{proxy.url}/api/v1/admin/keys/{made['key_id']}", headers={"X-Admin-Token": ADMIN_TOKEN}
    )
    assert revoked.status_code == 200
    assert_refused(post(proxy, key, "hermes", raw_body()), 401, "authentication_error", "revoked_api_key")
    assert sim_chat_count(sim) == before + 1
    # Unauthenticated requests name no org: they leave no audit record (only the one success does).
    time.sleep(0.1)
    assert len(proxy.ledger.audit()) == audit_before + 1


def test_expired_key_and_missing_scope(proxy: Proxy, sim: SimUpstreamThread) -> None:
    before = sim_chat_count(sim)
    expiring = proxy.key("default", expires_in_seconds=1)
    read_only = proxy.key("default", scopes=["read"])
    r = post(proxy, read_only, "hermes", raw_body(max_tokens=10))
    assert_refused(r, 403, "insufficient_scope", "insufficient_scope")
    assert httpx.get(
        f"{proxy.url}/api/v1/agents/hermes", headers={"authorization": f"Bearer {read_only}"}
    ).is_success
    time.sleep(1.1)
    assert_refused(
        post(proxy, expiring, "hermes", raw_body()), 401, "authentication_error", "expired_api_key"
    )
    assert sim_chat_count(sim) == before


def test_audit_is_scoped_to_the_keys_org(proxy: Proxy, keys: dict[str, str]) -> None:
    assert post(proxy, keys["acme"], "reader", raw_body(max_tokens=10)).status_code == 200
    for query in ("", "?org_id=default", "?agent_id=hermes"):
        r = httpx.get(f"{proxy.url}/api/v1/audit{query}", headers={"authorization": f"Bearer {keys['acme']}"})
        assert r.status_code == 200
        items = r.json()["items"]
        assert all(item["org"] == "acme" for item in items), query
        if not query:
            assert items
            assert all(isinstance(item["actual"], int | float) for item in items)
    r = httpx.get(f"{proxy.url}/api/v1/audit", headers={"X-Admin-Token": ADMIN_TOKEN})
    assert {item["org"] for item in r.json()["items"]} >= {"acme", "default"}


def test_wrong_admin_token_is_401(proxy: Proxy) -> None:
    r = httpx.post(f"{proxy.url}/api/v1/admin/generate-key", headers={"X-Admin-Token": "x" * 40},
                   json={"org_id": "default"})  # fmt: skip
    assert r.status_code == 401
    r = httpx.post(f"{proxy.url}/api/v1/admin/generate-key", json={"org_id": "default"})
    assert r.status_code == 401


@pytest.mark.parametrize("header", ["x-api-key", "X-API-Key", "X-Api-Key"])
def test_anthropic_style_key_headers_are_accepted(proxy: Proxy, keys: dict[str, str], header: str) -> None:
    r = httpx.post(f"{proxy.url}/v1/chat/completions", content=raw_body(max_tokens=10), timeout=30,
                   headers={header: keys["default"], "x-resgov-agent-id": "hermes",
                            "content-type": "application/json"})  # fmt: skip
    assert r.status_code == 200, r.text


def test_key_bound_to_an_agent(proxy: Proxy, sim: SimUpstreamThread) -> None:
    bound = proxy.key("default", agent_id="hermes")
    r = post(proxy, bound, None, raw_body(max_tokens=10))
    assert r.status_code == 200, r.text
    row = audit_row(proxy, r.headers["x-resgov-request-id"])
    assert row["agent"] == "hermes" and row["status"] == "completed"
    assert post(proxy, bound, "hermes", raw_body(max_tokens=10)).status_code == 200
    before = sim_chat_count(sim)
    r = post(proxy, bound, "spender", raw_body(max_tokens=10))
    assert r.status_code == 403
    assert r.json()["error"]["reason"] == "agent_mismatch"
    assert sim_chat_count(sim) == before


def test_admin_token_never_spends(proxy: Proxy, sim: SimUpstreamThread) -> None:
    before = sim_chat_count(sim)
    r = post(proxy, None, "hermes", raw_body(), **{"X-Admin-Token": ADMIN_TOKEN})
    assert r.status_code == 401
    assert sim_chat_count(sim) == before


# --- shrink ---------------------------------------------------------------------------------------


def test_shrink_lowers_the_cap_to_what_the_budget_affords(tmp_path: Path) -> None:
    agents = "[agents.a]\ndaily_budget = 0.001\n"
    extra = 'on_insufficient_budget = "shrink"\nshrink_min_tokens = 16'
    with (
        SimUpstreamThread(SimConfig()) as sim,
        Proxy(tmp_path, policy_for(sim.base_url, agents, extra)) as proxy,
    ):
        key = proxy.key()
        raw = raw_body(max_tokens=1000)
        r = post(proxy, key, "a", raw)
        assert r.status_code == 200, r.text
        shrunk = int(r.headers["x-resgov-shrunk-max-tokens"])
        limit = parse_amount("0.001")
        # The largest cap whose worst case fits what is left (nothing spent yet).
        assert sim_bound(raw, 1, shrunk) <= limit < sim_bound(raw, 1, shrunk + 1)
        assert 16 <= shrunk < 1000
        assert sim_chat_bodies(sim)[-1]["max_tokens"] == shrunk
        assert parse_amount(r.headers["x-resgov-reserved"]) == sim_bound(raw, 1, shrunk)
        assert r.json()["resgov_cost"]["reserved"] == pytest.approx(sim_bound(raw, 1, shrunk) / NANO)
        # A call that fits is not shrunk.
        r = post(proxy, key, "a", raw_body(max_tokens=20))
        assert r.status_code == 200
        assert "x-resgov-shrunk-max-tokens" not in r.headers
        assert sim_chat_bodies(sim)[-1]["max_tokens"] == 20
        # Same for a stream, with max_completion_tokens.
        spent = proxy.ledger.spent("default", "a:a:daily")
        raw = raw_body(max_completion_tokens=1000, stream=True)
        with httpx.stream("POST", f"{proxy.url}/v1/chat/completions", content=raw, timeout=30,
                          headers={"authorization": f"Bearer {key}", "x-resgov-agent-id": "a"}) as s:  # fmt: skip
            assert s.status_code == 200
            shrunk = int(s.headers["x-resgov-shrunk-max-tokens"])
            assert sim_bound(raw, 1, shrunk) <= limit - spent < sim_bound(raw, 1, shrunk + 1)
            b"".join(s.iter_bytes())
        assert sim_chat_bodies(sim)[-1]["max_completion_tokens"] == shrunk
        proxy.ledger.check_invariants()


def test_shrink_never_goes_below_its_minimum(tmp_path: Path) -> None:
    agents = "[agents.a]\ndaily_budget = 0.0003\n"  # affords ~55 output tokens, under the minimum
    extra = 'on_insufficient_budget = "shrink"\nshrink_min_tokens = 256'
    with (
        SimUpstreamThread(SimConfig()) as sim,
        Proxy(tmp_path, policy_for(sim.base_url, agents, extra)) as proxy,
    ):
        r = post(proxy, proxy.key(), "a", raw_body(max_tokens=1000))
        assert_refused(r, 403, "budget_exceeded", "daily_budget_exceeded", proxy, 0, sim)
        assert "x-resgov-shrunk-max-tokens" not in r.headers
        proxy.ledger.check_invariants()


# --- reading where an agent stands ---------------------------------------------------------------


def _budgets(proxy: Proxy, key: str, agent: str) -> dict[tuple[str, str], dict[str, Any]]:
    r = httpx.get(f"{proxy.url}/api/v1/agents/{agent}", headers={"authorization": f"Bearer {key}"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["agent_id"] == agent
    return {(b["level"], b["period"]): b for b in body["budgets"]}


def test_agent_budgets_shape_and_read_your_writes(proxy: Proxy, keys: dict[str, str]) -> None:
    key = keys["acme"]
    budgets = _budgets(proxy, key, "reader")
    assert set(budgets) == {("agent", "daily"), ("org", "daily")}
    for b in budgets.values():
        assert set(b) >= {
            "level",
            "period",
            "limit",
            "spent",
            "reserved",
            "remaining",
            "currency",
            "resets_at",
        }
        for field in ("limit", "spent", "reserved", "remaining"):
            assert isinstance(b[field], int | float) and not isinstance(b[field], bool), (field, b)
        assert b["currency"] == "USD"
        resets = datetime.fromisoformat(b["resets_at"].replace("Z", "+00:00"))
        assert resets > datetime.now(UTC)
        assert (resets.hour, resets.minute, resets.second) == (0, 0, 0)
    agent_line = budgets[("agent", "daily")]
    assert agent_line["limit"] == 5
    assert agent_line["remaining"] == pytest.approx(
        agent_line["limit"] - agent_line["spent"] - agent_line["reserved"]
    )
    spent = parse_amount(agent_line["spent"])
    org_spent = parse_amount(budgets[("org", "daily")]["spent"])
    for i in range(4):
        if i % 2 == 0:
            r = post(proxy, key, "reader", raw_body(max_tokens=30 + i))
            assert r.status_code == 200
            cost = parse_amount(r.headers["x-resgov-cost"])
            assert parse_amount(r.headers["x-resgov-remaining"]) == min(
                parse_amount("5") - spent - cost, parse_amount("100") - org_spent - cost
            )
        else:
            with httpx.stream("POST", f"{proxy.url}/v1/chat/completions", content=raw_body(max_tokens=30, stream=True),
                              headers={"authorization": f"Bearer {key}", "x-resgov-agent-id": "reader"}) as s:  # fmt: skip
                assert s.status_code == 200
                rid = s.headers["x-resgov-request-id"]
                body = b"".join(s.iter_bytes())
            assert body.rstrip().endswith(b"data: [DONE]")
            cost = audit_row(proxy, rid)["actual"]
        # Immediately after the response's last byte: the call is visible.
        now = _budgets(proxy, key, "reader")
        assert parse_amount(now[("agent", "daily")]["spent"]) == spent + cost, i
        assert now[("agent", "daily")]["reserved"] == 0
        assert parse_amount(now[("org", "daily")]["spent"]) == org_spent + cost
        spent += cost
        org_spent += cost


def test_agent_budgets_access_control(proxy: Proxy, keys: dict[str, str]) -> None:
    r = httpx.get(f"{proxy.url}/api/v1/agents/hermes", headers={"authorization": f"Bearer {keys['acme']}"})
    assert r.status_code == 404
    r = httpx.get(f"{proxy.url}/api/v1/agents/hermes")
    assert r.status_code == 401
    r = httpx.get(f"{proxy.url}/api/v1/agents/hermes", headers={"X-Admin-Token": ADMIN_TOKEN})
    assert r.status_code == 200
    budgets = {(b["level"], b["period"]): b for b in r.json()["budgets"]}
    assert budgets[("agent", "daily")]["limit"] == 3


# --- cost reporting ------------------------------------------------------------------------------


def test_non_stream_cost_object_and_headers(
    proxy: Proxy, keys: dict[str, str], sim: SimUpstreamThread
) -> None:
    raw = raw_body(max_tokens=200)
    r = post(proxy, keys["default"], "hermes", raw)
    assert r.status_code == 200, r.text
    body = r.json()
    upstream_usage = body["usage"]
    cost = body["resgov_cost"]
    assert set(cost) >= {"reserved", "actual", "refund", "input_tokens", "output_tokens"}
    reserved = sim_bound(raw, 1, 200)
    actual = sim_cost(upstream_usage["prompt_tokens"], upstream_usage["completion_tokens"])
    assert parse_amount(cost["reserved"]) == reserved
    assert parse_amount(cost["actual"]) == actual
    assert parse_amount(cost["refund"]) == reserved - actual
    assert cost["input_tokens"] == upstream_usage["prompt_tokens"]
    assert cost["output_tokens"] == upstream_usage["completion_tokens"]
    assert parse_amount(r.headers["x-resgov-cost"]) == actual
    assert parse_amount(r.headers["x-resgov-reserved"]) == reserved
    rid = r.headers["x-resgov-request-id"]
    row = audit_row(proxy, rid)
    assert (row["reserved"], row["actual"], row["status"]) == (reserved, actual, "completed")
    assert row["upstream_request_id"]
    left = parse_amount("3") - proxy.ledger.spent("default", "a:hermes:daily")
    assert parse_amount(r.headers["x-resgov-remaining"]) == left
    # The upstream got the body ResGov reserved for, and no ResGov credential.
    sent = [q for q in list(sim.stats.requests) if q.path.endswith("/chat/completions")][-1]
    assert sent.body["max_tokens"] == 200
    assert keys["default"] not in str(sent.headers)
    assert not any(h.startswith("x-resgov") for h in sent.headers)


def test_stream_carries_its_reservation(proxy: Proxy, keys: dict[str, str]) -> None:
    raw = raw_body(max_tokens=100, stream=True)
    with httpx.stream("POST", f"{proxy.url}/v1/chat/completions", content=raw,
                      headers={"authorization": f"Bearer {keys['default']}", "x-resgov-agent-id": "hermes"}) as s:  # fmt: skip
        assert s.status_code == 200
        assert s.headers["content-type"].startswith("text/event-stream")
        reserved = parse_amount(s.headers["x-resgov-reserved"])
        rid = s.headers["x-resgov-request-id"]
        assert "x-resgov-remaining" in s.headers
        b"".join(s.iter_bytes())
    assert reserved == sim_bound(raw, 1, 100)
    row = audit_row(proxy, rid)
    assert row["reserved"] == reserved and row["status"] == "completed"
    assert 0 < row["actual"] <= reserved


def test_health(proxy: Proxy) -> None:
    r = httpx.get(f"{proxy.url}/health")
    assert r.status_code == 200
    body = r.json()
    assert body["status"] == "ok"
    assert isinstance(body["version"], str) and body["version"]
    assert body["store"]["reachable"] is True


def test_ledger_invariants_hold_after_everything(proxy: Proxy) -> None:
    proxy.ledger.check_invariants()
