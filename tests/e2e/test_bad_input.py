"""Bad input gets a 4xx JSON error (never a 500, nothing reserved, upstream untouched);
unusual but valid input is forwarded and bounded."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from resgov.core.money import parse_amount
from resgov.simulator.upstream import SimConfig, SimUpstreamThread
from tests.helpers import Proxy, policy_for, sim_bound, sim_chat_bodies, sim_chat_count, sim_cost

MAX_BYTES = 8192
AGENTS = """
[agents.a]
daily_budget = 50
max_tokens_per_request = 2000

[agents.free]
daily_budget = 50
"""
GLOBAL = f"max_request_bytes = {MAX_BYTES}\ndefault_max_tokens = 3000"
MSG = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def sim() -> Iterator[SimUpstreamThread]:
    with SimUpstreamThread(SimConfig()) as upstream:
        yield upstream


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory, sim: SimUpstreamThread) -> Iterator[Proxy]:
    with Proxy(tmp_path_factory.mktemp("bad"), policy_for(sim.base_url, AGENTS, GLOBAL)) as p:
        yield p


@pytest.fixture(scope="module")
def client(proxy: Proxy) -> Iterator[httpx.Client]:
    key = proxy.key()
    headers = {"authorization": f"Bearer {key}", "x-resgov-agent-id": "a", "content-type": "application/json"}
    with httpx.Client(base_url=proxy.url, headers=headers, timeout=30) as c:
        yield c


def send(client: httpx.Client, raw: bytes, **headers: str) -> httpx.Response:
    return client.post("/v1/chat/completions", content=raw, headers=headers)


def assert_4xx(r: httpx.Response, statuses: tuple[int, ...]) -> dict[str, Any]:
    assert r.status_code in statuses, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    error = r.json()["error"]
    assert (
        isinstance(error["type"], str)
        and isinstance(error["message"], str)
        and isinstance(error["reason"], str)
    )
    return dict(error)


def assert_untouched(proxy: Proxy, sim: SimUpstreamThread, before: int) -> None:
    assert sim_chat_count(sim) == before, "a rejected request reached the upstream"
    assert proxy.ledger.open_reservations() == 0
    assert proxy.ledger.reserved_total() == 0


def body(**fields: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"model": "gpt-sim", "messages": MSG}
    out.update(fields)
    return {k: v for k, v in out.items() if v is not ...}


MALFORMED = [
    b"",
    b"{",
    b'{"model": "gpt-sim", "messages": [',
    b"not json at all",
    b'{"model": "gpt-sim", "messages": []}}',
    b"\xff\xfe\x00garbage",
    b"[]",
    b'"a string"',
    b"42",
    b"null",
    b"true",
    b'[{"model": "gpt-sim"}]',
    b'{"model": "gpt-sim", "messages": [{"role": "user", "content": "x"}], "max_tokens": 1e999}',
    b'{"model": "gpt-sim", "messages": [{"role": "user", "content": "x"}], "max_tokens": 100000000000000000000000}',
    b'{"model": "gpt-sim", "messages": [{"role": "user", "content": "\\ud800"}]}',
    b'{"model": NaN, "messages": []}',
]


@pytest.mark.parametrize("raw", MALFORMED)
def test_malformed_json_is_400(
    proxy: Proxy, client: httpx.Client, sim: SimUpstreamThread, raw: bytes
) -> None:
    before = sim_chat_count(sim)
    r = send(client, raw)
    assert_4xx(r, (400, 422))
    assert_untouched(proxy, sim, before)


WRONG_TYPES = [
    body(model=...),
    body(model=1),
    body(model=None),
    body(model=""),
    body(model=["gpt-sim"]),
    body(messages=...),
    body(messages="hello"),
    body(messages={"role": "user"}),
    body(messages=[1, 2]),
    body(messages=["hello"]),
    body(messages=None),
    body(stream="yes"),
    body(stream=1),
    body(max_tokens="10"),
    body(max_tokens=1.5),
    body(max_tokens=True),
    body(max_tokens=[10]),
    body(max_completion_tokens="10"),
    body(n="2"),
    body(n=1.0),
    body(stream_options="on", stream=True),
    body(tools="search"),
    body(tools=[1]),
]


@pytest.mark.parametrize("payload", WRONG_TYPES)
def test_wrong_types_are_400(
    proxy: Proxy, client: httpx.Client, sim: SimUpstreamThread, payload: Any
) -> None:
    before = sim_chat_count(sim)
    error = assert_4xx(send(client, orjson.dumps(payload)), (400, 422))
    assert error["type"] != "budget_exceeded"
    assert_untouched(proxy, sim, before)


BAD_VALUES = [
    body(max_tokens=0),
    body(max_tokens=-1),
    body(max_tokens=-(2**63)),
    body(max_tokens=2**63 - 1),
    body(max_tokens=10**15),
    body(max_completion_tokens=0),
    body(max_completion_tokens=-5),
    body(max_completion_tokens=10**12),
    body(n=0),
    body(n=-3),
    body(n=1000),
    body(n=2**62),
]


@pytest.mark.parametrize("payload", BAD_VALUES)
def test_negative_zero_and_absurd_caps_are_refused(
    proxy: Proxy, client: httpx.Client, sim: SimUpstreamThread, payload: Any
) -> None:
    before = sim_chat_count(sim)
    r = send(client, orjson.dumps(payload))
    error = assert_4xx(r, (400, 403, 422))
    if r.status_code == 403:
        # A cap above max_tokens_per_request is a policy refusal, also fine: never a budget one.
        assert error["type"] == "max_tokens_exceeded"
    assert_untouched(proxy, sim, before)


def test_absurd_caps_for_an_agent_without_a_limit(
    proxy: Proxy, client: httpx.Client, sim: SimUpstreamThread
) -> None:
    before = sim_chat_count(sim)
    for cap in (10**9, 2**63 - 1):
        r = send(client, orjson.dumps(body(max_tokens=cap)), **{"x-resgov-agent-id": "free"})
        assert_4xx(r, (403, 422))
    assert_untouched(proxy, sim, before)


def test_body_over_max_request_bytes_is_413(
    proxy: Proxy, client: httpx.Client, sim: SimUpstreamThread
) -> None:
    before = sim_chat_count(sim)
    big = orjson.dumps(body(messages=[{"role": "user", "content": "x" * MAX_BYTES}]))
    error = assert_4xx(send(client, big), (413,))
    assert error["reason"] == "request_too_large"

    def chunks() -> Iterator[bytes]:
        # No content-length: the limit must hold while the body streams in.
        for i in range(0, len(big), 1000):
            yield big[i : i + 1000]

    r = client.post("/v1/chat/completions", content=chunks())
    assert_4xx(r, (413,))
    r = send(client, b"x" * (4 * 1024 * 1024))
    assert_4xx(r, (413,))
    assert_untouched(proxy, sim, before)


def test_bad_requests_leave_an_audit_record_and_nothing_else(proxy: Proxy, client: httpx.Client) -> None:
    r = send(client, b"{broken")
    rid = r.headers["x-resgov-request-id"]
    proxy.ledger.check_invariants()
    import time

    deadline = time.monotonic() + 5
    rows: list[dict[str, Any]] = []
    while not rows and time.monotonic() < deadline:
        rows = [a for a in proxy.ledger.audit() if a["request_id"] == rid]
        time.sleep(0.02)
    assert len(rows) == 1
    assert rows[0]["status"] == "rejected" and rows[0]["http_status"] == 400 and rows[0]["actual"] == 0


# --- unusual but valid: forwarded and bounded ----------------------------------------------------


UNUSUAL = [
    ("content parts", body(messages=[{"role": "user", "content": [{"type": "text", "text": "hi"},
                                                                  {"type": "text", "text": "there"}]}],
                           max_tokens=50), 50),
    ("content null", body(messages=[
        {"role": "user", "content": "call it"},
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "done"},
    ], max_tokens=50), 50),
    ("max_tokens null", body(max_tokens=None), 2000),
    ("max_completion_tokens null", body(max_completion_tokens=None, max_tokens=None), 2000),
    ("no cap at all", body(), 2000),
    ("unknown fields", body(max_tokens=50, foo={"bar": [1, 2, 3]}, metadata={"k": "v"}, user="u-1",
                            seed=7, temperature=0.2, logit_bias={"50256": -100}, x_vendor_flag=True), 50),
    ("empty messages", body(messages=[], max_tokens=50), 50),
    ("stream false explicit", body(stream=False, max_tokens=50), 50),
    ("unicode", body(messages=[{"role": "user", "content": "héllo 🌍 \u2028 \x00 end"}], max_tokens=50), 50),
    ("system and developer", body(messages=[{"role": "system", "content": "be brief"},
                                            {"role": "developer", "content": "really"},
                                            {"role": "user", "content": "hi", "name": "bob"}], max_tokens=50), 50),
]  # fmt: skip


@pytest.mark.parametrize(("name", "payload", "cap"), UNUSUAL, ids=[u[0] for u in UNUSUAL])
def test_unusual_but_valid_requests_are_forwarded_and_bounded(
    proxy: Proxy, client: httpx.Client, sim: SimUpstreamThread, name: str, payload: dict[str, Any], cap: int
) -> None:
    raw = orjson.dumps(payload)
    before = sim_chat_count(sim)
    r = send(client, raw)
    if name == "empty messages":
        # The simulator (like OpenAI) rejects an empty conversation: ResGov forwarded it.
        assert r.status_code == 400 and sim_chat_count(sim) == before + 1
        assert proxy.ledger.reserved_total() == 0
        return
    assert r.status_code == 200, r.text
    assert sim_chat_count(sim) == before + 1
    sent = sim_chat_bodies(sim)[-1]
    for k, v in payload.items():
        if k not in ("max_tokens", "max_completion_tokens", "messages") and v is not None:
            assert sent[k] == v, k
    assert sent["messages"] == payload["messages"]
    # The upstream cannot exceed what was reserved: ResGov set the cap it reserved for.
    assert max(sent.get("max_tokens") or 0, sent.get("max_completion_tokens") or 0) == cap
    reserved = parse_amount(r.headers["x-resgov-reserved"])
    assert reserved == sim_bound(raw, len(payload["messages"]), cap)
    usage = r.json()["usage"]
    assert sim_cost(usage["prompt_tokens"], usage["completion_tokens"]) <= reserved
    assert proxy.ledger.reserved_total() == 0


def test_choices_tools_and_predictions_are_in_the_bound(
    proxy: Proxy, client: httpx.Client, sim: SimUpstreamThread
) -> None:
    """``n`` multiplies the output, offered tools add their hidden prompt, rejected predicted
    tokens are billed as output: the reservation covers each (README, "Worst case")."""
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]
    prediction = {"type": "content", "content": "the answer is probably forty-two"}
    cases: list[tuple[dict[str, Any], Callable[[bytes], int]]] = [
        (body(max_tokens=40, n=3), lambda raw: sim_bound(raw, 1, 40, n=3)),
        (body(max_tokens=40, tools=tools), lambda raw: sim_bound(raw, 1, 40, tools=True)),
        (body(max_tokens=40, prediction=prediction),
         lambda raw: sim_cost(len(raw) + 64 + 16, 40 + len(orjson.dumps(prediction)))),
        (body(max_tokens=40, n=2, prediction=prediction),
         lambda raw: sim_cost(len(raw) + 64 + 16, (40 + len(orjson.dumps(prediction))) * 2)),
    ]  # fmt: skip
    for payload, expected in cases:
        raw = orjson.dumps(payload)
        r = send(client, raw)
        assert r.status_code == 200, r.text
        reserved = parse_amount(r.headers["x-resgov-reserved"])
        assert reserved == expected(raw), payload
        usage = r.json()["usage"]
        assert sim_cost(usage["prompt_tokens"], usage["completion_tokens"]) <= reserved
        if "n" in payload:
            assert len(r.json()["choices"]) == payload["n"]
            assert sim_chat_bodies(sim)[-1]["n"] == payload["n"]
    assert proxy.ledger.reserved_total() == 0


def test_image_part_with_an_escaped_type_is_still_bounded_as_an_image(
    proxy: Proxy, client: httpx.Client, sim: SimUpstreamThread
) -> None:
    """JSON allows ``\\u0069`` for ``i``: the same image part, spelled differently on the wire,
    must be reserved at the image ceiling (16,384 tokens), not at the bytes of its URL.

    ResGov only looks for media parts when the raw body contains ``"image`` (and a few other
    hints); escaping one letter of the type and of the key hides the part from that check.
    """
    raw = (
        b'{"model":"gpt-sim","max_tokens":10,"messages":[{"role":"user","content":['
        b'{"type":"text","text":"what is this?"},'
        b'{"type":"\\u0069mage_url","\\u0069mage_url":{"url":"https://x.test/cat.png"}}]}]}'
    )
    assert b'"image' not in raw
    assert orjson.loads(raw)["messages"][0]["content"][1]["type"] == "image_url"
    r = send(client, raw)
    assert r.status_code == 200, r.text
    reserved = parse_amount(r.headers["x-resgov-reserved"])
    assert reserved >= sim_cost(16_384, 10), "an image part escaped on the wire escaped the image ceiling"


# --- fuzz: whatever arrives, never a 5xx -------------------------------------------------------

json_scalar = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=20),
)  # fmt: skip
json_value = st.recursive(
    json_scalar, lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner,
                                                                                      max_size=4)),
    max_leaves=12,
)  # fmt: skip
field_value = st.one_of(json_value, st.integers(min_value=-5, max_value=5000))
request_like = st.fixed_dictionaries(
    {},
    optional={
        "model": st.one_of(st.just("gpt-sim"), st.just("sim/gpt-sim"), json_value),
        "messages": st.one_of(
            st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "tool"])},
                                           optional={"content": json_value, "name": json_value}), max_size=3),
            json_value,
        ),
        "max_tokens": field_value, "max_completion_tokens": field_value, "n": field_value,
        "stream": st.one_of(st.booleans(), json_value), "stream_options": json_value, "tools": json_value,
        "tool_choice": json_value, "prediction": json_value, "web_search_options": json_value,
    },
)  # fmt: skip


@given(st.one_of(request_like.map(orjson.dumps), json_value.map(orjson.dumps), st.binary(max_size=64)))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_random_json_never_gets_a_5xx(proxy: Proxy, client: httpx.Client, raw: bytes) -> None:
    r = send(client, raw)
    assert r.status_code < 500, (r.status_code, r.text, raw)
    assert r.headers["content-type"].startswith(("application/json", "text/event-stream"))
    if r.status_code >= 400:
        assert "error" in r.json()


def test_ledger_is_clean_after_all_of_it(proxy: Proxy) -> None:
    proxy.ledger.check_invariants()
