"""``/v1/messages`` and chat ⇄ messages translation, end to end: the official SDKs against a
real ResGov on loopback and the simulator speaking each provider's wire format.

The routes are the app's own (``server/app.py``): ``/v1/messages`` and the chat route with
a translating adapter per foreign upstream format. A translating adapter parses the
request itself, so its checks and the bound of the translated request happen before the
reservation.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import anthropic
import httpx
import httpx2
import openai
import orjson
import pytest

from resgov.config.rgf import parse_policy
from resgov.core.bounds import input_bound
from resgov.core.money import NANO
from resgov.core.policy import ProviderPolicy
from resgov.core.pricing import ModelPrice, Usage, bound_cost, usage_cost
from resgov.providers.anthropic import Messages, usage_from_anthropic
from resgov.providers.base import Adapter
from resgov.providers.openai import usage_from_openai
from resgov.providers.translate import ChatToMessages
from resgov.simulator.upstream import RecordedRequest, SimConfig, SimUpstreamThread
from tests.helpers import Proxy

ANTH_KEY_ENV = "RESGOV_TEST_ANTH_KEY"
ANTH_KEY = "sk-ant-test-provider-key"
SIM_KEY_ENV = "RESGOV_TEST_SIM_KEY"
SIM_KEY = "sk-openai-test-provider-key"
CLAUDE = "anth/claude-sim"
GPT = "sim/gpt-sim"
N_CALLS = 3

WEATHER_CHAT_TOOL: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather for a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
WEATHER_TOOL: Any = {
    "name": "get_weather",
    "description": "Weather for a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


def policy_text(sim_url: str, budgets: dict[str, Decimal]) -> str:
    agents = "\n".join(f"[agents.{name}]\ndaily_budget = {amount}\n" for name, amount in budgets.items())
    return f"""
[global]
currency = "USD"
default_provider = "sim"

[providers.sim]
base_url = "{sim_url}/v1"
api_key_env = "{SIM_KEY_ENV}"
format = "openai"
first_byte_timeout = 5
idle_timeout = 2

[providers.anth]
base_url = "{sim_url}"
api_key_env = "{ANTH_KEY_ENV}"
format = "anthropic"
first_byte_timeout = 5
idle_timeout = 2

[models."{CLAUDE}"]
input_per_mtok = 3.00
output_per_mtok = 15.00
cache_read_per_mtok = 0.30
cache_write_per_mtok = 3.75

[models."{GPT}"]
input_per_mtok = 1.00
output_per_mtok = 4.00

[agents.claude]
daily_budget = 50
{agents}
"""


def install_routes(proxy: Proxy) -> None:
    """The app registers the routes itself; kept so each test states what it relies on."""
    for path in ("/v1/messages", "/v1/chat/completions", "/chat/completions"):
        assert ("POST", path) in proxy.app.routes


@pytest.fixture(autouse=True)
def provider_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ANTH_KEY_ENV, ANTH_KEY)
    monkeypatch.setenv(SIM_KEY_ENV, SIM_KEY)


@pytest.fixture
def sim() -> Iterator[SimUpstreamThread]:
    with SimUpstreamThread(SimConfig(chunks=12)) as upstream:
        yield upstream


@pytest.fixture
def proxy(tmp_path: Path, sim: SimUpstreamThread) -> Iterator[Proxy]:
    with Proxy(tmp_path, policy_text(sim.base_url, {})) as p:
        install_routes(p)
        yield p


def price_of(model: str, sim: SimUpstreamThread) -> ModelPrice:
    policy = parse_policy(policy_text(sim.base_url, {}), "test.rgf")
    provider, upstream_model = policy.route(model)
    price = policy.prices.lookup(model, provider.name, upstream_model, provider.base_url)
    assert price is not None
    return price


def anthropic_client(proxy: Proxy, key: str, agent: str = "claude", **kw: Any) -> anthropic.Anthropic:
    return anthropic.Anthropic(
        base_url=proxy.url,
        api_key=key,
        default_headers={"X-ResGov-Agent-ID": agent},
        max_retries=0,
        **kw,
    )


def openai_client(proxy: Proxy, key: str, agent: str = "claude", **kw: Any) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=f"{proxy.url}/v1",
        api_key=key,
        default_headers={"X-ResGov-Agent-ID": agent},
        max_retries=0,
        **kw,
    )


def capturing() -> tuple[httpx2.Client, list[bytes]]:
    """An HTTP client for the SDKs that keeps the exact request bodies they send."""
    bodies: list[bytes] = []

    def hook(request: httpx2.Request) -> None:
        bodies.append(request.read())

    return httpx2.Client(event_hooks={"request": [hook]}), bodies


def upstream_requests(sim: SimUpstreamThread, suffix: str) -> list[RecordedRequest]:
    return [r for r in list(sim.stats.requests) if r.path.endswith(suffix)]


def assert_upstream_auth(request: RecordedRequest, resgov_key: str, fmt: str) -> None:
    """The provider's key, the provider's way; never ResGov's key or headers."""
    headers = request.headers
    if fmt == "anthropic":
        assert headers["x-api-key"] == ANTH_KEY
        assert headers["anthropic-version"]
        assert "authorization" not in headers
    else:
        assert headers["authorization"] == f"Bearer {SIM_KEY}"
        assert "x-api-key" not in headers
    assert not any(resgov_key in value for value in headers.values())
    assert not any(name.startswith("x-resgov-") for name in headers)


