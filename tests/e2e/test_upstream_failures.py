"""Upstream misbehaviour: errors, dead ports, cuts, stalls, over-billing, lost usage, split SSE, gone clients."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest

from resgov.core.money import parse_amount
from resgov.simulator.upstream import SimConfig, SimUpstreamThread
from tests.helpers import Proxy, free_port, policy_for, sim_bound, sim_chat_count, sim_cost

DEAD_PORT = free_port()  # nothing listens here: connection refused

EXTRA = f"""
[providers.dead]
base_url = "http://127.0.0.1:{DEAD_PORT}/v1"
format = "openai"
connect_timeout = 2

[models."dead/gpt-sim"]
input_per_mtok = 1.00
output_per_mtok = 4.00

[models."slow/gpt-sim"]
input_per_mtok = 1.00
output_per_mtok = 4.00

[agents.a]
daily_budget = 10
"""

MSG = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def sim() -> Iterator[SimUpstreamThread]:
    with SimUpstreamThread(SimConfig()) as upstream:
        yield upstream


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, sim: SimUpstreamThread) -> Iterator[Proxy]:
    slow = f"""
[providers.slow]
base_url = "{sim.base_url}/v1"
format = "openai"
first_byte_timeout = 1
idle_timeout = 2
"""
    with Proxy(tmp_path_factory.mktemp("upstream"), policy_for(sim.base_url, EXTRA + slow)) as p:
        yield p


@pytest.fixture(scope="module")
def key(proxy: Proxy) -> str:
    return proxy.key()


@pytest.fixture(autouse=True)
def _drained(proxy: Proxy) -> Iterator[None]:
    yield
    wait_settled(proxy)
    proxy.ledger.check_invariants()


def wait_settled(proxy: Proxy, timeout: float = 8.0) -> None:
    """Settlement of an aborted stream runs as the proxy notices; give it a bounded moment."""
    deadline = time.monotonic() + timeout
    while proxy.ledger.open_reservations() and time.monotonic() < deadline:
        time.sleep(0.02)


def raw_body(**fields: Any) -> bytes:
    body: dict[str, Any] = {"model": "gpt-sim", "messages": MSG, "max_tokens": 100}
    body.update(fields)
    return orjson.dumps(body)


def headers(key: str, **sim: str) -> dict[str, str]:
    h = {"authorization": f"Bearer {key}", "x-resgov-agent-id": "a", "content-type": "application/json"}
    h.update({f"x-sim-{k.replace('_', '-')}": v for k, v in sim.items()})
    return h


def post(proxy: Proxy, key: str, raw: bytes, **sim: str) -> httpx.Response:
    return httpx.post(
        f"{proxy.url}/v1/chat/completions", content=raw, headers=headers(key, **sim), timeout=30
    )


def stream(proxy: Proxy, key: str, raw: bytes, **sim: str) -> tuple[httpx.Response, bytes]:
    with httpx.stream("POST", f"{proxy.url}/v1/chat/completions", content=raw, headers=headers(key, **sim),
                      timeout=30) as r:  # fmt: skip
        data = b"".join(r.iter_bytes())
    return r, data


def audit_of(proxy: Proxy, r: httpx.Response) -> dict[str, Any]:
    rid = r.headers["x-resgov-request-id"]
    wait_settled(proxy)
    rows = [a for a in proxy.ledger.audit() if a["request_id"] == rid]
    assert len(rows) == 1
    return rows[0]


def events(data: bytes) -> list[Any]:
    out = []
    for block in data.split(b"\n\n"):
        for line in block.splitlines():
            if line.startswith(b"data: ") and line != b"data: [DONE]":
                out.append(orjson.loads(line[6:]))
    return out


def content_of(data: bytes) -> str:
    text = ""
    for e in events(data):
        for choice in e.get("choices") or []:
            text += (choice.get("delta") or {}).get("content") or ""
    return text


# --- errors before any output: released, passed through ------------------------------------------


@pytest.mark.parametrize("status", [500, 429, 401, 400, 503])
@pytest.mark.parametrize("streaming", [False, True])
def test_upstream_error_is_passed_through_and_released(
    proxy: Proxy, key: str, sim: SimUpstreamThread, status: int, streaming: bool
) -> None:
    spent = proxy.ledger.spent("default", "a:a:daily")
    direct = httpx.post(f"{sim.base_url}/v1/chat/completions", json={"model": "gpt-sim", "messages": MSG},
                        headers={"x-sim-error-status": str(status)})  # fmt: skip
    raw = raw_body(stream=streaming)
    r = post(proxy, key, raw, error_status=str(status))
    assert r.status_code == status
    error = r.json()["error"]
    assert set(error) == set(direct.json()["error"])
    assert (
        error["type"] == direct.json()["error"]["type"]
        and error["message"] == direct.json()["error"]["message"]
    )
    if status in (429, 503):
        assert r.headers.get("retry-after") == "1"
    row = audit_of(proxy, r)
    assert (row["status"], row["actual"], row["http_status"]) == ("upstream_error", 0, status)
    assert row["reserved"] == sim_bound(raw, 1, 100)
    assert proxy.ledger.spent("default", "a:a:daily") == spent


def test_connection_refused_is_502_and_released(proxy: Proxy, key: str, sim: SimUpstreamThread) -> None:
    spent = proxy.ledger.spent("default", "a:a:daily")
    for streaming in (False, True):
        r = post(proxy, key, raw_body(model="dead/gpt-sim", stream=streaming))
        assert r.status_code == 502, r.text
        assert r.json()["error"]["reason"] == "upstream_unreachable"
        row = audit_of(proxy, r)
        assert (row["status"], row["actual"]) == ("upstream_error", 0)
    assert proxy.ledger.spent("default", "a:a:daily") == spent


def test_first_byte_timeout_is_504_and_charged_a_bound(proxy: Proxy, key: str) -> None:
    raw = raw_body(model="slow/gpt-sim")
    r = post(proxy, key, raw, latency_ms="1600")
    assert r.status_code == 504, r.text
    assert r.json()["error"]["reason"] == "upstream_timeout"
    row = audit_of(proxy, r)
    # The request was sent: a unary answer may have been billed in full.
    assert row["estimated"] == 1 and row["actual"] == row["reserved"] == sim_bound(raw, 1, 100)
    raw = raw_body(model="slow/gpt-sim", stream=True)
    r = post(proxy, key, raw, latency_ms="1600")
    assert r.status_code == 504
    row = audit_of(proxy, r)
    # A stream produced nothing yet: its input bound only.
    assert row["estimated"] == 1 and row["actual"] == sim_bound(raw, 1, 0) < row["reserved"]


# --- output flowed, then trouble: estimated, never above the reservation -------------------------


def test_stream_cut_midway_is_estimated_within_the_reservation(proxy: Proxy, key: str) -> None:
    raw = raw_body(stream=True)
    r, data = stream(proxy, key, raw, cut_after_chunks="3")
    assert r.status_code == 200
    assert content_of(data) == "tok " * 3
    assert any(e.get("error", {}).get("type") == "upstream_cut" for e in events(data))
    row = audit_of(proxy, r)
    input_bound = len(raw) + 64 + 16
    assert row["status"] == "estimated" and row["estimated"] == 1
    assert row["actual"] <= row["reserved"]
    # The bound of what was produced: input bound + the content bytes streamed (12), give or
    # take the role marker of the first delta.
    assert sim_cost(input_bound, 12) <= row["actual"] <= sim_cost(input_bound, 12 + len("assistant"))


def test_unary_body_cut_is_charged_its_bound(proxy: Proxy, key: str) -> None:
    raw = raw_body()
    r = post(proxy, key, raw, cut_after_chunks="1")
    assert r.status_code == 502
    row = audit_of(proxy, r)
    assert row["estimated"] == 1 and row["actual"] == row["reserved"]


def test_stalled_stream_ends_at_idle_timeout_and_is_settled(proxy: Proxy, key: str) -> None:
    raw = raw_body(stream=True)
    started = time.monotonic()
    r, data = stream(proxy, key, raw, stall_after_chunks="2")
    took = time.monotonic() - started
    assert 1.5 <= took < 6, took  # idle_timeout = 2 s
    assert content_of(data) == "tok " * 2
    assert any(e.get("error", {}).get("type") == "idle_timeout" for e in events(data))
    row = audit_of(proxy, r)
    assert row["status"] == "estimated" and row["reason"] == "idle_timeout"
    assert 0 < row["actual"] <= row["reserved"]


def test_stalled_unary_answer_is_504_and_settled(proxy: Proxy, key: str) -> None:
    """Issue 2: "a stalled upstream ends the call with 504 and settles its reservation"."""
    raw = raw_body()
    started = time.monotonic()
    r = post(proxy, key, raw, stall_after_chunks="1")
    assert time.monotonic() - started < 6
    assert r.status_code == 504, (r.status_code, r.text)
    assert r.json()["error"]["type"] == "upstream_timeout"
    row = audit_of(proxy, r)
    assert row["estimated"] == 1 and 0 < row["actual"] <= row["reserved"]


def test_usage_above_reservation_is_charged_in_full_and_flagged(proxy: Proxy, key: str) -> None:
    raw = raw_body(max_tokens=5)
    r = post(proxy, key, raw, usage_multiplier="50")
    assert r.status_code == 200
    usage = r.json()["usage"]
    actual = sim_cost(usage["prompt_tokens"], usage["completion_tokens"])
    reserved = sim_bound(raw, 1, 5)
    assert actual > reserved
    cost = r.json()["resgov_cost"]
    assert parse_amount(cost["actual"]) == actual and cost["overage"] is True
    row = audit_of(proxy, r)
    assert (row["actual"], row["reserved"], row["overage"], row["status"]) == (
        actual,
        reserved,
        1,
        "completed",
    )
    # Same through a stream.
    raw = raw_body(max_tokens=5, stream=True, stream_options={"include_usage": True})
    r, data = stream(proxy, key, raw, usage_multiplier="50")
    usage = next(e["usage"] for e in events(data) if e.get("usage"))
    row = audit_of(proxy, r)
    assert row["actual"] == sim_cost(usage["prompt_tokens"], usage["completion_tokens"]) > row["reserved"]
    assert row["overage"] == 1


def test_missing_usage_is_estimated(proxy: Proxy, key: str) -> None:
    raw = raw_body(stream=True)
    r, data = stream(proxy, key, raw, omit_usage="true")
    assert content_of(data) == "tok " * 16
    row = audit_of(proxy, r)
    assert row["status"] == "estimated" and row["estimated"] == 1
    input_bound = len(raw) + 64 + 16
    assert sim_cost(input_bound, 64) <= row["actual"] <= min(row["reserved"], sim_cost(input_bound, 64 + 9))
    raw = raw_body()
    r = post(proxy, key, raw, omit_usage="true")
    assert r.status_code == 200 and "usage" not in r.json()
    assert r.json()["resgov_cost"]["estimated"] is True
    row = audit_of(proxy, r)
    assert row["status"] == "estimated" and 0 < row["actual"] <= row["reserved"]


def test_split_sse_still_finds_the_exact_usage(proxy: Proxy, key: str) -> None:
    raw = raw_body(stream=True, stream_options={"include_usage": True})
    r, data = stream(proxy, key, raw, split_sse="true")
    assert content_of(data) == "tok " * 16
    usage = [e["usage"] for e in events(data) if e.get("usage")]
    assert len(usage) == 1
    row = audit_of(proxy, r)
    assert row["status"] == "completed" and row["estimated"] == 0
    assert row["actual"] == sim_cost(usage[0]["prompt_tokens"], usage[0]["completion_tokens"])
    assert (row["input_tokens"], row["output_tokens"]) == (
        usage[0]["prompt_tokens"],
        usage[0]["completion_tokens"],
    )
    assert data.rstrip().endswith(b"data: [DONE]")


def test_client_disconnect_mid_stream_is_settled_as_estimated(
    proxy: Proxy, key: str, sim: SimUpstreamThread
) -> None:
    raw = raw_body(stream=True)
    aborted = sum(sim.stats.aborted.values())
    with httpx.stream("POST", f"{proxy.url}/v1/chat/completions", content=raw, timeout=30,
                      headers=headers(key, chunk_delay_ms="200")) as r:  # fmt: skip
        assert r.status_code == 200
        rid = r.headers["x-resgov-request-id"]
        first = next(r.iter_bytes())
        assert first
    # Leaving the block closes the connection with the stream unfinished.
    wait_settled(proxy)
    assert proxy.ledger.open_reservations() == 0
    row = next(a for a in proxy.ledger.audit() if a["request_id"] == rid)
    assert row["status"] == "estimated" and row["estimated"] == 1
    assert row["reason"] == "client_disconnect"
    assert row["actual"] <= row["reserved"]
    # ResGov hung up on the upstream too, instead of letting it generate into the void.
    deadline = time.monotonic() + 5
    while sum(sim.stats.aborted.values()) == aborted and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sum(sim.stats.aborted.values()) > aborted


@pytest.mark.parametrize("wants", [True, False])
def test_usage_chunk_only_when_the_client_asked(
    proxy: Proxy, key: str, sim: SimUpstreamThread, wants: bool
) -> None:
    fields: dict[str, Any] = {"stream": True}
    if wants:
        fields["stream_options"] = {"include_usage": True}
    before = sim_chat_count(sim)
    r, data = stream(proxy, key, raw_body(**fields))
    assert r.status_code == 200
    assert sim_chat_count(sim) == before + 1
    # ResGov always asks the upstream for usage (that is how it charges exactly).
    sent = [q.body for q in list(sim.stats.requests) if q.path.endswith("/chat/completions")][-1]
    assert sent["stream_options"]["include_usage"] is True
    chunks = events(data)
    usage_chunks = [e for e in chunks if e.get("usage")]
    if wants:
        assert len(usage_chunks) == 1 and usage_chunks[0]["choices"] == []
    else:
        assert usage_chunks == []
        assert all(e.get("choices") for e in chunks)
    assert data.rstrip().endswith(b"data: [DONE]")
    row = audit_of(proxy, r)
    assert row["status"] == "completed" and row["estimated"] == 0