def audit_actuals(proxy: Proxy, agent: str) -> list[tuple[str, int]]:
    return [(a["status"], a["actual"]) for a in proxy.ledger.audit() if a["agent"] == agent]


def bound_of(adapter: Adapter, raw: bytes, price: ModelPrice) -> int:
    """The documented worst case of a text-only request (what ResGov must reserve)."""
    req = adapter.parse(raw)
    assert req.output_cap is not None
    tokens = input_bound(req.raw_size, req.media_root, req.message_count, bool(req.tools), None).tokens
    return bound_cost(price, tokens, req.output_cap * req.n, req.web_searches or 0)


def body_of(error: anthropic.APIStatusError | openai.APIStatusError) -> Any:
    """The parsed JSON error body an SDK exception carries."""
    return error.body


def dumped(models: Any) -> Any:
    """SDK response objects as the plain dicts a follow-up request sends back."""
    return [m.model_dump(exclude_none=True) for m in models]


def nano(header: str) -> int:
    return int(Decimal(header) * NANO)


# --- Anthropic SDK on /v1/messages → Anthropic-format provider ---------------------------------------


def test_anthropic_sdk_non_stream(proxy: Proxy, sim: SimUpstreamThread) -> None:
    key = proxy.key()
    http, bodies = capturing()
    client = anthropic_client(proxy, key, http_client=http)
    raw = client.messages.with_raw_response.create(
        model=CLAUDE,
        max_tokens=100,
        system="You are terse.",
        messages=[{"role": "user", "content": "Hello there"}],
    )
    message = raw.parse()
    assert message.type == "message"
    assert message.content[0].type == "text" and message.content[0].text
    assert message.stop_reason == "end_turn"
    assert message.usage.input_tokens > 0 and message.usage.output_tokens == 12
    price = price_of(CLAUDE, sim)
    usage = usage_from_anthropic(message.usage.model_dump())
    assert usage is not None
    expected = usage_cost(price, usage)
    assert nano(raw.headers["x-resgov-cost"]) == expected
    assert nano(raw.headers["x-resgov-reserved"]) == bound_of(Messages(), bodies[0], price)
    assert orjson.loads(raw.http_response.content)["resgov_cost"]["estimated"] is False

    (upstream,) = upstream_requests(sim, "/v1/messages")
    assert_upstream_auth(upstream, key, "anthropic")
    assert upstream.body["model"] == "claude-sim"
    assert upstream.body["max_tokens"] == 100
    assert upstream.body["system"] == "You are terse."
    assert audit_actuals(proxy, "claude") == [("completed", expected)]
    proxy.ledger.check_invariants()


@pytest.mark.parametrize("split", [False, True])
def test_anthropic_sdk_stream(proxy: Proxy, sim: SimUpstreamThread, split: bool) -> None:
    key = proxy.key()
    client = anthropic_client(proxy, key)
    headers = {"X-Sim-Split-Sse": "true"} if split else {}
    with client.messages.stream(
        model=CLAUDE,
        max_tokens=200,
        messages=[{"role": "user", "content": "Stream me something"}],
        extra_headers=headers,
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "tok " * 12
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens == 12 and final.usage.input_tokens > 0
    usage = usage_from_anthropic(final.usage.model_dump())
    assert usage is not None
    assert audit_actuals(proxy, "claude") == [("completed", usage_cost(price_of(CLAUDE, sim), usage))]
    (upstream,) = upstream_requests(sim, "/v1/messages")
    assert_upstream_auth(upstream, key, "anthropic")
    assert upstream.body["stream"] is True
    proxy.ledger.check_invariants()


def test_anthropic_sdk_tool_use_round_trip(proxy: Proxy, sim: SimUpstreamThread) -> None:
    client = anthropic_client(proxy, proxy.key())
    message = client.messages.create(
        model=CLAUDE,
        max_tokens=100,
        tools=[WEATHER_TOOL],
        messages=[{"role": "user", "content": "Weather in Oslo?"}],
        extra_headers={"X-Sim-Tool-Call": "true"},
    )
    assert message.stop_reason == "tool_use"
    (block,) = message.content
    assert block.type == "tool_use" and block.name == "get_weather"
    with client.messages.stream(
        model=CLAUDE,
        max_tokens=100,
        tools=[WEATHER_TOOL],
        messages=[{"role": "user", "content": "Weather in Oslo?"}],
        extra_headers={"X-Sim-Tool-Call": "true"},
    ) as stream:
        final = stream.get_final_message()
    assert final.content[0].type == "tool_use" and final.content[0].input == block.input
    proxy.ledger.check_invariants()


def test_anthropic_route_refusals_use_anthropic_envelope(proxy: Proxy, sim: SimUpstreamThread) -> None:
    key = proxy.key()
    client = anthropic_client(proxy, key)
    # max_tokens is required by the Messages API: a clear 400, nothing reserved or sent.
    r = httpx.post(
        f"{proxy.url}/v1/messages",
        headers={"x-api-key": key, "X-ResGov-Agent-ID": "claude", "anthropic-version": "2023-06-01"},
        json={"model": CLAUDE, "messages": [{"role": "user", "content": "hi"}]},
    )
    assert r.status_code == 400
    assert r.json()["type"] == "error"
    assert "max_tokens" in r.json()["error"]["message"]
    with pytest.raises(anthropic.AuthenticationError):
        anthropic_client(proxy, "rgf_not_a_key").messages.create(
            model=CLAUDE, max_tokens=10, messages=[{"role": "user", "content": "hi"}]
        )
    # The upstream's own errors reach the client in Anthropic's shape, with its status.
    with pytest.raises(anthropic.RateLimitError) as info:
        client.messages.create(
            model=CLAUDE,
            max_tokens=10,
            messages=[{"role": "user", "content": "hi"}],
            extra_headers={"X-Sim-Error-Status": "429"},
        )
    assert body_of(info.value)["error"]["type"] == "rate_limit_error"
    assert not upstream_requests(sim, "/chat/completions")
    proxy.ledger.check_invariants()


@pytest.mark.parametrize(
    "fields",
    [
        {"tools": [{"type": "code_execution_20250825", "name": "code_execution"}]},
        {"mcp_servers": [{"type": "url", "url": "https://mcp.example", "name": "gh"}]},
    ],
)
def test_server_tools_whose_cost_nothing_bounds_are_refused_never_sent(
    proxy: Proxy, sim: SimUpstreamThread, fields: dict[str, Any]
) -> None:
    # Their output (program output, MCP tool results) is billed as input of any size: no bound,
    # so a budget could not hold. Refused before anything is reserved; nothing reaches upstream.
    key = proxy.key()
    headers = {"x-api-key": key, "X-ResGov-Agent-ID": "claude", "anthropic-version": "2023-06-01"}
    message = {"model": CLAUDE, "max_tokens": 50, "messages": [{"role": "user", "content": "run it"}]}
    r = httpx.post(f"{proxy.url}/v1/messages", headers=headers, json={**message, **fields})
    assert r.status_code == 403, r.text
    error = r.json()["error"]
    assert r.json()["type"] == "error" and error["reason"] == "unbounded_cost"
    assert error["agent_id"] == "claude"
    assert not upstream_requests(sim, "/v1/messages")
    refusal = [a for a in proxy.ledger.audit() if a["request_id"] == r.headers["x-resgov-request-id"]]
    assert [(a["status"], a["reason"], a["actual"]) for a in refusal] == [("denied", "unbounded_cost", 0)]
    proxy.ledger.check_invariants()


def test_web_fetch_is_bounded_by_its_limits_or_refused(proxy: Proxy, sim: SimUpstreamThread) -> None:
    key = proxy.key()
    headers = {"x-api-key": key, "X-ResGov-Agent-ID": "claude", "anthropic-version": "2023-06-01"}
    fetch = {"type": "web_fetch_20250910", "name": "web_fetch", "max_uses": 2}
    message = {"model": CLAUDE, "max_tokens": 50, "messages": [{"role": "user", "content": "read it"}]}
    # Without max_content_tokens nothing bounds the pages it brings in: refused, never sent.
    r = httpx.post(f"{proxy.url}/v1/messages", headers=headers, json={**message, "tools": [fetch]})
    assert r.status_code == 403
    assert r.json()["type"] == "error" and r.json()["error"]["reason"] == "unbounded_cost"
    assert not upstream_requests(sim, "/v1/messages")
    # With both limits, up to max_uses pages of max_content_tokens are reserved as input.
    body = orjson.dumps({**message, "tools": [{**fetch, "max_content_tokens": 8_000}]})
    r = httpx.post(
        f"{proxy.url}/v1/messages", headers={**headers, "content-type": "application/json"}, content=body
    )
    assert r.status_code == 200, r.text
    price = price_of(CLAUDE, sim)
    reserved = nano(r.headers["x-resgov-reserved"])
    assert reserved == bound_of(Messages(), body, price)
    pages = bound_cost(price, 2 * 8_000, 0) - bound_cost(price, 0, 0)
    assert reserved >= bound_of(Messages(), orjson.dumps(message), price) + pages
    assert [s for s, _ in audit_actuals(proxy, "claude")] == ["denied", "completed"]
    proxy.ledger.check_invariants()


def test_anthropic_stream_cut_midway_is_charged_estimated(proxy: Proxy, sim: SimUpstreamThread) -> None:
    client = anthropic_client(proxy, proxy.key())
    with pytest.raises(anthropic.APIError):  # noqa: SIM117 - the error may come from either
        with client.messages.stream(
            model=CLAUDE,
            max_tokens=100,
            messages=[{"role": "user", "content": "hi"}],
            extra_headers={"X-Sim-Cut-After-Chunks": "3"},
        ) as stream:
            for _ in stream.text_stream:
                pass
    ((status, actual),) = audit_actuals(proxy, "claude")
    assert status == "estimated" and actual > 0
    proxy.ledger.check_invariants()


def test_anthropic_budget_allows_exactly_the_calls_that_fit(tmp_path: Path, sim: SimUpstreamThread) -> None:
    params: dict[str, Any] = {
        "model": CLAUDE,
        "max_tokens": 300,
        "messages": [{"role": "user", "content": "Count to three."}],
    }
    # The exact body the SDK sends and what the provider bills for it, learned directly.
    http, bodies = capturing()
    direct = anthropic.Anthropic(base_url=sim.base_url, api_key="x", max_retries=0, http_client=http)
    usage = usage_from_anthropic(direct.messages.create(**params).usage.model_dump())
    assert usage is not None
    price = price_of(CLAUDE, sim)
    bound, cost = bound_of(Messages(), bodies[0], price), usage_cost(price, usage)
    assert cost < bound
    # Room for N-1 actual calls and one more worst case, and not for another worst case.
    budget = Decimal((N_CALLS - 1) * cost + bound + cost // 2) / NANO
    sim.stats.reset()
    with Proxy(tmp_path, policy_text(sim.base_url, {"tight": budget})) as proxy:
        install_routes(proxy)
        client = anthropic_client(proxy, proxy.key(), agent="tight")
        for _ in range(N_CALLS):
            client.messages.create(**params)
        with pytest.raises(anthropic.PermissionDeniedError) as info:
            client.messages.create(**params)
        error = body_of(info.value)["error"]
        assert info.value.status_code == 403
        assert body_of(info.value)["type"] == "error"
        assert error["type"] == "budget_exceeded"
        assert error["agent_id"] == "tight"
        assert error["message"].startswith("Daily budget exceeded.")
        assert len(upstream_requests(sim, "/v1/messages")) == N_CALLS
        assert proxy.ledger.spent("default", "a:tight:") == N_CALLS * cost
        assert [s for s, _ in audit_actuals(proxy, "tight")] == ["completed"] * N_CALLS + ["denied"]
        proxy.ledger.check_invariants()


# --- Anthropic SDK on /v1/messages → OpenAI-format provider (MessagesToChat) ------------------------


def test_anthropic_sdk_to_openai_provider(proxy: Proxy, sim: SimUpstreamThread) -> None:
    key = proxy.key()
    client = anthropic_client(proxy, key)
    message = client.messages.create(
        model=GPT, max_tokens=50, system="Be brief.", messages=[{"role": "user", "content": "hi"}]
    )
    assert message.content[0].type == "text" and message.content[0].text == "tok " * 12
    assert message.stop_reason == "end_turn"
    with client.messages.stream(
        model=GPT,
        max_tokens=50,
        messages=[{"role": "user", "content": "hi"}],
        extra_headers={"X-Sim-Split-Sse": "true"},
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == "tok " * 12
    assert final.usage.output_tokens == 12 and final.usage.input_tokens > 0
    tool_msg = client.messages.create(
        model=GPT,
        max_tokens=50,
        tools=[WEATHER_TOOL],
        messages=[{"role": "user", "content": "Weather?"}],
        extra_headers={"X-Sim-Tool-Call": "true"},
    )
    assert tool_msg.stop_reason == "tool_use"
    assert tool_msg.content[0].type == "tool_use" and tool_msg.content[0].name == "get_weather"
    # ...and the tool result goes back as a tool message.
    follow = client.messages.create(
        model=GPT,
        max_tokens=50,
        tools=[WEATHER_TOOL],
        messages=[
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": dumped(tool_msg.content)},
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": tool_msg.content[0].id, "content": "9C"}],
            },
        ],
    )
    assert follow.content[0].type == "text"
    chats = upstream_requests(sim, "/chat/completions")
    assert len(chats) == 4
    for request in chats:
        assert_upstream_auth(request, key, "openai")
    assert chats[0].body["messages"][0] == {"role": "system", "content": "Be brief."}
    assert chats[1].body["stream_options"] == {"include_usage": True}
    assert chats[3].body["messages"][-1] == {
        "role": "tool",
        "tool_call_id": tool_msg.content[0].id,
        "content": "9C",
    }
    price = price_of(GPT, sim)
    usage = usage_from_anthropic(final.usage.model_dump())
    assert usage is not None
    assert audit_actuals(proxy, "claude")[1] == ("completed", usage_cost(price, usage))
    with pytest.raises(anthropic.InternalServerError) as info:
        client.messages.create(
            model=GPT,
            max_tokens=5,
            messages=[{"role": "user", "content": "hi"}],
            extra_headers={"X-Sim-Error-Status": "500"},
        )
    assert body_of(info.value)["error"]["type"] == "api_error"
    proxy.ledger.check_invariants()


# --- OpenAI SDK on /v1/chat/completions → Anthropic-format provider (ChatToMessages) ------------------


def test_openai_sdk_to_anthropic_provider(proxy: Proxy, sim: SimUpstreamThread) -> None:
    key = proxy.key()
    client = openai_client(proxy, key)
    # The brief's CrewAI snippet: "openai/anthropic/claude-..." sends "anthropic/claude-..." here.
    completion = client.chat.completions.create(
        model=CLAUDE,
        messages=[{"role": "system", "content": "Be terse."}, {"role": "user", "content": "hi"}],
        max_tokens=60,
    )
    choice = completion.choices[0]
    assert choice.message.content == "tok " * 12
    assert choice.finish_reason == "stop"
    assert completion.usage is not None and completion.usage.completion_tokens == 12
    stream = client.chat.completions.create(
        model=CLAUDE,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=60,
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"X-Sim-Split-Sse": "true"},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "tok " * 12
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        "stop"
    ]
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == [] and usage_chunk.usage is not None
    assert usage_chunk.usage.completion_tokens == 12
    # Without include_usage the client gets no usage chunk.
    plain = list(
        client.chat.completions.create(
            model=CLAUDE, messages=[{"role": "user", "content": "hi"}], stream=True
        )
    )
    assert all(c.usage is None for c in plain) and all(c.choices for c in plain)

    messages = upstream_requests(sim, "/v1/messages")
    assert len(messages) == 3
    for request in messages:
        assert_upstream_auth(request, key, "anthropic")
    assert messages[0].body["system"] == [{"type": "text", "text": "Be terse."}]
    assert messages[0].body["max_tokens"] == 60
    assert messages[0].body["model"] == "claude-sim"
    # No max_tokens from the client: ResGov's default cap is what Anthropic requires.
    assert messages[2].body["max_tokens"] == 4096
    price = price_of(CLAUDE, sim)
    expected = [
        usage_cost(price, Usage(input_tokens=completion.usage.prompt_tokens, output_tokens=12)),
        usage_cost(price, Usage(input_tokens=usage_chunk.usage.prompt_tokens, output_tokens=12)),
    ]
    assert audit_actuals(proxy, "claude")[:2] == [("completed", c) for c in expected]
    proxy.ledger.check_invariants()


def test_openai_sdk_tool_call_round_trip_through_anthropic(proxy: Proxy, sim: SimUpstreamThread) -> None:
    client = openai_client(proxy, proxy.key())
    tool_headers = {"X-Sim-Tool-Call": "true"}
    ask: list[Any] = [{"role": "user", "content": "Weather in Oslo?"}]
    completion = client.chat.completions.create(
        model=CLAUDE,
        messages=ask,
        tools=[WEATHER_CHAT_TOOL],
        max_tokens=60,
        extra_headers=tool_headers,
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls is not None
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    arguments = json.loads(call.function.arguments)  # type: ignore[union-attr]
    assert isinstance(arguments, dict)

    stream = client.chat.completions.create(
        model=CLAUDE,
        messages=ask,
        tools=[WEATHER_CHAT_TOOL],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=60,
        stream=True,
        extra_headers=tool_headers,
    )
    calls: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in stream:
        for delta_call in chunk.choices[0].delta.tool_calls or []:
            entry = calls.setdefault(delta_call.index, {"id": "", "name": "", "arguments": ""})
            entry["id"] += delta_call.id or ""
            if delta_call.function is not None:
                entry["name"] += delta_call.function.name or ""
                entry["arguments"] += delta_call.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    assert calls[0]["name"] == "get_weather" and calls[0]["id"].startswith("toolu_")
    assert json.loads(calls[0]["arguments"]) == arguments

    # The tool result goes back through the same route: Anthropic sees tool_use + tool_result.
    follow = client.chat.completions.create(
        model=CLAUDE,
        tools=[WEATHER_CHAT_TOOL],
        max_tokens=60,
        messages=[
            *ask,
            dumped([choice.message])[0],
            {"role": "tool", "tool_call_id": call.id, "content": "9C and clear"},
        ],
    )
    assert follow.choices[0].message.content == "tok " * 12
    sent = upstream_requests(sim, "/v1/messages")
    assert sent[1].body["tool_choice"] == {"type": "tool", "name": "get_weather"}
    assert sent[2].body["messages"][1]["content"] == [
        {"type": "tool_use", "id": call.id, "name": "get_weather", "input": arguments}
    ]
    assert sent[2].body["messages"][2]["content"] == [
        {"type": "tool_result", "tool_use_id": call.id, "content": "9C and clear"}
    ]
    assert sent[0].body["tools"] == [
        {
            "name": "get_weather",
            "description": "Weather for a city",
            "input_schema": WEATHER_CHAT_TOOL["function"]["parameters"],
        }
    ]
    proxy.ledger.check_invariants()


def test_openai_sdk_errors_through_anthropic(proxy: Proxy, sim: SimUpstreamThread) -> None:
    client = openai_client(proxy, proxy.key())
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(
            model=CLAUDE,
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=5,
            extra_headers={"X-Sim-Error-Status": "429"},
        )
    assert body_of(info.value)["type"] == "rate_limit_error"
    with pytest.raises(openai.UnprocessableEntityError):
        client.chat.completions.create(model=CLAUDE, messages=[{"role": "user", "content": "hi"}], n=2)
    assert len(upstream_requests(sim, "/v1/messages")) == 1
    assert [s for s, _ in audit_actuals(proxy, "claude")] == ["upstream_error", "rejected"]
    proxy.ledger.check_invariants()


def test_chat_budget_through_translation_allows_exactly_the_calls_that_fit(
    tmp_path: Path, sim: SimUpstreamThread
) -> None:
    params: dict[str, Any] = {
        "model": CLAUDE,
        "max_tokens": 250,
        "messages": [
            {"role": "system", "content": "Be terse."},
            {"role": "user", "content": "Count to three."},
        ],
    }
    # The exact body the OpenAI SDK sends (captured against the simulator's chat route)...
    http, bodies = capturing()
    openai.OpenAI(
        base_url=f"{sim.base_url}/v1", api_key="x", max_retries=0, http_client=http
    ).chat.completions.create(**params)
    adapter = ChatToMessages()
    price = price_of(CLAUDE, sim)
    # Reserved: the bound of the request as translated.
    bound = bound_of(adapter, bodies[0], price)
    # ...and what Anthropic bills for its translation.
    provider = ProviderPolicy(name="anth", base_url=sim.base_url, format="anthropic")
    path, upstream_body = adapter.build_upstream(adapter.parse(bodies[0]), 250, "claude-sim", provider)
    answer = httpx.post(
        sim.base_url + path, content=upstream_body, headers={"content-type": "application/json"}
    )
    usage = usage_from_anthropic(answer.json()["usage"])
    assert usage is not None
    cost = usage_cost(price, usage)
    budget = Decimal((N_CALLS - 1) * cost + bound + cost // 2) / NANO
    sim.stats.reset()
    with Proxy(tmp_path, policy_text(sim.base_url, {"tight": budget})) as proxy:
        install_routes(proxy)
        client = openai_client(proxy, proxy.key(), agent="tight")
        for _ in range(N_CALLS):
            raw = client.chat.completions.with_raw_response.create(**params)
            assert nano(raw.headers["x-resgov-reserved"]) == bound
            assert nano(raw.headers["x-resgov-cost"]) == cost
            completion = raw.parse()
            assert completion.usage is not None
            assert usage_from_openai(completion.usage.model_dump()) is not None
        with pytest.raises(openai.PermissionDeniedError) as info:
            client.chat.completions.create(**params)
        assert info.value.status_code == 403
        assert body_of(info.value)["type"] == "budget_exceeded"
        assert len(upstream_requests(sim, "/v1/messages")) == N_CALLS
        assert proxy.ledger.spent("default", "a:tight:") == N_CALLS * cost
        proxy.ledger.check_invariants()


def test_chat_route_still_serves_openai_providers(proxy: Proxy, sim: SimUpstreamThread) -> None:
    """Registering the translation leaves same-format forwarding as it was."""
    client = openai_client(proxy, proxy.key())
    completion = client.chat.completions.create(
        model=GPT, messages=[{"role": "user", "content": "hi"}], max_tokens=20
    )
    assert completion.choices[0].message.content == "tok " * 12
    assert not upstream_requests(sim, "/v1/messages")
    proxy.ledger.check_invariants()
